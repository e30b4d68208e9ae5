//! One scheduling pass, as a pure function: the cluster as read from the
//! store in, the proposals to write and withdraw out. Both are the registry's
//! types ([`World`], [`Change`], from [`crate::registry::schedule`]), which
//! reads the one and writes the other.
//!
//! Rules, in this order:
//! 1. Proposals of units nobody wants any more (destroyed, set inactive) are
//!    withdrawn; the machine's agent stops the unit and releases its claim.
//! 2. Two units proposed on one machine that must not share it (a
//!    `Conflicts` glob or `Replaces` that now matches, after a `--replace`)
//!    evict one, the one [`crate::units::colocation::evicted`] names: the unit
//!    matched by the other's glob goes (both matching each other: the greater
//!    name goes), so the unit whose file asked for the exclusion keeps its
//!    place. A unit already evicted, or only claimed there (being stopped),
//!    evicts nobody: it is leaving.
//! 3. Units are then decided one by one in name order with
//!    [`crate::units::placement::decide`], counting every proposal made so far
//!    in this pass, so a bulk start spreads over the machines.
//!    * A global unit is proposed to every eligible machine and withdrawn
//!      from the others.
//!    * A non-global unit keeps its proposal while its machine is alive,
//!      undrained and eligible. A proposal nobody claimed within the bound
//!      (`stale`) moves to another eligible machine, if there is one. A unit
//!      still claimed somewhere without a proposal waits, and an unclaimed
//!      proposal of it elsewhere is withdrawn: its machine is stopping it,
//!      and it must not run twice.
//!    * A unit with `Replaces` goes where it displaces a unit, whose proposal
//!      is withdrawn; one proposed earlier in this same pass is decided again
//!      instead, so the two are never proposed to one machine.
//!
//!    * A unit claimed on a draining machine (alive, drained) moves
//!      make-before-break ([`handover`]): it keeps its place there until a
//!      replacement is active on another machine.
//!
//! Every change carries the revisions it was decided from, so the scheduler's
//! transactions fail instead of acting on a stale view.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

mod handover;
mod pairs;

pub use crate::registry::schedule::{Change, Seen, Touched, Wanted, World};

use crate::registry::Revision;
use crate::units::UnitName;
use crate::units::colocation;
use crate::units::placement::{
    Cluster, Decision, Here, Machine, Outcome, Placed, decide, decide_with, least_loaded,
};
use pairs::{Occupants, Pairs};

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The writes, in order.
    pub changes: Vec<Change>,
    /// Units that fit nowhere, with the reason.
    pub unplaceable: Vec<(UnitName, String)>,
    /// Units that should move but found no room, and stay as they are for
    /// now (a stale proposal nowhere else fits, a unit displaced again):
    /// like unplaceable ones, any change anywhere may make room.
    pub waiting: BTreeSet<UnitName>,
}

impl Plan {
    /// What the next pass must decide again because of this one: every
    /// (unit, machine) pair it writes and every unit it could not place. A
    /// write that fails (or has not landed yet) leaves the world as it was,
    /// and the next pass must then make the same decision.
    pub fn carried(&self) -> Touched {
        let mut touched = Touched::default();
        for change in &self.changes {
            match change {
                Change::Propose {
                    unit,
                    machine,
                    from,
                    ..
                } => {
                    touched.note_pair(unit, machine);
                    if let Some((old, _)) = from {
                        touched.note_pair(unit, old);
                    }
                }
                Change::Update { unit, machine, .. } | Change::Withdraw { unit, machine, .. } => {
                    touched.note_pair(unit, machine);
                }
            }
        }
        for unit in self.unplaceable.iter().map(|(u, _)| u).chain(&self.waiting) {
            touched.note_unit(unit);
        }
        touched
    }
}

/// Runs one pass over `world`, deciding every unit.
pub fn plan(world: &World) -> Plan {
    plan_with(world, None, true)
}

