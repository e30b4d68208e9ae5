//! The user-facing operations on the registry: what `flotilla submit`, `start`,
//! `stop`, `destroy`, `list-units` and `list-machines` do, over a [`Client`].
//!
//! Each change is one transaction that compares what it read, so two users
//! racing never lose a write: the loser gets an error saying to retry. Bad
//! input (an invalid unit, a name that is not a unit) is refused before
//! anything is written.

use std::collections::{BTreeMap, BTreeSet};

use super::LeaseId;
use super::bodies::BodyCache;
use super::error::RegistryError;
use super::index::{self, Index};
use super::keys::{self, MachineKey};
use super::reader::Reader;
use super::records::{self, DesiredState, MachineRecord, Renewal, ReportedState, UnitRecord};
use crate::consensus::client::{Client, ClientError, KEY_BY_KEY};
use crate::consensus::kv::{Compare, KeyValue, Op};
use crate::consensus::node::LeaseRenewal;
use crate::consensus::protocol::GET_KEYS_MAX;
use crate::units::{Unit, UnitKind, UnitName};

/// What [`submit`] and [`submit_as`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// A new unit.
    Created,
    /// The same body was already there.
    Unchanged,
    /// The body was replaced.
    Replaced,
}

/// What storing a unit does to a stored unit with another body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDifferent {
    /// Refuse: [`RegistryError::Exists`].
    Refuse,
    /// Replace the body, keep the desired state.
    Replace,
    /// Replace the body and set this desired state (fleet's PUT).
    Reset(DesiredState),
}

/// Stores `unit` (its canonical text, which is what `flotilla cat` shows) with
/// desired state `inactive`, or replaces its body when `replace` is set,
/// keeping its desired state.
pub async fn submit(
    client: &Client,
    unit: &Unit,
    replace: bool,
) -> Result<Submitted, RegistryError> {
    let policy = if replace {
        OnDifferent::Replace
    } else {
        OnDifferent::Refuse
    };
    store_unit(client, unit, DesiredState::Inactive, policy).await
}

/// fleet's `PUT /fleet/v1/units/NAME` with options: creates `unit` with
/// desired state `desired`, or, when it exists with another body, replaces
/// the body AND sets `desired`, in one transaction (fleetctl then waits for
/// the old body to stop before it starts the new one). The same body is
/// [`Submitted::Unchanged`] and changes nothing.
pub async fn submit_as(
    client: &Client,
    unit: &Unit,
    desired: DesiredState,
) -> Result<Submitted, RegistryError> {
    store_unit(client, unit, desired, OnDifferent::Reset(desired)).await
}

async fn store_unit(
    client: &Client,
    unit: &Unit,
    created: DesiredState,
    on_different: OnDifferent,
) -> Result<Submitted, RegistryError> {
    let text = unit.file().to_text();
    let name = unit.name();
    let key = keys::unit(name);
    let existing = client.get(&key).await?;
    let current = existing
        .as_ref()
        .map(|kv| records::decode::<UnitRecord>(&kv.key, &kv.value))
        .transpose()?;
    let (record, outcome) = match (current, on_different) {
        (Some(record), _) if record.hash == unit.hash() => return Ok(Submitted::Unchanged),
        (Some(_), OnDifferent::Refuse) => return Err(RegistryError::Exists(name.clone())),
        (Some(record), OnDifferent::Replace) => (
            UnitRecord {
                hash: unit.hash(),
                ..record
            },
            Submitted::Replaced,
        ),
        (Some(record), OnDifferent::Reset(desired)) => (
            UnitRecord {
                hash: unit.hash(),
                desired,
                ..record
            },
            Submitted::Replaced,
        ),
        (None, _) => (
            UnitRecord {
                name: name.clone(),
                hash: unit.hash(),
                desired: created,
            },
            Submitted::Created,
        ),
    };
    let compare = vec![Compare::unchanged(&key, existing.as_ref())];
    let ops = vec![
        Op::put(keys::body(&unit.hash()), text.as_bytes().to_vec()),
        Op::put(key, records::encode(&record)),
    ];
    let (ok, _, _) = client.txn(compare, ops, Vec::new()).await?;
    if !ok {
        return Err(RegistryError::Raced(name.clone()));
    }
    Ok(outcome)
}

