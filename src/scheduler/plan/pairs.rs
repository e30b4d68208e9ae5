//! The pass's sets of (unit, machine) pairs, also indexed by machine.
//!
//! "What stays on machine M" is asked once for every placed unit a pass
//! decides; answered by scanning all pairs, a pass over 30,000 placed units
//! cost 900 million comparisons. The index answers it with the units on M.
//! [`Occupants`] also counts each machine's wanted units, keeps the machines
//! that take work in that order ([`LoadOrder`], so placement looks at the
//! least loaded first) and keeps apart the units that can exclude others,
//! which is all that placing a unit without rules of its own needs to know
//! of a machine, and the units that name others, whose place depends on
//! every unit next to them. Both sets outlive a pass ([`super::Index`]).

use std::collections::{BTreeSet, HashMap};

use crate::registry::schedule::Wanted;
use crate::units::UnitName;
use crate::units::colocation;
use crate::units::load_order::LoadOrder;
use crate::units::placement::Machine;

/// A set of (unit, machine) pairs that also knows each machine's units.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Pairs {
    all: BTreeSet<(UnitName, String)>,
    by_machine: HashMap<String, BTreeSet<UnitName>>,
}

impl Pairs {
    /// Adds a pair; false if it was there.
    pub(super) fn insert(&mut self, pair: (UnitName, String)) -> bool {
        let (unit, machine) = &pair;
        self.by_machine
            .entry(machine.clone())
            .or_default()
            .insert(unit.clone());
        self.all.insert(pair)
    }

    /// Removes a pair; false if it was not there.
    pub(super) fn remove(&mut self, pair: &(UnitName, String)) -> bool {
        let (unit, machine) = pair;
        if let Some(units) = self.by_machine.get_mut(machine) {
            units.remove(unit);
            if units.is_empty() {
                self.by_machine.remove(machine);
            }
        }
        self.all.remove(pair)
    }

    /// Whether the pair is in the set.
    pub(super) fn contains(&self, pair: &(UnitName, String)) -> bool {
        self.all.contains(pair)
    }

    /// Every pair, by unit then machine.
    pub(super) fn iter(&self) -> impl Iterator<Item = &(UnitName, String)> {
        self.all.iter()
    }

    /// The units paired with `machine`.
    pub(super) fn on(&self, machine: &str) -> impl Iterator<Item = &UnitName> {
        self.by_machine.get(machine).into_iter().flatten()
    }

    /// The machines paired with `unit`.
    pub(super) fn machines_of<'p>(&'p self, unit: &UnitName) -> impl Iterator<Item = &'p str> {
        let unit = unit.clone();
        self.all
            .range((unit.clone(), String::new())..)
            .take_while(move |(u, _)| *u == unit)
            .map(|(_, machine)| machine.as_str())
    }

    /// Whether `unit` is paired with `machine` (without building a pair).
    pub(super) fn has(&self, unit: &UnitName, machine: &str) -> bool {
        self.by_machine
            .get(machine)
            .is_some_and(|units| units.contains(unit))
    }
}

/// The units occupying machines (proposed or claimed), with each machine's
/// count of wanted ones and the wanted ones that can exclude others.
///
/// It holds no borrow of the world, so the scheduler keeps one between
/// passes ([`super::Index`]): each unit is classified (wanted or not, what
/// its rules name) when its first pair goes in, and every pair of a unit is
/// taken out and put back when its wanted entry changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Occupants {
    pairs: Pairs,
    /// Each unit with a pair here: as classified when its pairs went in,
    /// and how many pairs it has.
    classes: HashMap<UnitName, (Class, usize)>,
    load: HashMap<String, usize>,
    /// The machines that take work, by (load, id).
    order: LoadOrder,
    excluding: Pairs,
    /// Wanted units that name others (exclude them or follow one): whether
    /// they may stay depends on every unit next to them.
    naming: Pairs,
}

/// What a unit's rules make of it, for the indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Class {
    /// Wanted: counts as load.
    counted: bool,
    /// Wanted and can exclude others.
    excludes: bool,
    /// Wanted and names others (excludes them, or follows one).
    names: bool,
}

impl Class {
    fn of(wanted: Option<&Wanted>) -> Class {
        let Some(wanted) = wanted else {
            return Class {
                counted: false,
                excludes: false,
                names: false,
            };
        };
        let rules = &wanted.requirements;
        let excludes = colocation::excludes_any(rules);
        Class {
            counted: true,
            excludes,
            names: excludes || !rules.machine_of.is_empty(),
        }
    }
}

impl Occupants {
    /// None yet, ordering `machines` (those that take work) by load.
    pub(super) fn new(machines: &[Machine]) -> Occupants {
        Occupants {
            order: LoadOrder::new(machines.iter().map(|m| m.id.as_str())),
            ..Occupants::default()
        }
    }