/// Runs one pass over `world` that decides only the units whose decision
/// `touched` may have changed, which makes the same plan as [`plan`] when
/// `touched` holds every change since a pass over the world before them,
/// and what that pass carried ([`Plan::carried`]); the tests check this over
/// random sequences of changes. A unit's decision depends on its own
/// records, the machines it is on, and the units there (for a unit that
/// names no other: only the units there that can exclude others), so a
/// pass decides:
/// * the units touched, and every global unit (decided against every machine);
/// * every unit on a machine that came, went or changed;
/// * on a machine where a unit came or went, the units there that name
///   others (all units there when the one that came or went can exclude
///   others, or its rules changed);
/// * units that this pass itself moves next to, the same way, as it goes.
///
/// Every unit it does not decide would have kept its place unchanged.
///
/// `index` is what the last pass left (or [`Index::default`]); it is brought
/// up to date with `touched` first, and left up to date with `world`.
pub fn plan_touched(world: &World, touched: &Touched, index: &mut Index) -> Plan {
    index.sync(world, touched);
    let (plan, left) = pass_over(Pass::with(world, std::mem::take(index)), Some(touched));
    *index = left;
    plan
}

/// [`plan`] or [`plan_touched`], deciding units by walking machines in load
/// order when `fast` ([`least_loaded`]), else with every machine's verdict:
/// the same plan, which the tests check on random worlds.
fn plan_with(world: &World, touched: Option<&Touched>, fast: bool) -> Plan {
    let mut pass = Pass::new(world);
    pass.fast = fast;
    pass_over(pass, touched).0
}

/// Runs `pass` over every unit, or over those `touched` may have changed.
fn pass_over<'w>(mut pass: Pass<'w>, touched: Option<&Touched>) -> (Plan, Index) {
    let world = pass.world;
    let Some(touched) = touched.filter(|t| !t.all) else {
        pass.withdraw_unwanted(world.proposals.keys());
        pass.evict_conflicts(None);
        for (name, wanted) in &world.wanted {
            pass.place(name, wanted);
        }
        return pass.finish();
    };
    let machines = pass.focus_on(touched);
    let first: Vec<UnitName> = pass.focus.iter().flatten().cloned().collect();
    pass.withdraw_unwanted(first.iter());
    pass.evict_conflicts(Some(&machines));
    // In name order, as a full pass; units this pass adds behind the
    // cursor are decided too.
    let mut cursor: Option<UnitName> = None;
    loop {
        let focus = pass.focus.as_ref().expect("set by focus_on");
        let next = match &cursor {
            None => focus.iter().next(),
            Some(at) => focus
                .range::<UnitName, _>((Bound::Excluded(at), Bound::Unbounded))
                .next(),
        };
        let Some(name) = next.cloned() else {
            break;
        };
        if let Some(wanted) = world.wanted.get(&name) {
            pass.place(&name, wanted);
        }
        cursor = Some(name);
    }
    pass.finish()
}

/// Who is where, as a pass needs to know it: every (unit, machine) pair
/// proposed or claimed, indexed by machine and by load. Built from a world
/// it costs a walk over every proposal and claim, which at 30,000 units was
/// most of a pass that decided a few; the scheduler keeps one between passes
/// and [`plan_touched`] brings it up to date with what changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Index {
    /// (unit, machine) pairs that occupy a machine: proposed or claimed.
    occupants: Occupants,
    /// (unit, machine) pairs proposed.
    live: Pairs,
}

impl Index {
    /// The index of `world`.
    pub fn of(world: &World) -> Index {
        let mut index = Index {
            occupants: Occupants::new(&world.machines),
            live: Pairs::default(),
        };
        for (unit, on) in &world.proposals {
            let wanted = world.wanted.get(unit);
            for machine in on.keys() {
                index.live.insert((unit.clone(), machine.clone()));
                index
                    .occupants
                    .insert((unit.clone(), machine.clone()), wanted);
            }
        }
        for (unit, on) in &world.claims {
            let wanted = world.wanted.get(unit);
            for machine in on {
                index
                    .occupants
                    .insert((unit.clone(), machine.clone()), wanted);
            }
        }
        index
    }

