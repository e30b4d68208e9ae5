//! The placement decision: which machines may run a unit, and which one should.
//!
//! A pure function of its inputs, so every node reaches the same answer from the
//! same facts. What may share a machine (rules 3 to 5) is asked of
//! [`super::colocation`], as the agent's claim check ([`super::claim`]) and the
//! scheduler's eviction ask it, so all three apply one rule. fleet's rules, per
//! candidate machine:
//!
//! 1. `MachineID` must name it (a full id, or an 8-character prefix that names
//!    exactly one machine in the cluster: an ambiguous prefix places nowhere).
//! 2. Its metadata must satisfy `MachineMetadata`.
//! 3. Every `MachineOf` peer must already be placed on it.
//! 4. No unit placed on it may conflict: this unit's `Conflicts` globs must not
//!    match a placed unit, and no placed unit's globs may match this one.
//! 5. No placed unit may replace this one (`Replaces` on the other side). A unit
//!    this one replaces does not block it: it is displaced to another machine.
//!    Two units that replace each other are kept apart and neither displaces.
//!
//! Among the eligible machines a unit with `Replaces` prefers one where it
//! displaces something (that is what replacing means); otherwise, and within
//! that preference, the least-loaded machine by placed-unit count wins, ties
//! going to the smallest machine id so every node decides the same. A `Global`
//! unit goes to every eligible machine.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::colocation::{Rule, between, missing_peer};
use super::fleet::{Requirements, id_matches};
use super::name::UnitName;

/// A machine as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The machine id (`/etc/machine-id`, 32 lowercase hex digits).
    pub id: String,
    /// Metadata from the machine's configuration, e.g. `region=eu`.
    pub metadata: BTreeMap<String, String>,
}

/// A unit that runs on, is claimed by, or is being proposed to a machine.
///
/// The caller includes in-flight proposals here, so a bulk start spreads
/// instead of piling onto the machine that looked emptiest at the start.
#[derive(Debug, Clone, Copy)]
pub struct Placed<'a> {
    /// The unit's name.
    pub name: &'a UnitName,
    /// Its requirements (its own Conflicts/Replaces globs count too).
    pub requirements: &'a Requirements,
    /// The id of the machine it is on.
    pub machine: &'a str,
}

/// The facts a decision is made from.
#[derive(Debug, Clone, Copy)]
pub struct Cluster<'a> {
    /// Machines that are present and may take work.
    pub machines: &'a [Machine],
    /// Units placed on them.
    pub placed: &'a [Placed<'a>],
}

/// Why a machine cannot run the unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ineligible {
    /// `MachineID` names another machine.
    MachineId {
        /// The id or prefix the unit asks for.
        wanted: String,
    },
    /// The machine fails the `MachineMetadata` rule for this key.
    Metadata {
        /// The metadata key whose rule failed.
        key: String,
    },
    /// A `MachineOf` peer is not placed on this machine.
    MissingPeer {
        /// The peer that is elsewhere or nowhere.
        peer: UnitName,
    },
    /// A unit on the machine conflicts with this one (either side's globs).
    Conflict {
        /// The conflicting unit.
        with: UnitName,
    },
    /// A unit on the machine replaces this one, so this one must go elsewhere.
    ReplacedBy {
        /// The replacing unit.
        by: UnitName,
    },
    /// This unit and one on the machine replace each other; they are kept apart.
    MutualReplace {
        /// The other unit.
        with: UnitName,
    },
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::MachineId { wanted } => {
                write!(f, "MachineID={wanted} names another machine")
            }
            Ineligible::Metadata { key } => write!(f, "metadata {key} does not match"),
            Ineligible::MissingPeer { peer } => write!(f, "MachineOf peer {peer} is not there"),
            Ineligible::Conflict { with } => write!(f, "conflicts with {with}"),
            Ineligible::ReplacedBy { by } => write!(f, "{by} replaces this unit there"),
            Ineligible::MutualReplace { with } => {
                write!(f, "{with} and this unit replace each other")
            }
        }
    }
}

