use super::*;
use crate::registry::UnitState;
use crate::registry::per_machine::{ByMachine, MachineIds};
use crate::registry::records::{Proposal, ReportedState, Target};
use crate::units::colocation;
use crate::units::{Unit, UnitHash};
use proptest::prelude::*;
use std::sync::Arc;

// ---- building worlds ------------------------------------------------

fn name(unit: &str) -> UnitName {
    UnitName::parse(unit).unwrap()
}

/// The 32-digit id of the machine called by one letter: `a` is `aaaa…`.
fn id(letter: char) -> String {
    letter.to_string().repeat(32)
}

fn machine(letter: char, metadata: &[(&str, &str)]) -> Machine {
    Machine {
        id: id(letter),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// A world whose alive, undrained machines are the given letters.
fn world(letters: &str) -> World {
    World {
        machines: letters.chars().map(|c| machine(c, &[])).collect(),
        ..World::default()
    }
}

/// The unit `unit` with `xfleet` as its `[X-Fleet]` section, to be launched.
fn wanted(unit: &str, xfleet: &str) -> Wanted {
    let text = format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}\n");
    let parsed = Unit::from_text(&name(unit), &text).unwrap();
    Wanted {
        proposal: Proposal {
            hash: parsed.hash(),
            target: Target::Launched,
        },
        requirements: Arc::new(parsed.requirements().clone()),
    }
}

fn want(w: &mut World, unit: &str, xfleet: &str) {
    w.wanted.insert(name(unit), wanted(unit, xfleet));
}

/// Stores a proposal of `unit` (its wanted body, or one of its own) on `m`.
fn proposed(w: &mut World, unit: &str, m: char, mod_revision: Revision) {
    let proposal = w
        .wanted
        .get(&name(unit))
        .map_or_else(|| wanted(unit, "").proposal, |x| x.proposal);
    w.proposals.entry(name(unit)).or_default().insert(
        id(m),
        Seen {
            proposal,
            mod_revision,
        },
    );
}

fn claimed(w: &mut World, unit: &str, m: char) {
    w.claims.entry(name(unit)).or_default().insert(id(m));
}

fn pointer(w: &mut World, unit: &str, m: char, revision: Revision) {
    w.placed.insert(name(unit), (id(m), revision));
}

/// Proposed and claimed on `m`, the pointer at `m`: a unit running there.
fn running(w: &mut World, unit: &str, m: char, revision: Revision) {
    proposed(w, unit, m, revision);
    claimed(w, unit, m);
    pointer(w, unit, m, revision);
}

fn fresh(unit: &str, m: char, w: &World) -> Change {
    Change::Propose {
        unit: name(unit),
        machine: id(m),
        proposal: w.wanted[&name(unit)].proposal,
        from: None,
        placed_revision: Some(0),
    }
}

fn withdrawal(unit: &str, m: char, rev: Revision, placed: Option<Revision>) -> Change {
    Change::Withdraw {
        unit: name(unit),
        machine: id(m),
        mod_revision: rev,
        placed_revision: placed,
    }
}

/// Where the plan proposes `unit`.
fn targets(plan: &Plan, unit: &str) -> Vec<String> {
    plan.changes
        .iter()
        .filter_map(|c| match c {
            Change::Propose {
                unit: u, machine, ..
            } if *u == name(unit) => Some(machine.clone()),
            _ => None,
        })
        .collect()
}

fn unplaceable(plan: &Plan) -> Vec<&str> {
    plan.unplaceable.iter().map(|(u, _)| u.as_str()).collect()
}

// ---- simulating the store and the agents ----------------------------

fn revision_of(w: &World, unit: &UnitName, machine: &str) -> Option<Revision> {
    w.proposals
        .get(unit)
        .and_then(|on| on.get(machine))
        .map(|s| s.mod_revision)
}

/// Every compare the scheduler's transaction makes for `changes` holds in
/// the world they were planned from, so the batch commits.
fn assert_guards_hold(read: &World, changes: &[Change]) {
    for change in changes {
        match change {
            Change::Propose {
                unit,
                machine,
                from,
                placed_revision,
                ..
            } => {
                match placed_revision {
                    Some(rev) => assert_eq!(
                        read.placed.get(unit).map_or(0, |(_, r)| *r),
                        *rev,
                        "{change:?}"
                    ),
                    None => assert_eq!(revision_of(read, unit, machine), None, "{change:?}"),
                }
                if let Some((old, rev)) = from {
                    assert_ne!(old, machine, "{change:?}");
                    assert_eq!(revision_of(read, unit, old), Some(*rev), "{change:?}");
                    assert!(!read.is_claimed(unit, old), "{change:?}");
                }
            }
            Change::Update {
                unit,
                machine,
                mod_revision,
                proposal,
            } => {
                assert_eq!(
                    revision_of(read, unit, machine),
                    Some(*mod_revision),
                    "{change:?}"
                );
                assert_ne!(
                    read.proposals[unit][machine].proposal, *proposal,
                    "an update changes something: {change:?}"
                );
            }
            Change::Withdraw {
                unit,
                machine,
                mod_revision,
                placed_revision,
            } => {
                assert_eq!(
                    revision_of(read, unit, machine),
                    Some(*mod_revision),
                    "{change:?}"
                );
                if let Some(rev) = placed_revision {
                    assert_eq!(
                        read.placed.get(unit),
                        Some(&(machine.clone(), *rev)),
                        "{change:?}"
                    );
                }
            }
        }
    }
}

/// Commits `changes` as one transaction would, each write at a new revision.
fn apply(w: &mut World, changes: &[Change], next: &mut Revision) {
    assert_guards_hold(w, changes);
    for change in changes.iter().cloned() {
        *next += 1;
        match change {
            Change::Propose {
                unit,
                machine,
                proposal,
                from,
                placed_revision,
            } => {
                let on = w.proposals.entry(unit.clone()).or_default();
                on.insert(
                    machine.clone(),
                    Seen {
                        proposal,
                        mod_revision: *next,
                    },
                );
                if let Some((old, _)) = from {
                    on.remove(&old);
                }
                if placed_revision.is_some() {
                    w.placed.insert(unit, (machine, *next));
                }
            }
            Change::Update {
                unit,
                machine,
                proposal,
                ..
            } => {
                w.proposals.get_mut(&unit).unwrap().insert(
                    machine,
                    Seen {
                        proposal,
                        mod_revision: *next,
                    },
                );
            }
            Change::Withdraw {
                unit,
                machine,
                placed_revision,
                ..
            } => {
                if let Some(on) = w.proposals.get_mut(&unit) {
                    on.remove(&machine);
                }
                if placed_revision.is_some() {
                    w.placed.remove(&unit);
                }
            }
        }
    }
    w.proposals.retain(|_, on| !on.is_empty());
}

/// The agents catch up: every proposal claimed, every other claim released.
fn settle(w: &mut World) {
    w.claims = w
        .proposals
        .iter()
        .map(|(u, on)| (u.clone(), on.keys().cloned().collect()))
        .collect();
    w.claims.retain(|_, on| !on.is_empty());
    w.stale.clear();
}

/// Applies `plan` and lets the agents settle; returns the next plan.
fn round(w: &mut World, plan: &Plan, next: &mut Revision) -> Plan {
    apply(w, &plan.changes, next);
    settle(w);
    super::plan(w)
}

/// Units proposed per machine.
fn load(w: &World) -> BTreeMap<String, Vec<UnitName>> {
    let mut by_machine: BTreeMap<String, Vec<UnitName>> = BTreeMap::new();
    for (unit, on) in &w.proposals {
        for machine in on.keys() {
            by_machine
                .entry(machine.clone())
                .or_default()
                .push(unit.clone());
        }
    }
    by_machine
}

/// Whether two units may not share a machine, by either side's rules.
fn exclusive(w: &World, a: &UnitName, b: &UnitName) -> bool {
    let (Some(ra), Some(rb)) = (w.wanted.get(a), w.wanted.get(b)) else {
        return false;
    };
    !colocation::between((a, &ra.requirements), (b, &rb.requirements)).allows_sharing()
}

/// Pairs of units proposed together on one machine that exclude each other.
fn exclusive_neighbours(w: &World) -> Vec<(UnitName, UnitName, String)> {
    let mut found = Vec::new();
    for (machine, units) in load(w) {
        for (i, a) in units.iter().enumerate() {
            for b in &units[i + 1..] {
                if exclusive(w, a, b) {
                    found.push((a.clone(), b.clone(), machine.clone()));
                }
            }
        }
    }
    found
}

// ---- bulk starts ----------------------------------------------------

#[test]
fn a_bulk_start_spreads_in_one_pass() {
    let mut w = world("abc");
    for i in 0..10 {
        want(&mut w, &format!("u@{i}.service"), "");
    }
    let plan = plan(&w);
    assert!(plan.unplaceable.is_empty());
    assert_eq!(plan.changes.len(), 10);
    for change in &plan.changes {
        let Change::Propose {
            from,
            placed_revision,
            ..
        } = change
        else {
            panic!("only proposals expected: {change:?}");
        };
        assert_eq!((from, placed_revision), (&None, &Some(0)));
    }
    // Round robin in name order, ties to the smallest id.
    assert_eq!(targets(&plan, "u@0.service"), [id('a')]);
    assert_eq!(targets(&plan, "u@1.service"), [id('b')]);
    assert_eq!(targets(&plan, "u@2.service"), [id('c')]);
    assert_eq!(targets(&plan, "u@3.service"), [id('a')]);
    let mut next = 100;
    let again = round(&mut w, &plan, &mut next);
    assert_eq!(again, Plan::default(), "one pass places everything");
    let counts: Vec<usize> = load(&w).values().map(Vec::len).collect();
    assert_eq!(counts, [4, 3, 3]);
}

#[test]
fn a_bulk_start_counts_units_already_running() {
    let mut w = world("abc");
    running(&mut w, "old@1.service", 'a', 1);
    running(&mut w, "old@2.service", 'a', 2);
    want(&mut w, "old@1.service", "");
    want(&mut w, "old@2.service", "");
    for i in 0..4 {
        want(&mut w, &format!("new@{i}.service"), "");
    }
    let mut next = 100;
    let plan = plan(&w);
    assert_eq!(plan.changes.len(), 4);
    round(&mut w, &plan, &mut next);
    let counts: Vec<usize> = load(&w).values().map(Vec::len).collect();
    assert_eq!(counts, [2, 2, 2]);
}

#[test]
fn conflicting_template_instances_take_one_machine_each() {
    let mut w = world("abc");
    for i in 1..=5 {
        want(
            &mut w,
            &format!("hello@{i}.service"),
            "Conflicts=hello@*.service",
        );
    }
    let plan = plan(&w);
    assert_eq!(plan.changes.len(), 3, "{plan:?}");
    let hosts: BTreeSet<String> = (1..=3)
        .flat_map(|i| targets(&plan, &format!("hello@{i}.service")))
        .collect();
    assert_eq!(hosts.len(), 3, "distinct machines: {plan:?}");
    assert_eq!(unplaceable(&plan), ["hello@4.service", "hello@5.service"]);
    for (_, reason) in &plan.unplaceable {
        assert!(reason.contains("conflicts with hello@"), "{reason}");
    }
    // Once they run nothing changes; the two keep waiting.
    let mut next = 100;
    let again = round(&mut w, &plan, &mut next);
    assert!(again.changes.is_empty(), "{again:?}");
    assert_eq!(unplaceable(&again), ["hello@4.service", "hello@5.service"]);
}

#[test]
fn no_machines_means_unplaceable_with_a_reason() {
    let mut w = world("");
    want(&mut w, "u.service", "");
    let plan = plan(&w);
    assert!(plan.changes.is_empty());
    assert_eq!(plan.unplaceable.len(), 1);
    assert!(plan.unplaceable[0].1.contains("no machines"));
}

// ---- withdrawing ----------------------------------------------------

#[test]
fn units_nobody_wants_are_withdrawn_with_their_pointer() {
    let mut w = world("abc");
    // Destroyed while running on a: its pointer goes with it.
    running(&mut w, "gone.service", 'a', 5);
    // A stray proposal on b while the pointer says c: the pointer stays.
    proposed(&mut w, "stray.service", 'b', 7);
    pointer(&mut w, "stray.service", 'c', 8);
    // Without a pointer (a global unit, say).
    proposed(&mut w, "global.service", 'a', 9);
    proposed(&mut w, "global.service", 'c', 10);
    let plan = plan(&w);
    assert_eq!(
        plan.changes,
        [
            withdrawal("global.service", 'a', 9, None),
            withdrawal("global.service", 'c', 10, None),
            withdrawal("gone.service", 'a', 5, Some(5)),
            withdrawal("stray.service", 'b', 7, None),
        ]
    );
    assert!(plan.unplaceable.is_empty());
}

#[test]
fn a_changed_body_or_target_is_updated_in_place() {
    let mut w = world("ab");
    want(&mut w, "u.service", "");
    running(&mut w, "u.service", 'b', 4);
    let old = w.proposals[&name("u.service")][&id('b')].proposal;
    let mut new = old;
    new.hash = UnitHash::of_text("another body");
    w.wanted.get_mut(&name("u.service")).unwrap().proposal = new;
    let update = |proposal| {
        vec![Change::Update {
            unit: name("u.service"),
            machine: id('b'),
            proposal,
            mod_revision: 4,
        }]
    };
    assert_eq!(plan(&w).changes, update(new));
    let mut loaded = old;
    loaded.target = Target::Loaded;
    w.wanted.get_mut(&name("u.service")).unwrap().proposal = loaded;
    assert_eq!(plan(&w).changes, update(loaded));
}

#[test]
fn a_unit_no_longer_eligible_is_withdrawn_and_waits_for_its_release() {
    let mut w = World {
        machines: vec![machine('a', &[("region", "eu")]), machine('b', &[])],
        ..World::default()
    };
    want(&mut w, "u.service", "MachineMetadata=region=eu");
    running(&mut w, "u.service", 'b', 3);
    let plan = plan(&w);
    assert_eq!(plan.changes, [withdrawal("u.service", 'b', 3, Some(3))]);
    let mut next = 10;
    let again = round(&mut w, &plan, &mut next);
    assert_eq!(again.changes, [fresh("u.service", 'a', &w)]);
}

#[test]
fn extra_proposals_are_withdrawn_keeping_the_claimed_one() {
    let mut w = world("abc");
    want(&mut w, "u.service", "");
    proposed(&mut w, "u.service", 'a', 1);
    running(&mut w, "u.service", 'b', 2);
    proposed(&mut w, "u.service", 'c', 3);
    let plan = plan(&w);
    assert_eq!(
        plan.changes,
        [
            withdrawal("u.service", 'a', 1, None),
            withdrawal("u.service", 'c', 3, None),
        ]
    );
}

// ---- machines leaving, proposals going stale ------------------------

#[test]
fn an_unclaimed_proposal_on_a_drained_machine_moves() {
    // a is drained (or dead): absent from the machines.
    let mut w = world("bc");
    want(&mut w, "u.service", "");
    want(&mut w, "busy.service", "");
    running(&mut w, "busy.service", 'b', 1);
    proposed(&mut w, "u.service", 'a', 3);
    pointer(&mut w, "u.service", 'a', 3);
    let plan = plan(&w);
    assert_eq!(
        plan.changes,
        [Change::Propose {
            unit: name("u.service"),
            machine: id('c'),
            proposal: w.wanted[&name("u.service")].proposal,
            from: Some((id('a'), 3)),
            placed_revision: Some(3),
        }]
    );
    let mut next = 10;
    assert_eq!(round(&mut w, &plan, &mut next), Plan::default());
}

#[test]
fn an_unclaimed_proposal_on_a_drained_machine_with_nowhere_to_go_is_withdrawn() {
    let mut w = world("b");
    want(&mut w, "u.service", &format!("MachineID={}", id('a')));
    proposed(&mut w, "u.service", 'a', 3);
    pointer(&mut w, "u.service", 'a', 3);
    let plan = plan(&w);
    assert_eq!(plan.changes, [withdrawal("u.service", 'a', 3, Some(3))]);
    assert_eq!(unplaceable(&plan), ["u.service"]);
}

#[test]
fn a_claimed_proposal_on_a_drained_machine_is_withdrawn_and_never_doubled() {
    let mut w = world("bc");
    want(&mut w, "u.service", "");
    running(&mut w, "u.service", 'a', 3);
    let plan1 = plan(&w);
    assert_eq!(plan1.changes, [withdrawal("u.service", 'a', 3, Some(3))]);
    assert!(plan1.unplaceable.is_empty());
    // The agent on a is still stopping it: nothing is proposed elsewhere.
    let mut next = 10;
    apply(&mut w, &plan1.changes, &mut next);
    assert!(w.claims.contains_key(&name("u.service")));
    let plan2 = plan(&w);
    assert_eq!(plan2, Plan::default());
    // Released: now it goes to b.
    w.claims.clear();
    assert_eq!(plan(&w).changes, [fresh("u.service", 'b', &w)]);
}

#[test]
fn a_claim_anywhere_blocks_every_new_proposal() {
    let mut w = world("abc");
    want(&mut w, "u.service", "");
    claimed(&mut w, "u.service", 'a');
    assert_eq!(plan(&w), Plan::default());
    claimed(&mut w, "u.service", 'z');
    assert_eq!(plan(&w), Plan::default());
}

#[test]
fn an_unclaimed_proposal_is_withdrawn_while_the_unit_runs_elsewhere() {
    // Still running on a (its proposal already withdrawn), proposed on b:
    // b's agent could claim it before a's has stopped it.
    for stale in [false, true] {
        let mut w = world("abc");
        want(&mut w, "u.service", "");
        claimed(&mut w, "u.service", 'a');
        proposed(&mut w, "u.service", 'b', 4);
        pointer(&mut w, "u.service", 'b', 4);
        if stale {
            w.stale.insert((name("u.service"), id('b')));
        }
        let plan = plan(&w);
        assert_eq!(
            plan.changes,
            [withdrawal("u.service", 'b', 4, Some(4))],
            "stale: {stale}"
        );
    }
}

#[test]
fn a_stale_unclaimed_proposal_moves_to_another_eligible_machine() {
    let mut w = world("abc");
    want(&mut w, "u.service", "");
    want(&mut w, "busy.service", "");
    running(&mut w, "busy.service", 'b', 1);
    proposed(&mut w, "u.service", 'a', 5);
    pointer(&mut w, "u.service", 'a', 5);
    w.stale.insert((name("u.service"), id('a')));
    let plan = plan(&w);
    assert_eq!(
        plan.changes,
        [Change::Propose {
            unit: name("u.service"),
            machine: id('c'),
            proposal: w.wanted[&name("u.service")].proposal,
            from: Some((id('a'), 5)),
            placed_revision: Some(5),
        }]
    );
}

#[test]
fn a_stale_proposal_stays_when_nowhere_else_fits() {
    // The only machine.
    let mut w = world("a");
    want(&mut w, "u.service", "");
    proposed(&mut w, "u.service", 'a', 5);
    w.stale.insert((name("u.service"), id('a')));
    // It waits for room: the next pass decides it again.
    let waits = Plan {
        waiting: BTreeSet::from([name("u.service")]),
        ..Plan::default()
    };
    assert_eq!(plan(&w), waits);
    // Pinned to its machine.
    let mut w = world("ab");
    want(&mut w, "u.service", &format!("MachineID={}", id('a')));
    proposed(&mut w, "u.service", 'a', 5);
    w.stale.insert((name("u.service"), id('a')));
    assert_eq!(plan(&w), waits);
    // Claimed after all: a claim is never moved.
    let mut w = world("ab");
    want(&mut w, "u.service", "");
    running(&mut w, "u.service", 'a', 5);
    w.stale.insert((name("u.service"), id('a')));
    assert_eq!(plan(&w), Plan::default());
}

// ---- global units ---------------------------------------------------

#[test]
fn a_global_unit_goes_to_every_eligible_machine_and_only_there() {
    let mut w = World {
        machines: vec![
            machine('a', &[("region", "eu")]),
            machine('b', &[("region", "us")]),
            machine('c', &[("region", "eu")]),
            machine('d', &[("region", "eu")]),
        ],
        ..World::default()
    };
    want(
        &mut w,
        "g.service",
        "Global=true\nMachineMetadata=region=eu",
    );
    let current = w.wanted[&name("g.service")].proposal;
    // b is not eligible, c has an old body, d an old target, e is drained.
    for (m, rev) in [('b', 2), ('c', 3), ('d', 4), ('e', 5)] {
        proposed(&mut w, "g.service", m, rev);
        claimed(&mut w, "g.service", m);
    }
    let on = w.proposals.get_mut(&name("g.service")).unwrap();
    on.get_mut(&id('c')).unwrap().proposal.hash = UnitHash::of_text("old");
    on.get_mut(&id('d')).unwrap().proposal.target = Target::Loaded;
    let plan = plan(&w);
    assert_eq!(
        plan.changes,
        [
            withdrawal("g.service", 'b', 2, None),
            Change::Update {
                unit: name("g.service"),
                machine: id('c'),
                proposal: current,
                mod_revision: 3,
            },
            Change::Update {
                unit: name("g.service"),
                machine: id('d'),
                proposal: current,
                mod_revision: 4,
            },
            withdrawal("g.service", 'e', 5, None),
            Change::Propose {
                unit: name("g.service"),
                machine: id('a'),
                proposal: current,
                from: None,
                placed_revision: None,
            },
        ]
    );
    let mut next = 10;
    assert_eq!(round(&mut w, &plan, &mut next), Plan::default());
    let hosts: Vec<&String> = w.proposals[&name("g.service")].keys().collect();
    assert_eq!(hosts, [&id('a'), &id('c'), &id('d')]);
}

#[test]
fn a_global_unit_keeps_off_machines_with_a_conflict_and_counts_as_load() {
    let mut w = world("abc");
    want(&mut w, "a-blocker.service", "Conflicts=g.service");
    running(&mut w, "a-blocker.service", 'b', 1);
    want(&mut w, "g.service", "Global=true");
    want(&mut w, "z.service", "");
    let plan = plan(&w);
    let g = targets(&plan, "g.service");
    assert_eq!(g, [id('a'), id('c')]);
    // Every machine now holds one unit; z takes the smallest id.
    assert_eq!(targets(&plan, "z.service"), [id('a')]);
}

#[test]
fn a_global_unit_with_no_eligible_machine_is_withdrawn_everywhere() {
    let mut w = world("ab");
    want(
        &mut w,
        "g.service",
        "Global=true\nMachineMetadata=region=mars",
    );
    proposed(&mut w, "g.service", 'a', 1);
    proposed(&mut w, "g.service", 'b', 2);
    let plan = plan(&w);
    assert_eq!(
        plan.changes,
        [
            withdrawal("g.service", 'a', 1, None),
            withdrawal("g.service", 'b', 2, None),
        ]
    );
    assert_eq!(unplaceable(&plan), ["g.service"]);
}

// ---- MachineOf ------------------------------------------------------

#[test]
fn machine_of_follows_a_peer_proposed_in_the_same_pass() {
    let mut w = world("abc");
    want(&mut w, "busy.service", "");
    running(&mut w, "busy.service", 'a', 1);
    want(&mut w, "app.service", "");
    want(&mut w, "side.service", "MachineOf=app.service");
    let plan = plan(&w);
    assert!(plan.unplaceable.is_empty(), "{plan:?}");
    assert_eq!(targets(&plan, "app.service"), [id('b')]);
    // c is emptier, but the peer is on b.
    assert_eq!(targets(&plan, "side.service"), [id('b')]);
    let mut next = 10;
    assert_eq!(round(&mut w, &plan, &mut next), Plan::default());
}

#[test]
fn machine_of_a_peer_later_in_name_order_follows_it_next_pass() {
    let mut w = world("abc");
    want(&mut w, "busy.service", "");
    running(&mut w, "busy.service", 'a', 1);
    want(&mut w, "a-side.service", "MachineOf=z-app.service");
    want(&mut w, "z-app.service", "");
    let mut next = 10;
    let plan1 = plan(&w);
    let plan2 = round(&mut w, &plan1, &mut next);
    let plan3 = round(&mut w, &plan2, &mut next);
    assert_eq!(plan3, Plan::default());
    let app = &w.proposals[&name("z-app.service")];
    let side = &w.proposals[&name("a-side.service")];
    assert_eq!(
        app.keys().collect::<Vec<_>>(),
        side.keys().collect::<Vec<_>>()
    );
}

#[test]
fn machine_of_a_peer_that_left_withdraws_the_follower() {
    let mut w = world("ab");
    want(&mut w, "app.service", "");
    want(&mut w, "side.service", "MachineOf=app.service");
    running(&mut w, "side.service", 'a', 1);
    let plan1 = plan(&w);
    // app goes to the emptier b; side, without its peer on a, is withdrawn.
    assert_eq!(
        plan1.changes,
        [
            fresh("app.service", 'b', &w),
            withdrawal("side.service", 'a', 1, Some(1)),
        ]
    );
    let mut next = 10;
    let plan2 = round(&mut w, &plan1, &mut next);
    let plan3 = round(&mut w, &plan2, &mut next);
    assert_eq!(plan3, Plan::default());
    assert_eq!(
        w.proposals[&name("app.service")].keys().collect::<Vec<_>>(),
        w.proposals[&name("side.service")]
            .keys()
            .collect::<Vec<_>>()
    );
}

// ---- Replaces and conflict eviction ---------------------------------

#[test]
fn a_replacing_unit_goes_where_the_replaced_one_runs_and_displaces_it() {
    let mut w = world("abc");
    want(&mut w, "other.service", "");
    want(&mut w, "web-v1.service", "");
    want(&mut w, "web-v2.service", "Replaces=web-v1.service");
    // v1 on the busiest machine.
    running(&mut w, "other.service", 'b', 1);
    running(&mut w, "web-v1.service", 'b', 2);
    let plan1 = plan(&w);
    assert_eq!(
        plan1.changes,
        [
            fresh("web-v2.service", 'b', &w),
            withdrawal("web-v1.service", 'b', 2, Some(2)),
        ]
    );
    // v1 is stopping on b: not proposed anywhere yet.
    assert!(targets(&plan1, "web-v1.service").is_empty());
    assert!(plan1.unplaceable.is_empty());
    let mut next = 10;
    let plan2 = round(&mut w, &plan1, &mut next);
    let v1 = targets(&plan2, "web-v1.service");
    assert_eq!(v1, [id('a')], "{plan2:?}");
    assert_eq!(round(&mut w, &plan2, &mut next), Plan::default());
}

#[test]
fn a_replacing_unit_started_with_the_replaced_one_never_shares_its_machine() {
    let mut w = world("ab");
    want(&mut w, "a.service", "");
    want(&mut w, "b.service", "Replaces=a.service");
    let plan = plan(&w);
    let (a, b) = (targets(&plan, "a.service"), targets(&plan, "b.service"));
    assert_eq!(b.len(), 1, "{plan:?}");
    assert!(a.len() <= 1, "{plan:?}");
    assert_ne!(a, b, "proposed together: {plan:?}");
    let mut next = 10;
    let mut again = plan;
    for _ in 0..3 {
        again = round(&mut w, &again, &mut next);
        assert!(exclusive_neighbours(&w).is_empty(), "{w:?}");
    }
    assert_eq!(again, Plan::default());
    assert_eq!(w.proposals.len(), 2);
}

#[test]
fn a_stale_replacing_unit_displaces_what_it_replaces_where_it_moves() {
    let mut w = world("ab");
    want(&mut w, "v1.service", "");
    want(&mut w, "v2.service", "Replaces=v1.service");
    running(&mut w, "v1.service", 'b', 1);
    proposed(&mut w, "v2.service", 'a', 2);
    pointer(&mut w, "v2.service", 'a', 2);
    w.stale.insert((name("v2.service"), id('a')));
    let plan = plan(&w);
    assert_eq!(targets(&plan, "v2.service"), [id('b')]);
    assert!(
        plan.changes
            .contains(&withdrawal("v1.service", 'b', 1, Some(1))),
        "{plan:?}"
    );
}

#[test]
fn conflict_eviction_keeps_the_unit_whose_file_asked() {
    for (asker, other) in [("x.service", "y.service"), ("y.service", "x.service")] {
        let mut w = world("a");
        want(&mut w, asker, &format!("Conflicts={other}"));
        want(&mut w, other, "");
        running(&mut w, "x.service", 'a', 1);
        running(&mut w, "y.service", 'a', 2);
        pointer(&mut w, other, 'a', 3);
        let plan = plan(&w);
        let rev = if other == "x.service" { 1 } else { 2 };
        assert_eq!(
            plan.changes,
            [withdrawal(other, 'a', rev, Some(3))],
            "{asker} asked"
        );
        // The evicted unit waits for its release: nothing else fits.
        assert!(plan.unplaceable.is_empty());
        let mut next = 10;
        let again = round(&mut w, &plan, &mut next);
        assert!(again.changes.is_empty());
        assert_eq!(unplaceable(&again), [other]);
    }
}

#[test]
fn conflict_eviction_of_mutual_exclusion_evicts_the_greater_name() {
    let mut w = world("ab");
    want(&mut w, "x.service", "Conflicts=y.service");
    want(&mut w, "y.service", "Replaces=x.service");
    running(&mut w, "x.service", 'a', 1);
    running(&mut w, "y.service", 'a', 2);
    let plan = plan(&w);
    assert_eq!(plan.changes, [withdrawal("y.service", 'a', 2, Some(2))]);
}

#[test]
fn a_unit_being_stopped_does_not_evict_its_neighbour() {
    // x was withdrawn earlier and is stopping on a; its new body conflicts
    // with y. y keeps its place: x is leaving anyway.
    let mut w = world("ab");
    want(&mut w, "x.service", "Conflicts=y.service");
    want(&mut w, "y.service", "");
    claimed(&mut w, "x.service", 'a');
    running(&mut w, "y.service", 'a', 2);
    assert_eq!(plan(&w), Plan::default());
}

#[test]
fn eviction_along_a_chain_removes_only_what_it_must() {
    // a excludes b, b excludes c: evicting b is enough.
    let mut w = world("abc");
    want(&mut w, "a.service", "Conflicts=b.service");
    want(&mut w, "b.service", "Conflicts=c.service");
    want(&mut w, "c.service", "");
    running(&mut w, "a.service", 'a', 1);
    running(&mut w, "b.service", 'a', 2);
    running(&mut w, "c.service", 'a', 3);
    let plan = plan(&w);
    assert_eq!(plan.changes, [withdrawal("b.service", 'a', 2, Some(2))]);
}

#[test]
fn a_replaced_unit_proposed_earlier_in_the_pass_is_decided_again() {
    let mut w = world("ab");
    want(&mut w, "a.service", "");
    want(&mut w, "b.service", "Replaces=a.service");
    let plan = plan(&w);
    // a first took machine a; b goes there to replace it, and a moves on
    // before anything is written.
    assert_eq!(
        plan.changes,
        [fresh("b.service", 'a', &w), fresh("a.service", 'b', &w)]
    );
    let mut next = 10;
    assert_eq!(round(&mut w, &plan, &mut next), Plan::default());
}

#[test]
fn a_replaced_global_unit_proposed_earlier_in_the_pass_is_taken_back_there() {
    let mut w = world("ab");
    want(&mut w, "g.service", "Global=true");
    want(&mut w, "r.service", "Replaces=g.service");
    let plan = plan(&w);
    let proposal = w.wanted[&name("g.service")].proposal;
    assert_eq!(
        plan.changes,
        [
            Change::Propose {
                unit: name("g.service"),
                machine: id('b'),
                proposal,
                from: None,
                placed_revision: None,
            },
            fresh("r.service", 'a', &w),
        ]
    );
    let mut next = 10;
    assert_eq!(round(&mut w, &plan, &mut next), Plan::default());
}

#[test]
fn a_displaced_move_with_nowhere_left_withdraws_where_it_came_from() {
    // c is stale on b and moves to d; x (which conflicts with c) then
    // takes b; r replaces c on d. c fits nowhere now, and b is taken.
    let mut w = world("bd");
    want(&mut w, "c.service", "");
    want(&mut w, "x.service", "Conflicts=c.service");
    want(&mut w, "y.service", "Replaces=c.service");
    proposed(&mut w, "c.service", 'b', 1);
    pointer(&mut w, "c.service", 'b', 1);
    w.stale.insert((name("c.service"), id('b')));
    let plan = plan(&w);
    assert_eq!(
        plan.changes,
        [
            fresh("x.service", 'b', &w),
            fresh("y.service", 'd', &w),
            withdrawal("c.service", 'b', 1, Some(1)),
        ]
    );
    assert_eq!(unplaceable(&plan), ["c.service"]);
    let mut next = 10;
    let again = round(&mut w, &plan, &mut next);
    assert!(again.changes.is_empty() && exclusive_neighbours(&w).is_empty());
}

#[test]
fn a_displaced_move_that_fits_only_where_it_came_from_is_undone() {
    let mut w = world("ab");
    want(&mut w, "u.service", "");
    want(&mut w, "v.service", "Replaces=u.service");
    proposed(&mut w, "u.service", 'a', 1);
    w.stale.insert((name("u.service"), id('a')));
    let plan = plan(&w);
    // u would move to b, where v replaces it: it stays on a instead.
    assert_eq!(plan.changes, [fresh("v.service", 'b', &w)]);
    assert!(plan.unplaceable.is_empty());
}

#[test]
fn machine_of_ignores_a_peer_being_stopped() {
    // app was withdrawn from a and is stopping there: side must not
    // follow it to a machine it is leaving.
    let mut w = world("ab");
    want(&mut w, "app.service", "");
    want(&mut w, "side.service", "MachineOf=app.service");
    claimed(&mut w, "app.service", 'a');
    let plan1 = plan(&w);
    assert!(plan1.changes.is_empty(), "{plan1:?}");
    assert_eq!(unplaceable(&plan1), ["side.service"]);
    // Released: both land together.
    w.claims.clear();
    let plan2 = plan(&w);
    assert_eq!(
        plan2.changes,
        [
            fresh("app.service", 'a', &w),
            fresh("side.service", 'a', &w)
        ]
    );
}

// ---- property tests -------------------------------------------------

/// Unit names the random worlds use, in name order.
const NAMES: [&str; 8] = [
    "a.service",
    "b.service",
    "c.service",
    "db.service",
    "g.service",
    "web@1.service",
    "web@2.service",
    "web@3.service",
];

const GLOBS: [&str; 7] = [
    "web@*.service",
    "db*",
    "a.service",
    "b.service",
    "c*",
    "g.service",
    "*.service",
];

const MACHINES: [char; 4] = ['a', 'b', 'c', 'd'];

/// A unit's `[X-Fleet]` rules, over the small pools above.
#[derive(Debug, Clone)]
enum Rule {
    Plain,
    Conflicts(Vec<usize>),
    /// Replaces the unit at this index: kept acyclic by replacing only
    /// units after it in name order, or only units before it.
    Replaces(usize),
    Follows(usize),
    Global(Vec<usize>),
    Pinned(usize),
    /// `MachineMetadata=region=east` (or `west`): machines start without.
    Region(bool),
}

fn rule() -> impl Strategy<Value = Rule> {
    let globs = || proptest::collection::vec(0..GLOBS.len(), 1..3);
    prop_oneof![
        3 => Just(Rule::Plain),
        4 => globs().prop_map(Rule::Conflicts),
        2 => (0..NAMES.len()).prop_map(Rule::Replaces),
        1 => (0..NAMES.len()).prop_map(Rule::Follows),
        1 => proptest::collection::vec(0..GLOBS.len(), 0..2).prop_map(Rule::Global),
        1 => (0..MACHINES.len()).prop_map(Rule::Pinned),
        1 => any::<bool>().prop_map(Rule::Region),
    ]
}

fn xfleet(index: usize, rule: &Rule, replace_later: bool) -> String {
    let globs = |list: &[usize]| -> String {
        let list: Vec<&str> = list.iter().map(|g| GLOBS[*g]).collect();
        list.join(" ")
    };
    match rule {
        Rule::Plain => String::new(),
        Rule::Conflicts(list) => format!("Conflicts={}", globs(list)),
        Rule::Replaces(other) if (*other > index) == replace_later && *other != index => {
            format!("Replaces={}", NAMES[*other])
        }
        Rule::Replaces(_) => String::new(),
        Rule::Follows(peer) => format!("MachineOf={}", NAMES[*peer]),
        Rule::Global(list) if list.is_empty() => "Global=true".to_string(),
        Rule::Global(list) => format!("Global=true\nConflicts={}", globs(list)),
        Rule::Pinned(m) => format!("MachineID={}", id(MACHINES[*m])),
        Rule::Region(east) => {
            format!(
                "MachineMetadata=region={}",
                if *east { "east" } else { "west" }
            )
        }
    }
}

/// A unit of the random world: whether it is wanted, its rules, its target.
#[derive(Debug, Clone)]
struct Spec {
    wanted: bool,
    rule: Rule,
    loaded: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        proptest::bool::weighted(0.85),
        rule(),
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(wanted, rule, loaded)| Spec {
            wanted,
            rule,
            loaded,
        })
}

