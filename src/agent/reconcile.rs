//! Desired against actual: what the agent must ask systemd to do.
//!
//! The agent knows which units the cluster wants on this host and in which
//! state (`loaded`: file written and linked; `launched`: also started), and
//! what systemd reports for the units flotilla manages. This module turns the
//! difference into actions in a safe order: stops first, then unloads, then
//! loads, at most one daemon reload for the whole batch, then starts. A unit
//! whose body changed is unloaded and loaded again; a file flotilla wrote that
//! no longer parses is stopped and unloaded. A unit systemd reports `failed`
//! is left to its own `Restart=` policy and reported, not restarted in a loop
//! here.
//!
//! systemd is reloaded only when the batch unloads a unit or loads one under a
//! name systemd still holds (a changed body, or a unit from before that it
//! remembers): systemd (252 checked) loads a newly linked file on demand, and
//! a reload with hundreds of units loaded costs most of a second of its time.

use std::collections::{BTreeMap, BTreeSet};

use crate::registry::UnitState;
use crate::registry::records::Target;
use crate::units::{UnitHash, UnitName};

/// What the cluster wants for one unit on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Loaded or launched.
    pub target: Target,
    /// The body to run.
    pub hash: UnitHash,
}

/// systemd's ACTIVE state, reduced to what reconciling needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// active, reloading, activating: running or on its way.
    Running,
    /// inactive, deactivating: not running.
    Stopped,
    /// failed: systemd gave up on it.
    Failed,
}

impl Activity {
    /// The activity of a unit in `state`; stopped when systemd said nothing.
    pub fn of(state: Option<&UnitState>) -> Activity {
        match state {
            Some(s) if s.is_running() => Activity::Running,
            Some(s) if s.is_failed() => Activity::Failed,
            _ => Activity::Stopped,
        }
    }
}

/// What this host has for one flotilla-managed unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actual {
    /// The body whose file is written and linked; `None` when the file no
    /// longer parses (it is stopped and unloaded).
    pub hash: Option<UnitHash>,
    /// What systemd reports.
    pub activity: Activity,
    /// The target the agent last brought it to (`None`: not known to have
    /// done anything with it, e.g. right after it was loaded here).
    pub applied: Option<Target>,
}

/// One thing to ask of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// StopUnit("replace").
    Stop(UnitName),
    /// Disable, reset-failed and remove the unit file.
    Unload(UnitName),
    /// Write the file for this body and link it into systemd's runtime path.
    Load(UnitName, UnitHash),
    /// One daemon reload after all loads and unloads of the batch.
    Reload,
    /// StartUnit("replace").
    Start(UnitName),
}

/// The actions that take `actual` to `desired`, in execution order.
/// `held` names the units systemd holds in memory (LoadState other than
/// `not-found`; see [`UnitState::is_held`]) among those with no file here:
/// loading one of them needs a daemon reload, loading any other does not.
pub fn reconcile(
    desired: &BTreeMap<UnitName, Desired>,
    actual: &BTreeMap<UnitName, Actual>,
    held: &BTreeSet<UnitName>,
) -> Vec<Action> {
    let mut stops = Vec::new();
    let mut unloads = Vec::new();
    let mut loads = Vec::new();
    let mut starts = Vec::new();
    for (name, have) in actual {
        let want = desired
            .get(name)
            .filter(|want| have.hash == Some(want.hash));
        let should_stop = match have.hash {
            // Unreadable: whatever systemd runs from it must go.
            None => true,
            Some(_) => {
                let launched_here = have.applied == Some(Target::Launched);
                have.activity == Activity::Running
                    && want.is_none_or(|want| want.target == Target::Loaded && launched_here)
            }
        };
        if should_stop {
            stops.push(Action::Stop(name.clone()));
        }
        if want.is_none() {
            unloads.push(Action::Unload(name.clone()));
        }
    }
    let mut reload_for_loads = false;
    for (name, want) in desired {
        let have = actual.get(name).filter(|have| have.hash == Some(want.hash));
        if have.is_none() {
            loads.push(Action::Load(name.clone(), want.hash));
            reload_for_loads |= held.contains(name);
        }
        let running = have.is_some_and(|h| h.activity == Activity::Running);
        let failed = have.is_some_and(|h| h.activity == Activity::Failed);
        if want.target == Target::Launched && !running && !failed {
            starts.push(Action::Start(name.clone()));
        }
    }
    in_order(stops, unloads, loads, reload_for_loads, starts)
}

