//! The scheduler's view of the registry, kept current by the member's one watch.
//!
//! Reading the whole registry for every pass (five range reads of every
//! unit, machine, proposal and claim, on every change and every half second)
//! cost the Raft leader most of a core at 1,000 hosts and 30,000 units, with
//! nothing changing (issue 14). A [`View`] reads everything once
//! ([`View::load`]: page by page, replaying the changes made meanwhile, so it
//! is the registry at one revision), then applies the store's events from
//! the next revision on, so a pass decides from memory and an idle cluster
//! costs its scheduler nothing.
//!
//! One decoded registry per member: the records the API lists too (units,
//! machines, drains, metadata, reported states, claim counts, reasons) are
//! not kept here a second time. The view holds a registry [`Index`], and on a
//! daemon that index is the member's copy's own ([`super::mirror`], one
//! watch of the whole store): [`View::apply_copy`] takes each of its updates,
//! adopts its index (a clone of persistent maps: shared, not copied) and
//! applies the update's events only to what the scheduler alone keeps
//! (bodies and the rules parsed from them, proposals with their revisions,
//! claims by unit, placement pointers, what changed since the last pass).
//! Records are decoded in one place, [`Index`]; the reported states in the
//! world a pass plans over are the index's own, behind `Arc`s. A view loaded
//! for one use (or in tests) applies events to its own index
//! ([`View::apply`]).
//!
//! The events applied in order leave the view equal to a fresh load at the
//! same revision (`tests/view.rs` checks that against a real store for random
//! sequences of registry changes, fed both ways). The view is loaded again
//! only when its updates skip revisions (the copy reloaded after its watch
//! broke) or its member starts leading.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use imbl::OrdMap;

use super::bodies::{Body, BodyCache};
use super::index::Index;
use super::keys::{self, MachineKey};
use super::mirror::Update;
use super::per_machine::ByMachine;
use super::records::{self, Proposal, Target};
use super::schedule::{Reading, Seen, Touched, Wanted, World};
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Event, EventKind, KeyValue, Revision};
use crate::consensus::protocol::PAGE_KEYS;
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
    /// The registry decoded: unit records, presence records, drain marks,
    /// metadata, reported states, claims per machine, stored reasons. The
    /// member's copy's own index when fed by [`View::apply_copy`].
    registry: Index,
    /// The units of each body hash, to decide again when a body comes or goes.
    by_hash: HashMap<UnitHash, BTreeSet<UnitName>>,
    /// What a pass plans over (its `stale` is the scheduler's to fill).
    world: World,
    /// Units that should run but cannot be scheduled at all, with the reason.
    unschedulable: BTreeMap<UnitName, String>,
    /// Proposals not claimed on their machine, with their revision: what
    /// the scheduler ages against the claim bound, without a walk over
    /// every proposal.
    unclaimed: BTreeMap<(UnitName, String), Revision>,
    /// Whether `world.machines` must be rebuilt from the records.
    machines_changed: bool,
    /// What a pass decides from that changed since [`View::take_touched`].
    touched: Touched,
}

/// Why a view cannot take an update of the member's copy: the copy went on
/// from a revision past the view's (it loaded again), so events between are
/// missing. The view must be loaded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the registry copy went on from revision {since}, past the view's {view}")]
pub struct Behind {
    /// The revision the update starts from.
    pub since: Revision,
    /// The view's revision.
    pub view: Revision,
}

impl View {
    /// Reads the whole registry, parsing bodies into `cache` (the daemon's
    /// one cache), which afterwards holds only the bodies still stored.
    pub async fn load(client: &Client, cache: Arc<BodyCache>) -> Result<View, ClientError> {
        View::load_in_pages(client, cache, PAGE_KEYS).await
    }