/// An existing proposal: unit index, machine index, old body, claimed, stale, pointer.
type Existing = (usize, usize, bool, bool, bool, bool);

fn random_world(
    specs: &[Spec],
    replace_later: bool,
    alive: &[bool],
    existing: &[Existing],
    loose_claims: &[(usize, usize)],
) -> World {
    let mut w = World::default();
    for (m, up) in MACHINES.iter().zip(alive) {
        if *up {
            w.machines.push(machine(*m, &[]));
        }
    }
    for (i, spec) in specs.iter().enumerate() {
        if !spec.wanted {
            continue;
        }
        let text = format!(
            "[Service]\nExecStart=/bin/true\n[X-Fleet]\n{}\n",
            xfleet(i, &spec.rule, replace_later)
        );
        // Combinations the validator refuses (MachineOf itself, ...) run plain.
        let mut unit = match Unit::from_text(&name(NAMES[i]), &text) {
            Ok(parsed) => Wanted {
                proposal: Proposal {
                    hash: parsed.hash(),
                    target: Target::Launched,
                },
                requirements: Arc::new(parsed.requirements().clone()),
            },
            Err(_) => wanted(NAMES[i], ""),
        };
        if spec.loaded {
            unit.proposal.target = Target::Loaded;
        }
        w.wanted.insert(name(NAMES[i]), unit);
    }
    let mut revision = 0;
    for &(u, m, old_body, claim, stale, point) in existing {
        let (u, m) = (u % specs.len(), m % MACHINES.len());
        revision += 1;
        let letter = MACHINES[m];
        proposed(&mut w, NAMES[u], letter, revision);
        if old_body {
            let on = w.proposals.get_mut(&name(NAMES[u])).unwrap();
            on.get_mut(&id(letter)).unwrap().proposal.hash = UnitHash::of_text("old");
        }
        if claim {
            claimed(&mut w, NAMES[u], letter);
        } else if stale {
            w.stale.insert((name(NAMES[u]), id(letter)));
        }
        if point {
            pointer(&mut w, NAMES[u], letter, revision);
        }
    }
    for &(u, m) in loose_claims {
        claimed(&mut w, NAMES[u % specs.len()], MACHINES[m % MACHINES.len()]);
    }
    w
}