/// What to do with the unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Run it on `machine`; the units in `displaces` must move elsewhere first.
    One {
        /// The chosen machine's id.
        machine: String,
        /// Units on that machine this one replaces.
        displaces: Vec<UnitName>,
    },
    /// A global unit: run it on every one of these machines.
    Every {
        /// Ids of all eligible machines, sorted.
        machines: Vec<String>,
    },
    /// Nowhere, for the reason given (with what to change).
    NotPlaceable {
        /// A sentence a user can act on.
        reason: String,
    },
}

/// The full answer: eligibility of every machine, and the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Eligible machine ids, best first.
    pub eligible: Vec<String>,
    /// Every other machine, with why it cannot run the unit.
    pub rejected: Vec<(String, Ineligible)>,
    /// Where the unit goes.
    pub outcome: Outcome,
}

/// Decides where the unit `name` with `requirements` should run in `cluster`.
///
/// Entries for `name` itself in `cluster.placed` are ignored, so the answer is
/// "where it belongs given everything else", whether it is placed yet or not.
pub fn decide(cluster: Cluster<'_>, name: &UnitName, requirements: &Requirements) -> Decision {
    // Grouped by machine once: a decision costs machines plus placed units,
    // not their product (30,000 units on 1,000 machines made it 30 million
    // comparisons per unit).
    let mut by_machine: HashMap<&str, Vec<Placed<'_>>> = HashMap::new();
    for placed in cluster.placed.iter().filter(|p| p.name != name) {
        by_machine.entry(placed.machine).or_default().push(*placed);
    }
    decide_with(
        cluster.machines,
        |machine| {
            let units = by_machine
                .get(machine.id.as_str())
                .cloned()
                .unwrap_or_default();
            Here {
                load: units.len(),
                units,
            }
        },
        name,
        requirements,
    )
}

/// One machine's units, as a decision needs them.
#[derive(Debug, Clone, Default)]
pub struct Here<'a> {
    /// How many units occupy the machine, the one decided not counted: the
    /// load that "least loaded" compares.
    pub load: usize,
    /// The units whose rules are checked against the one decided: all of
    /// them, or, for a unit that names no other (no `Conflicts=`,
    /// `Replaces=` or `MachineOf=`), only those that can exclude others
    /// ([`super::colocation::excludes_any`]); the rest could never keep it
    /// off the machine.
    pub units: Vec<Placed<'a>>,
}

/// [`decide`] with each machine's units given by `here`, so a caller that
/// keeps them indexed (the scheduler's pass) decides a unit without walking
/// every placed unit.
pub fn decide_with<'a>(
    machines: &'a [Machine],
    here: impl Fn(&'a Machine) -> Here<'a>,
    name: &UnitName,
    requirements: &Requirements,
) -> Decision {
    if let Some(reason) = ambiguous_machine_id(machines, requirements) {
        return Decision {
            eligible: Vec::new(),
            rejected: Vec::new(),
            outcome: Outcome::NotPlaceable { reason },
        };
    }
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    for machine in machines {
        let Here { load, units } = here(machine);
        let units: Vec<&Placed<'_>> = units.iter().filter(|p| p.name != name).collect();
        match check_machine(machine, &units, name, requirements) {
            Ok(displaces) => candidates.push((machine, load, displaces)),
            Err(why) => rejected.push((machine.id.clone(), why)),
        }
    }
    // Displacing machines first (only a unit with Replaces has any), then least
    // loaded, then smallest id: a total order, so every node agrees.
    candidates.sort_by(|a, b| {
        a.2.is_empty()
            .cmp(&b.2.is_empty())
            .then(a.1.cmp(&b.1))
            .then(a.0.id.cmp(&b.0.id))
    });
    let eligible: Vec<String> = candidates.iter().map(|c| c.0.id.clone()).collect();

    let outcome = if candidates.is_empty() {
        Outcome::NotPlaceable {
            reason: explain_rejections(machines.len(), &rejected),
        }
    } else if requirements.global {
        let mut machines = eligible.clone();
        machines.sort();
        Outcome::Every { machines }
    } else {
        let (machine, _, displaces) = candidates.swap_remove(0);
        Outcome::One {
            machine: machine.id.clone(),
            displaces,
        }
    };
    Decision {
        eligible,
        rejected,
        outcome,
    }
}

