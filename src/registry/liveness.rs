//! Which machines are alive and which ones the store still remembers without
//! a live presence, for `flotilla cluster health`.
//!
//! A machine's presence record lives on its lease and vanishes when the lease
//! expires (host down, cut off longer than its TTL, or retired). Its claim
//! generation key and its drain mark do not: they outlive the lease, so they
//! name the machines that were here and no longer are.
//!
//! A live machine whose last renewal is overdue (two renewals missed) is
//! named too: it is about to lose its units. When each machine last renewed
//! comes from [`last_renewals`]: the member's own view of its presence
//! lease, or the renewal stamp agents of the first release write.
//!
//! Reads are serializable (this member's state, no leader needed): a health
//! report must still say something when the cluster has lost its quorum.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::RegistryError;
use super::keys::{self, MachineKey};
use super::reader::Reader;
use super::records::{self, Renewal};
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::KeyValue;
use crate::consensus::node::LeaseRenewal;

/// A machine the store knows whose presence lease has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpiredMachine {
    /// Its machine id.
    pub machine: String,
    /// Whether it is drained (an operator took it out on purpose).
    pub drained: bool,
    /// Units still proposed to it (the scheduler moves them after its bound).
    pub proposals: usize,
}

/// A live machine that has missed renewals: its lease runs out soon unless
/// it is heard of again (host overloaded, cut off, or its agent stuck).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverdueMachine {
    /// Its machine id.
    pub machine: String,
    /// Seconds since its last renewal.
    pub renewed_secs_ago: u64,
    /// Its presence lease's TTL in seconds.
    pub ttl_secs: u64,
}

/// The machines, as their presence leases say: alive or expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Liveness {
    /// Machines with a live presence.
    pub live: Vec<String>,
    /// Live machines whose last renewal is overdue ([`Renewal::is_overdue`]).
    pub overdue: Vec<OverdueMachine>,
    /// Machines without one that the store still remembers.
    pub expired: Vec<ExpiredMachine>,
}

