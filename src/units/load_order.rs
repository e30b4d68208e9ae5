//! Machines kept in the order placement compares them: least loaded first,
//! ties to the smallest id.
//!
//! [`super::placement::decide`] scores every machine and sorts them; a
//! scheduler placing 100,000 units over 5,000 machines did that 100,000 times
//! a pass. Kept in this order as loads change, the machines let
//! [`super::placement::least_loaded`] stop at the first eligible one, which
//! is the one the full decision picks.

use std::collections::{BTreeSet, HashMap};

/// A set of machine ids, each with a load, iterated by (load, id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOrder {
    ordered: BTreeSet<(usize, String)>,
    load: HashMap<String, usize>,
}

impl LoadOrder {
    /// The machines `ids`, all with load 0.
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a str>) -> LoadOrder {
        let mut order = LoadOrder::default();
        for id in ids {
            if order.load.insert(id.to_string(), 0).is_none() {
                order.ordered.insert((0, id.to_string()));
            }
        }
        order
    }

    /// Sets the load of `id`; a machine not in the set is ignored (its units
    /// count nowhere, as it takes no work).
    pub fn set(&mut self, id: &str, load: usize) {
        let Some(current) = self.load.get_mut(id) else {
            return;
        };
        if *current == load {
            return;
        }
        let old = std::mem::replace(current, load);
        let key = self
            .ordered
            .take(&(old, id.to_string()))
            .expect("LoadOrder: every machine with a load is ordered");
        self.ordered.insert((load, key.1));
    }

    /// The load of `id`, if it is in the set.
    pub fn load(&self, id: &str) -> Option<usize> {
        self.load.get(id).copied()
    }

    /// Every machine with its load, least loaded first, ties by id.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &str)> {
        self.ordered.iter().map(|(load, id)| (*load, id.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// After any sequence of loads set, the order is the sorted
        /// (load, id) of the machines' last loads.
        #[test]
        fn iterates_as_sorting_would(
            n in 0usize..6,
            sets in proptest::collection::vec((0usize..8, 0usize..5), 0..40),
        ) {
            let ids: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
            let mut order = LoadOrder::new(ids.iter().map(String::as_str));
            let mut loads = vec![0usize; n];
            for (machine, load) in sets {
                // Ids past n are not in the set: ignored.
                order.set(&format!("m{machine}"), load);
                if machine < n {
                    loads[machine] = load;
                }
            }
            let mut expected: Vec<(usize, String)> =
                ids.iter().cloned().enumerate().map(|(i, id)| (loads[i], id)).collect();
            expected.sort();
            let got: Vec<(usize, String)> = order.iter().map(|(l, id)| (l, id.to_string())).collect();
            prop_assert_eq!(got, expected);
            for (i, id) in ids.iter().enumerate() {
                prop_assert_eq!(order.load(id), Some(loads[i]));
            }
            prop_assert_eq!(order.load("m9"), None);
        }
    }
}