    /// [`View::load`] reading pages of at most `page_keys` keys. The pages
    /// are read at the revisions of their moments ([`Client::range_all`]):
    /// the changes made meanwhile are replayed from a watch, from the first
    /// page's revision on, until the view reaches the last page's, so the
    /// view returned is the registry at its revision. History compacted
    /// past the first page fails the load ([`ClientError::Compacted`]): load
    /// again.
    pub async fn load_in_pages(
        client: &Client,
        cache: Arc<BodyCache>,
        page_keys: u32,
    ) -> Result<View, ClientError> {
        let paged = client.range_all_with(keys::ROOT, false, page_keys).await?;
        let mut view = View::from_kvs(&paged.kvs, paged.revision, cache);
        let whole_at = paged.last_revision;
        drop(paged);
        if view.revision >= whole_at {
            return Ok(view);
        }
        // Every key of the store: the last page's revision may be a change
        // outside the registry, which only a watch of everything sees.
        let mut watch = client.watch("", view.revision + 1);
        while view.revision < whole_at {
            let events = watch.next().await?;
            let registry: Vec<Event> = events
                .iter()
                .filter(|e| e.kv.key.starts_with(keys::ROOT))
                .cloned()
                .collect();
            view.apply(&registry);
            if let Some(last) = events.last() {
                view.revision = view.revision.max(last.revision());
            }
        }
        view.loaded();
        Ok(view)
    }

    /// The view of a registry holding exactly `kvs`, read at `revision`.
    pub fn from_kvs(kvs: &[KeyValue], revision: Revision, cache: Arc<BodyCache>) -> View {
        let mut view = View {
            cache,
            ..View::default()
        };
        for kv in kvs {
            view.own(EventKind::Put, kv);
        }
        view.settle();
        view.revision = revision;
        view.loaded();
        view
    }

    /// A view just loaded: the cache keeps only the bodies still stored,
    /// and the next pass decides everything.
    fn loaded(&mut self) {
        let live: HashSet<UnitHash> = self.bodies.keys().copied().collect();
        self.cache.keep_only(&live);
        self.touched = Touched {
            all: true,
            ..Touched::default()
        };
    }

    /// Applies a batch of watch events, in order (whole revisions), to the
    /// view's own index and the rest.
    pub fn apply(&mut self, events: &[Event]) {
        for event in events {
            self.own(event.kind, &event.kv);
            self.revision = self.revision.max(event.revision());
        }
        self.settle();
    }

