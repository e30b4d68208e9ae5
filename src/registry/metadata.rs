//! Machine metadata set through the API (fleet's `PATCH /fleet/v1/machines`),
//! and how it merges with the metadata a machine publishes itself.
//!
//! A machine's own metadata comes from its configuration and lives in its
//! presence record, which vanishes with its lease. What an operator sets
//! through the API is stored apart, per machine and key
//! ([`super::keys::metadata`]), so it survives the machine leaving and
//! rejoining, as fleet's did. An empty stored value removes the key, even
//! one the machine's configuration sets. Everything that reads a machine's
//! metadata (`list-machines`, the API, the scheduler's placement) reads the
//! merge ([`merge`]), so a patch moves units as a configuration change would.

use std::collections::BTreeMap;

use super::error::RegistryError;
use super::keys;
use super::reader::Reader;
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{KeyValue, Op};

/// The metadata set through the API: machine id → key → value ("" removes).
pub type Dynamic = BTreeMap<String, BTreeMap<String, String>>;

/// One change to one machine's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The machine's id (it need not be present, as in fleet).
    pub machine: String,
    /// The metadata key.
    pub key: String,
    /// The new value; `None` removes the key.
    pub value: Option<String>,
}

/// Reads every value set through the API.
pub async fn dynamic(registry: &impl Reader) -> Result<Dynamic, ClientError> {
    let kvs = registry.read_prefix(keys::METADATA).await?;
    Ok(from_kvs(&kvs))
}

/// The values set through the API, from a read of [`keys::METADATA`].
pub fn from_kvs(kvs: &[KeyValue]) -> Dynamic {
    let mut dynamic = Dynamic::new();
    for kv in kvs {
        if let Some((machine, key)) = keys::parse_metadata_key(&kv.key) {
            dynamic.entry(machine.to_string()).or_default().insert(
                key.to_string(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            );
        }
    }
    dynamic
}

/// A machine's metadata: its own, with what was set through the API on top
/// (an empty value removes the key).
pub fn merge(
    own: &BTreeMap<String, String>,
    set: Option<&BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut merged = own.clone();
    for (key, value) in set.into_iter().flatten() {
        if value.is_empty() {
            merged.remove(key);
        } else {
            merged.insert(key.clone(), value.clone());
        }
    }
    merged
}

/// Applies `changes` in order, all in one transaction: all or nothing.
/// The caller has checked them (keys as [`crate::units::fleet::is_metadata_key`]).
pub async fn apply(client: &Client, changes: &[Change]) -> Result<(), RegistryError> {
    if changes.is_empty() {
        return Ok(());
    }
    let ops = changes
        .iter()
        .map(|c| {
            let value = c.value.clone().unwrap_or_default();
            Op::put(keys::metadata(&c.machine, &c.key), value.into_bytes())
        })
        .collect();
    client.txn(Vec::new(), ops, Vec::new()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn set_values_override_and_empty_ones_remove() {
        let own = map(&[("region", "eu"), ("disk", "ssd")]);
        assert_eq!(merge(&own, None), own);
        let set = map(&[("region", "us"), ("disk", ""), ("rack", "r1"), ("gone", "")]);
        assert_eq!(
            merge(&own, Some(&set)),
            map(&[("region", "us"), ("rack", "r1")])
        );
    }

    #[test]
    fn stored_keys_are_read_per_machine() {
        let kv = |key: String, value: &str| KeyValue {
            key,
            value: value.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: None,
        };
        let kvs = [
            kv(keys::metadata("m1", "region"), "eu"),
            kv(keys::metadata("m1", "disk"), ""),
            kv(keys::metadata("m2", "rack"), "r1"),
            kv("/flotilla/metadata/broken".to_string(), "x"),
        ];
        let dynamic = from_kvs(&kvs);
        assert_eq!(dynamic["m1"], map(&[("region", "eu"), ("disk", "")]));
        assert_eq!(dynamic["m2"], map(&[("rack", "r1")]));
        assert_eq!(dynamic.len(), 2);
    }
}
