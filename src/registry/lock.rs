//! The reboot lock in the store: every transaction on the semaphores and on
//! the marks of machines asked to reboot, and the reads the reboot
//! coordinator makes about its own machine.
//!
//! A semaphore is one JSON value per group (see [`super::semaphore`]).
//! Every change reads it, computes the new value purely and writes it back in
//! ONE transaction that compares the key's mod revision; a transaction that
//! lost a race changes nothing and the change is computed again from a fresh
//! read. So however many hosts race, the stored value only ever moves through
//! values the pure operations produced, and never has more than `max` holders.
//!
//! The transaction also compares the value itself with the one read: that is
//! what lets the store's role policy judge an agent's change of a semaphore
//! from the request alone ([`super::access`]: an agent may add or remove only
//! itself as a holder), since the write can only apply to the value compared.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::bodies::BodyCache;
use super::keys::{self, MachineKey};
use super::records::{self, Proposal, RecordError};
use super::semaphore::{Holder, LockError, Semaphore};
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Compare, Op, Revision};
use crate::units::placement::Machine;
use crate::units::{Requirements, UnitName};

/// The group of machines that do not name one.
pub const DEFAULT_GROUP: &str = "default";

/// How many times a change is computed again after losing a race.
const TRIES: u32 = 64;

/// Why a lock operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum LockOpError {
    /// The cluster could not be asked.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A stored record is unreadable.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The semaphore refused the change.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Every try lost a race with another writer.
    #[error(
        "the reboot lock of group {group} changed under this request {tries} times in a row; \
         nothing was changed, try again"
    )]
    Contended {
        /// The group.
        group: String,
        /// How many tries were made.
        tries: u32,
    },
    /// A registry operation (the drain mark) failed.
    #[error(transparent)]
    Registry(#[from] super::error::RegistryError),
    /// Not a usable group name.
    #[error("{0:?} is not a lock group name: use 1-63 letters, digits, '-', '_' or '.'")]
    BadGroup(String),
}

/// Whether `group` may name a lock group: it becomes part of a key.
pub fn is_group_name(group: &str) -> bool {
    !group.is_empty()
        && group.len() <= 63
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn semaphore_key(group: &str) -> Result<String, LockOpError> {
    if !is_group_name(group) {
        return Err(LockOpError::BadGroup(group.to_string()));
    }
    Ok(keys::semaphore(group))
}

/// A semaphore as read, with its key's mod revision (0: never written, the
/// default value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The value.
    pub semaphore: Semaphore,
    /// The key's mod revision.
    pub revision: Revision,
    /// The value's bytes as stored (empty when never written).
    stored: Vec<u8>,
}

impl Read {
    /// The compares that hold only while the semaphore is still as read:
    /// its mod revision, and its value when it exists.
    fn unchanged(&self, key: &str) -> Vec<Compare> {
        let mut compare = vec![Compare::revision_is(key, self.revision)];
        if self.revision != 0 {
            compare.push(Compare::value_is(key, self.stored.clone()));
        }
        compare
    }
}

/// Reads the semaphore of `group` (linearizable).
pub async fn read(client: &Client, group: &str) -> Result<Read, LockOpError> {
    let key = semaphore_key(group)?;
    Ok(match client.get(&key).await? {
        Some(kv) => Read {
            semaphore: records::decode(&kv.key, &kv.value)?,
            revision: kv.mod_revision,
            stored: kv.value,
        },
        None => Read {
            semaphore: Semaphore::default(),
            revision: 0,
            stored: Vec::new(),
        },
    })
}

/// Every semaphore that was ever written, by group.
pub async fn semaphores(client: &Client) -> Result<BTreeMap<String, Semaphore>, LockOpError> {
    records_under(client, keys::LOCKS).await
}

/// Every record under `prefix`, by the rest of its key.
async fn records_under<T: serde::de::DeserializeOwned>(
    client: &Client,
    prefix: &str,
) -> Result<BTreeMap<String, T>, LockOpError> {
    let (kvs, _) = client.range(prefix, true, false).await?;
    let mut all = BTreeMap::new();
    for kv in kvs {
        if let Some(rest) = kv.key.strip_prefix(prefix) {
            all.insert(rest.to_string(), records::decode(&kv.key, &kv.value)?);
        }
    }
    Ok(all)
}

/// Applies `change` to the semaphore of `group` with compare-and-swap,
/// computing it again from a fresh read whenever another writer got there
/// first. `change` returns the new value (`None`: nothing to write) and an
/// answer for the caller; returns the value it was applied to and the answer.
async fn change<T>(
    client: &Client,
    group: &str,
    change: impl Fn(&Semaphore) -> Result<(Option<Semaphore>, T), LockError>,
) -> Result<(Semaphore, T), LockOpError> {
    let key = semaphore_key(group)?;
    for attempt in 0..TRIES {
        let read = read(client, group).await?;
        let (next, answer) = change(&read.semaphore)?;
        let Some(next) = next else {
            return Ok((read.semaphore, answer));
        };
        let compare = read.unchanged(&key);
        let ops = vec![Op::put(key.clone(), records::encode(&next))];
        let (ok, _, _) = client.txn(compare, ops, Vec::new()).await?;
        if ok {
            return Ok((read.semaphore, answer));
        }
        // Lost a race: spread the retries of many losers a little.
        let spread = u64::from(attempt % 8) * 3 + u64::from(std::process::id() % 5);
        tokio::time::sleep(Duration::from_millis(spread)).await;
    }
    Err(LockOpError::Contended {
        group: group.to_string(),
        tries: TRIES,
    })
}