    /// Takes an update of the member's copy of the registry: adopts its index
    /// (shared) and applies the events past this view's revision to the rest.
    /// An update behind the view changes nothing; one that starts past it
    /// fails with [`Behind`].
    pub fn apply_copy(&mut self, update: &Update) -> Result<(), Behind> {
        if update.since > self.revision {
            return Err(Behind {
                since: update.since,
                view: self.revision,
            });
        }
        if update.copy.revision() < self.revision {
            return Ok(());
        }
        let before = std::mem::replace(&mut self.registry, update.copy.index().clone());
        for event in update.events() {
            if event.revision() > self.revision && event.kv.key.starts_with(keys::ROOT) {
                let old = unit_hash(&before, &event.kv.key);
                self.note(event.kind, &event.kv, old);
            }
        }
        self.revision = update.copy.revision();
        self.settle();
        Ok(())
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
    pub fn claimed_per_machine(&self) -> &OrdMap<String, usize> {
        self.registry.claims_per_machine()
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
    pub fn reasons(&self) -> &OrdMap<UnitName, String> {
        self.registry.reasons()
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
            reasons: self
                .reasons()
                .iter()
                .map(|(u, r)| (u.clone(), r.clone()))
                .collect(),
        }
    }

    /// Applies one event to the view's own index, then to the rest.
    fn own(&mut self, kind: EventKind, kv: &KeyValue) {
        let old = unit_hash(&self.registry, &kv.key);
        match kind {
            EventKind::Put => self.registry.put(kv),
            EventKind::Delete => self.registry.delete(&kv.key),
        }
        self.note(kind, kv, old);
    }

    /// Applies one event, already in [`View::registry`], to what the view
    /// keeps besides it; `old` is the body hash of the unit before, for an
    /// event of a unit record.
    fn note(&mut self, kind: EventKind, kv: &KeyValue, old: Option<UnitHash>) {
        let key = kv.key.as_str();
        let put = kind == EventKind::Put;
        if let Some(name) = keys::unit_after(keys::UNITS, key) {
            let name = self.registry.shared_name(name);
            self.rehash(&name, old);
            self.evaluate(&name);
        } else if let Some(hash) = keys::parse_body_key(key) {
            if put {
                if !self.bodies.contains_key(&hash) {
                    let body = self.cache.insert(hash, &kv.value);
                    self.bodies.insert(hash, body);
                    self.evaluate_units_of(&hash);
                }
            } else {
                self.bodies.remove(&hash);
                self.cache.remove(&hash);
                self.evaluate_units_of(&hash);
            }
        } else if let Some(id) = key
            .strip_prefix(keys::MACHINES)
            .or_else(|| key.strip_prefix(keys::DRAIN))
            .or_else(|| keys::parse_metadata_key(key).map(|(id, _)| id))
        {
            self.machines_changed = true;
            self.touched.note_machine(id);
        } else if let Some(unit) = keys::unit_after(keys::PLACED, key) {
            let unit = self.registry.shared_name(unit);
            self.touched.note_unit(&unit);
            if put {
                let machine = String::from_utf8_lossy(&kv.value).into_owned();
                self.world.placed.insert(unit, (machine, kv.mod_revision));
            } else {
                self.world.placed.remove(&unit);
            }
        } else if let Some((unit, id)) = keys::parse_state_key(key) {
            let unit = self.registry.shared_name(unit);
            if self.registry.any_drained() {
                // Make-before-break off a draining machine waits for them.
                self.touched.note_unit(&unit);
            }
            match self.registry.state(&unit, &id) {
                Some(state) => {
                    let state = state.clone();
                    self.world.reported.insert((unit, id), state);
                }
                None => {
                    self.world.reported.remove(&(unit, id));
                }
            }
        } else {
            match keys::parse_machine_key(key) {
                Some(MachineKey::Proposal(id, unit)) => {
                    let unit = self.registry.shared_name(unit);
                    self.touched.note_pair(&unit, &id);
                    let proposal = records::decode::<Proposal>(key, &kv.value);
                    match proposal.ok().filter(|_| put) {
                        Some(proposal) => self.put_proposal(unit, id, proposal, kv.mod_revision),
                        None => self.forget_proposal(&unit, &id),
                    }
                }
                Some(MachineKey::Claim(id, unit)) => {
                    let unit = self.registry.shared_name(unit);
                    self.touched.note_pair(&unit, &id);
                    if put {
                        self.unclaimed.remove(&(unit.clone(), id.clone()));
                        self.world.claims.entry(unit).or_default().insert(id);
                    } else {
                        self.forget_claim(unit, id);
                    }
                }
                Some(MachineKey::Generation(_)) | None => {}
            }
        }
    }

    /// Keeps the proposal of `unit` on `machine`, read at `revision`.
    fn put_proposal(
        &mut self,
        unit: UnitName,
        machine: String,
        proposal: Proposal,
        revision: Revision,
    ) {
        let seen = Seen {
            proposal,
            mod_revision: revision,
        };
        if !self.world.is_claimed(&unit, &machine) {
            self.unclaimed
                .insert((unit.clone(), machine.clone()), revision);
        }
        self.world
            .proposals
            .entry(unit)
            .or_default()
            .insert(machine, seen);
    }

    /// Drops the proposal of `unit` on `machine`.
    fn forget_proposal(&mut self, unit: &UnitName, machine: &str) {
        remove_inner(&mut self.world.proposals, unit, machine);
        self.unclaimed.remove(&(unit.clone(), machine.to_string()));
    }

    /// Drops the claim of `unit` on `machine`: its proposal there, if any,
    /// is unclaimed again.
    fn forget_claim(&mut self, unit: UnitName, machine: String) {
        let Some(on) = self.world.claims.get_mut(&unit) else {
            return;
        };
        if on.remove(&machine) {
            let revision = self
                .world
                .proposals
                .get(&unit)
                .and_then(|on| on.get(&machine))
                .map(|seen| seen.mod_revision);
            if let Some(revision) = revision {
                self.unclaimed.insert((unit.clone(), machine), revision);
            }
        }
        if on.is_empty() {
            self.world.claims.remove(&unit);
        }
    }

    /// Files unit `name` under its body hash now, and no longer under `old`.
    fn rehash(&mut self, name: &UnitName, old: Option<UnitHash>) {
        let now = self.registry.unit(name).map(|r| r.hash);
        if let Some(hash) = now {
            self.by_hash.entry(hash).or_default().insert(name.clone());
        }
        if let Some(old) = old
            && now != Some(old)
            && let Some(names) = self.by_hash.get_mut(&old)
        {
            names.remove(name);
            if names.is_empty() {
                self.by_hash.remove(&old);
            }
        }
    }

    /// Decides again whether unit `name` is wanted, unschedulable or
    /// neither, from its record and its body's rules.
    fn evaluate(&mut self, name: &UnitName) {
        self.touched.note_wanted(name);
        self.world.wanted.remove(name);
        self.unschedulable.remove(name);
        let Some(record) = self.registry.unit(name) else {
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
        for (_, record) in self.registry.machine_records() {
            if self.registry.is_drained(&record.id) {
                self.world.draining.insert(record.id.clone());
            } else {
                self.world.machines.push(Machine {
                    metadata: self.registry.metadata_of(record),
                    id: record.id.clone(),
                });
            }
        }
    }
}

/// The body hash `index` files the unit of `key` under, if `key` is a unit
/// record's.
fn unit_hash(index: &Index, key: &str) -> Option<UnitHash> {
    let name = keys::unit_after(keys::UNITS, key)?;
    index.unit(&name).map(|r| r.hash)
}

/// Removes `outer[unit][machine]`, and `unit` once it has no machine left.
fn remove_inner<V>(outer: &mut BTreeMap<UnitName, ByMachine<V>>, unit: &UnitName, machine: &str) {
    if let Some(on) = outer.get_mut(unit) {
        on.remove(machine);
        if on.is_empty() {
            outer.remove(unit);
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
        let claim = records::encode(&records::Claim {
            instance: "i".to_string(),
        });
        view.apply(&[event(EventKind::Put, keys::claim("m1", &unit), &claim, 6)]);
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

    fn state(active: &str) -> Vec<u8> {
        records::encode(&crate::registry::records::ReportedState {
            hash: UnitHash::of_text("x"),
            state: crate::registry::UnitState {
                load: "loaded".to_string(),
                active: active.to_string(),
                sub: "running".to_string(),
            },
            target: None,
            reason: None,
        })
    }

    /// Fed by a copy's updates, the view keeps no record of its own: the
    /// world's reported states are the copy's, and an update that skips
    /// revisions is refused.
    #[test]
    fn a_view_fed_by_the_copy_shares_its_records_and_refuses_a_gap() {
        use super::super::mirror::Snapshot;
        let unit = UnitName::parse("web@1.service").unwrap();
        let mut view = View::from_kvs(&[], 1, Arc::default());
        let mut copy = Snapshot::from_kvs(&[], 1);
        let mut feed = |view: &mut View, events: Vec<Event>| {
            let since = copy.revision();
            copy.apply(&events);
            let update = Update {
                since,
                events: vec![events.into()],
                copy: copy.clone(),
            };
            view.apply_copy(&update).map(|()| copy.clone())
        };
        let at = (unit.clone(), "m1".to_string());
        let put = event(
            EventKind::Put,
            keys::state(&unit, "m1"),
            &state("active"),
            2,
        );
        let copy_now = feed(&mut view, vec![put]).unwrap();
        assert_eq!(view.revision(), 2);
        let shared = copy_now.index().state(&unit, "m1").unwrap();
        assert!(
            Arc::ptr_eq(shared, &view.world().reported[&at]),
            "the same record, not a copy"
        );
        // An update the view is past changes nothing.
        let old = Update::loaded(Snapshot::from_kvs(&[], 1));
        assert_eq!(view.apply_copy(&old), Ok(()));
        assert_eq!(view.revision(), 2);
        assert_eq!(view.world().reported.len(), 1);
        // A copy that loaded again past the view: events are missing.
        let reloaded = Update::loaded(Snapshot::from_kvs(&[], 5));
        assert_eq!(
            view.apply_copy(&reloaded),
            Err(Behind { since: 5, view: 2 })
        );
        let gone = event(EventKind::Delete, keys::state(&unit, "m1"), b"", 3);
        feed(&mut view, vec![gone]).unwrap();
        assert!(view.world().reported.is_empty());
    }
}
