//! Make-before-break off a draining machine.
//!
//! A machine that is alive but drained (`flotilla drain`, or its reboot
//! coordinator before a reboot) must not lose its units before they run
//! elsewhere: a service whose every instance sat on draining machines would
//! otherwise be down for the time a start takes. So a non-global unit
//! claimed on a draining machine keeps that proposal, a second proposal goes
//! to the machine placement picks among the others, and only once the unit
//! is claimed there AND reported in its target state (active, or loaded) is
//! the draining machine's proposal withdrawn, which makes its agent stop it.
//! For that moment the unit runs twice, on two machines: that is the point.
//! A unit that has nowhere else to go (pinned by `MachineID`, or every other
//! machine excluded) stays where it is and is reported unplaceable; a global
//! unit stays too ([`Pass::stays_while_draining`]). Both stop with the host
//! if it goes down.
//!
//! The replacement's machine may die or never claim the proposal: it is
//! withdrawn (after the claim bound) and a new one is picked next pass.
//! Undraining mid-way is handled by the ordinary rules: the unit then has
//! two proposals and keeps one, a claimed one first.

use super::{Pass, Seen, Wanted};
use crate::units::UnitName;

impl Pass<'_> {
    /// Whether `unit` claimed on `machine` stays there because the machine
    /// is draining (for units placement would otherwise take away at once).
    pub(super) fn stays_while_draining(&self, unit: &UnitName, machine: &str) -> bool {
        self.world.draining.contains(machine) && self.world.is_claimed(unit, machine)
    }

    /// Moves `unit` make-before-break if it is claimed on a draining machine;
    /// returns whether it was (then nothing else decides it in this pass).
    pub(super) fn hand_over(&mut self, unit: &UnitName, wanted: &Wanted) -> bool {
        let Some(on) = self.world.proposals.get(unit) else {
            return false;
        };
        let Some(from) = on
            .keys()
            .find(|m| self.stays_while_draining(unit, m))
            .cloned()
        else {
            return false;
        };
        let seen_from = on[&from];
        if seen_from.proposal != wanted.proposal {
            self.update(unit, &from, wanted, &seen_from);
        }
        let others: Vec<(String, Seen)> = on
            .iter()
            .filter(|(m, _)| **m != from)
            .filter(|(m, _)| !self.withdrawn.contains(&(unit.clone(), (*m).clone())))
            .map(|(m, s)| (m.clone(), *s))
            .collect();
        let Some((to, seen)) = others.first().cloned() else {
            self.propose_replacement(unit, wanted);
            return true;
        };
        for (extra, _) in &others[1..] {
            self.withdraw(unit, extra);
        }
        let claimed = self.world.is_claimed(unit, &to);
        let lost = !self.alive.contains_key(to.as_str())
            || (!claimed && self.world.stale.contains(&(unit.clone(), to.clone())));
        if lost {
            // Gone, drained too, or never claimed it: pick again next pass.
            self.withdraw(unit, &to);
        } else if seen.proposal != wanted.proposal {
            self.update(unit, &to, wanted, &seen);
        } else if claimed && self.ready(unit, &to, wanted) {
            self.withdraw(unit, &from);
        }
        true
    }

    /// Proposes `unit` to the best other machine, keeping it where it is.
    fn propose_replacement(&mut self, unit: &UnitName, wanted: &Wanted) {
        let placed_revision = Some(self.world.placed.get(unit).map_or(0, |(_, rev)| *rev));
        self.place_new(unit, wanted, placed_revision, |reason| {
            format!("it stays on its draining machine: {reason}")
        });
    }

    /// Whether `machine` reports `unit` in its target state, with the body
    /// wanted now.
    fn ready(&self, unit: &UnitName, machine: &str, wanted: &Wanted) -> bool {
        let Some(state) = self
            .world
            .reported
            .get(&(unit.clone(), machine.to_string()))
        else {
            return false;
        };
        state.hash == wanted.proposal.hash && state.state.reached(wanted.proposal.target)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Change, World, plan};
    use super::*;
    use crate::registry::UnitState;
    use crate::registry::records::{Proposal, ReportedState, Target};
    use crate::units::Unit;
    use crate::units::placement::Machine;
    use std::sync::Arc;

    fn name(unit: &str) -> UnitName {
        UnitName::parse(unit).unwrap()
    }

    fn id(letter: char) -> String {
        letter.to_string().repeat(32)
    }

    /// Alive machines `alive` (undrained) and `draining` (alive, drained).
    fn world(alive: &str, draining: &str) -> World {
        let machine = |c: char| Machine {
            id: id(c),
            metadata: Default::default(),
        };
        World {
            machines: alive.chars().map(machine).collect(),
            draining: draining.chars().map(id).collect(),
            ..World::default()
        }
    }

    fn want(w: &mut World, unit: &str, xfleet: &str) {
        let text = format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}\n");
        let parsed = Unit::from_text(&name(unit), &text).unwrap();
        w.wanted.insert(
            name(unit),
            Wanted {
                proposal: Proposal {
                    hash: parsed.hash(),
                    target: Target::Launched,
                },
                requirements: Arc::new(parsed.requirements().clone()),
            },
        );
    }

    /// `unit` proposed and claimed on `m` (and reported `active` there).
    fn running(w: &mut World, unit: &str, m: char, revision: u64, active: &str) {
        let proposal = w.wanted[&name(unit)].proposal;
        w.proposals.entry(name(unit)).or_default().insert(
            id(m),
            Seen {
                proposal,
                mod_revision: revision,
            },
        );
        w.claims.entry(name(unit)).or_default().insert(id(m));
        w.reported.insert(
            (name(unit), id(m)),
            Arc::new(ReportedState {
                hash: proposal.hash,
                state: UnitState {
                    load: "loaded".into(),
                    active: active.into(),
                    sub: "running".into(),
                },
                target: Some(proposal.target),
                reason: None,
            }),
        );
    }

    fn proposed_to(changes: &[Change]) -> Vec<(UnitName, String)> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Propose { unit, machine, .. } => Some((unit.clone(), machine.clone())),
                _ => None,
            })
            .collect()
    }

    fn withdrawn(changes: &[Change]) -> Vec<(UnitName, String)> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Withdraw { unit, machine, .. } => Some((unit.clone(), machine.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_draining_machine_keeps_its_unit_until_the_replacement_is_active() {
        let mut w = world("bc", "a");
        want(&mut w, "web.service", "");
        running(&mut w, "web.service", 'a', 5, "active");

        // Pass 1: a replacement is proposed, nothing is withdrawn.
        let p = plan(&w);
        assert_eq!(
            proposed_to(&p.changes),
            vec![(name("web.service"), id('b'))]
        );
        assert!(withdrawn(&p.changes).is_empty(), "{:?}", p.changes);

        // Pass 2: proposed on b, claimed there, still activating: both stay.
        running(&mut w, "web.service", 'b', 7, "activating");
        let p = plan(&w);
        assert!(p.changes.is_empty(), "{:?}", p.changes);

        // Pass 3: active on b: only now does a let go.
        running(&mut w, "web.service", 'b', 7, "active");
        let p = plan(&w);
        assert_eq!(withdrawn(&p.changes), vec![(name("web.service"), id('a'))]);
        assert!(proposed_to(&p.changes).is_empty());
    }

    #[test]
    fn a_conflicting_pair_moves_to_the_free_machine() {
        let mut w = world("bc", "a");
        for unit in ["hello@1.service", "hello@2.service"] {
            want(&mut w, unit, "Conflicts=hello@*.service");
        }
        running(&mut w, "hello@1.service", 'a', 5, "active");
        running(&mut w, "hello@2.service", 'b', 6, "active");
        let p = plan(&w);
        assert_eq!(
            proposed_to(&p.changes),
            vec![(name("hello@1.service"), id('c'))]
        );
        assert!(withdrawn(&p.changes).is_empty());
    }

    #[test]
    fn nowhere_to_go_stays_and_says_why() {
        let mut w = world("b", "a");
        for unit in ["hello@1.service", "hello@2.service"] {
            want(&mut w, unit, "Conflicts=hello@*.service");
        }
        want(&mut w, "pinned.service", &format!("MachineID={}", id('a')));
        want(&mut w, "everywhere.service", "Global=true");
        running(&mut w, "hello@1.service", 'a', 5, "active");
        running(&mut w, "hello@2.service", 'b', 6, "active");
        running(&mut w, "pinned.service", 'a', 7, "active");
        running(&mut w, "everywhere.service", 'a', 8, "active");
        running(&mut w, "everywhere.service", 'b', 9, "active");
        let p = plan(&w);
        assert!(withdrawn(&p.changes).is_empty(), "{:?}", p.changes);
        assert!(proposed_to(&p.changes).is_empty(), "{:?}", p.changes);
        let stuck: Vec<&UnitName> = p.unplaceable.iter().map(|(u, _)| u).collect();
        assert_eq!(
            stuck,
            vec![&name("hello@1.service"), &name("pinned.service")]
        );
        assert!(
            p.unplaceable[0].1.contains("draining machine"),
            "{:?}",
            p.unplaceable
        );
    }

    #[test]
    fn a_replacement_that_is_lost_is_picked_again() {
        let mut w = world("c", "a");
        want(&mut w, "web.service", "");
        running(&mut w, "web.service", 'a', 5, "active");
        // Proposed to b, which then died (not alive any more).
        let proposal = w.wanted[&name("web.service")].proposal;
        w.proposals.get_mut(&name("web.service")).unwrap().insert(
            id('b'),
            Seen {
                proposal,
                mod_revision: 9,
            },
        );
        let p = plan(&w);
        assert_eq!(withdrawn(&p.changes), vec![(name("web.service"), id('b'))]);
        assert!(proposed_to(&p.changes).is_empty(), "one change at a time");
    }

    #[test]
    fn undrained_again_keeps_one_copy() {
        let mut w = world("ab", "");
        want(&mut w, "web.service", "");
        running(&mut w, "web.service", 'a', 5, "active");
        running(&mut w, "web.service", 'b', 7, "active");
        let p = plan(&w);
        assert_eq!(withdrawn(&p.changes), vec![(name("web.service"), id('b'))]);
    }
}