/// [`decide_with`]'s outcome found without scoring every machine, for a unit
/// whose choice is simply the least-loaded eligible machine: `by_load` yields
/// the machines in ascending (load, id) order, the load being what `here`
/// reports for each, and the first eligible one is the machine
/// [`decide_with`] picks. So a scheduler that keeps its machines ordered by
/// load (a [`super::load_order::LoadOrder`]) places a unit after checking
/// the few machines in front instead of all of them (at 5,000 machines a
/// bulk pass scored 5,000 per unit and never finished).
///
/// `None` when the unit needs [`decide_with`]: a `Global` unit (every
/// eligible machine), one with `Replaces=` (it prefers a machine where it
/// displaces something), `MachineID=` (an ambiguous prefix is refused
/// outright), `MachineOf=` (its machine is its peers'), and a unit no machine
/// takes (the reason names the machines that refused it).
pub fn least_loaded<'a>(
    by_load: impl IntoIterator<Item = &'a Machine>,
    here: impl Fn(&'a Machine) -> Here<'a>,
    name: &UnitName,
    requirements: &Requirements,
) -> Option<Outcome> {
    if requirements.global
        || !requirements.replaces.is_empty()
        || requirements.machine_id.is_some()
        || !requirements.machine_of.is_empty()
    {
        return None;
    }
    let mut previous: Option<(usize, &str)> = None;
    for machine in by_load {
        let Here { load, units } = here(machine);
        debug_assert!(
            previous.is_none_or(|p| p < (load, machine.id.as_str())),
            "least_loaded: machines not in (load, id) order"
        );
        previous = Some((load, machine.id.as_str()));
        let units: Vec<&Placed<'_>> = units.iter().filter(|p| p.name != name).collect();
        if check_machine(machine, &units, name, requirements).is_ok() {
            return Some(Outcome::One {
                machine: machine.id.clone(),
                displaces: Vec::new(),
            });
        }
    }
    None
}

/// A sentence for a `MachineID` prefix that names more than one machine.
fn ambiguous_machine_id(machines: &[Machine], requirements: &Requirements) -> Option<String> {
    let wanted = requirements.machine_id.as_deref()?;
    let matching: Vec<&str> = machines
        .iter()
        .filter(|m| id_matches(wanted, &m.id))
        .map(|m| m.id.as_str())
        .collect();
    (matching.len() > 1).then(|| {
        format!(
            "MachineID={wanted} matches {} machines ({}); give the full 32-digit machine id",
            matching.len(),
            matching.join(", ")
        )
    })
}