    /// Brings the index up to date with `world`, which differs from the
    /// world it was of by `touched` (everything, when `touched.all`).
    fn sync(&mut self, world: &World, touched: &Touched) {
        if touched.all {
            *self = Index::of(world);
            return;
        }
        let units: BTreeSet<&UnitName> = touched
            .wanted
            .iter()
            .chain(touched.pairs.iter().map(|(unit, _)| unit))
            .collect();
        for unit in units {
            self.resync(world, unit);
        }
        if !touched.machines.is_empty() {
            self.occupants.reorder(&world.machines);
        }
    }

    /// Puts every pair of `unit` as `world` has them.
    fn resync(&mut self, world: &World, unit: &UnitName) {
        let old: Vec<String> = self
            .occupants
            .machines_of(unit)
            .map(str::to_string)
            .collect();
        for machine in old {
            let pair = (unit.clone(), machine);
            self.occupants.remove(&pair);
            self.live.remove(&pair);
        }
        let wanted = world.wanted.get(unit);
        for machine in world
            .proposals
            .get(unit)
            .into_iter()
            .flat_map(|on| on.keys())
        {
            self.live.insert((unit.clone(), machine.clone()));
            self.occupants
                .insert((unit.clone(), machine.clone()), wanted);
        }
        for machine in world.claims.get(unit).into_iter().flatten() {
            self.occupants
                .insert((unit.clone(), machine.clone()), wanted);
        }
    }
}

/// The decision the pass makes for `unit` from `world`, machine by machine,
/// with the same facts (every unit proposed or claimed counts), for
/// `flotilla explain`; `None` when the unit is not wanted (inactive, a
/// template, an unreadable body).
pub fn explain(world: &World, unit: &UnitName) -> Option<Decision> {
    let wanted = world.wanted.get(unit)?;
    Some(Pass::new(world).decision(unit, wanted, None))
}

struct Pass<'w> {
    world: &'w World,
    plan: Plan,
    /// (unit, machine) pairs that occupy a machine: proposed or claimed.
    occupants: Occupants,
    /// (unit, machine) pairs proposed once this pass is written: the stored
    /// proposals not withdrawn, and the new ones. A unit claimed on a machine
    /// without one is being stopped there.
    live: Pairs,
    /// Proposals withdrawn in this pass.
    withdrawn: BTreeSet<(UnitName, String)>,
    /// The machines that may take work, by id.
    alive: BTreeMap<&'w str, &'w Machine>,
    /// Whether a unit that takes the least-loaded eligible machine is placed
    /// by walking the machines in load order (see [`plan_with`]).
    fast: bool,
    /// The units this pass decides, when not all ([`plan_touched`]); it
    /// grows as the pass moves units next to others.
    focus: Option<BTreeSet<UnitName>>,
    /// The units this pass moved in `occupants` and `live`.
    changed: BTreeSet<UnitName>,
}

impl<'w> Pass<'w> {
    fn new(world: &'w World) -> Self {
        Pass::with(world, Index::of(world))
    }

    /// A pass over `world` using `index`, which must be up to date with it.
    fn with(world: &'w World, index: Index) -> Self {
        Pass {
            world,
            plan: Plan::default(),
            occupants: index.occupants,
            live: index.live,
            withdrawn: BTreeSet::new(),
            alive: world.machines.iter().map(|m| (m.id.as_str(), m)).collect(),
            fast: true,
            focus: None,
            changed: BTreeSet::new(),
        }
    }

    /// The plan, and the index as it was before the pass (the units the
    /// pass moved put back as the world has them).
    fn finish(self) -> (Plan, Index) {
        let mut index = Index {
            occupants: self.occupants,
            live: self.live,
        };
        for unit in &self.changed {
            index.resync(self.world, unit);
        }
        (self.plan, index)
    }

    /// Decides `unit`.
    fn place(&mut self, unit: &UnitName, wanted: &Wanted) {
        if wanted.requirements.global {
            self.place_global(unit, wanted);
        } else {
            self.place_one(unit, wanted);
        }
    }