/// Reads which machines are live (and which of those are overdue, by this
/// host's clock) and which have expired.
pub async fn liveness(client: &Client) -> Result<Liveness, RegistryError> {
    let (machines, _) = client.range(keys::MACHINES, true, true).await?;
    let (stamps, _) = client.range(keys::RENEWALS, true, true).await?;
    let renewals = last_renewals(client, &machines, &stamps).await?;
    let (drains, _) = client.range(keys::DRAIN, true, true).await?;
    let (per_machine, _) = client.range(keys::PER_MACHINE, true, true).await?;
    let live: BTreeSet<String> = machines
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::MACHINES))
        .map(str::to_string)
        .collect();
    let drained: BTreeSet<&str> = drains
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::DRAIN))
        .collect();
    let mut known: BTreeMap<String, usize> = drained.iter().map(|id| (id.to_string(), 0)).collect();
    for kv in &per_machine {
        match keys::parse_machine_key(&kv.key) {
            Some(MachineKey::Proposal(id, _)) => *known.entry(id).or_default() += 1,
            Some(MachineKey::Claim(id, _) | MachineKey::Generation(id)) => {
                known.entry(id).or_default();
            }
            None => {}
        }
    }
    let expired = known
        .into_iter()
        .filter(|(id, _)| !live.contains(id))
        .map(|(id, proposals)| ExpiredMachine {
            drained: drained.contains(id.as_str()),
            machine: id,
            proposals,
        })
        .collect();
    let now_ms = now_ms();
    let overdue = renewals
        .iter()
        .filter(|(id, renewal)| live.contains(*id) && renewal.is_overdue(now_ms))
        .map(|(id, renewal)| OverdueMachine {
            machine: id.clone(),
            renewed_secs_ago: now_ms.saturating_sub(renewal.at_ms) / 1000,
            ttl_secs: renewal.ttl_ms / 1000,
        })
        .collect();
    Ok(Liveness {
        live: live.into_iter().collect(),
        overdue,
        expired,
    })
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// When each live machine (`machines`: their presence records as read)
/// last renewed its presence, by machine id, given the renewal `stamps`
/// read with them.
///
/// A renewal is a keep-alive of the presence lease and nothing more: the
/// member `registry` asks says how long ago it applied each lease's
/// last one ([`Client::lease_renewals`]). A machine whose agent is of the
/// first release also stamps each renewal (`renewed/<id>`); a stamp, where
/// there is one, is used as it stands. A member of the first release cannot
/// say, and then the stamps are all there is.
pub async fn last_renewals(
    registry: &impl Reader,
    machines: &[KeyValue],
    stamps: &[KeyValue],
) -> Result<BTreeMap<String, Renewal>, RegistryError> {
    let seen = match registry.lease_renewals().await {
        Ok(seen) => seen,
        Err(ClientError::Refused(why)) => {
            tracing::debug!("the member cannot say when leases were renewed ({why}); stamps only");
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    Ok(merge_renewals(machines, stamps, &seen, now_ms()))
}

/// [`last_renewals`]' choice, at `now_ms`: each machine's stamp if it has
/// one, else the member's view of the lease its presence record is on.
fn merge_renewals(
    machines: &[KeyValue],
    stamps: &[KeyValue],
    seen: &[LeaseRenewal],
    now_ms: u64,
) -> BTreeMap<String, Renewal> {
    let seen: BTreeMap<_, _> = seen.iter().map(|r| (r.id, r)).collect();
    let mut renewals: BTreeMap<String, Renewal> = machines
        .iter()
        .filter_map(|kv| {
            let id = kv.key.strip_prefix(keys::MACHINES)?;
            let lease = seen.get(&kv.lease?).copied();
            Some((id.to_string(), renewal_of(lease, None, now_ms)?))
        })
        .collect();
    for kv in stamps {
        if let Some(id) = kv.key.strip_prefix(keys::RENEWALS)
            && let Ok(stamp) = records::decode::<Renewal>(&kv.key, &kv.value)
        {
            renewals.insert(id.to_string(), stamp);
        }
    }
    renewals
}

/// When one machine last renewed, at `now_ms`: its renewal `stamp` if it
/// has one, else the member's view of its presence `lease`, if it saw a
/// keep-alive of it.
pub fn renewal_of(
    lease: Option<&LeaseRenewal>,
    stamp: Option<Renewal>,
    now_ms: u64,
) -> Option<Renewal> {
    stamp.or_else(|| {
        let lease = lease?;
        Some(Renewal {
            at_ms: now_ms.saturating_sub(lease.renewed_ms_ago?),
            ttl_ms: lease.ttl_ms,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: String, value: Vec<u8>, lease: Option<u64>) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease,
        }
    }

    #[test]
    fn a_renewal_is_the_members_view_of_the_lease_unless_an_agent_stamped_it() {
        let machines = [
            kv(keys::machine("new"), b"{}".to_vec(), Some(7)),
            kv(keys::machine("old"), b"{}".to_vec(), Some(8)),
            kv(keys::machine("unseen"), b"{}".to_vec(), Some(9)),
            kv(keys::machine("gone"), b"{}".to_vec(), Some(10)),
        ];
        let stamp = Renewal {
            at_ms: 90_000,
            ttl_ms: 9_000,
        };
        let stamps = [kv(keys::renewal("old"), records::encode(&stamp), Some(8))];
        let seen = |id, renewed_ms_ago| LeaseRenewal {
            id,
            ttl_ms: 6_000,
            renewed_ms_ago,
        };
        let seen = [seen(7, Some(4_500)), seen(8, Some(10)), seen(9, None)];
        let merged = merge_renewals(&machines, &stamps, &seen, 100_000);
        assert_eq!(
            merged,
            BTreeMap::from([
                (
                    "new".to_string(),
                    Renewal {
                        at_ms: 95_500,
                        ttl_ms: 6_000
                    }
                ),
                ("old".to_string(), stamp),
            ])
        );
        // Two renewals (2 s each) missed: overdue, by the member's view.
        assert!(merged["new"].is_overdue(100_000));
        assert!(!merged["new"].is_overdue(99_000));
    }
}