/// How many units one transaction of [`set_desired`] changes at most.
const DESIRED_BATCH: usize = 1024;

/// Sets the desired state of every unit in `names`. An instance that was
/// never submitted is made from its submitted template first, as fleet does.
/// Checks every name before writing anything; returns how many changed.
pub async fn set_desired(
    client: &Client,
    names: &[UnitName],
    desired: DesiredState,
) -> Result<usize, RegistryError> {
    for name in names {
        if name.kind() == UnitKind::Template && desired != DesiredState::Inactive {
            return Err(RegistryError::Template(name.clone()));
        }
    }
    let kvs = read_named(client, names).await?;
    let existing: BTreeMap<&str, &KeyValue> = kvs.iter().map(|kv| (kv.key.as_str(), kv)).collect();
    let mut changes = Vec::new();
    let templates = BodyCache::new();
    for name in names {
        let key = keys::unit(name);
        let read = existing.get(key.as_str()).copied();
        let mut ops = Vec::new();
        let record = match read {
            Some(kv) => records::decode::<UnitRecord>(&kv.key, &kv.value)?,
            None => {
                let instance = instantiate(client, name, &existing, &templates).await?;
                ops.push(Op::put(
                    keys::body(&instance.hash()),
                    instance.file().to_text().into_bytes(),
                ));
                UnitRecord {
                    name: name.clone(),
                    hash: instance.hash(),
                    desired: DesiredState::Inactive,
                }
            }
        };
        if record.desired == desired && read.is_some() {
            continue;
        }
        ops.push(Op::put(
            key.clone(),
            records::encode(&UnitRecord { desired, ..record }),
        ));
        changes.push((name.clone(), Compare::unchanged(&key, read), ops));
    }
    let changed = changes.len();
    for batch in changes.chunks(DESIRED_BATCH) {
        let compare = batch.iter().map(|(_, c, _)| c.clone()).collect();
        let ops = batch
            .iter()
            .flat_map(|(_, _, o)| o.iter().cloned())
            .collect();
        let (ok, _, _) = client.txn(compare, ops, Vec::new()).await?;
        if !ok {
            return Err(RegistryError::Raced(batch[0].0.clone()));
        }
    }
    Ok(changed)
}

/// Past this many unit keys, [`set_desired`] reads every unit record in one
/// range instead of the keys it needs.
const NAMED_READS: usize = 4 * GET_KEYS_MAX;

/// The unit records [`set_desired`] needs for `names`: each name's and, for an
/// instance, its template's. Up to [`NAMED_READS`] keys are read by name, in
/// one linearizable round per [`GET_KEYS_MAX`] ([`Client::get_keys`]), so a
/// start call of twenty units neither reads every unit in the cluster (at
/// 15,000 units that capped paced starts at 310–400 calls' worth a second)
/// nor waits for twenty rounds one after the other (which capped them at
/// about 530 units a second over eight connections, issue 14); more, by one
/// range of every unit record, as from a member that predates named reads
/// when more than [`KEY_BY_KEY`] are wanted. Every write compares what it
/// read, as before.
async fn read_named(client: &Client, names: &[UnitName]) -> Result<Vec<KeyValue>, RegistryError> {
    let wanted: BTreeSet<String> = names
        .iter()
        .flat_map(|name| std::iter::once(name.clone()).chain(name.template()))
        .map(|name| keys::unit(&name))
        .collect();
    if wanted.len() <= NAMED_READS {
        let wanted: Vec<String> = wanted.into_iter().collect();
        match client.get_keys(&wanted).await {
            // A member that predates named reads, and more keys than it is
            // worth reading one by one: one range, as before named reads.
            Err(ClientError::Refused(_)) if wanted.len() > KEY_BY_KEY => {}
            read => return Ok(read?),
        }
    }
    Ok(client.range(keys::UNITS, true, false).await?.0)
}

