//! The pass's sets of (unit, machine) pairs, also indexed by machine.
//!
//! "What stays on machine M" is asked once for every placed unit in every
//! pass; answered by scanning all pairs, a pass over 30,000 placed units cost
//! 900 million comparisons. The index answers it with the units on M.

use std::collections::{BTreeSet, HashMap};

use crate::units::UnitName;

/// A set of (unit, machine) pairs that also knows each machine's units.
#[derive(Debug, Clone, Default)]
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
        assert_eq!(pairs.iter().count(), 2);
    }
}