/// What [`acquire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// A free slot was taken.
    Taken,
    /// `id` already held a slot (which is success, as for locksmith).
    AlreadyHeld,
}

/// Takes a slot of `group` for `id` at `now` (seconds since the epoch). A
/// coordinator passes its `boot_id`; a slot `id` already holds then records
/// it, so a lock taken by hand for a machine is adopted by its coordinator.
pub async fn acquire(
    client: &Client,
    group: &str,
    id: &str,
    now: u64,
    boot_id: Option<&str>,
) -> Result<Acquired, LockOpError> {
    let (_, acquired) = change(client, group, |s| match s.holder(id) {
        Some(held) => {
            let next = match boot_id {
                Some(boot) if held.boot_id.as_deref() != Some(boot) => {
                    Some(s.record_boot(id, boot)?)
                }
                _ => None,
            };
            Ok((next, Acquired::AlreadyHeld))
        }
        None => Ok((Some(s.lock(id, now, boot_id)?), Acquired::Taken)),
    })
    .await?;
    Ok(acquired)
}

/// Gives back the slot `id` holds in `group`.
pub async fn release(client: &Client, group: &str, id: &str) -> Result<(), LockOpError> {
    change(client, group, |s| Ok((Some(s.unlock(id)?), ()))).await?;
    Ok(())
}

/// Releases `holder` if it still holds exactly that slot (same id, taken at
/// the same time): a stale holder found absent is freed, but one that came
/// back and took the lock again meanwhile is left alone. Returns whether it
/// was released.
pub async fn release_stale(
    client: &Client,
    group: &str,
    holder: &Holder,
) -> Result<bool, LockOpError> {
    let (_, released) = change(client, group, |s| {
        if s.holder(&holder.id)
            .is_some_and(|h| h.since == holder.since)
        {
            Ok((Some(s.unlock(&holder.id)?), true))
        } else {
            Ok((None, false))
        }
    })
    .await?;
    Ok(released)
}

/// Sets the limit of `group`; returns the old and the new one.
pub async fn set_max(client: &Client, group: &str, max: u32) -> Result<(u32, u32), LockOpError> {
    let (old, ()) = change(client, group, |s| Ok((Some(s.set_max(max)), ()))).await?;
    Ok((old.max, max))
}

/// The mark `flotilla lock need-reboot` leaves for a machine. It is not on a
/// lease: it must outlive the daemon, which is what reboots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootMark {
    /// When it was asked for, in seconds since the epoch.
    pub since: u64,
    /// Reboot even when the drain could not move every unit within
    /// `drain_timeout` (those units stop with the host).
    #[serde(default)]
    pub force: bool,
    /// The boot this machine's coordinator asked for the reboot in, once it
    /// did: a later boot knows from it that the reboot happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_boot: Option<String>,
}

/// Asks machine `id` to reboot (replacing an earlier mark).
pub async fn mark_reboot(client: &Client, id: &str, mark: &RebootMark) -> Result<(), LockOpError> {
    let op = Op::put(keys::reboot_mark(id), records::encode(mark));
    client.txn(Vec::new(), vec![op], Vec::new()).await?;
    Ok(())
}

/// The reboot mark of machine `id`, with its mod revision.
pub async fn reboot_mark(
    client: &Client,
    id: &str,
) -> Result<Option<(RebootMark, Revision)>, LockOpError> {
    let Some(kv) = client.get(&keys::reboot_mark(id)).await? else {
        return Ok(None);
    };
    Ok(Some((
        records::decode(&kv.key, &kv.value)?,
        kv.mod_revision,
    )))
}

/// Removes the reboot mark of `id` if it is still the one read at
/// `revision` (a newer request is kept). Returns whether it went.
pub async fn clear_reboot_mark(
    client: &Client,
    id: &str,
    revision: Revision,
) -> Result<bool, LockOpError> {
    let key = keys::reboot_mark(id);
    let compare = vec![Compare::revision_is(&key, revision)];
    let (ok, _, _) = client
        .txn(compare, vec![Op::delete(key)], Vec::new())
        .await?;
    Ok(ok)
}

/// Every machine asked to reboot, by id.
pub async fn reboot_marks(client: &Client) -> Result<BTreeMap<String, RebootMark>, LockOpError> {
    records_under(client, keys::REBOOTS).await
}