/// The instance `name` made from its submitted template (templates' bodies
/// read once per call, in `templates`).
async fn instantiate(
    client: &Client,
    name: &UnitName,
    units: &BTreeMap<&str, &KeyValue>,
    templates: &BodyCache,
) -> Result<Unit, RegistryError> {
    let missing = || RegistryError::NoSuchUnit(name.clone());
    let template = name.template().ok_or_else(missing)?;
    let kv = units
        .get(keys::unit(&template).as_str())
        .copied()
        .ok_or_else(missing)?;
    let record: UnitRecord = records::decode(&kv.key, &kv.value)?;
    let body = templates.of(client, &record).await?;
    let invalid = |name: &UnitName| {
        let name = name.clone();
        move |source| RegistryError::Invalid { name, source }
    };
    body.unit(&template).map_err(invalid(&template))?;
    body.unit(name).map_err(invalid(name))
}

/// The file text of a stored unit.
pub async fn body_text(client: &Client, record: &UnitRecord) -> Result<String, RegistryError> {
    let body = BodyCache::new().of(client, record).await?;
    Ok(body.text().to_string())
}

/// The record of `name`.
pub async fn unit_record(
    registry: &impl Reader,
    name: &UnitName,
) -> Result<UnitRecord, RegistryError> {
    let kv = registry
        .read_key(&keys::unit(name))
        .await?
        .ok_or_else(|| RegistryError::NoSuchUnit(name.clone()))?;
    Ok(records::decode(&kv.key, &kv.value)?)
}

/// Removes `name` from the cluster (its machine stops and unloads it); its
/// body goes too when no other unit uses it. Returns whether it existed.
pub async fn destroy(client: &Client, name: &UnitName) -> Result<bool, RegistryError> {
    let key = keys::unit(name);
    let Some(kv) = client.get(&key).await? else {
        return Ok(false);
    };
    let record: UnitRecord = records::decode(&kv.key, &kv.value)?;
    let (all, _) = client.range(keys::UNITS, true, false).await?;
    let shared = all.iter().any(|other| {
        other.key != key
            && records::decode::<UnitRecord>(&other.key, &other.value)
                .is_ok_and(|r| r.hash == record.hash)
    });
    let mut ops = vec![Op::delete(key.clone()), Op::delete(keys::reason(name))];
    if !shared {
        ops.push(Op::delete(keys::body(&record.hash)));
    }
    let compare = vec![Compare::unchanged(&key, Some(&kv))];
    let (ok, _, _) = client.txn(compare, ops, Vec::new()).await?;
    if !ok {
        return Err(RegistryError::Raced(name.clone()));
    }
    Ok(true)
}

/// Every submitted unit, by name.
pub async fn unit_records(registry: &impl Reader) -> Result<Vec<UnitRecord>, RegistryError> {
    let kvs = registry.read_prefix(keys::UNITS).await?;
    kvs.iter()
        .map(|kv| records::decode(&kv.key, &kv.value).map_err(RegistryError::from))
        .collect()
}

/// One machine, as `list-machines` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRow {
    /// Its presence record, with the metadata set through the API merged
    /// in ([`metadata::merge`]): what placement sees.
    pub record: MachineRecord,
    /// Whether it is drained.
    pub drained: bool,
    /// How many units it has claimed.
    pub units: usize,
    /// When it last renewed its presence, if it said.
    pub renewal: Option<Renewal>,
}

/// Every machine with a live presence, by id.
pub async fn machines(registry: &impl Reader) -> Result<Vec<MachineRow>, RegistryError> {
    let index = Index::read(registry, &index::MACHINE_PREFIXES).await?;
    machine_rows(registry, &index).await
}