    /// Sets the units a pass decides after `touched` (see [`plan_touched`]);
    /// returns the machines where two units may have come to exclude each other.
    fn focus_on(&mut self, touched: &Touched) -> BTreeSet<String> {
        let mut focus: BTreeSet<UnitName> = touched.units.clone();
        let mut machines = BTreeSet::new();
        for unit in &touched.wanted {
            focus.insert(unit.clone());
            for machine in self.occupants.machines_of(unit) {
                machines.insert(machine.to_string());
                focus.extend(self.occupants.on(machine).cloned());
            }
        }
        for (unit, machine) in &touched.pairs {
            focus.insert(unit.clone());
            let every = touched.wanted.contains(unit) || self.excludes(unit);
            self.occupants.neighbours(machine, every, &mut focus);
            machines.insert(machine.clone());
        }
        for machine in &touched.machines {
            focus.extend(self.occupants.on(machine).cloned());
        }
        for (unit, wanted) in &self.world.wanted {
            if wanted.requirements.global {
                focus.insert(unit.clone());
            }
        }
        self.focus = Some(focus);
        machines
    }

    /// Whether `unit` is wanted and can exclude others.
    fn excludes(&self, unit: &UnitName) -> bool {
        self.world
            .wanted
            .get(unit)
            .is_some_and(|w| colocation::excludes_any(&w.requirements))
    }

    /// `unit` came to or left `machine` in this pass: in a pass that decides
    /// some units only, it and the units whose decision that may change are
    /// decided too (those not decided yet).
    fn moved(&mut self, unit: &UnitName, machine: &str) {
        self.changed.insert(unit.clone());
        let every = self.excludes(unit);
        if let Some(focus) = self.focus.as_mut() {
            focus.insert(unit.clone());
            self.occupants.neighbours(machine, every, focus);
        }
    }

    fn withdraw(&mut self, unit: &UnitName, machine: &str) {
        let Some(seen) = self
            .world
            .proposals
            .get(unit)
            .and_then(|on| on.get(machine))
        else {
            return;
        };
        if !self.withdrawn.insert((unit.clone(), machine.to_string())) {
            return;
        }
        self.live.remove(&(unit.clone(), machine.to_string()));
        let placed_revision = self
            .world
            .placed
            .get(unit)
            .filter(|(m, _)| m == machine)
            .map(|(_, rev)| *rev);
        self.plan.changes.push(Change::Withdraw {
            unit: unit.clone(),
            machine: machine.to_string(),
            mod_revision: seen.mod_revision,
            placed_revision,
        });
        // A claimed unit keeps occupying the machine until its agent releases it.
        let claimed = self
            .world
            .claims
            .get(unit)
            .is_some_and(|on| on.contains(machine));
        if !claimed {
            self.occupants.remove(&(unit.clone(), machine.to_string()));
        }
        self.moved(unit, machine);
    }