/// The ids of the machines with a live presence.
pub async fn present_machines(client: &Client) -> Result<BTreeSet<String>, LockOpError> {
    let (kvs, _) = client.range(keys::MACHINES, true, false).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::MACHINES))
        .map(str::to_string)
        .collect())
}

/// One unit proposed to or claimed by a machine, as its coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostUnit {
    /// The unit.
    pub name: UnitName,
    /// The scheduler's proposal here, if any (none: being stopped here).
    pub proposal: Option<Proposal>,
    /// Whether this machine claimed it.
    pub claimed: bool,
    /// Its `[X-Fleet]` rules, when its body is readable.
    pub requirements: Option<Requirements>,
}

/// What the store says about one machine, for its reboot coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    /// Its presence record exists (its lease is live).
    pub present: bool,
    /// Its drain mark is set.
    pub drained: bool,
    /// Every unit proposed to or claimed by it.
    pub units: Vec<HostUnit>,
}

/// Reads machine `id`'s presence, drain mark, proposals and claims, with the
/// rules of each unit there.
pub async fn host_view(
    client: &Client,
    bodies: &BodyCache,
    id: &str,
) -> Result<HostView, LockOpError> {
    let present = client.get(&keys::machine(id)).await?.is_some();
    let drained = client.get(&keys::drain(id)).await?.is_some();
    let (kvs, _) = client.range(&keys::machine_prefix(id), true, false).await?;
    let mut units: BTreeMap<UnitName, HostUnit> = BTreeMap::new();
    let entry = |units: &mut BTreeMap<UnitName, HostUnit>, name: &UnitName| {
        units.entry(name.clone()).or_insert_with(|| HostUnit {
            name: name.clone(),
            proposal: None,
            claimed: false,
            requirements: None,
        });
    };
    for kv in &kvs {
        match keys::parse_machine_key(&kv.key) {
            Some(MachineKey::Proposal(_, name)) => {
                entry(&mut units, &name);
                let proposal: Proposal = records::decode(&kv.key, &kv.value)?;
                units.get_mut(&name).expect("just added").proposal = Some(proposal);
            }
            Some(MachineKey::Claim(_, name)) => {
                entry(&mut units, &name);
                units.get_mut(&name).expect("just added").claimed = true;
            }
            _ => {}
        }
    }
    for unit in units.values_mut() {
        unit.requirements = rules_of(client, bodies, &unit.name).await?;
    }
    Ok(HostView {
        present,
        drained,
        units: units.into_values().collect(),
    })
}

/// The `[X-Fleet]` rules of a submitted unit (`None`: gone or unreadable).
async fn rules_of(
    client: &Client,
    bodies: &BodyCache,
    name: &UnitName,
) -> Result<Option<Requirements>, LockOpError> {
    let Some(kv) = client.get(&keys::unit(name)).await? else {
        return Ok(None);
    };
    let record: records::UnitRecord = records::decode(&kv.key, &kv.value)?;
    Ok(bodies
        .get(client, &record.hash)
        .await?
        .and_then(|body| body.requirements(name).ok())
        .map(|rules| Requirements::clone(&rules)))
}

/// The cluster as placement sees it, for explaining why a unit cannot leave
/// a draining machine: machines that may take work (present, undrained), and
/// every unit proposed or claimed anywhere with its rules.
#[derive(Debug, Clone, Default)]
pub struct PlacementView {
    /// Present, undrained machines.
    pub machines: Vec<Machine>,
    /// (unit, its rules, machine) for every proposal and claim.
    pub placed: Vec<(UnitName, Requirements, String)>,
}

/// Reads a [`PlacementView`]: the scheduler's own reading of the world
/// ([`super::schedule::read_world`]), so the coordinator explains with exactly
/// what the scheduler decides from.
pub async fn placement_view(
    client: &Client,
    bodies: &Arc<BodyCache>,
) -> Result<PlacementView, LockOpError> {
    let world = super::schedule::read_world(client, bodies).await?.world;
    let mut placed = Vec::new();
    for (unit, wanted) in &world.wanted {
        let on: BTreeSet<&String> = world
            .proposals
            .get(unit)
            .into_iter()
            .flat_map(|machines| machines.keys())
            .chain(world.claims.get(unit).into_iter().flatten())
            .collect();
        for id in on {
            placed.push((
                unit.clone(),
                Requirements::clone(&wanted.requirements),
                id.clone(),
            ));
        }
    }
    Ok(PlacementView {
        machines: world.machines,
        placed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_become_keys_safely() {
        for good in ["default", "db-1", "rack_2.eu"] {
            assert!(is_group_name(good), "{good}");
            assert_eq!(
                semaphore_key(good).unwrap(),
                format!("/flotilla/lock/{good}")
            );
        }
        for bad in ["", "a/b", "..x/", "has space", &"x".repeat(64)] {
            assert!(!is_group_name(bad), "{bad}");
            assert!(matches!(semaphore_key(bad), Err(LockOpError::BadGroup(_))));
        }
    }
}