/// Every machine of `index` ([`Index::machine_rows`]), with when each last
/// renewed as the member `registry` asks saw it.
pub async fn machine_rows(
    registry: &impl Reader,
    index: &Index,
) -> Result<Vec<MachineRow>, RegistryError> {
    index.check()?;
    let seen = renewals_seen(registry).await?;
    Ok(index
        .machine_rows(&seen, super::liveness::now_ms())
        .collect())
}

/// The member's view of every lease's last keep-alive, by lease (none from
/// a member of the first release, which cannot say).
pub async fn renewals_seen(
    registry: &impl Reader,
) -> Result<BTreeMap<LeaseId, LeaseRenewal>, RegistryError> {
    match registry.lease_renewals().await {
        Ok(seen) => Ok(seen.into_iter().map(|r| (r.id, r)).collect()),
        Err(ClientError::Refused(why)) => {
            tracing::debug!("the member cannot say when leases were renewed ({why}); stamps only");
            Ok(BTreeMap::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// The one machine `given` names: its full id, its host name or its
/// address, else the one machine whose id starts with it.
pub async fn find_machine(client: &Client, given: &str) -> Result<MachineRecord, RegistryError> {
    let rows = machines(client).await?;
    let records: Vec<MachineRecord> = rows.into_iter().map(|row| row.record).collect();
    pick_machine(records, given)
}

/// [`find_machine`]'s choice among `machines`.
fn pick_machine(machines: Vec<MachineRecord>, given: &str) -> Result<MachineRecord, RegistryError> {
    if given.is_empty() {
        return Err(RegistryError::NoSuchMachine(given.to_string()));
    }
    let named = |m: &MachineRecord| m.id == given || m.hostname == given || m.ip == given;
    let (exact, rest): (Vec<MachineRecord>, Vec<MachineRecord>) =
        machines.into_iter().partition(named);
    let found = if exact.is_empty() {
        rest.into_iter()
            .filter(|m| m.id.starts_with(given))
            .collect()
    } else {
        exact
    };
    let mut found = found.into_iter();
    match (found.next(), found.next()) {
        (Some(one), None) => Ok(one),
        (None, _) => Err(RegistryError::NoSuchMachine(given.to_string())),
        (Some(a), Some(b)) => Err(RegistryError::AmbiguousMachine {
            given: given.to_string(),
            candidates: [a, b]
                .into_iter()
                .chain(found)
                .map(|m| format!("{} ({}, {})", m.id, m.hostname, m.ip))
                .collect(),
        }),
    }
}

/// The machines that claimed unit `name` (several for a global unit), with
/// their presence records: where its systemd status and journal are.
pub async fn claimed_by(
    registry: &impl Reader,
    name: &UnitName,
) -> Result<Vec<MachineRecord>, RegistryError> {
    let per_machine = registry.read_prefix(keys::PER_MACHINE).await?;
    let ids: BTreeSet<String> = per_machine
        .iter()
        .filter_map(|kv| match keys::parse_machine_key(&kv.key) {
            Some(MachineKey::Claim(id, unit)) if unit == *name => Some(id),
            _ => None,
        })
        .collect();
    let mut found = Vec::new();
    for id in ids {
        if let Some(kv) = registry.read_key(&keys::machine(&id)).await? {
            found.push(records::decode(&kv.key, &kv.value)?);
        }
    }
    Ok(found)
}

/// The scheduler's reason for every unit it cannot place.
pub async fn reasons(registry: &impl Reader) -> Result<BTreeMap<UnitName, String>, RegistryError> {
    let kvs = registry.read_prefix(keys::REASONS).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| {
            let unit = keys::unit_after(keys::REASONS, &kv.key)?;
            Some((unit, String::from_utf8_lossy(&kv.value).into_owned()))
        })
        .collect())
}

/// Marks machine `id` drained (its units move away, it takes no new ones) or
/// undrained.
pub async fn set_drained(client: &Client, id: &str, drained: bool) -> Result<(), RegistryError> {
    let op = if drained {
        Op::put(keys::drain(id), Vec::new())
    } else {
        Op::delete(keys::drain(id))
    };
    client.txn(Vec::new(), vec![op], Vec::new()).await?;
    Ok(())
}

/// One unit on one machine (or nowhere), as `list-units` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitRow {
    /// The unit.
    pub name: UnitName,
    /// What the user asked for.
    pub desired: DesiredState,
    /// The machine holding a claim or a proposal, if any.
    pub machine: Option<String>,
    /// That machine's IP, if known.
    pub ip: Option<String>,
    /// Whether the machine claimed it (not only proposed).
    pub claimed: bool,
    /// systemd's states there, as last reported.
    pub state: Option<ReportedState>,
}

/// Every unit that is loaded or launched, one row per machine it is on (a
/// global unit has several), and one row without machine while unplaced;
/// and an unloaded unit on each machine still holding it ([`Index::rows_of`]).
pub async fn unit_rows(registry: &impl Reader) -> Result<Vec<UnitRow>, RegistryError> {
    let index = Index::read(registry, &index::PREFIXES).await?;
    index.check()?;
    Ok(index.unit_rows().collect())
}

/// The units among `names` still proposed, claimed or reported anywhere:
/// after unload or destroy, the ones some machine has not let go of yet.
pub async fn still_placed(
    client: &Client,
    names: &[UnitName],
) -> Result<BTreeSet<UnitName>, RegistryError> {
    let wanted: BTreeSet<&UnitName> = names.iter().collect();
    let (per_machine, _) = client.range(keys::PER_MACHINE, true, false).await?;
    let (states, _) = client.range(keys::STATES, true, false).await?;
    let mut placed = BTreeSet::new();
    for kv in &per_machine {
        if let Some(MachineKey::Proposal(_, unit) | MachineKey::Claim(_, unit)) =
            keys::parse_machine_key(&kv.key)
            && wanted.contains(&unit)
        {
            placed.insert(unit);
        }
    }
    for kv in &states {
        if let Some((unit, _)) = keys::parse_state_key(&kv.key)
            && wanted.contains(&unit)
        {
            placed.insert(unit);
        }
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, hostname: &str, ip: &str) -> MachineRecord {
        MachineRecord {
            id: id.to_string(),
            instance: "i".to_string(),
            hostname: hostname.to_string(),
            ip: ip.to_string(),
            metadata: BTreeMap::new(),
            api: None,
        }
    }

    #[test]
    fn machines_are_found_by_id_prefix_host_name_or_address() {
        let all = vec![
            machine("aaaa1111", "web1", "10.0.0.1"),
            machine("aaaa2222", "web2", "10.0.0.2"),
            machine("bbbb3333", "aaaa", "10.0.0.3"),
        ];
        let pick = |given: &str| pick_machine(all.clone(), given).map(|m| m.id);
        assert_eq!(pick("aaaa1111").unwrap(), "aaaa1111");
        assert_eq!(pick("aaaa2").unwrap(), "aaaa2222");
        assert_eq!(pick("web2").unwrap(), "aaaa2222");
        assert_eq!(pick("10.0.0.1").unwrap(), "aaaa1111");
        // A host name that is also an id prefix names the host.
        assert_eq!(pick("aaaa").unwrap(), "bbbb3333");
        let Err(RegistryError::AmbiguousMachine { candidates, .. }) = pick("a") else {
            panic!("ambiguous")
        };
        assert_eq!(candidates.len(), 2);
        assert!(candidates[0].contains("web1"), "{candidates:?}");
        assert!(matches!(pick("zz"), Err(RegistryError::NoSuchMachine(_))));
        assert!(matches!(pick(""), Err(RegistryError::NoSuchMachine(_))));
    }
}
