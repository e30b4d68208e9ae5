//! The scheduler's view of the registry, kept current by a watch.
//!
//! Reading the whole registry for every pass (five range reads of every
//! unit, machine, proposal and claim, on every change and every half second)
//! cost the Raft leader most of a core at 1,000 hosts and 30,000 units, with
//! nothing changing (issue 14). A [`View`] reads everything once, in one range
//! at one revision ([`View::load`]), then applies the store's events from the
//! next revision on ([`View::apply`], fed by [`follow`]), so a pass decides
//! from memory and an idle cluster costs its scheduler nothing.
//!
//! The events applied in order leave the view equal to a fresh load at the
//! same revision (`tests/view.rs` checks that against a real store for random
//! sequences of registry changes). The view is loaded again only when its
//! watch breaks (history compacted away) or its member starts leading.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::bodies::{Body, BodyCache};
use super::keys::{self, MachineKey};
use super::metadata::{self, Dynamic};
use super::records::{self, MachineRecord, Proposal, ReportedState, Target, UnitRecord};
use super::schedule::{Reading, Seen, Touched, Wanted, World};
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Event, EventKind, KeyValue, Revision};
use crate::units::placement::Machine;
use crate::units::{UnitHash, UnitKind, UnitName};

/// Everything the scheduler decides from, as of one store revision.
#[derive(Debug, Default)]
pub struct View {
    /// The last revision applied.
    revision: Revision,
    /// Where bodies are parsed once per daemon: the view hands what it reads
    /// to the daemon's cache and keeps the same parsed body.
    cache: Arc<BodyCache>,
    /// Every stored body, by hash (exactly those the store holds, whatever
    /// the shared cache keeps or forgets).
    bodies: HashMap<UnitHash, Arc<Body>>,
    /// Every unit record, wanted or not.
    units: BTreeMap<UnitName, UnitRecord>,
    /// The units of each body hash, to decide again when a body comes or goes.
    by_hash: HashMap<UnitHash, BTreeSet<UnitName>>,
    /// Every presence record, by the machine id in its key.
    machines: BTreeMap<String, MachineRecord>,
    /// Machines marked drained.
    drains: BTreeSet<String>,
    /// Metadata set through the API.
    dynamic: Dynamic,
    /// What a pass plans over (its `stale` is the scheduler's to fill).
    world: World,
    /// Units that should run but cannot be scheduled at all, with the reason.
    unschedulable: BTreeMap<UnitName, String>,
    /// The reasons stored for units that could not be placed.
    reasons: BTreeMap<UnitName, String>,
    /// Proposals not claimed on their machine, with their revision: what
    /// the scheduler ages against the claim bound, without a walk over
    /// every proposal.
    unclaimed: BTreeMap<(UnitName, String), Revision>,
    /// How many units each machine has claimed.
    claimed: HashMap<String, usize>,
    /// Whether `world.machines` must be rebuilt from the records.
    machines_changed: bool,
    /// What a pass decides from that changed since [`View::take_touched`].
    touched: Touched,
}

impl View {
    /// Reads the whole registry in one range (one revision), parsing bodies
    /// into `cache` (the daemon's one cache), which afterwards holds only the
    /// bodies still stored.
    pub async fn load(client: &Client, cache: Arc<BodyCache>) -> Result<View, ClientError> {
        let (kvs, revision) = client.range(keys::ROOT, true, false).await?;
        Ok(View::from_kvs(&kvs, revision, cache))
    }

    /// The view of a registry holding exactly `kvs`, read at `revision`.
    pub fn from_kvs(kvs: &[KeyValue], revision: Revision, cache: Arc<BodyCache>) -> View {
        let mut view = View {
            cache,
            ..View::default()
        };
        for kv in kvs {
            view.put(kv);
        }
        let live: HashSet<UnitHash> = view.bodies.keys().copied().collect();
        view.cache.keep_only(&live);
        view.settle();
        view.revision = revision;
        view.touched = Touched {
            all: true,
            ..Touched::default()
        };
        view
    }

    /// Applies a batch of watch events, in order (whole revisions).
    pub fn apply(&mut self, events: &[Event]) {
        for event in events {
            if event.kv.key.starts_with(keys::STATES) && !self.drains.is_empty() {
                // Make-before-break off a draining machine waits for them.
                if let Some((unit, _)) = keys::parse_state_key(&event.kv.key) {
                    self.touched.note_unit(&unit);
                }
            }
            match event.kind {
                EventKind::Put => self.put(&event.kv),
                EventKind::Delete => self.delete(&event.kv.key),
            }
            self.revision = self.revision.max(event.revision());
        }
        self.settle();
    }