/// Checks one machine; on success returns the units placing the unit there displaces.
fn check_machine(
    machine: &Machine,
    here: &[&Placed<'_>],
    name: &UnitName,
    requirements: &Requirements,
) -> Result<Vec<UnitName>, Ineligible> {
    if !requirements.admits_machine_id(&machine.id) {
        return Err(Ineligible::MachineId {
            wanted: requirements.machine_id.clone().unwrap_or_default(),
        });
    }
    if let Some(key) = requirements.unmet_metadata(&machine.metadata) {
        return Err(Ineligible::Metadata {
            key: key.to_string(),
        });
    }
    if let Some(peer) = missing_peer(requirements, |peer| here.iter().any(|p| p.name == peer)) {
        return Err(Ineligible::MissingPeer { peer: peer.clone() });
    }
    let mut displaces = Vec::new();
    for placed in here {
        let exclusion = between((name, requirements), (placed.name, placed.requirements));
        match (exclusion.by_first, exclusion.by_second) {
            (Some(Rule::Conflicts), _) | (_, Some(Rule::Conflicts)) => {
                return Err(Ineligible::Conflict {
                    with: placed.name.clone(),
                });
            }
            (Some(Rule::Replaces), Some(Rule::Replaces)) => {
                return Err(Ineligible::MutualReplace {
                    with: placed.name.clone(),
                });
            }
            (None, Some(Rule::Replaces)) => {
                return Err(Ineligible::ReplacedBy {
                    by: placed.name.clone(),
                });
            }
            (Some(Rule::Replaces), None) => displaces.push(placed.name.clone()),
            (None, None) => {}
        }
    }
    Ok(displaces)
}

/// One sentence saying why no machine qualifies, and what the user can change.
fn explain_rejections(machines: usize, rejected: &[(String, Ineligible)]) -> String {
    if machines == 0 {
        return "no machines are registered; start flotilla on a host (flotilla list-machines)"
            .to_string();
    }
    const SHOWN: usize = 4;
    let mut parts: Vec<String> = rejected
        .iter()
        .take(SHOWN)
        .map(|(id, why)| format!("{}: {why}", short_id(id)))
        .collect();
    if rejected.len() > SHOWN {
        parts.push(format!("and {} more", rejected.len() - SHOWN));
    }
    format!(
        "none of the {machines} machines is eligible ({}); relax the unit's [X-Fleet] \
         requirements or add a machine that meets them",
        parts.join("; ")
    )
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{Unit, UnitFile};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn machine(id: &str, metadata: &[(&str, &str)]) -> Machine {
        Machine {
            id: id.to_string(),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Three machines with 32-digit ids `aaaa...`, `bbbb...`, `cccc...`.
    fn three() -> Vec<Machine> {
        vec![
            machine(&"a".repeat(32), &[("region", "eu"), ("disk", "ssd")]),
            machine(&"b".repeat(32), &[("region", "us"), ("disk", "hdd")]),
            machine(&"c".repeat(32), &[("region", "eu"), ("disk", "hdd")]),
        ]
    }

    fn unit(name: &str, xfleet: &str) -> Unit {
        let text = format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}");
        Unit::from_text(&UnitName::parse(name).unwrap(), &text).unwrap()
    }

    /// Decides `candidate` with `placed` = (unit, machine) pairs already running.
    fn decide_with(machines: &[Machine], placed: &[(&Unit, &str)], candidate: &Unit) -> Decision {
        let placed: Vec<Placed<'_>> = placed
            .iter()
            .map(|(u, m)| Placed {
                name: u.name(),
                requirements: u.requirements(),
                machine: m,
            })
            .collect();
        decide(
            Cluster {
                machines,
                placed: &placed,
            },
            candidate.name(),
            candidate.requirements(),
        )
    }

    fn chosen(decision: &Decision) -> &str {
        match &decision.outcome {
            Outcome::One { machine, .. } => machine,
            other => panic!("expected one machine, got {other:?}"),
        }
    }

    #[test]
    fn least_loaded_with_stable_tie_break() {
        let m = three();
        let x = unit("x.service", "");
        let y = unit("y.service", "");
        let c = unit("c.service", "");
        assert_eq!(
            chosen(&decide_with(&m, &[], &c)),
            m[0].id,
            "tie: smallest id"
        );
        let d = decide_with(&m, &[(&x, &m[0].id), (&y, &m[1].id)], &c);
        assert_eq!(chosen(&d), m[2].id);
        assert_eq!(
            d.eligible,
            [m[2].id.clone(), m[0].id.clone(), m[1].id.clone()]
        );
    }

    #[test]
    fn a_unit_ignores_its_own_placement() {
        let m = three();
        let x = unit("x.service", "");
        // x is on machine b; re-deciding x does not count x against b.
        let d = decide_with(&m, &[(&x, &m[1].id)], &x);
        assert_eq!(chosen(&d), m[0].id);
        assert!(d.rejected.is_empty());
    }

    #[test]
    fn machine_id_pins_full_or_prefix() {
        let m = three();
        let full = unit("p.service", &format!("MachineID={}\n", m[2].id));
        assert_eq!(chosen(&decide_with(&m, &[], &full)), m[2].id);
        let prefix = unit("p.service", "MachineID=bbbbbbbb\n");
        let d = decide_with(&m, &[], &prefix);
        assert_eq!(chosen(&d), m[1].id);
        assert_eq!(d.rejected.len(), 2);
        let absent = unit("p.service", "MachineID=dddddddd\n");
        assert!(matches!(
            decide_with(&m, &[], &absent).outcome,
            Outcome::NotPlaceable { .. }
        ));
    }

    #[test]
    fn ambiguous_machine_id_prefix_is_not_placeable() {
        let m = vec![
            machine("12345678aaaaaaaaaaaaaaaaaaaaaaaa", &[]),
            machine("12345678bbbbbbbbbbbbbbbbbbbbbbbb", &[]),
        ];
        let u = unit("p.service", "MachineID=12345678\n");
        let d = decide_with(&m, &[], &u);
        let Outcome::NotPlaceable { reason } = d.outcome else {
            panic!("ambiguous prefix must not be placed: {d:?}");
        };
        assert!(reason.contains("matches 2 machines"), "{reason}");
        assert!(d.eligible.is_empty());
    }

    #[test]
    fn metadata_filters_machines() {
        let m = three();
        let eu_ssd = unit(
            "u.service",
            "MachineMetadata=region=eu\nMachineMetadata=disk=ssd\n",
        );
        assert_eq!(decide_with(&m, &[], &eu_ssd).eligible, [m[0].id.clone()]);
        let eu_or_us_hdd = unit(
            "u.service",
            "MachineMetadata=\"region=eu\" \"region=us\"\nMachineMetadata=disk=hdd\n",
        );
        assert_eq!(
            decide_with(&m, &[], &eu_or_us_hdd).eligible,
            [m[1].id.clone(), m[2].id.clone()]
        );
        let not_hdd = unit("u.service", "MachineMetadata=disk!=hdd\n");
        assert_eq!(decide_with(&m, &[], &not_hdd).eligible, [m[0].id.clone()]);
        let nowhere = unit("u.service", "MachineMetadata=region=ap\n");
        let Outcome::NotPlaceable { reason } = decide_with(&m, &[], &nowhere).outcome else {
            panic!()
        };
        assert!(reason.contains("metadata region"), "{reason}");
    }

    #[test]
    fn machine_of_requires_every_peer_on_the_machine() {
        let m = three();
        let db = unit("db.service", "");
        let cache = unit("cache.service", "");
        let app = unit("app.service", "MachineOf=db.service cache.service\n");
        // Peers on different machines: nowhere qualifies.
        let d = decide_with(&m, &[(&db, &m[0].id), (&cache, &m[1].id)], &app);
        assert!(matches!(d.outcome, Outcome::NotPlaceable { .. }));
        // Both on c: c, even though it is the most loaded.
        let d = decide_with(&m, &[(&db, &m[2].id), (&cache, &m[2].id)], &app);
        assert_eq!(chosen(&d), m[2].id);
    }

    #[test]
    fn conflicts_are_symmetric() {
        let m = three();
        let a1 = unit("web@1.service", "Conflicts=web@*.service\n");
        let plain = unit("web@2.service", "");
        // The candidate's own glob blocks machine a.
        let d = decide_with(&m, &[(&plain, &m[0].id)], &a1);
        assert!(!d.eligible.contains(&m[0].id));
        // The placed unit's glob blocks the candidate, which has no globs itself.
        let d = decide_with(&m, &[(&a1, &m[0].id)], &plain);
        assert!(!d.eligible.contains(&m[0].id));
        assert!(d.rejected.contains(&(
            m[0].id.clone(),
            Ineligible::Conflict {
                with: a1.name().clone()
            }
        )));
    }

    #[test]
    fn conflicting_instances_fill_machines_then_wait() {
        let m = three();
        let units: Vec<Unit> = (1..=4)
            .map(|i| unit(&format!("hello@{i}.service"), "Conflicts=hello@*.service\n"))
            .collect();
        let mut placed: Vec<(&Unit, &str)> = Vec::new();
        let mut waiting = 0;
        for u in &units {
            match decide_with(&m, &placed, u).outcome {
                Outcome::One { machine, .. } => {
                    let id = m.iter().find(|x| x.id == machine).unwrap();
                    placed.push((u, &id.id));
                }
                Outcome::NotPlaceable { .. } => waiting += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((placed.len(), waiting), (3, 1));
        let hosts: BTreeSet<&str> = placed.iter().map(|p| p.1).collect();
        assert_eq!(hosts.len(), 3);
    }

    #[test]
    fn replaces_displaces_the_replaced_unit() {
        let m = three();
        let v1 = unit("web-v1.service", "");
        let other = unit("other.service", "");
        let v2 = unit("web-v2.service", "Replaces=web-v1.service\n");
        // v1 on the busiest machine; v2 still goes there and displaces it.
        let placed = [(&v1, m[1].id.as_str()), (&other, m[1].id.as_str())];
        let d = decide_with(&m, &placed, &v2);
        assert_eq!(
            d.outcome,
            Outcome::One {
                machine: m[1].id.clone(),
                displaces: vec![v1.name().clone()]
            }
        );
        // The displaced unit cannot come back next to its replacement.
        let placed = [(&v2, m[1].id.as_str()), (&other, m[1].id.as_str())];
        let d = decide_with(&m, &placed, &v1);
        assert!(d.rejected.contains(&(
            m[1].id.clone(),
            Ineligible::ReplacedBy {
                by: v2.name().clone()
            }
        )));
        assert_ne!(chosen(&d), m[1].id);
    }

    #[test]
    fn mutual_replaces_keep_units_apart_without_displacing() {
        let m = three();
        let a = unit("a.service", "Replaces=b.service\n");
        let b = unit("b.service", "Replaces=a.service\n");
        let d = decide_with(&m, &[(&a, &m[0].id)], &b);
        assert_eq!(
            d.outcome,
            Outcome::One {
                machine: m[1].id.clone(),
                displaces: vec![]
            }
        );
    }

    #[test]
    fn global_units_go_to_every_eligible_machine() {
        let m = three();
        let g = unit(
            "exporter.service",
            "Global=true\nMachineMetadata=region=eu\n",
        );
        assert_eq!(
            decide_with(&m, &[], &g).outcome,
            Outcome::Every {
                machines: vec![m[0].id.clone(), m[2].id.clone()]
            }
        );
        let blocker = unit("blocker.service", "Conflicts=exporter.service\n");
        let d = decide_with(&m, &[(&blocker, &m[2].id)], &g);
        assert_eq!(
            d.outcome,
            Outcome::Every {
                machines: vec![m[0].id.clone()]
            }
        );
    }

    #[test]
    fn no_machines_says_so() {
        let u = unit("u.service", "");
        let Outcome::NotPlaceable { reason } = decide_with(&[], &[], &u).outcome else {
            panic!()
        };
        assert!(reason.contains("no machines"), "{reason}");
    }

    // ---- property tests -------------------------------------------------

    /// A random unit: name index, conflict globs and MachineOf peers over a small pool.
    #[derive(Debug, Clone)]
    struct Spec {
        conflicts: Vec<String>,
        peers: Vec<usize>,
    }

    const POOL: [&str; 6] = [
        "web@*.service",
        "db*",
        "*.service",
        "cache.service",
        "web@1.service",
        "q?.service",
    ];

    fn spec() -> impl Strategy<Value = Spec> {
        (
            proptest::collection::vec(proptest::sample::select(POOL.to_vec()), 0..3),
            proptest::collection::vec(0usize..12, 0..2),
        )
            .prop_map(|(conflicts, peers)| Spec {
                conflicts: conflicts.into_iter().map(String::from).collect(),
                peers,
            })
    }

    fn unit_names() -> Vec<UnitName> {
        let raw = [
            "web@1.service",
            "web@2.service",
            "web@3.service",
            "db.service",
            "db2.service",
            "cache.service",
            "qa.service",
            "qb.service",
            "x.service",
            "y.service",
            "z.service",
            "w.service",
        ];
        raw.iter().map(|n| UnitName::parse(n).unwrap()).collect()
    }

    /// Builds units from specs, dropping MachineOf peers that are not valid for that unit.
    fn build_units(specs: &[Spec]) -> Vec<Unit> {
        let names = unit_names();
        specs
            .iter()
            .zip(&names)
            .map(|(spec, name)| {
                let mut xfleet = String::new();
                for c in &spec.conflicts {
                    xfleet.push_str(&format!("Conflicts={c}\n"));
                }
                for p in &spec.peers {
                    xfleet.push_str(&format!("MachineOf={}\n", names[*p]));
                }
                let text = format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}");
                let file = UnitFile::parse(&text).unwrap();
                // Invalid combinations (self-peer, peer matching own conflict) are
                // refused by validation; such units run without X-Fleet rules.
                Unit::from_file(name, file).unwrap_or_else(|_| {
                    Unit::from_text(name, "[Service]\nExecStart=/bin/true\n").unwrap()
                })
            })
            .collect()
    }

    fn machines(n: usize) -> Vec<Machine> {
        (0..n).map(|i| machine(&format!("{i:032x}"), &[])).collect()
    }

    /// Places units one by one in order; returns (unit index, machine index) pairs.
    fn place_all(units: &[Unit], machines: &[Machine]) -> Vec<(usize, usize)> {
        let mut placed: Vec<(usize, usize)> = Vec::new();
        for (i, u) in units.iter().enumerate() {
            let view: Vec<Placed<'_>> = placed
                .iter()
                .map(|&(ui, mi)| Placed {
                    name: units[ui].name(),
                    requirements: units[ui].requirements(),
                    machine: &machines[mi].id,
                })
                .collect();
            let cluster = Cluster {
                machines,
                placed: &view,
            };
            match decide(cluster, u.name(), u.requirements()).outcome {
                Outcome::One { machine, displaces } => {
                    assert!(displaces.is_empty(), "no Replaces in these specs");
                    let mi = machines.iter().position(|m| m.id == machine).unwrap();
                    placed.push((i, mi));
                }
                Outcome::NotPlaceable { .. } => {}
                Outcome::Every { .. } => unreachable!("no Global in these specs"),
            }
        }
        placed
    }

    /// Units with any mix of `Conflicts`, `Replaces`, `MachineMetadata`,
    /// `MachineOf` and `Global`, one per name of [`unit_names`]; a mix
    /// validation refuses runs without rules.
    fn ruled_units() -> impl Strategy<Value = Vec<Unit>> {
        let one = (
            proptest::collection::vec(proptest::sample::select(POOL.to_vec()), 0..2),
            proptest::collection::vec(proptest::sample::select(POOL.to_vec()), 0..2),
            proptest::option::of(0u8..2),
            proptest::collection::vec(0usize..12, 0..2),
            proptest::bool::weighted(0.1),
        );
        proptest::collection::vec(one, 12).prop_map(|specs| {
            let names = unit_names();
            specs
                .into_iter()
                .zip(&names)
                .map(|((conflicts, replaces, region, peers, global), name)| {
                    let mut xfleet = String::new();
                    for c in conflicts {
                        xfleet.push_str(&format!("Conflicts={c}\n"));
                    }
                    for r in replaces {
                        xfleet.push_str(&format!("Replaces={r}\n"));
                    }
                    if let Some(r) = region {
                        xfleet.push_str(&format!("MachineMetadata=region=r{r}\n"));
                    }
                    for p in peers {
                        xfleet.push_str(&format!("MachineOf={}\n", names[p]));
                    }
                    if global {
                        xfleet.push_str("Global=true\n");
                    }
                    let text = format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}");
                    Unit::from_file(name, UnitFile::parse(&text).unwrap()).unwrap_or_else(|_| {
                        Unit::from_text(name, "[Service]\nExecStart=/bin/true\n").unwrap()
                    })
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Walking machines in load order and taking the first eligible one
        /// is the full decision, for every unit it answers for, and it
        /// answers for every unit placed on one machine without displacing;
        /// checked with units anywhere (conflicting ones together too) and,
        /// for a unit that names no other, with only the excluding units
        /// given, as the scheduler gives them.
        #[test]
        fn least_loaded_is_the_full_decision(
            units in ruled_units(),
            regions in proptest::collection::vec(0u8..2, 0..6),
            at in proptest::collection::vec(proptest::option::of(0usize..6), 12),
            candidate in 0usize..12,
        ) {
            let ms: Vec<Machine> = regions
                .iter()
                .enumerate()
                .map(|(i, r)| machine(&format!("{i:032x}"), &[("region", &format!("r{r}"))]))
                .collect();
            let placed: Vec<Placed<'_>> = units
                .iter()
                .zip(&at)
                .filter_map(|(u, m)| {
                    let m = ms.get((*m)?)?;
                    Some(Placed { name: u.name(), requirements: u.requirements(), machine: &m.id })
                })
                .collect();
            let unit = &units[candidate];
            let (name, rules) = (unit.name(), unit.requirements());
            let full = decide(Cluster { machines: &ms, placed: &placed }, name, rules);
            let here = |m: &Machine, only_excluding: bool| {
                let units: Vec<Placed<'_>> =
                    placed.iter().filter(|p| p.machine == m.id && p.name != name).copied().collect();
                let load = units.len();
                let units = units
                    .into_iter()
                    .filter(|p| !only_excluding || super::super::colocation::excludes_any(p.requirements))
                    .collect();
                Here { load, units }
            };
            let mut by_load: Vec<&Machine> = ms.iter().collect();
            by_load.sort_by_key(|m| (here(m, false).load, m.id.clone()));
            let names_none = !super::super::colocation::excludes_any(rules) && rules.machine_of.is_empty();
            for only_excluding in [false, names_none] {
                let fast = least_loaded(by_load.iter().copied(), |m| here(m, only_excluding), name, rules);
                let plain = !rules.global
                    && rules.replaces.is_empty()
                    && rules.machine_id.is_none()
                    && rules.machine_of.is_empty();
                match (&fast, &full.outcome) {
                    (Some(fast), outcome) => prop_assert_eq!(fast, outcome),
                    (None, Outcome::One { .. }) => prop_assert!(!plain, "plain unit not answered: {:?}", full),
                    (None, _) => {}
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn never_two_conflicting_units_on_one_machine(
            specs in proptest::collection::vec(spec(), 1..12),
            n in 1usize..5,
        ) {
            let units = build_units(&specs);
            let ms = machines(n);
            let placed = place_all(&units, &ms);
            for &(a, ma) in &placed {
                for &(b, mb) in &placed {
                    if a == b || ma != mb {
                        continue;
                    }
                    let (ua, ub) = (&units[a], &units[b]);
                    prop_assert!(
                        ua.requirements().conflict_glob_for(ub.name()).is_none()
                            && ub.requirements().conflict_glob_for(ua.name()).is_none(),
                        "{} and {} conflict but share machine {}", ua.name(), ub.name(), ma
                    );
                }
            }
        }

        #[test]
        fn machine_of_peers_always_co_locate(
            specs in proptest::collection::vec(spec(), 1..12),
            n in 1usize..5,
        ) {
            let units = build_units(&specs);
            let ms = machines(n);
            let placed = place_all(&units, &ms);
            for &(a, ma) in &placed {
                for peer in &units[a].requirements().machine_of {
                    let on_same = placed
                        .iter()
                        .any(|&(b, mb)| units[b].name() == peer && mb == ma);
                    prop_assert!(on_same, "{} placed without its peer {}", units[a].name(), peer);
                }
            }
        }

        #[test]
        fn identical_unconstrained_units_spread_evenly(count in 0usize..60, n in 1usize..8) {
            let ms = machines(n);
            let units: Vec<Unit> = (0..count)
                .map(|i| unit(&format!("u@{i}.service"), ""))
                .collect();
            let placed = place_all(&units, &ms);
            prop_assert_eq!(placed.len(), count);
            let mut load = vec![0usize; n];
            for &(_, mi) in &placed {
                load[mi] += 1;
            }
            let (max, min) = (*load.iter().max().unwrap(), *load.iter().min().unwrap());
            prop_assert!(max - min <= 1, "loads {:?}", load);
        }

        #[test]
        fn global_units_land_on_exactly_the_eligible_machines(
            regions in proptest::collection::vec(0u8..3, 1..8),
            wanted in 0u8..3,
        ) {
            let ms: Vec<Machine> = regions
                .iter()
                .enumerate()
                .map(|(i, r)| machine(&format!("{i:032x}"), &[("region", &format!("r{r}"))]))
                .collect();
            let g = unit("g.service", &format!("Global=true\nMachineMetadata=region=r{wanted}\n"));
            let expected: Vec<String> = ms
                .iter()
                .filter(|m| m.metadata["region"] == format!("r{wanted}"))
                .map(|m| m.id.clone())
                .collect();
            let outcome = decide_with(&ms, &[], &g).outcome;
            if expected.is_empty() {
                prop_assert!(matches!(outcome, Outcome::NotPlaceable { .. }), "{:?}", outcome);
            } else {
                prop_assert_eq!(outcome, Outcome::Every { machines: expected });
            }
        }
    }
}