    /// Orders `machines` (those that take work now) by their loads.
    pub(super) fn reorder(&mut self, machines: &[Machine]) {
        self.order = LoadOrder::new(machines.iter().map(|m| m.id.as_str()));
        for machine in machines {
            self.order.set(&machine.id, self.load(&machine.id));
        }
    }

    /// Adds a pair of a unit wanted as `wanted` (`None`: not wanted); false
    /// if it was there.
    pub(super) fn insert(&mut self, pair: (UnitName, String), wanted: Option<&Wanted>) -> bool {
        if self.pairs.contains(&pair) {
            return false;
        }
        let (class, count) = self
            .classes
            .entry(pair.0.clone())
            .or_insert_with(|| (Class::of(wanted), 0));
        *count += 1;
        let class = *class;
        if class.counted {
            let load = self.load.entry(pair.1.clone()).or_default();
            *load += 1;
            self.order.set(&pair.1, *load);
        }
        if class.excludes {
            self.excluding.insert(pair.clone());
        }
        if class.names {
            self.naming.insert(pair.clone());
        }
        self.pairs.insert(pair)
    }

    /// Removes a pair; false if it was not there.
    pub(super) fn remove(&mut self, pair: &(UnitName, String)) -> bool {
        if !self.pairs.remove(pair) {
            return false;
        }
        let Some((class, count)) = self.classes.get_mut(&pair.0) else {
            unreachable!("Occupants: every unit with a pair is classified");
        };
        let class = *class;
        *count -= 1;
        if *count == 0 {
            self.classes.remove(&pair.0);
        }
        if class.counted
            && let Some(load) = self.load.get_mut(&pair.1)
        {
            *load -= 1;
            self.order.set(&pair.1, *load);
            if *load == 0 {
                self.load.remove(&pair.1);
            }
        }
        self.excluding.remove(pair);
        self.naming.remove(pair);
        true
    }

    /// The units on `machine`.
    pub(super) fn on(&self, machine: &str) -> impl Iterator<Item = &UnitName> {
        self.pairs.on(machine)
    }

    /// Whether `unit` is on `machine`.
    pub(super) fn has(&self, unit: &UnitName, machine: &str) -> bool {
        self.pairs.has(unit, machine)
    }

    /// How many wanted units are on `machine`.
    pub(super) fn load(&self, machine: &str) -> usize {
        self.load.get(machine).copied().unwrap_or(0)
    }

    /// The machines that take work with their loads, least loaded first,
    /// ties by id.
    pub(super) fn by_load(&self) -> impl Iterator<Item = (usize, &str)> {
        self.order.iter()
    }

    /// The machines `unit` is on.
    pub(super) fn machines_of<'p>(&'p self, unit: &UnitName) -> impl Iterator<Item = &'p str> {
        self.pairs.machines_of(unit)
    }

    /// Adds to `into` the units on `machine` whose decision a unit coming or
    /// leaving there may change: every one when `every` (the unit can
    /// exclude others), else those that name others.
    pub(super) fn neighbours(&self, machine: &str, every: bool, into: &mut BTreeSet<UnitName>) {
        let on = if every { &self.pairs } else { &self.naming };
        into.extend(on.on(machine).cloned());
    }

    /// The wanted units on `machine` that can exclude others.
    pub(super) fn excluding_on(&self, machine: &str) -> impl Iterator<Item = &UnitName> {
        self.excluding.on(machine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_follows_the_set() {
        let unit = |n: &str| UnitName::parse(n).unwrap();
        let mut pairs = Pairs::default();
        assert!(pairs.insert((unit("a.service"), "m1".into())));
        assert!(pairs.insert((unit("b.service"), "m1".into())));
        assert!(pairs.insert((unit("a.service"), "m2".into())));
        assert!(!pairs.insert((unit("a.service"), "m2".into())));
        assert!(pairs.remove(&(unit("a.service"), "m1".into())));
        assert!(!pairs.remove(&(unit("a.service"), "m1".into())));
        let on_m1: Vec<&UnitName> = pairs.on("m1").collect();
        assert_eq!(on_m1, [&unit("b.service")]);
        assert_eq!(pairs.on("m3").count(), 0);
        assert!(pairs.contains(&(unit("a.service"), "m2".into())));
        assert!(pairs.has(&unit("a.service"), "m2"));
        let of_a: Vec<&str> = pairs.machines_of(&unit("a.service")).collect();
        assert_eq!(of_a, ["m2"]);
        assert_eq!(pairs.machines_of(&unit("c.service")).count(), 0);
        assert!(!pairs.has(&unit("a.service"), "m1"));
        assert_eq!(pairs.iter().count(), 2);
    }
}
