//! systemd's three states of one unit (fleet's LOAD/ACTIVE/SUB), and the
//! questions flotilla asks of them.
//!
//! The agent reads the states from systemd and reports them into the store;
//! the scheduler's claims, the CLI's `--block`, `list-units` and the API's
//! `currentState` all read them back. systemd's state names are strings, so
//! every rule that reads one ("is it running?", "did it fail?") lives here,
//! once, and every caller asks this type.

use serde::{Deserialize, Serialize};

use super::records::{DesiredState, Target};

/// ActiveStates in which a unit is running or on its way in or out: a unit in
/// one of them holds its machine, as far as `Conflicts=` is concerned.
pub const OCCUPYING_STATES: [&str; 4] = ["active", "activating", "reloading", "deactivating"];

/// A unit's three states as systemd reports them (fleet's LOAD/ACTIVE/SUB).
///
/// Stored as is inside [`super::records::ReportedState`], so the field names
/// are part of the store's format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    /// LoadState, e.g. "loaded" or "not-found".
    pub load: String,
    /// ActiveState, e.g. "active" or "failed".
    pub active: String,
    /// SubState, e.g. "running" or "dead".
    pub sub: String,
}

impl UnitState {
    /// What systemd says of a unit it has never loaded (or has forgotten):
    /// `not-found`/`inactive`/`dead`, as `systemctl show` has it.
    pub fn not_found() -> UnitState {
        UnitState {
            load: "not-found".to_string(),
            active: "inactive".to_string(),
            sub: "dead".to_string(),
        }
    }

    /// What the agent reports for a unit it refused to load (its file is
    /// bad or breaks a rule here): `error`/`failed`/`failed`, so every
    /// reader sees it failed without systemd ever holding it.
    pub fn refused() -> UnitState {
        UnitState {
            load: "error".to_string(),
            active: "failed".to_string(),
            sub: "failed".to_string(),
        }
    }

    /// Running or on its way: active, activating or reloading. A unit in
    /// these states needs no start, and a loaded-only unit in them is stopped.
    pub fn is_running(&self) -> bool {
        matches!(self.active.as_str(), "active" | "activating" | "reloading")
    }

    /// Exactly `active`: started and up (what `start --block` waits for).
    pub fn is_active(&self) -> bool {
        self.active == "active"
    }

    /// systemd gave up on it (`failed`): left to its own `Restart=`.
    pub fn is_failed(&self) -> bool {
        self.active == "failed"
    }

    /// Running or on its way in or out (see [`OCCUPYING_STATES`]).
    pub fn is_occupying(&self) -> bool {
        OCCUPYING_STATES.contains(&self.active.as_str())
    }

    /// Its file is loaded into systemd (LoadState `loaded`).
    pub fn is_loaded(&self) -> bool {
        self.load == "loaded"
    }

    /// systemd holds a unit by this name in memory (anything but
    /// `not-found`), so a new file for it takes effect only after a
    /// daemon-reload; a name systemd does not hold loads on demand.
    pub fn is_held(&self) -> bool {
        self.load != "not-found"
    }

    /// Whether the unit is in the state `target` puts it in: the one
    /// definition of "in its target state", asked when a draining machine's
    /// replacement is ready to take over and when a rebooted host is healthy.
    ///
    /// Launched is reached when the unit is `active`. Loaded is reached when
    /// systemd has its file loaded (LoadState `loaded`), whatever it runs:
    /// the agent stops a loaded-only unit that runs, and neither a handover
    /// nor a boot's health waits for that stop (`stop --block` waits for it
    /// on its own, until no machine reports the unit occupying).
    pub fn reached(&self, target: Target) -> bool {
        match target {
            Target::Launched => self.is_active(),
            Target::Loaded => self.is_loaded(),
        }
    }

    /// An estimate of fleet's `currentState` from systemd's states alone, for
    /// reports that do not say what the agent applied (older agents; see
    /// [`super::records::ReportedState::current_state`]): `launched` while the
    /// unit is running (or on its way), `loaded` while systemd has it loaded
    /// otherwise (stopped or failed), else `inactive`.
    pub fn current_state(&self) -> DesiredState {
        if self.is_running() {
            DesiredState::Launched
        } else if self.is_loaded() {
            DesiredState::Loaded
        } else {
            DesiredState::Inactive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(load: &str, active: &str) -> UnitState {
        UnitState {
            load: load.into(),
            active: active.into(),
            sub: String::new(),
        }
    }

    #[test]
    fn each_question_reads_the_right_state() {
        // (load, active) → running, active, failed, occupying, loaded, held
        let (t, f) = (true, false);
        let cases = [
            ("loaded", "active", [t, t, f, t, t, t]),
            ("loaded", "activating", [t, f, f, t, t, t]),
            ("loaded", "reloading", [t, f, f, t, t, t]),
            ("loaded", "deactivating", [f, f, f, t, t, t]),
            ("loaded", "inactive", [f, f, f, f, t, t]),
            ("loaded", "failed", [f, f, t, f, t, t]),
            ("masked", "inactive", [f, f, f, f, f, t]),
            ("not-found", "inactive", [f; 6]),
        ];
        for (load, active, expected) in cases {
            let s = state(load, active);
            let got = [
                s.is_running(),
                s.is_active(),
                s.is_failed(),
                s.is_occupying(),
                s.is_loaded(),
                s.is_held(),
            ];
            assert_eq!(got, expected, "{s:?}");
        }
        assert!(!UnitState::not_found().is_held());
    }

    #[test]
    fn launched_is_reached_when_active_and_loaded_when_loaded() {
        assert!(state("loaded", "active").reached(Target::Launched));
        assert!(!state("loaded", "activating").reached(Target::Launched));
        assert!(!state("loaded", "failed").reached(Target::Launched));
        assert!(state("loaded", "inactive").reached(Target::Loaded));
        assert!(state("loaded", "failed").reached(Target::Loaded));
        assert!(
            state("loaded", "active").reached(Target::Loaded),
            "a loaded-only unit still running has its file loaded"
        );
        assert!(!state("masked", "inactive").reached(Target::Loaded));
        assert!(!state("not-found", "inactive").reached(Target::Loaded));
    }

    #[test]
    fn stored_json_keeps_its_field_names() {
        let s = state("loaded", "active");
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"load": "loaded", "active": "active", "sub": ""})
        );
    }
}