    /// Withdraws every proposal of the units of `units` nobody wants.
    fn withdraw_unwanted<'u>(&mut self, units: impl Iterator<Item = &'u UnitName>) {
        let world = self.world;
        for unit in units {
            if world.wanted.contains_key(unit) {
                continue;
            }
            for machine in world
                .proposals
                .get(unit)
                .into_iter()
                .flat_map(|on| on.keys())
            {
                self.withdraw(unit, machine);
            }
        }
    }

    /// Withdraws one of every two units proposed on one machine that may not
    /// share it. A unit claimed there without a proposal is being stopped and
    /// evicts nobody; a unit already evicted evicts nobody more.
    ///
    /// Only machines with a unit that can exclude others can hold such a
    /// pair, and only pairs with one of those can be one: the rest are
    /// skipped (they would be allowed), in the same order as a walk over all.
    /// With `among`, only those machines are looked at.
    fn evict_conflicts(&mut self, among: Option<&BTreeSet<String>>) {
        let wanted = &self.world.wanted;
        let excludes = |unit: &UnitName| {
            wanted
                .get(unit)
                .is_some_and(|w| colocation::excludes_any(&w.requirements))
        };
        let machines: BTreeSet<String> = match among {
            None => self
                .live
                .iter()
                .filter(|(unit, _)| excludes(unit))
                .map(|(_, machine)| machine.clone())
                .collect(),
            Some(among) => among
                .iter()
                .filter(|m| self.live.on(m).any(&excludes))
                .cloned()
                .collect(),
        };
        for machine in machines {
            let units: Vec<(&UnitName, bool)> = self
                .live
                .on(&machine)
                .filter(|u| wanted.contains_key(*u))
                .map(|u| (u, excludes(u)))
                .collect();
            let mut evicted: BTreeSet<UnitName> = BTreeSet::new();
            for (i, (a, a_excludes)) in units.iter().enumerate() {
                for (b, b_excludes) in &units[i + 1..] {
                    if !a_excludes && !b_excludes {
                        continue;
                    }
                    if evicted.contains(*a) {
                        break;
                    }
                    if evicted.contains(*b) {
                        continue;
                    }
                    if let Some(loser) = self.leaver(a, b) {
                        evicted.insert(loser.clone());
                    }
                }
            }
            for unit in evicted {
                self.withdraw(&unit, &machine);
            }
        }
    }

    /// Which of two wanted units proposed on one machine must leave it, if
    /// they may not share it.
    fn leaver<'u>(&self, a: &'u UnitName, b: &'u UnitName) -> Option<&'u UnitName>
    where
        'w: 'u,
    {
        let wanted = &self.world.wanted;
        let (ra, rb) = (&wanted.get(a)?.requirements, &wanted.get(b)?.requirements);
        colocation::evicted((a, ra), (b, rb))
    }

    /// Where placement puts `unit` given every occupant (a withdrawn unit still
    /// claimed counts until released, except as a `MachineOf` peer: it is
    /// leaving), never on `exclude`. Most units take the least-loaded machine
    /// that admits them, found by walking the machines in load order; the
    /// others (and a unit nothing admits) get the full decision.
    fn decide(&self, unit: &UnitName, wanted: &Wanted, exclude: Option<&str>) -> Outcome {
        let rules = &wanted.requirements;
        if !self.fast {
            return self.decision(unit, wanted, exclude).outcome;
        }
        let names_none = !colocation::excludes_any(rules) && rules.machine_of.is_empty();
        let fast = least_loaded(
            self.by_load(unit, exclude),
            |machine: &Machine| self.here(unit, wanted, names_none, machine),
            unit,
            rules,
        );
        match fast {
            Some(outcome) => outcome,
            None => self.decision(unit, wanted, exclude).outcome,
        }
    }

    /// The machines that take work, but `exclude`, in the (load, id) order
    /// placement compares for `unit`: the load of a machine `unit` is on does
    /// not count `unit` itself.
    fn by_load<'p>(
        &'p self,
        unit: &UnitName,
        exclude: Option<&'p str>,
    ) -> impl Iterator<Item = &'w Machine> + 'p {
        let mine: Vec<&'p str> = self.occupants.machines_of(unit).collect();
        let mut own: Vec<(usize, &'w Machine)> = mine
            .iter()
            .filter(|id| Some(**id) != exclude)
            .filter_map(|id| self.alive.get(id))
            .map(|m| (self.occupants.load(&m.id).saturating_sub(1), *m))
            .collect();
        own.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
        let mut own = own.into_iter().peekable();
        let mut rest = self
            .occupants
            .by_load()
            .filter(move |(_, id)| Some(*id) != exclude && !mine.contains(id))
            .filter_map(|(load, id)| self.alive.get(id).map(|m| (load, *m)))
            .peekable();
        std::iter::from_fn(move || {
            let own_first = match (own.peek(), rest.peek()) {
                (Some(a), Some(b)) => (a.0, a.1.id.as_str()) < (b.0, b.1.id.as_str()),
                (Some(_), None) => true,
                (None, _) => false,
            };
            let next = if own_first { own.next() } else { rest.next() };
            next.map(|(_, machine)| machine)
        })
    }

    /// [`Pass::decide`] with every machine's verdict.
    fn decision(&self, unit: &UnitName, wanted: &Wanted, exclude: Option<&str>) -> Decision {
        let rules = &wanted.requirements;
        // A unit that names no other can only be kept off a machine by a unit
        // that excludes others: it needs the load and those, not every unit.
        let names_none = !colocation::excludes_any(rules) && rules.machine_of.is_empty();
        let fewer: Vec<Machine>;
        let machines = match exclude {
            Some(exclude) => {
                fewer = self
                    .world
                    .machines
                    .iter()
                    .filter(|m| m.id != exclude)
                    .cloned()
                    .collect();
                &fewer
            }
            None => &self.world.machines,
        };
        decide_with(
            machines,
            |machine: &Machine| self.here(unit, wanted, names_none, machine),
            unit,
            rules,
        )
    }

    /// What placement needs of `machine` to decide `unit`: its load without
    /// `unit`, and the units there whose rules could matter (for a unit that
    /// names none, only those that can exclude others).
    fn here<'p>(
        &'p self,
        unit: &'p UnitName,
        wanted: &'p Wanted,
        names_none: bool,
        machine: &'p Machine,
    ) -> Here<'p> {
        let id = machine.id.as_str();
        if names_none {
            let me = usize::from(self.occupants.has(unit, id));
            return Here {
                load: self.occupants.load(id) - me,
                units: self
                    .occupants
                    .excluding_on(id)
                    .filter_map(|u| self.placed_unit(u, id))
                    .collect(),
            };
        }
        let rules = &wanted.requirements;
        let units: Vec<Placed<'_>> = self
            .occupants
            .on(id)
            .filter(|u| *u != unit)
            .filter(|u| !rules.machine_of.contains(u) || self.live.has(u, id))
            .filter_map(|u| self.placed_unit(u, id))
            .collect();
        Here {
            load: units.len(),
            units,
        }
    }

    /// Proposes `unit` where placement decides, displacing what it replaces
    /// there; when it fits nowhere, records why (`why` words the reason).
    fn place_new(
        &mut self,
        unit: &UnitName,
        wanted: &Wanted,
        placed_revision: Option<Revision>,
        why: impl Fn(String) -> String,
    ) {
        match self.decide(unit, wanted, None) {
            Outcome::One { machine, displaces } => {
                self.propose(unit, &machine, wanted, None, placed_revision);
                for other in displaces {
                    self.displace(&other, &machine);
                }
            }
            Outcome::NotPlaceable { reason } => {
                self.plan.unplaceable.push((unit.clone(), why(reason)));
            }
            Outcome::Every { .. } => {
                self.plan.waiting.insert(unit.clone());
            }
        }
    }

    /// `unit` on `machine` as placement counts it, when it should run at all.
    fn placed_unit<'p>(&'p self, unit: &'p UnitName, machine: &'p str) -> Option<Placed<'p>> {
        self.world.wanted.get(unit).map(|w| Placed {
            name: unit,
            requirements: &w.requirements,
            machine,
        })
    }

    fn place_global(&mut self, unit: &UnitName, wanted: &Wanted) {
        let targets: BTreeSet<String> = match self.decide(unit, wanted, None) {
            Outcome::Every { machines } => machines.into_iter().collect(),
            Outcome::NotPlaceable { reason } => {
                self.plan.unplaceable.push((unit.clone(), reason));
                BTreeSet::new()
            }
            Outcome::One { machine, .. } => BTreeSet::from([machine]),
        };
        let current = self.world.proposals.get(unit).cloned().unwrap_or_default();
        for (machine, seen) in &current {
            if self.withdrawn.contains(&(unit.clone(), machine.clone())) {
                continue;
            }
            if !targets.contains(machine) && !self.stays_while_draining(unit, machine) {
                self.withdraw(unit, machine);
            } else if seen.proposal != wanted.proposal {
                self.update(unit, machine, wanted, seen);
            }
        }
        for machine in targets {
            if !current.contains_key(&machine) {
                self.propose(unit, &machine, wanted, None, None);
            }
        }
    }

    fn place_one(&mut self, unit: &UnitName, wanted: &Wanted) {
        if self.hand_over(unit, wanted) {
            return;
        }
        let mut current: Vec<(String, Seen)> = self
            .world
            .proposals
            .get(unit)
            .map(|on| {
                on.iter()
                    .filter(|(m, _)| !self.withdrawn.contains(&(unit.clone(), (*m).clone())))
                    .map(|(m, s)| (m.clone(), *s))
                    .collect()
            })
            .unwrap_or_default();
        // Never more than one proposal: keep a claimed one, else the first.
        current.sort_by_key(|(m, _)| (!self.world.is_claimed(unit, m), m.clone()));
        for (machine, _) in current.iter().skip(1) {
            self.withdraw(unit, machine);
        }
        let placed_revision = Some(self.world.placed.get(unit).map_or(0, |(_, rev)| *rev));
        let Some((machine, seen)) = current.into_iter().next() else {
            let elsewhere = self.world.claims.get(unit).is_some_and(|on| !on.is_empty());
            if !elsewhere {
                self.place_new(unit, wanted, placed_revision, |reason| reason);
            }
            return;
        };
        let claimed = self.world.is_claimed(unit, &machine);
        if !claimed && self.world.claims.get(unit).is_some_and(|on| !on.is_empty()) {
            // Still running elsewhere, being stopped there: this machine's
            // agent could claim it meanwhile and run it twice.
            self.withdraw(unit, &machine);
            return;
        }
        if !self.alive.contains_key(machine.as_str()) {
            if claimed {
                // Drained: its agent stops the unit and releases it first.
                self.withdraw(unit, &machine);
            } else {
                self.move_unclaimed(unit, wanted, &machine, &seen, true);
            }
            return;
        }
        if !claimed && self.world.stale.contains(&(unit.clone(), machine.clone())) {
            self.move_unclaimed(unit, wanted, &machine, &seen, false);
            return;
        }
        if !self.still_eligible(unit, wanted, &machine) {
            self.withdraw(unit, &machine);
            return;
        }
        if seen.proposal != wanted.proposal {
            self.update(unit, &machine, wanted, &seen);
        }
    }

    /// Whether `machine` may still run `unit` given everything else there.
    fn still_eligible(&self, unit: &UnitName, wanted: &Wanted, machine: &str) -> bool {
        let only = self
            .alive
            .get(machine)
            .map_or(&[][..], |m| std::slice::from_ref(*m));
        // Units that stay there: one being stopped does not count. A unit
        // that names no other can only be kept off by units that exclude
        // others (checked for every placed unit a pass decides, so only those).
        let rules = &wanted.requirements;
        let names_none = !colocation::excludes_any(rules) && rules.machine_of.is_empty();
        let placed: Vec<Placed<'_>> = if names_none {
            self.occupants
                .excluding_on(machine)
                .filter(|u| self.live.has(u, machine))
                .filter_map(|u| self.placed_unit(u, machine))
                .collect()
        } else {
            self.live
                .on(machine)
                .filter_map(|u| self.placed_unit(u, machine))
                .collect()
        };
        let decision = decide(
            Cluster {
                machines: only,
                placed: &placed,
            },
            unit,
            &wanted.requirements,
        );
        decision.eligible.iter().any(|m| m == machine)
    }

    /// Moves an unclaimed proposal off `machine`; `gone` when the machine is
    /// dead or drained (then it is withdrawn even if nowhere else fits).
    fn move_unclaimed(
        &mut self,
        unit: &UnitName,
        wanted: &Wanted,
        machine: &str,
        seen: &Seen,
        gone: bool,
    ) {
        let placed_revision = Some(self.world.placed.get(unit).map_or(0, |(_, rev)| *rev));
        match self.decide(unit, wanted, Some(machine)) {
            Outcome::One {
                machine: to,
                displaces,
            } => {
                self.withdrawn.insert((unit.clone(), machine.to_string()));
                self.occupants.remove(&(unit.clone(), machine.to_string()));
                self.live.remove(&(unit.clone(), machine.to_string()));
                self.moved(unit, machine);
                self.propose(
                    unit,
                    &to,
                    wanted,
                    Some((machine.to_string(), seen.mod_revision)),
                    placed_revision,
                );
                for other in displaces {
                    self.displace(&other, &to);
                }
            }
            Outcome::NotPlaceable { reason } if gone => {
                self.withdraw(unit, machine);
                self.plan.unplaceable.push((unit.clone(), reason));
            }
            _ => {
                self.plan.waiting.insert(unit.clone());
            }
        }
    }

    /// Makes `unit` leave `machine`, where a unit that replaces it was just
    /// proposed. A stored proposal is withdrawn. One made earlier in this pass
    /// is taken back before it is written, and a non-global unit is decided
    /// again now that its replacement is there.
    fn displace(&mut self, unit: &UnitName, machine: &str) {
        let key = (unit.clone(), machine.to_string());
        let at = self.plan.changes.iter().position(|c| {
            matches!(c, Change::Propose { unit: u, machine: m, .. } if *u == key.0 && *m == key.1)
        });
        let Some(at) = at else {
            self.withdraw(unit, machine);
            return;
        };
        let Change::Propose {
            from,
            placed_revision,
            ..
        } = self.plan.changes.remove(at)
        else {
            unreachable!("found as a proposal");
        };
        self.live.remove(&key);
        if !self.world.is_claimed(unit, machine) {
            self.occupants.remove(&key);
        }
        self.moved(unit, machine);
        let world = self.world;
        let Some(wanted) = world.wanted.get(unit).filter(|w| !w.requirements.global) else {
            return;
        };
        match self.decide(unit, wanted, None) {
            Outcome::One {
                machine: to,
                displaces,
            } if displaces.is_empty() => {
                match from {
                    // Back where it was moving from: the move is undone.
                    Some((old, _)) if old == to => {
                        let seen = world.proposals[unit][&old];
                        let old = (unit.clone(), old);
                        self.withdrawn.remove(&old);
                        self.live.insert(old.clone());
                        self.occupants.insert(old.clone(), Some(wanted));
                        self.moved(unit, &old.1);
                        // Where it was moving from, for want of room.
                        self.plan.waiting.insert(unit.clone());
                        if seen.proposal != wanted.proposal {
                            self.update(unit, &old.1, wanted, &seen);
                        }
                    }
                    from => self.propose(unit, &to, wanted, from, placed_revision),
                }
                return;
            }
            Outcome::NotPlaceable { reason } => {
                self.plan.unplaceable.push((unit.clone(), reason));
            }
            // It would displace yet another unit: left to the next pass.
            _ => {}
        }
        self.plan.waiting.insert(unit.clone());
        // Not placed now. If this was a move, the proposal it moved from is
        // withdrawn too: units decided since may have taken its place.
        if let Some((old, _)) = from {
            self.withdrawn.remove(&(unit.clone(), old.clone()));
            self.withdraw(unit, &old);
        }
    }

    fn propose(
        &mut self,
        unit: &UnitName,
        machine: &str,
        wanted: &Wanted,
        from: Option<(String, Revision)>,
        placed_revision: Option<Revision>,
    ) {
        self.occupants
            .insert((unit.clone(), machine.to_string()), Some(wanted));
        self.live.insert((unit.clone(), machine.to_string()));
        self.moved(unit, machine);
        self.plan.changes.push(Change::Propose {
            unit: unit.clone(),
            machine: machine.to_string(),
            proposal: wanted.proposal,
            from,
            placed_revision,
        });
    }

    fn update(&mut self, unit: &UnitName, machine: &str, wanted: &Wanted, seen: &Seen) {
        self.plan.changes.push(Change::Update {
            unit: unit.clone(),
            machine: machine.to_string(),
            proposal: wanted.proposal,
            mod_revision: seen.mod_revision,
        });
    }
}

#[cfg(test)]
mod tests;
