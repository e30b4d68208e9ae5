//! Desired against actual: what the agent must ask systemd to do.
//!
//! The agent knows which units the cluster wants on this host and in which
//! state (`loaded`: file written and linked; `launched`: also started), and
//! what systemd reports for the units flotilla manages. This module turns the
//! difference into actions in a safe order: stops first, then unloads, then
//! loads, one daemon reload for the whole batch, then starts. A unit whose body
//! changed is unloaded and loaded again. A unit systemd reports `failed` is left
//! to its own `Restart=` policy and reported, not restarted in a loop here.

use std::collections::BTreeMap;

use crate::units::{UnitHash, UnitName};

/// The state the cluster wants a unit in on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// File written and linked into systemd, not started.
    Loaded,
    /// Loaded and started.
    Launched,
}

/// What the cluster wants for one unit on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Loaded or launched.
    pub target: TargetState,
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

/// What this host has for one flotilla-managed unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actual {
    /// The body whose file is written and linked.
    pub hash: UnitHash,
    /// What systemd reports.
    pub activity: Activity,
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
pub fn reconcile(
    desired: &BTreeMap<UnitName, Desired>,
    actual: &BTreeMap<UnitName, Actual>,
) -> Vec<Action> {
    let mut stops = Vec::new();
    let mut unloads = Vec::new();
    let mut loads = Vec::new();
    let mut starts = Vec::new();
    for (name, have) in actual {
        let unwanted = desired.get(name).is_none_or(|want| want.hash != have.hash);
        let should_stop = unwanted
            || desired
                .get(name)
                .is_some_and(|want| want.target == TargetState::Loaded);
        if should_stop && have.activity == Activity::Running {
            stops.push(Action::Stop(name.clone()));
        }
        if unwanted {
            unloads.push(Action::Unload(name.clone()));
        }
    }
    for (name, want) in desired {
        let have = actual.get(name).filter(|have| have.hash == want.hash);
        if have.is_none() {
            loads.push(Action::Load(name.clone(), want.hash));
        }
        let running = have.is_some_and(|h| h.activity == Activity::Running);
        let failed = have.is_some_and(|h| h.activity == Activity::Failed);
        if want.target == TargetState::Launched && !running && !failed {
            starts.push(Action::Start(name.clone()));
        }
    }
    let reload = if loads.is_empty() && unloads.is_empty() {
        None
    } else {
        Some(Action::Reload)
    };
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

    fn want(pairs: &[(&str, TargetState, &str)]) -> BTreeMap<UnitName, Desired> {
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
                        hash: hash(b),
                    },
                )
            })
            .collect()
    }

    use Activity::*;
    use TargetState::*;

    #[test]
    fn nothing_to_do_when_converged() {
        let d = want(&[("a.service", Launched, "x"), ("b.service", Loaded, "y")]);
        let a = have(&[("a.service", Running, "x"), ("b.service", Stopped, "y")]);
        assert!(reconcile(&d, &a).is_empty());
    }

    #[test]
    fn new_units_load_reload_once_then_start() {
        let d = want(&[
            ("a.service", Launched, "x"),
            ("b.service", Launched, "y"),
            ("c.service", Loaded, "z"),
        ]);
        let actions = reconcile(&d, &BTreeMap::new());
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
    fn unwanted_units_stop_then_unload() {
        let a = have(&[("a.service", Running, "x"), ("b.service", Stopped, "y")]);
        assert_eq!(
            reconcile(&BTreeMap::new(), &a),
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
            reconcile(&d, &a),
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
            reconcile(&d, &a),
            [
                Action::Stop(name("a.service")),
                Action::Start(name("b.service"))
            ]
        );
    }

    #[test]
    fn failed_units_are_left_to_systemd() {
        let d = want(&[("a.service", Launched, "x")]);
        let a = have(&[("a.service", Failed, "x")]);
        assert!(reconcile(&d, &a).is_empty());
    }
}