/// The actions that stop and unload `units` whatever systemd reports of
/// them: every unit file of the agent's but those still wanted, when it
/// joins again after its lease expired or leaves the cluster. A unit not
/// running stops at once, so each is stopped without asking first.
pub fn remove(units: &[UnitName]) -> Vec<Action> {
    let stops = units.iter().cloned().map(Action::Stop).collect();
    let unloads = units.iter().cloned().map(Action::Unload).collect();
    in_order(stops, unloads, Vec::new(), false, Vec::new())
}

/// One batch in the module's order: stops, unloads, loads, the daemon
/// reload (when anything was unloaded, or `reload_for_loads`: a load under a
/// name systemd holds), then starts.
fn in_order(
    stops: Vec<Action>,
    unloads: Vec<Action>,
    loads: Vec<Action>,
    reload_for_loads: bool,
    starts: Vec<Action>,
) -> Vec<Action> {
    let reload = (!unloads.is_empty() || reload_for_loads).then_some(Action::Reload);
    stops
        .into_iter()
        .chain(unloads)
        .chain(loads)
        .chain(reload)
        .chain(starts)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::UnitFile;

    fn name(n: &str) -> UnitName {
        UnitName::parse(n).unwrap()
    }

    fn hash(body: &str) -> UnitHash {
        UnitFile::parse(&format!("[Service]\nExecStart={body}\n"))
            .unwrap()
            .hash()
    }

    fn want(pairs: &[(&str, Target, &str)]) -> BTreeMap<UnitName, Desired> {
        pairs
            .iter()
            .map(|(n, t, b)| {
                (
                    name(n),
                    Desired {
                        target: *t,
                        hash: hash(b),
                    },
                )
            })
            .collect()
    }

    fn have(pairs: &[(&str, Activity, &str)]) -> BTreeMap<UnitName, Actual> {
        pairs
            .iter()
            .map(|(n, a, b)| {
                (
                    name(n),
                    Actual {
                        activity: *a,
                        hash: Some(hash(b)),
                        applied: Some(Target::Launched),
                    },
                )
            })
            .collect()
    }

    /// Nothing loaded by systemd under any name.
    fn none_held() -> BTreeSet<UnitName> {
        BTreeSet::new()
    }

    use Activity::*;
    use Target::*;

    #[test]
    fn removing_stops_then_unloads_then_reloads_once() {
        let units = [name("a.service"), name("b.service")];
        assert_eq!(
            remove(&units),
            vec![
                Action::Stop(units[0].clone()),
                Action::Stop(units[1].clone()),
                Action::Unload(units[0].clone()),
                Action::Unload(units[1].clone()),
                Action::Reload,
            ]
        );
        assert!(remove(&[]).is_empty(), "nothing to remove, no reload");
    }

    #[test]
    fn nothing_to_do_when_converged() {
        let d = want(&[("a.service", Launched, "x"), ("b.service", Loaded, "y")]);
        let a = have(&[("a.service", Running, "x"), ("b.service", Stopped, "y")]);
        assert!(reconcile(&d, &a, &none_held()).is_empty());
    }

    #[test]
    fn new_units_load_reload_once_then_start() {
        let d = want(&[
            ("a.service", Launched, "x"),
            ("b.service", Launched, "y"),
            ("c.service", Loaded, "z"),
        ]);
        // systemd still holds one of the names (a unit from before): one
        // reload for the whole batch.
        let held = BTreeSet::from([name("b.service")]);
        let actions = reconcile(&d, &BTreeMap::new(), &held);
        assert_eq!(
            actions,
            [
                Action::Load(name("a.service"), hash("x")),
                Action::Load(name("b.service"), hash("y")),
                Action::Load(name("c.service"), hash("z")),
                Action::Reload,
                Action::Start(name("a.service")),
                Action::Start(name("b.service")),
            ]
        );
    }

    #[test]
    fn names_systemd_never_held_load_without_a_reload() {
        let d = want(&[("a.service", Launched, "x"), ("c.service", Loaded, "z")]);
        assert_eq!(
            reconcile(&d, &BTreeMap::new(), &none_held()),
            [
                Action::Load(name("a.service"), hash("x")),
                Action::Load(name("c.service"), hash("z")),
                Action::Start(name("a.service")),
            ]
        );
    }

    #[test]
    fn unreadable_files_are_stopped_and_unloaded_whatever_their_state() {
        let mut a = have(&[("a.service", Stopped, "x")]);
        a.insert(
            name("broken.service"),
            Actual {
                hash: None,
                activity: Stopped,
                applied: None,
            },
        );
        let d = want(&[("a.service", Launched, "x")]);
        assert_eq!(
            reconcile(&d, &a, &none_held()),
            [
                Action::Stop(name("broken.service")),
                Action::Unload(name("broken.service")),
                Action::Reload,
                Action::Start(name("a.service")),
            ]
        );
    }

    #[test]
    fn activity_reads_systemd_s_active_state() {
        let state = |active: &str| UnitState {
            load: "loaded".into(),
            active: active.into(),
            sub: String::new(),
        };
        assert_eq!(Activity::of(Some(&state("activating"))), Running);
        assert_eq!(Activity::of(Some(&state("failed"))), Failed);
        assert_eq!(Activity::of(Some(&state("deactivating"))), Stopped);
        assert_eq!(Activity::of(None), Stopped);
    }

    #[test]
    fn unwanted_units_stop_then_unload() {
        let a = have(&[("a.service", Running, "x"), ("b.service", Stopped, "y")]);
        assert_eq!(
            reconcile(&BTreeMap::new(), &a, &none_held()),
            [
                Action::Stop(name("a.service")),
                Action::Unload(name("a.service")),
                Action::Unload(name("b.service")),
                Action::Reload,
            ]
        );
    }

    #[test]
    fn a_changed_body_is_unloaded_and_loaded_again() {
        let d = want(&[("a.service", Launched, "new")]);
        let a = have(&[("a.service", Running, "old")]);
        assert_eq!(
            reconcile(&d, &a, &none_held()),
            [
                Action::Stop(name("a.service")),
                Action::Unload(name("a.service")),
                Action::Load(name("a.service"), hash("new")),
                Action::Reload,
                Action::Start(name("a.service")),
            ]
        );
    }

    #[test]
    fn target_changes_start_or_stop_without_reloading() {
        let d = want(&[("a.service", Loaded, "x"), ("b.service", Launched, "y")]);
        let a = have(&[("a.service", Running, "x"), ("b.service", Stopped, "y")]);
        assert_eq!(
            reconcile(&d, &a, &none_held()),
            [
                Action::Stop(name("a.service")),
                Action::Start(name("b.service"))
            ]
        );
    }

    #[test]
    fn a_loaded_unit_systemd_started_itself_is_left_running() {
        let d = want(&[("dep.service", Loaded, "x")]);
        let mut a = have(&[("dep.service", Running, "x")]);
        // Loaded here, then started by systemd (WantedBy= of a running unit).
        for applied in [None, Some(Loaded)] {
            a.get_mut(&name("dep.service")).unwrap().applied = applied;
            assert!(reconcile(&d, &a, &none_held()).is_empty(), "{applied:?}");
        }
        // Launched by the agent, now wanted loaded: stopped.
        a.get_mut(&name("dep.service")).unwrap().applied = Some(Launched);
        assert_eq!(
            reconcile(&d, &a, &none_held()),
            [Action::Stop(name("dep.service"))]
        );
        // Unwanted: stopped and unloaded whoever started it.
        a.get_mut(&name("dep.service")).unwrap().applied = None;
        assert_eq!(
            reconcile(&BTreeMap::new(), &a, &none_held()),
            [
                Action::Stop(name("dep.service")),
                Action::Unload(name("dep.service")),
                Action::Reload
            ]
        );
    }

    #[test]
    fn failed_units_are_left_to_systemd() {
        let d = want(&[("a.service", Launched, "x")]);
        let a = have(&[("a.service", Failed, "x")]);
        assert!(reconcile(&d, &a, &none_held()).is_empty());
    }
}