fn is_global(w: &World, unit: &UnitName) -> bool {
    w.wanted.get(unit).is_some_and(|x| x.requirements.global)
}

/// What must hold after every round's writes, before the agents act.
fn check_round(read: &World, plan: &Plan, after: &World) -> Result<(), TestCaseError> {
    for change in &plan.changes {
        if let Change::Propose { unit, .. } = change
            && !is_global(read, unit)
        {
            prop_assert!(
                read.claims.get(unit).is_none_or(MachineIds::is_empty),
                "{change:?} while {unit} is claimed on {:?}",
                read.claims.get(unit)
            );
        }
    }
    let pairs = exclusive_neighbours(after);
    prop_assert!(
        pairs.is_empty(),
        "exclusive units share a machine: {pairs:?}"
    );
    let alive: BTreeSet<&String> = after.machines.iter().map(|m| &m.id).collect();
    for (unit, on) in &after.proposals {
        prop_assert!(after.wanted.contains_key(unit), "{unit} is not wanted");
        if is_global(after, unit) {
            for machine in on.keys() {
                prop_assert!(alive.contains(machine), "global {unit} on {machine}");
            }
            continue;
        }
        prop_assert!(on.len() <= 1, "{unit} proposed {} times", on.len());
        for machine in on.keys() {
            // An unclaimed proposal may be claimed at any moment: the unit
            // must not be running anywhere.
            if !read.is_claimed(unit, machine) {
                prop_assert!(
                    read.claims.get(unit).is_none_or(MachineIds::is_empty),
                    "{unit} proposed unclaimed on {machine} while claimed on {:?}",
                    read.claims.get(unit)
                );
            }
        }
    }
    Ok(())
}