    /// The last revision this view reflects.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// What a pass decides from that changed since the last call (state
    /// reports count only while a machine drains; renewal stamps and the
    /// scheduler's own reasons never do): everything, for a fresh view.
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    /// Whether anything a pass decides from changed since [`View::take_touched`].
    pub fn is_touched(&self) -> bool {
        !self.touched.is_empty()
    }

    /// Every proposal not claimed on its machine, with its revision.
    pub fn unclaimed(&self) -> impl Iterator<Item = (&UnitName, &String, Revision)> {
        self.unclaimed.iter().map(|((u, m), rev)| (u, m, *rev))
    }

    /// How many units each machine has claimed (machines with none left out).
    pub fn claimed_per_machine(&self) -> &HashMap<String, usize> {
        &self.claimed
    }

    /// The world a pass plans over.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The world, for the scheduler to mark stale proposals in.
    pub fn world_mut(&mut self) -> &mut World {
        &mut self.world
    }

    /// Units that should run but cannot be scheduled, with the reason.
    pub fn unschedulable(&self) -> impl Iterator<Item = (&UnitName, &String)> {
        self.unschedulable.iter()
    }

    /// The reasons stored for units that could not be placed.
    pub fn reasons(&self) -> &BTreeMap<UnitName, String> {
        &self.reasons
    }

    /// A copy of what a one-off reader needs ([`super::schedule::read_world`]).
    pub fn reading(&self) -> Reading {
        Reading {
            world: self.world.clone(),
            unschedulable: self
                .unschedulable
                .iter()
                .map(|(u, r)| (u.clone(), r.clone()))
                .collect(),
            reasons: self.reasons.clone(),
        }
    }

