//! The scheduler's side of the registry: the world it reads and the
//! proposals it writes.
//!
//! The scheduler on the Raft leader ([`crate::scheduler`]) decides with a pure
//! pass ([`crate::scheduler::plan`]) over a [`World`] read here, and hands back
//! [`Change`]s, which are written here as guarded transactions: every change
//! carries the revisions it was decided from and fails, changing nothing, when
//! the store moved on. Reading and writing both speak the key layout of
//! [`super::keys`], so the scheduler itself never sees a key.
//!
//! The scheduler's reason for each unit it cannot place is stored too
//! ([`record_reasons`]), written only when it changes, so `list-units`, the
//! API and `explain` can show it on any host.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::bodies::BodyCache;
use super::keys::{self, MachineKey};
use super::metadata;
use super::records::{self, MachineRecord, Proposal, ReportedState, Target, UnitRecord};
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Compare, Op, Revision};
use crate::units::placement::Machine;
use crate::units::{Requirements, UnitKind, UnitName};

/// How many changes share one transaction.
const BATCH: usize = 1024;

/// A unit that should run (loaded or launched), as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// The proposal every machine running it should have.
    pub proposal: Proposal,
    /// Its `[X-Fleet]` rules.
    pub requirements: Requirements,
}

/// A proposal as read, with its revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The proposal.
    pub proposal: Proposal,
    /// Its key's mod revision.
    pub mod_revision: Revision,
}

/// The cluster as one pass sees it.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Units that should run, by name.
    pub wanted: BTreeMap<UnitName, Wanted>,
    /// Machines that may take work: alive and not drained.
    pub machines: Vec<Machine>,
    /// Every proposal: unit → machine → proposal.
    pub proposals: BTreeMap<UnitName, BTreeMap<String, Seen>>,
    /// Every claim: unit → machines holding one.
    pub claims: BTreeMap<UnitName, BTreeSet<String>>,
    /// Placement pointers of non-global units: unit → (machine, mod revision).
    pub placed: BTreeMap<UnitName, (String, Revision)>,
    /// Unclaimed proposals older than the claim bound: (unit, machine).
    pub stale: BTreeSet<(UnitName, String)>,
    /// Machines alive but drained: their units move make-before-break.
    pub draining: BTreeSet<String>,
    /// systemd's states as reported, by (unit, machine); read only while a
    /// machine drains (a replacement counts once it is in its target state).
    pub reported: BTreeMap<(UnitName, String), ReportedState>,
}

/// One write the pass asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Propose `unit` to `machine` (moving it from `from`, if set).
    Propose {
        /// The unit.
        unit: UnitName,
        /// Where it should run.
        machine: String,
        /// The proposal.
        proposal: Proposal,
        /// The machine whose unclaimed proposal this replaces, with its revision.
        from: Option<(String, Revision)>,
        /// The placement pointer's revision as read (0: none); `None` for a
        /// global unit, which has no pointer.
        placed_revision: Option<Revision>,
    },
    /// Rewrite a proposal whose body or target changed.
    Update {
        /// The unit.
        unit: UnitName,
        /// The machine.
        machine: String,
        /// The new proposal.
        proposal: Proposal,
        /// The proposal's revision as read.
        mod_revision: Revision,
    },
    /// Remove a proposal; the machine stops the unit and releases it.
    Withdraw {
        /// The unit.
        unit: UnitName,
        /// The machine.
        machine: String,
        /// The proposal's revision as read.
        mod_revision: Revision,
        /// The placement pointer to remove with it, with its revision.
        placed_revision: Option<Revision>,
    },
}

/// What one read of the store found: the world to plan over, and the units
/// that should run but cannot be scheduled at all, with the reason.
#[derive(Debug, Default)]
pub struct Reading {
    /// Everything the pass decides from; `stale` is left empty for the
    /// scheduler, which alone knows how long a proposal went unclaimed.
    pub world: World,
    /// Units left out of `world.wanted`: no stored body, or an invalid one.
    pub unschedulable: Vec<(UnitName, String)>,
    /// The reasons stored for units that could not be placed (see
    /// [`record_reasons`]).
    pub reasons: BTreeMap<UnitName, String>,
}