/// What must hold once the plan has nothing left to change.
fn check_fixed_point(w: &World, plan: &Plan) -> Result<(), TestCaseError> {
    let waiting: BTreeSet<&UnitName> = plan.unplaceable.iter().map(|(u, _)| u).collect();
    for (unit, x) in &w.wanted {
        let on = w.proposals.get(unit);
        if x.requirements.global {
            continue;
        }
        let Some(on) = on else {
            prop_assert!(
                waiting.contains(unit),
                "{unit} is neither placed nor unplaceable"
            );
            continue;
        };
        prop_assert!(!waiting.contains(unit), "{unit} is placed and unplaceable");
        let machine = on.keys().next().unwrap();
        for peer in &x.requirements.machine_of {
            prop_assert!(
                w.proposals
                    .get(peer)
                    .is_some_and(|p| p.contains_key(machine)),
                "{unit} on {machine} without its peer {peer}"
            );
        }
        if let Some(pin) = &x.requirements.machine_id {
            prop_assert_eq!(pin, machine);
        }
    }
    Ok(())
}

/// Rounds a random world may take to settle: most take one to three; a
/// `MachineOf` follower named before its peer takes one more per link.
const ROUNDS: usize = 10;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn random_worlds_settle_without_exclusive_neighbours_or_doubles(
        specs in proptest::collection::vec(spec(), NAMES.len()),
        replace_later in any::<bool>(),
        alive in proptest::collection::vec(proptest::bool::weighted(0.8), MACHINES.len()),
        existing in proptest::collection::vec(
            (0..NAMES.len(), 0..MACHINES.len(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
            0..10,
        ),
        loose_claims in proptest::collection::vec((0..NAMES.len(), 0..MACHINES.len()), 0..4),
    ) {
        let mut w = random_world(&specs, replace_later, &alive, &existing, &loose_claims);
        let mut next: Revision = 1000;
        for _ in 0..ROUNDS {
            let plan = plan(&w);
            // Walking machines in load order decides as scoring them all.
            prop_assert_eq!(&plan, &super::plan_with(&w, None, false));
            if plan.changes.is_empty() {
                if w.claims.values().flatten().count() == load(&w).values().flatten().count() {
                    return check_fixed_point(&w, &plan);
                }
                // The agents have not settled yet (loose claims): let them.
                settle(&mut w);
                continue;
            }
            let read = w.clone();
            apply(&mut w, &plan.changes, &mut next);
            check_round(&read, &plan, &w)?;
            settle(&mut w);
        }
        prop_assert!(false, "no fixed point after {} rounds: {:?}", ROUNDS, plan(&w));
    }

    #[test]
    fn identical_units_spread_evenly_in_one_pass(count in 0usize..40, machines in 1usize..7) {
        let letters: String = "abcdefg".chars().take(machines).collect();
        let mut w = world(&letters);
        for i in 0..count {
            want(&mut w, &format!("u@{i}.service"), "");
        }
        let plan = plan(&w);
        prop_assert_eq!(plan.changes.len(), count);
        let mut next = 0;
        let again = round(&mut w, &plan, &mut next);
        prop_assert_eq!(again, Plan::default());
        let mut counts: Vec<usize> = load(&w).values().map(Vec::len).collect();
        counts.resize(machines, 0);
        let (max, min) = (counts.iter().max().unwrap(), counts.iter().min().unwrap());
        prop_assert!(max - min <= 1, "{:?}", counts);
    }

    #[test]
    fn conflicting_instances_fill_distinct_machines(count in 0usize..9, machines in 0usize..6) {
        let letters: String = "abcdef".chars().take(machines).collect();
        let mut w = world(&letters);
        for i in 0..count {
            want(&mut w, &format!("hello@{i}.service"), "Conflicts=hello@*.service");
        }
        let plan = plan(&w);
        let placed = count.min(machines);
        prop_assert_eq!(plan.changes.len(), placed);
        prop_assert_eq!(plan.unplaceable.len(), count - placed);
        let hosts: BTreeSet<String> = (0..count)
            .flat_map(|i| targets(&plan, &format!("hello@{i}.service")))
            .collect();
        prop_assert_eq!(hosts.len(), placed);
    }
}

// ---- passes over what changed ---------------------------------------

/// What changed between two worlds, as the view records it from the
/// store's events (reported states only while a machine drains) and the
/// scheduler from its stale marks.
fn touched_between(old: &World, new: &World) -> Touched {
    fn keys<'a, K: Ord, V>(a: &'a BTreeMap<K, V>, b: &'a BTreeMap<K, V>) -> BTreeSet<&'a K> {
        a.keys().chain(b.keys()).collect()
    }
    let mut t = Touched::default();
    for unit in keys(&old.wanted, &new.wanted) {
        if old.wanted.get(unit) != new.wanted.get(unit) {
            t.note_wanted(unit);
        }
    }
    let empty = ByMachine::default();
    for unit in keys(&old.proposals, &new.proposals) {
        let (a, b) = (
            old.proposals.get(unit).unwrap_or(&empty),
            new.proposals.get(unit).unwrap_or(&empty),
        );
        let machines: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for machine in machines {
            if a.get(machine) != b.get(machine) {
                t.note_pair(unit, machine);
            }
        }
    }
    let none = MachineIds::default();
    for unit in keys(&old.claims, &new.claims) {
        let (a, b) = (
            old.claims.get(unit).unwrap_or(&none),
            new.claims.get(unit).unwrap_or(&none),
        );
        let differ = a.iter().filter(|m| !b.contains(m));
        for machine in differ.chain(b.iter().filter(|m| !a.contains(m))) {
            t.note_pair(unit, machine);
        }
    }
    for unit in keys(&old.placed, &new.placed) {
        if old.placed.get(unit) != new.placed.get(unit) {
            t.note_unit(unit);
        }
    }
    for (unit, _) in old.stale.symmetric_difference(&new.stale) {
        t.note_unit(unit);
    }
    if !old.draining.is_empty() || !new.draining.is_empty() {
        for (unit, machine) in keys(&old.reported, &new.reported) {
            if old.reported.get(&(unit.clone(), machine.clone()))
                != new.reported.get(&(unit.clone(), machine.clone()))
            {
                t.note_unit(unit);
            }
        }
    }
    let machines = |w: &World| -> BTreeMap<String, Machine> {
        w.machines
            .iter()
            .map(|m| (m.id.clone(), m.clone()))
            .collect()
    };
    let (a, b) = (machines(old), machines(new));
    for machine in keys(&a, &b) {
        if a.get(machine) != b.get(machine) {
            t.note_machine(machine);
        }
    }
    for machine in old.draining.symmetric_difference(&new.draining) {
        t.note_machine(machine);
    }
    t
}

/// One change to the world between two passes: (what, unit, machine, flag).
type Event = (usize, usize, usize, bool);

/// Changes `w` as the cluster might between two passes.
fn happen(w: &mut World, specs: &[Spec], (what, u, m, flag): Event, next: &mut Revision) {
    let unit = name(NAMES[u % NAMES.len()]);
    let letter = MACHINES[m % MACHINES.len()];
    let machine_id = id(letter);
    let all = || MACHINES.iter().map(|c| id(*c));
    match what % 9 {
        // An agent claims what it was proposed, or releases a claim.
        0 => {
            let proposed = w
                .proposals
                .get(&unit)
                .is_some_and(|on| on.contains_key(&machine_id));
            if proposed && flag {
                w.claims.entry(unit).or_default().insert(machine_id);
            } else if let Some(on) = w.claims.get_mut(&unit) {
                on.remove(&machine_id);
                if on.is_empty() {
                    w.claims.remove(&unit);
                }
            }
        }
        // A host dies (its claims go with its lease) or joins.
        1 => {
            let alive =
                w.machines.iter().any(|x| x.id == machine_id) || w.draining.contains(&machine_id);
            if alive {
                w.machines.retain(|x| x.id != machine_id);
                w.draining.remove(&machine_id);
                for on in w.claims.values_mut() {
                    on.remove(&machine_id);
                }
                w.claims.retain(|_, on| !on.is_empty());
            } else if all().any(|x| x == machine_id) {
                w.machines.push(machine(letter, &[]));
                w.machines.sort_by(|a, b| a.id.cmp(&b.id));
            }
        }
        // Drained, or undrained.
        2 => {
            if w.draining.remove(&machine_id) {
                w.machines.push(machine(letter, &[]));
                w.machines.sort_by(|a, b| a.id.cmp(&b.id));
            } else if w.machines.iter().any(|x| x.id == machine_id) {
                w.machines.retain(|x| x.id != machine_id);
                w.draining.insert(machine_id);
            }
        }
        // New metadata.
        3 => {
            if let Some(x) = w.machines.iter_mut().find(|x| x.id == machine_id) {
                let value = if flag { "east" } else { "west" };
                x.metadata.insert("region".into(), value.into());
            }
        }
        // A unit is started, stopped or given new rules.
        4 => {
            let i = u % NAMES.len();
            if flag {
                w.wanted.remove(&unit);
            } else {
                let rule = &specs[(i + m) % specs.len()].rule;
                let text = format!(
                    "[Service]\nExecStart=/bin/true\n[X-Fleet]\n{}\n",
                    xfleet(i, rule, true)
                );
                let wanted = match Unit::from_text(&unit, &text) {
                    Ok(parsed) => Wanted {
                        proposal: Proposal {
                            hash: parsed.hash(),
                            target: Target::Launched,
                        },
                        requirements: Arc::new(parsed.requirements().clone()),
                    },
                    Err(_) => wanted(NAMES[i], ""),
                };
                w.wanted.insert(unit, wanted);
            }
        }
        // An unclaimed proposal reaches the claim bound, or is seen afresh.
        5 => {
            let pair = (unit.clone(), machine_id.clone());
            if !w.stale.remove(&pair)
                && w.proposals
                    .get(&unit)
                    .is_some_and(|on| on.contains_key(&machine_id))
                && !w.is_claimed(&unit, &machine_id)
            {
                w.stale.insert(pair);
            }
        }
        // A host reports a state.
        6 => {
            let hash = w
                .wanted
                .get(&unit)
                .map_or(UnitHash::of_text("x"), |x| x.proposal.hash);
            w.reported.insert(
                (unit, machine_id),
                Arc::new(ReportedState {
                    hash,
                    state: UnitState {
                        load: "loaded".into(),
                        active: if flag { "active" } else { "activating" }.into(),
                        sub: "running".into(),
                    },
                    target: Some(Target::Launched),
                    reason: None,
                }),
            );
        }
        // Someone else's write: a proposal appears (a deposed scheduler).
        7 => {
            *next += 1;
            proposed(w, NAMES[u % NAMES.len()], letter, *next);
        }
        // A claim of a unit nobody proposed there (a host being stopped).
        _ => {
            if flag {
                w.claims.entry(unit).or_default().insert(machine_id);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// A pass over what changed since the last pass (and what that pass
    /// carried) plans exactly what a pass over everything plans, whichever
    /// of the last pass's writes landed and whatever happened meanwhile.
    #[test]
    fn a_pass_over_what_changed_plans_as_a_pass_over_everything(
        specs in proptest::collection::vec(spec(), NAMES.len()),
        replace_later in any::<bool>(),
        alive in proptest::collection::vec(proptest::bool::weighted(0.8), MACHINES.len()),
        existing in proptest::collection::vec(
            (0..NAMES.len(), 0..MACHINES.len(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
            0..10,
        ),
        loose_claims in proptest::collection::vec((0..NAMES.len(), 0..MACHINES.len()), 0..4),
        steps in proptest::collection::vec(
            (
                proptest::collection::vec(proptest::bool::weighted(0.7), 0..16),
                proptest::collection::vec((0..9usize, 0..NAMES.len(), 0..MACHINES.len(), any::<bool>()), 0..5),
            ),
            1..8,
        ),
    ) {
        let mut w = random_world(&specs, replace_later, &alive, &existing, &loose_claims);
        let mut next: Revision = 1000;
        let mut last = plan(&w);
        let mut index = Index::of(&w);
        for (landed, events) in steps {
            let before = w.clone();
            let written: Vec<Change> = last
                .changes
                .iter()
                .enumerate()
                .filter(|(i, _)| landed.get(*i).copied().unwrap_or(true))
                .map(|(_, c)| c.clone())
                .collect();
            apply(&mut w, &written, &mut next);
            for event in events {
                happen(&mut w, &specs, event, &mut next);
            }
            let mut touched = touched_between(&before, &w);
            touched.merge(last.carried());
            let full = plan(&w);
            prop_assert_eq!(&plan_touched(&w, &touched, &mut index), &full, "touched: {:?}", touched);
            // The index kept between passes is the index of the world.
            prop_assert_eq!(&index, &Index::of(&w));
            last = full;
        }
    }
}