    fn put(&mut self, kv: &KeyValue) {
        let key = kv.key.as_str();
        if let Some(name) = keys::unit_after(keys::UNITS, key) {
            match records::decode::<UnitRecord>(key, &kv.value) {
                Ok(record) => self.set_unit(&name, Some(record)),
                Err(e) => {
                    tracing::warn!("skipping {e}");
                    self.set_unit(&name, None);
                }
            }
        } else if let Some(hash) = keys::parse_body_key(key) {
            if !self.bodies.contains_key(&hash) {
                let body = self.cache.insert(hash, &kv.value);
                self.bodies.insert(hash, body);
                self.evaluate_units_of(&hash);
            }
        } else if let Some(id) = key.strip_prefix(keys::MACHINES) {
            match records::decode::<MachineRecord>(key, &kv.value) {
                Ok(record) => {
                    self.machines.insert(id.to_string(), record);
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    self.machines.remove(id);
                }
            }
            self.machines_changed = true;
            self.touched.note_machine(id);
        } else if let Some(id) = key.strip_prefix(keys::DRAIN) {
            self.drains.insert(id.to_string());
            self.machines_changed = true;
            self.touched.note_machine(id);
        } else if let Some((id, name)) = keys::parse_metadata_key(key) {
            self.dynamic.entry(id.to_string()).or_default().insert(
                name.to_string(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            );
            self.machines_changed = true;
            self.touched.note_machine(id);
        } else if let Some(unit) = keys::unit_after(keys::PLACED, key) {
            let machine = String::from_utf8_lossy(&kv.value).into_owned();
            self.touched.note_unit(&unit);
            self.world.placed.insert(unit, (machine, kv.mod_revision));
        } else if let Some(unit) = keys::unit_after(keys::REASONS, key) {
            let reason = String::from_utf8_lossy(&kv.value).into_owned();
            self.reasons.insert(unit, reason);
        } else if let Some(at) = keys::parse_state_key(key) {
            match records::decode::<ReportedState>(key, &kv.value) {
                Ok(state) => {
                    self.world.reported.insert(at, state);
                }
                Err(_) => {
                    self.world.reported.remove(&at);
                }
            }
        } else {
            match keys::parse_machine_key(key) {
                Some(MachineKey::Proposal(id, unit)) => {
                    self.touched.note_pair(&unit, &id);
                    match records::decode::<Proposal>(key, &kv.value) {
                        Ok(proposal) => {
                            let seen = Seen {
                                proposal,
                                mod_revision: kv.mod_revision,
                            };
                            if !self.is_claimed(&unit, &id) {
                                self.unclaimed
                                    .insert((unit.clone(), id.clone()), kv.mod_revision);
                            }
                            self.world
                                .proposals
                                .entry(unit)
                                .or_default()
                                .insert(id, seen);
                        }
                        Err(_) => self.forget_proposal(&unit, &id),
                    }
                }
                Some(MachineKey::Claim(id, unit)) => {
                    self.touched.note_pair(&unit, &id);
                    self.unclaimed.remove(&(unit.clone(), id.clone()));
                    if self
                        .world
                        .claims
                        .entry(unit)
                        .or_default()
                        .insert(id.clone())
                    {
                        *self.claimed.entry(id).or_default() += 1;
                    }
                }
                Some(MachineKey::Generation(_)) | None => {}
            }
        }
    }

    /// Whether `unit` is claimed on `machine`.
    fn is_claimed(&self, unit: &UnitName, machine: &str) -> bool {
        self.world
            .claims
            .get(unit)
            .is_some_and(|on| on.contains(machine))
    }

    /// Drops the proposal of `unit` on `machine`.
    fn forget_proposal(&mut self, unit: &UnitName, machine: &str) {
        remove_inner(&mut self.world.proposals, unit, machine);
        self.unclaimed.remove(&(unit.clone(), machine.to_string()));
    }

    fn delete(&mut self, key: &str) {
        if let Some(name) = keys::unit_after(keys::UNITS, key) {
            self.set_unit(&name, None);
        } else if let Some(hash) = keys::parse_body_key(key) {
            self.bodies.remove(&hash);
            self.cache.remove(&hash);
            self.evaluate_units_of(&hash);
        } else if let Some(id) = key.strip_prefix(keys::MACHINES) {
            self.machines_changed |= self.machines.remove(id).is_some();
            self.touched.note_machine(id);
        } else if let Some(id) = key.strip_prefix(keys::DRAIN) {
            self.machines_changed |= self.drains.remove(id);
            self.touched.note_machine(id);
        } else if let Some((id, name)) = keys::parse_metadata_key(key) {
            if let Some(set) = self.dynamic.get_mut(id) {
                set.remove(name);
                if set.is_empty() {
                    self.dynamic.remove(id);
                }
            }
            self.machines_changed = true;
            self.touched.note_machine(id);
        } else if let Some(unit) = keys::unit_after(keys::PLACED, key) {
            self.world.placed.remove(&unit);
            self.touched.note_unit(&unit);
        } else if let Some(unit) = keys::unit_after(keys::REASONS, key) {
            self.reasons.remove(&unit);
        } else if let Some(at) = keys::parse_state_key(key) {
            self.world.reported.remove(&at);
        } else {
            match keys::parse_machine_key(key) {
                Some(MachineKey::Proposal(id, unit)) => {
                    self.touched.note_pair(&unit, &id);
                    self.forget_proposal(&unit, &id);
                }
                Some(MachineKey::Claim(id, unit)) => {
                    self.touched.note_pair(&unit, &id);
                    let Some(on) = self.world.claims.get_mut(&unit) else {
                        return;
                    };
                    if on.remove(&id) {
                        if let Some(count) = self.claimed.get_mut(&id) {
                            *count -= 1;
                            if *count == 0 {
                                self.claimed.remove(&id);
                            }
                        }
                        let revision = self
                            .world
                            .proposals
                            .get(&unit)
                            .and_then(|on| on.get(&id))
                            .map(|seen| seen.mod_revision);
                        if let Some(revision) = revision {
                            self.unclaimed.insert((unit.clone(), id.clone()), revision);
                        }
                    }
                    if on.is_empty() {
                        self.world.claims.remove(&unit);
                    }
                }
                Some(MachineKey::Generation(_)) | None => {}
            }
        }
    }

    /// Stores (or forgets) the record of unit `name` and decides it again.
    fn set_unit(&mut self, name: &UnitName, record: Option<UnitRecord>) {
        let old = match record {
            Some(record) => {
                self.by_hash
                    .entry(record.hash)
                    .or_default()
                    .insert(name.clone());
                self.units.insert(name.clone(), record)
            }
            None => self.units.remove(name),
        };
        if let Some(old) = old
            && self.units.get(name).is_none_or(|now| now.hash != old.hash)
            && let Some(names) = self.by_hash.get_mut(&old.hash)
        {
            names.remove(name);
            if names.is_empty() {
                self.by_hash.remove(&old.hash);
            }
        }
        self.evaluate(name);
    }

    /// Decides again whether unit `name` is wanted, unschedulable or
    /// neither, from its record and its body's rules.
    fn evaluate(&mut self, name: &UnitName) {
        self.touched.note_wanted(name);
        self.world.wanted.remove(name);
        self.unschedulable.remove(name);
        let Some(record) = self.units.get(name) else {
            return;
        };
        let Some(target) = Target::of(record.desired) else {
            return;
        };
        if name.kind() == UnitKind::Template {
            return;
        }
        let requirements = match self.bodies.get(&record.hash) {
            None => Err("it has no stored body (destroy it and submit it again)".to_string()),
            Some(body) => body
                .requirements(name)
                .map_err(|e| format!("its stored body is invalid: {e}")),
        };
        match requirements {
            Ok(requirements) => {
                let proposal = Proposal {
                    hash: record.hash,
                    target,
                };
                let wanted = Wanted {
                    proposal,
                    requirements,
                };
                self.world.wanted.insert(name.clone(), wanted);
            }
            Err(reason) => {
                self.unschedulable.insert(name.clone(), reason);
            }
        }
    }

    /// Decides again every unit with body `hash` (the body came or went).
    fn evaluate_units_of(&mut self, hash: &UnitHash) {
        let names: Vec<UnitName> = self
            .by_hash
            .get(hash)
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.evaluate(&name);
        }
    }