/// Reads units, machines (with the metadata set through the API merged in,
/// [`metadata::merge`]), drain marks, proposals, claims, placement pointers
/// and stored reasons; the `[X-Fleet]` rules of each unit come through
/// `bodies`, which afterwards holds only the bodies of stored units.
pub async fn read_world(client: &Client, bodies: &BodyCache) -> Result<Reading, ClientError> {
    let (units, _) = client.range(keys::UNITS, true, false).await?;
    let (machines, _) = client.range(keys::MACHINES, true, false).await?;
    let (drains, _) = client.range(keys::DRAIN, true, false).await?;
    let (per_machine, _) = client.range(keys::PER_MACHINE, true, false).await?;
    let (placed, _) = client.range(keys::PLACED, true, false).await?;
    let (reasons, _) = client.range(keys::REASONS, true, false).await?;
    let dynamic = metadata::dynamic(client).await?;
    let mut reading = Reading::default();
    let world = &mut reading.world;

    let mut live = HashSet::new();
    for kv in &units {
        let Ok(record) = records::decode::<UnitRecord>(&kv.key, &kv.value) else {
            tracing::warn!("skipping unreadable unit record {}", kv.key);
            continue;
        };
        live.insert(record.hash);
        let Some(target) = Target::of(record.desired) else {
            continue;
        };
        if record.name.kind() == UnitKind::Template {
            continue;
        }
        match requirements(client, bodies, &record).await? {
            Ok(requirements) => {
                let proposal = Proposal {
                    hash: record.hash,
                    target,
                };
                let wanted = Wanted {
                    proposal,
                    requirements,
                };
                world.wanted.insert(record.name, wanted);
            }
            Err(reason) => reading.unschedulable.push((record.name, reason)),
        }
    }
    bodies.keep_only(&live);
    let drained: BTreeSet<&str> = drains
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::DRAIN))
        .collect();
    for kv in &machines {
        match records::decode::<MachineRecord>(&kv.key, &kv.value) {
            Ok(m) if !drained.contains(m.id.as_str()) => world.machines.push(Machine {
                metadata: metadata::merge(&m.metadata, dynamic.get(&m.id)),
                id: m.id,
            }),
            Ok(m) => {
                world.draining.insert(m.id);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
    if !world.draining.is_empty() {
        read_reported(client, world).await?;
    }
    for kv in &reasons {
        if let Some(unit) = keys::unit_after(keys::REASONS, &kv.key) {
            let reason = String::from_utf8_lossy(&kv.value).into_owned();
            reading.reasons.insert(unit, reason);
        }
    }
    for kv in &per_machine {
        match keys::parse_machine_key(&kv.key) {
            Some(MachineKey::Proposal(id, unit)) => {
                let Ok(proposal) = records::decode::<Proposal>(&kv.key, &kv.value) else {
                    continue;
                };
                world.proposals.entry(unit).or_default().insert(
                    id,
                    Seen {
                        proposal,
                        mod_revision: kv.mod_revision,
                    },
                );
            }
            Some(MachineKey::Claim(id, unit)) => {
                world.claims.entry(unit).or_default().insert(id);
            }
            _ => {}
        }
    }
    for kv in &placed {
        if let Some(unit) = keys::unit_after(keys::PLACED, &kv.key) {
            let machine = String::from_utf8_lossy(&kv.value).into_owned();
            world.placed.insert(unit, (machine, kv.mod_revision));
        }
    }
    Ok(reading)
}

/// Reads systemd's reported states, which make-before-break needs while a
/// machine drains (a replacement counts once it is active).
async fn read_reported(client: &Client, world: &mut World) -> Result<(), ClientError> {
    let (states, _) = client.range(keys::STATES, true, false).await?;
    for kv in &states {
        if let Some(at) = keys::parse_state_key(&kv.key)
            && let Ok(state) = records::decode::<ReportedState>(&kv.key, &kv.value)
        {
            world.reported.insert(at, state);
        }
    }
    Ok(())
}

/// The `[X-Fleet]` rules of `record`'s unit, or why it cannot be scheduled.
async fn requirements(
    client: &Client,
    bodies: &BodyCache,
    record: &UnitRecord,
) -> Result<Result<Requirements, String>, ClientError> {
    Ok(match bodies.get(client, &record.hash).await? {
        None => Err("it has no stored body (destroy it and submit it again)".to_string()),
        Some(body) => body
            .requirements(&record.name)
            .map_err(|e| format!("its stored body is invalid: {e}")),
    })
}

/// The store's revision now: watching from the next one misses nothing that
/// a read made after this call does not see.
pub async fn revision(client: &Client) -> Result<Revision, ClientError> {
    let (_, revision) = client.range(keys::UNITS, true, true).await?;
    Ok(revision)
}

/// Whether a change under `key` may change what the scheduler decides:
/// state reports, renewal stamps and its own reasons do not.
fn concerns_scheduler(key: &str) -> bool {
    ![keys::STATES, keys::RENEWALS, keys::REASONS]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

/// Wakes the scheduler whenever anything but a state report, a renewal or a
/// reason changes, from revision `from` on, resubscribing (at the then current revision, with a
/// wake-up for what it may have missed) whenever the watch fails.
pub async fn wake_on_changes(endpoints: Vec<String>, mut from: Revision, wake: Arc<Notify>) {
    loop {
        let Ok(client) = Client::connect(&endpoints).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut watch = client.watch(keys::ROOT, from);
        loop {
            match watch.next().await {
                Ok(events) => {
                    from = watch.next_revision();
                    if events.iter().any(|e| concerns_scheduler(&e.kv.key)) {
                        wake.notify_one();
                    }
                }
                Err(e) => {
                    tracing::debug!("scheduler watch: {e}; resubscribing");
                    if let Ok(revision) = revision(&client).await {
                        from = revision + 1;
                    }
                    wake.notify_one();
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stores the reason of every unit in `now` (units that cannot be placed)
/// whose stored reason differs, and deletes the reasons `stored` holds for
/// units no longer in `now`: nothing is written while the reasons stay the
/// same.
pub async fn record_reasons(
    client: &Client,
    stored: &BTreeMap<UnitName, String>,
    now: &[&(UnitName, String)],
) -> Result<(), ClientError> {
    let current: BTreeMap<&UnitName, &String> = now.iter().map(|(u, r)| (u, r)).collect();
    let mut ops = Vec::new();
    for (unit, reason) in &current {
        if stored.get(*unit) != Some(*reason) {
            ops.push(Op::put(keys::reason(unit), reason.as_bytes().to_vec()));
        }
    }
    for unit in stored.keys() {
        if !current.contains_key(unit) {
            ops.push(Op::delete(keys::reason(unit)));
        }
    }
    for batch in ops.chunks(BATCH) {
        client.txn(Vec::new(), batch.to_vec(), Vec::new()).await?;
    }
    Ok(())
}

/// Writes the changes: a batch per transaction, and one by one when a batch
/// fails its compares (each failure then only costs that change a pass).
pub async fn apply(client: &Client, changes: &[Change]) -> Result<(), ClientError> {
    for batch in changes.chunks(BATCH) {
        let (mut compare, mut ops) = (Vec::new(), Vec::new());
        for change in batch {
            let (c, o) = transaction(change);
            compare.extend(c);
            ops.extend(o);
        }
        let (ok, _, _) = client.txn(compare, ops, Vec::new()).await?;
        if ok {
            count_placements(batch);
        }
        if ok || batch.len() == 1 {
            continue;
        }
        for change in batch {
            let (compare, ops) = transaction(change);
            let (ok, _, _) = client.txn(compare, ops, Vec::new()).await?;
            if ok {
                count_placements(std::slice::from_ref(change));
            } else {
                tracing::debug!("scheduler: stale change skipped: {change:?}");
            }
        }
    }
    Ok(())
}

/// Counts the proposals among written `changes` ([`crate::metrics`]).
fn count_placements(changes: &[Change]) {
    let placed = changes
        .iter()
        .filter(|c| matches!(c, Change::Propose { .. }))
        .count();
    crate::metrics::METRICS.placements.add(placed as u64);
}

/// The guarded writes of one change.
fn transaction(change: &Change) -> (Vec<Compare>, Vec<Op>) {
    match change {
        Change::Propose {
            unit,
            machine,
            proposal,
            from,
            placed_revision,
        } => {
            let target = keys::proposal(machine, unit);
            let mut compare = Vec::new();
            let mut ops = vec![Op::put(target.clone(), records::encode(proposal))];
            match placed_revision {
                Some(revision) => {
                    compare.push(Compare::revision_is(&keys::placed(unit), *revision));
                    ops.push(Op::put(keys::placed(unit), machine.as_bytes().to_vec()));
                }
                None => compare.push(Compare::unchanged(&target, None)),
            }
            if let Some((old, revision)) = from {
                compare.push(Compare::revision_is(&keys::proposal(old, unit), *revision));
                compare.push(Compare::unchanged(&keys::claim(old, unit), None));
                ops.push(Op::delete(keys::proposal(old, unit)));
            }
            (compare, ops)
        }
        Change::Update {
            unit,
            machine,
            proposal,
            mod_revision,
        } => {
            let key = keys::proposal(machine, unit);
            (
                vec![Compare::revision_is(&key, *mod_revision)],
                vec![Op::put(key, records::encode(proposal))],
            )
        }
        Change::Withdraw {
            unit,
            machine,
            mod_revision,
            placed_revision,
        } => {
            let key = keys::proposal(machine, unit);
            let mut compare = vec![Compare::revision_is(&key, *mod_revision)];
            let mut ops = vec![Op::delete(key)];
            if let Some(revision) = placed_revision {
                compare.push(Compare::revision_is(&keys::placed(unit), *revision));
                ops.push(Op::delete(keys::placed(unit)));
            }
            (compare, ops)
        }
    }
}
