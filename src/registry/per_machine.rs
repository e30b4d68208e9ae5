//! What one unit has on machines, as the scheduler's world keeps it: a sorted
//! vector, not a map per unit.
//!
//! A unit is proposed to and claimed on one machine (a global unit on each
//! eligible one). The world kept a `BTreeMap` of machines per unit for its
//! proposals and a `BTreeSet` for its claims, and a standard B-tree's
//! smallest node has room for 11 entries: 808 bytes per unit for one
//! proposal, 280 for one claim. At 100,000 units that was the largest part
//! of the scheduler's memory on the Raft leader (80 MiB for the proposals
//! alone, by heaptrack at the bulk start's peak; issue 14). These hold what
//! they hold and a little room, and still answer by machine in id order.

use std::ops::Index;

/// Up to this many entries, a vector grows one slot at a time (a unit is on
/// one machine, or two while it moves); past it, by doubling (a global unit
/// on thousands of machines).
const EXACT: usize = 4;

/// Makes room for one more entry in `v`.
fn room<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() && v.len() < EXACT {
        v.reserve_exact(1);
    }
}

/// A map from machine id to `V`, in id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByMachine<V>(Vec<(String, V)>);

impl<V> Default for ByMachine<V> {
    fn default() -> Self {
        ByMachine(Vec::new())
    }
}

impl<V> ByMachine<V> {
    fn find(&self, machine: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(m, _)| m.as_str().cmp(machine))
    }

    /// The value for `machine`.
    pub fn get(&self, machine: &str) -> Option<&V> {
        self.find(machine).ok().map(|i| &self.0[i].1)
    }

    /// The value for `machine`, to change.
    pub fn get_mut(&mut self, machine: &str) -> Option<&mut V> {
        self.find(machine).ok().map(|i| &mut self.0[i].1)
    }

    /// Whether `machine` has a value.
    pub fn contains_key(&self, machine: &str) -> bool {
        self.find(machine).is_ok()
    }

    /// Sets the value for `machine`; returns the one it replaced.
    pub fn insert(&mut self, machine: String, value: V) -> Option<V> {
        match self.find(&machine) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                room(&mut self.0);
                self.0.insert(i, (machine, value));
                None
            }
        }
    }

    /// Removes the value for `machine`; returns it.
    pub fn remove(&mut self, machine: &str) -> Option<V> {
        let i = self.find(machine).ok()?;
        Some(self.0.remove(i).1)
    }

    /// Keeps only the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut V) -> bool) {
        self.0.retain_mut(|(m, v)| keep(m, v));
    }

    /// The machines, in id order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(m, _)| m)
    }

    /// The values, in machine id order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    /// The entries, in machine id order.
    pub fn iter(&self) -> Entries<'_, V> {
        self.0.iter().map(|(m, v)| (m, v))
    }

    /// How many machines have a value.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no machine has a value.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The entries of a [`ByMachine`], in machine id order.
pub type Entries<'a, V> =
    std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&'a (String, V)) -> (&'a String, &'a V)>;

impl<'a, V> IntoIterator for &'a ByMachine<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = Entries<'a, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<V> Index<&str> for ByMachine<V> {
    type Output = V;

    /// The value for `machine`; panics when it has none, as a map's index does.
    fn index(&self, machine: &str) -> &V {
        self.get(machine)
            .unwrap_or_else(|| panic!("no entry for machine {machine}"))
    }
}

impl<V> Index<&String> for ByMachine<V> {
    type Output = V;

    fn index(&self, machine: &String) -> &V {
        &self[machine.as_str()]
    }
}

impl<V> FromIterator<(String, V)> for ByMachine<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(entries: I) -> Self {
        let mut map = ByMachine::default();
        for (machine, value) in entries {
            map.insert(machine, value);
        }
        map
    }
}

/// A set of machine ids, in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineIds(Vec<String>);

impl MachineIds {
    fn find(&self, machine: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|m| m.as_str().cmp(machine))
    }

    /// Whether `machine` is in the set.
    pub fn contains(&self, machine: &str) -> bool {
        self.find(machine).is_ok()
    }

    /// Adds `machine`; false if it was there.
    pub fn insert(&mut self, machine: String) -> bool {
        match self.find(&machine) {
            Ok(_) => false,
            Err(i) => {
                room(&mut self.0);
                self.0.insert(i, machine);
                true
            }
        }
    }

    /// Removes `machine`; false if it was not there.
    pub fn remove(&mut self, machine: &str) -> bool {
        match self.find(machine) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps only the machines `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&String) -> bool) {
        self.0.retain(|m| keep(m));
    }

    /// The machines, in id order.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }

    /// How many machines are in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a MachineIds {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl FromIterator<String> for MachineIds {
    fn from_iter<I: IntoIterator<Item = String>>(machines: I) -> Self {
        let mut set = MachineIds::default();
        for machine in machines {
            set.insert(machine);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any sequence of inserts and removes leaves them equal to a
        /// standard map and set fed the same, answering alike on the way.
        #[test]
        fn they_behave_as_a_map_and_a_set(ops in proptest::collection::vec((any::<bool>(), 0u8..12, any::<u8>()), 0..200)) {
            let mut map = ByMachine::default();
            let mut model = BTreeMap::new();
            let mut set = MachineIds::default();
            let mut set_model = BTreeSet::new();
            for (put, m, v) in ops {
                let machine = format!("m{m:02}");
                if put {
                    prop_assert_eq!(map.insert(machine.clone(), v), model.insert(machine.clone(), v));
                    prop_assert_eq!(set.insert(machine.clone()), set_model.insert(machine.clone()));
                } else {
                    prop_assert_eq!(map.remove(&machine), model.remove(&machine));
                    prop_assert_eq!(set.remove(&machine), set_model.remove(&machine));
                }
                prop_assert_eq!(map.get(&machine), model.get(&machine));
                prop_assert_eq!(map.contains_key(&machine), model.contains_key(&machine));
                prop_assert_eq!(set.contains(&machine), set_model.contains(&machine));
                prop_assert_eq!(map.len(), model.len());
                prop_assert_eq!(set.len(), set_model.len());
            }
            prop_assert!(map.iter().eq(model.iter()));
            prop_assert!(map.keys().eq(model.keys()));
            prop_assert!(map.values().eq(model.values()));
            prop_assert!(set.iter().eq(set_model.iter()));
            let rebuilt: ByMachine<u8> = model.clone().into_iter().collect();
            prop_assert_eq!(&rebuilt, &map);
            map.retain(|_, v| *v % 2 == 0);
            model.retain(|_, v| *v % 2 == 0);
            prop_assert!(map.iter().eq(model.iter()));
        }
    }

    #[test]
    fn one_entry_takes_one_slot() {
        let mut map = ByMachine::default();
        map.insert("m1".to_string(), 1u64);
        assert_eq!(map.0.capacity(), 1);
        assert_eq!(map["m1"], 1);
        let mut set = MachineIds::default();
        set.insert("m1".to_string());
        set.insert("m0".to_string());
        assert_eq!(set.0.capacity(), 2);
        assert_eq!(set.iter().collect::<Vec<_>>(), ["m0", "m1"]);
    }
}
