//! The scheduler: on the Raft leader only, turns units that should run into
//! proposals under each chosen machine's own prefix.
//!
//! It reads the registry, runs one pure [`plan`] pass and writes the changes
//! as guarded transactions; then it sleeps until something it reads changes
//! (a watch on `/flotilla/`, ignoring state reports) or a short tick passes,
//! which is how unclaimed proposals age into being moved. A deposed leader's
//! scheduler stops; any stale write it still makes fails its compares.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Compare, Op, Revision};
use crate::consensus::runner::Handle;
use crate::registry::keys::{self, MachineKey};
use crate::registry::ops::{delete, put, revision_is, same_revision};
use crate::registry::records::{self, MachineRecord, Proposal, ReportedState, Target, UnitRecord};
use crate::units::placement::Machine;
use crate::units::{Requirements, Unit, UnitHash, UnitKind, UnitName};
use plan::{Change, Seen, Wanted, World};

/// How often the scheduler runs a pass when nothing wakes it.
const TICK: Duration = Duration::from_millis(500);
/// How many changes share one transaction.
const BATCH: usize = 1024;

/// Runs the scheduler whenever this member leads, until the member stops.
pub async fn run(node: Handle, endpoints: Vec<String>, claim_timeout: Duration) {
    let mut scheduler = Scheduler {
        claim_timeout,
        requirements: HashMap::new(),
        first_seen: HashMap::new(),
        unplaceable: BTreeMap::new(),
    };
    loop {
        match node.status().await {
            Err(_) => return,
            Ok(status) if status.leader == status.id && status.id != 0 => {
                tracing::info!("this member leads: scheduling");
                if let Err(e) = scheduler.lead(&node, &endpoints).await {
                    tracing::warn!("scheduler: {e}; retrying");
                }
            }
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Scheduler {
    claim_timeout: Duration,
    /// Parsed `[X-Fleet]` rules by (unit, body); `None` when the body is bad.
    requirements: HashMap<(UnitName, UnitHash), Option<Requirements>>,
    /// When each unclaimed proposal (unit, machine, revision) was first seen.
    first_seen: HashMap<(UnitName, String, Revision), Instant>,
    /// The last reason logged for each unplaceable unit, to log changes only.
    unplaceable: BTreeMap<UnitName, String>,
}

impl Scheduler {
    /// Schedules until this member no longer leads.
    async fn lead(&mut self, node: &Handle, endpoints: &[String]) -> Result<(), ClientError> {
        let client = Client::connect(endpoints).await?;
        let wake = Arc::new(Notify::new());
        let (_, revision) = client.range(keys::UNITS, true, true).await?;
        let watcher = tokio::spawn(wake_on_changes(
            endpoints.to_vec(),
            revision + 1,
            wake.clone(),
        ));
        self.first_seen.clear();
        let result = async {
            loop {
                self.pass(&client).await?;
                tokio::select! {
                    _ = wake.notified() => {
                        // Let a burst of writes land before the next pass.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    _ = tokio::time::sleep(TICK) => {}
                }
                match node.status().await {
                    Ok(status) if status.leader == status.id => {}
                    _ => return Ok(()),
                }
            }
        }
        .await;
        watcher.abort();
        result
    }

    async fn pass(&mut self, client: &Client) -> Result<(), ClientError> {
        let world = self.read_world(client).await?;
        let plan = plan::plan(&world);
        for (unit, reason) in &plan.unplaceable {
            if self.unplaceable.get(unit) != Some(reason) {
                tracing::warn!("cannot place {unit}: {reason}");
                self.unplaceable.insert(unit.clone(), reason.clone());
            }
        }
        let still: BTreeSet<&UnitName> = plan.unplaceable.iter().map(|(u, _)| u).collect();
        self.unplaceable.retain(|u, _| still.contains(u));
        if !plan.changes.is_empty() {
            tracing::debug!("scheduler: {} changes", plan.changes.len());
            apply(client, &plan.changes).await?;
        }
        Ok(())
    }

    async fn read_world(&mut self, client: &Client) -> Result<World, ClientError> {
        let (units, _) = client.range(keys::UNITS, true, false).await?;
        let (machines, _) = client.range(keys::MACHINES, true, false).await?;
        let (drains, _) = client.range(keys::DRAIN, true, false).await?;
        let (per_machine, _) = client.range(keys::PER_MACHINE, true, false).await?;
        let (placed, _) = client.range(keys::PLACED, true, false).await?;
        let mut world = World::default();

        for kv in &units {
            let Ok(record) = records::decode::<UnitRecord>(&kv.key, &kv.value) else {
                tracing::warn!("skipping unreadable unit record {}", kv.key);
                continue;
            };
            let Some(target) = Target::of(record.desired) else {
                continue;
            };
            if record.name.kind() == UnitKind::Template {
                continue;
            }
            if let Some(requirements) = self.requirements_of(client, &record).await? {
                world.wanted.insert(
                    record.name.clone(),
                    Wanted {
                        proposal: Proposal {
                            hash: record.hash,
                            target,
                        },
                        requirements,
                    },
                );
            }
        }
        let drained: BTreeSet<&str> = drains
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(keys::DRAIN))
            .collect();
        for kv in &machines {
            match records::decode::<MachineRecord>(&kv.key, &kv.value) {
                Ok(m) if !drained.contains(m.id.as_str()) => world.machines.push(Machine {
                    id: m.id,
                    metadata: m.metadata,
                }),
                Ok(m) => {
                    world.draining.insert(m.id);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        if !world.draining.is_empty() {
            self.read_reported(client, &mut world).await?;
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
        self.age_proposals(&mut world);
        Ok(world)
    }

    /// Reads systemd's reported states, which make-before-break needs while
    /// a machine drains (a replacement counts once it is active).
    async fn read_reported(&self, client: &Client, world: &mut World) -> Result<(), ClientError> {
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

    /// Marks proposals nobody claimed within the bound as stale.
    fn age_proposals(&mut self, world: &mut World) {
        let now = Instant::now();
        let mut live = HashMap::new();
        for (unit, on) in &world.proposals {
            for (machine, seen) in on {
                let claimed = world.claims.get(unit).is_some_and(|c| c.contains(machine));
                if claimed {
                    continue;
                }
                let key = (unit.clone(), machine.clone(), seen.mod_revision);
                let since = self.first_seen.get(&key).copied().unwrap_or(now);
                if now.duration_since(since) >= self.claim_timeout {
                    world.stale.insert((unit.clone(), machine.clone()));
                }
                live.insert(key, since);
            }
        }
        self.first_seen = live;
    }

    async fn requirements_of(
        &mut self,
        client: &Client,
        record: &UnitRecord,
    ) -> Result<Option<Requirements>, ClientError> {
        let key = (record.name.clone(), record.hash);
        if let Some(known) = self.requirements.get(&key) {
            return Ok(known.clone());
        }
        let body = client.get(&keys::body(&record.hash)).await?;
        let parsed = match body {
            None => {
                tracing::warn!("unit {} has no stored body; not scheduling it", record.name);
                None
            }
            Some(kv) => match Unit::from_text(&record.name, &String::from_utf8_lossy(&kv.value)) {
                Ok(unit) => Some(unit.requirements().clone()),
                Err(e) => {
                    tracing::warn!("unit {} is invalid, not scheduling it: {e}", record.name);
                    None
                }
            },
        };
        self.requirements.insert(key, parsed.clone());
        Ok(parsed)
    }
}

/// Wakes the scheduler whenever anything but a state report changes.
async fn wake_on_changes(endpoints: Vec<String>, mut from: Revision, wake: Arc<Notify>) {
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
                    if events.iter().any(|e| !e.kv.key.starts_with(keys::STATES)) {
                        wake.notify_one();
                    }
                }
                Err(e) => {
                    tracing::debug!("scheduler watch: {e}; resubscribing");
                    if let Ok((_, revision)) = client.range(keys::UNITS, true, true).await {
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

/// Writes the changes: a batch per transaction, and one by one when a batch
/// fails its compares (each failure then only costs that change a pass).
async fn apply(client: &Client, changes: &[Change]) -> Result<(), ClientError> {
    for batch in changes.chunks(BATCH) {
        let (mut compare, mut ops) = (Vec::new(), Vec::new());
        for change in batch {
            let (c, o) = transaction(change);
            compare.extend(c);
            ops.extend(o);
        }
        let (ok, _, _) = client.txn(compare, ops, Vec::new()).await?;
        if ok || batch.len() == 1 {
            continue;
        }
        for change in batch {
            let (compare, ops) = transaction(change);
            let (ok, _, _) = client.txn(compare, ops, Vec::new()).await?;
            if !ok {
                tracing::debug!("scheduler: stale change skipped: {change:?}");
            }
        }
    }
    Ok(())
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
            let mut ops = vec![put(target.clone(), records::encode(proposal))];
            match placed_revision {
                Some(revision) => {
                    compare.push(revision_is(&keys::placed(unit), *revision));
                    ops.push(put(keys::placed(unit), machine.as_bytes().to_vec()));
                }
                None => compare.push(same_revision(&target, None)),
            }
            if let Some((old, revision)) = from {
                compare.push(revision_is(&keys::proposal(old, unit), *revision));
                compare.push(same_revision(&keys::claim(old, unit), None));
                ops.push(delete(keys::proposal(old, unit), false));
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
                vec![revision_is(&key, *mod_revision)],
                vec![put(key, records::encode(proposal))],
            )
        }
        Change::Withdraw {
            unit,
            machine,
            mod_revision,
            placed_revision,
        } => {
            let key = keys::proposal(machine, unit);
            let mut compare = vec![revision_is(&key, *mod_revision)];
            let mut ops = vec![delete(key, false)];
            if let Some(revision) = placed_revision {
                compare.push(revision_is(&keys::placed(unit), *revision));
                ops.push(delete(keys::placed(unit), false));
            }
            (compare, ops)
        }
    }
}