    /// Rebuilds the machines a pass may use, and those draining, after a
    /// presence record, drain mark or metadata changed.
    fn settle(&mut self) {
        if !std::mem::take(&mut self.machines_changed) {
            return;
        }
        self.world.machines.clear();
        self.world.draining.clear();
        for record in self.machines.values() {
            if self.drains.contains(&record.id) {
                self.world.draining.insert(record.id.clone());
            } else {
                self.world.machines.push(Machine {
                    metadata: metadata::merge(&record.metadata, self.dynamic.get(&record.id)),
                    id: record.id.clone(),
                });
            }
        }
    }
}

/// Removes `outer[unit][machine]`, and `unit` once it has no machine left.
fn remove_inner<V>(
    outer: &mut BTreeMap<UnitName, BTreeMap<String, V>>,
    unit: &UnitName,
    machine: &str,
) {
    if let Some(on) = outer.get_mut(unit) {
        on.remove(machine);
        if on.is_empty() {
            outer.remove(unit);
        }
    }
}

/// Why a view's watch ended: the view must be loaded again.
#[derive(Debug)]
pub struct WatchEnded(pub ClientError);

/// Sends every batch of events under the registry from revision `from` on,
/// until the watch fails (its history compacted, or no member answers) or
/// the receiver is gone; then sends why and returns.
pub async fn follow(
    endpoints: Vec<String>,
    from: Revision,
    events: UnboundedSender<Result<Vec<Event>, WatchEnded>>,
) {
    let client = match Client::connect(&endpoints).await {
        Ok(client) => client,
        Err(e) => {
            let _ = events.send(Err(WatchEnded(e)));
            return;
        }
    };
    let mut watch = client.watch(keys::ROOT, from);
    loop {
        match watch.next().await {
            Ok(batch) => {
                if events.send(Ok(batch)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = events.send(Err(WatchEnded(e)));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, key: String, value: &[u8], revision: Revision) -> Event {
        Event {
            kind,
            kv: KeyValue {
                key,
                value: value.to_vec(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: None,
            },
        }
    }

    #[test]
    fn only_what_the_scheduler_decides_from_wakes_it() {
        let unit = UnitName::parse("web@1.service").unwrap();
        let pair = (unit.clone(), "m1".to_string());
        let mut view = View::from_kvs(&[], 1, Arc::default());
        assert!(view.take_touched().all, "a fresh view asks for a full pass");
        assert!(!view.is_touched());
        let put = |key: String, revision| event(EventKind::Put, key, b"{}", revision);
        view.apply(&[put(keys::renewal("m1"), 2), put(keys::reason(&unit), 3)]);
        view.apply(&[put(keys::state(&unit, "m1"), 4)]);
        assert!(!view.is_touched(), "renewals, reasons and states do not");
        assert_eq!(view.revision(), 4);
        let proposal = records::encode(&Proposal {
            hash: UnitHash::of_text("x"),
            target: Target::Launched,
        });
        view.apply(&[event(
            EventKind::Put,
            keys::proposal("m1", &unit),
            &proposal,
            5,
        )]);
        assert_eq!(view.unclaimed().count(), 1, "proposed, not claimed");
        view.apply(&[put(keys::claim("m1", &unit), 6)]);
        let touched = view.take_touched();
        assert_eq!(
            touched.pairs,
            BTreeSet::from([pair.clone()]),
            "a claim does"
        );
        assert_eq!(view.world().claims[&unit].len(), 1);
        assert_eq!(view.unclaimed().count(), 0);
        assert_eq!(view.claimed_per_machine()["m1"], 1);
        view.apply(&[put(keys::drain("m1"), 7)]);
        assert_eq!(
            view.take_touched().machines,
            BTreeSet::from(["m1".to_string()])
        );
        view.apply(&[put(keys::state(&unit, "m1"), 8)]);
        assert_eq!(
            view.take_touched().units,
            BTreeSet::from([unit.clone()]),
            "states do while a machine drains"
        );
        let gone = event(EventKind::Delete, keys::claim("m1", &unit), b"", 9);
        view.apply(&[gone]);
        assert_eq!(view.take_touched().pairs, BTreeSet::from([pair]));
        assert!(view.world().claims.is_empty(), "no empty entry is left");
        assert!(view.claimed_per_machine().is_empty());
        let unclaimed: Vec<_> = view.unclaimed().collect();
        assert_eq!(
            unclaimed,
            [(&unit, &"m1".to_string(), 5)],
            "unclaimed again"
        );
    }
}
