//! The values stored under [`super::keys`], as JSON so `flotilla kv get` shows
//! them readably. Each record has one writer: unit records the CLI/API,
//! proposals the scheduler, claims and states the owning agent.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::UnitState;
use crate::units::{UnitHash, UnitName};

/// The state a user asks for, fleet's three desired states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Stored only; runs nowhere (what fleet's API leaves out).
    #[default]
    Inactive,
    /// Placed on a machine, file written and linked, not started.
    Loaded,
    /// Placed, loaded and started.
    Launched,
}

impl DesiredState {
    /// fleet's word for the state, as its API and fleetctl's lines spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Inactive => "inactive",
            DesiredState::Loaded => "loaded",
            DesiredState::Launched => "launched",
        }
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A submitted unit: which body, and what the user wants of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    /// The unit's name.
    pub name: UnitName,
    /// The hash of its body (under [`super::keys::body`]).
    pub hash: UnitHash,
    /// What the user asked for.
    pub desired: DesiredState,
}

/// A machine's presence: written on its lease, gone when the lease expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// `/etc/machine-id`.
    pub id: String,
    /// The daemon install's own id (from its data dir): same machine id and
    /// instance is the same daemon coming back; another instance is a duplicate.
    pub instance: String,
    /// The host name, for people.
    pub hostname: String,
    /// The address other hosts and `flotilla ssh` reach it at.
    pub ip: String,
    /// Matched by `MachineMetadata=`.
    pub metadata: BTreeMap<String, String>,
    /// Where other daemons reach its HTTPS API (`host:port`), to ask it for
    /// the status and journal of its units; absent without TLS, or when its
    /// API is not on TCP or only on loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
}

/// What the scheduler places for a machine to claim and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Load it (file written and linked) without starting it.
    Loaded,
    /// Load and start it.
    Launched,
}

impl Target {
    /// The target for a desired state; `None` for inactive (runs nowhere).
    pub fn of(desired: DesiredState) -> Option<Target> {
        match desired {
            DesiredState::Inactive => None,
            DesiredState::Loaded => Some(Target::Loaded),
            DesiredState::Launched => Some(Target::Launched),
        }
    }
}

impl From<Target> for DesiredState {
    fn from(target: Target) -> DesiredState {
        match target {
            Target::Loaded => DesiredState::Loaded,
            Target::Launched => DesiredState::Launched,
        }
    }
}

/// The scheduler's proposal that a machine run a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The body to run.
    pub hash: UnitHash,
    /// Loaded or launched.
    pub target: Target,
}

/// A machine's claim on a unit, on its presence lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The claiming daemon's instance id.
    pub instance: String,
}

/// systemd's view of a unit on one machine, as the agent last saw it, and
/// what the agent last did with it.
///
/// Stored as one flat object, `{"hash","load","active","sub","target"}`;
/// `target` is absent in reports of older agents, `reason` in all but
/// refusals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedState {
    /// The body loaded there.
    pub hash: UnitHash,
    /// LOAD/ACTIVE/SUB there.
    #[serde(flatten)]
    pub state: UnitState,
    /// The target the agent last brought the unit to there: `launched` once
    /// it asked systemd to start it, whatever systemd made of that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// Why the agent refused to load the unit there (its name is the host's
    /// own unit, `ssh.service`): the report then says failed, and this shows
    /// in list-units and explain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ReportedState {
    /// fleet's `currentState` of the unit on this machine: what the agent
    /// applied (`launched` even when ExecStart failed: `/state` shows the
    /// failure), not systemd's health. Reports without a target fall back
    /// to systemd's states ([`UnitState::current_state`]).
    pub fn current_state(&self) -> DesiredState {
        self.target
            .map_or_else(|| self.state.current_state(), DesiredState::from)
    }
}

/// When a machine last renewed its presence.
///
/// Worked out from the member's view of the presence lease
/// ([`super::liveness::last_renewals`]), so `list-machines` can say how long
/// ago each machine was last heard of; agents of the first release also
/// wrote one on their presence lease with every renewal, by their own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The presence lease's TTL, in milliseconds.
    pub ttl_ms: u64,
}

/// How often a presence lease of `ttl` is renewed: a third of it, so two
/// renewals can fail before it expires. The agent renews on it (and times
/// everything against renewals from it: the store's call timeout, retries,
/// what counts as cut off); [`Renewal::is_overdue`] reads it back.
pub fn renew_interval(ttl: Duration) -> Duration {
    ttl / 3
}

impl Renewal {
    /// Whether this renewal, seen at `now_ms` (Unix milliseconds), is
    /// overdue: two [`renew_interval`]s have passed without another, which
    /// leaves a third of the TTL before the lease ends.
    pub fn is_overdue(&self, now_ms: u64) -> bool {
        let since = Duration::from_millis(now_ms.saturating_sub(self.at_ms));
        since > 2 * renew_interval(Duration::from_millis(self.ttl_ms))
    }
}

/// Why a stored record could not be read.
#[derive(Debug, thiserror::Error)]
#[error("the record at {key} is unreadable ({source}); was it written by a newer flotilla?")]
pub struct RecordError {
    /// The key.
    pub key: String,
    /// The parse error.
    #[source]
    pub source: serde_json::Error,
}

/// Encodes a record for the store.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records always serialise")
}

/// Decodes the record stored at `key`.
pub fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, RecordError> {
    serde_json::from_slice(value).map_err(|source| RecordError {
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_is_overdue_after_two_missed_renewals() {
        let ttl = Duration::from_secs(9);
        assert_eq!(renew_interval(ttl), Duration::from_secs(3));
        let renewal = Renewal {
            at_ms: 1_000_000,
            ttl_ms: 9_000,
        };
        assert!(!renewal.is_overdue(1_000_000));
        assert!(!renewal.is_overdue(1_006_000), "two intervals exactly");
        assert!(renewal.is_overdue(1_006_001));
        assert!(!renewal.is_overdue(999_000), "a clock behind the stamp");
    }

    #[test]
    fn reported_states_are_one_flat_object() {
        let record = ReportedState {
            hash: UnitHash::of_text("[Service]\nExecStart=/bin/true\n"),
            state: UnitState {
                load: "loaded".into(),
                active: "active".into(),
                sub: "running".into(),
            },
            target: Some(Target::Launched),
            reason: None,
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(&record)).unwrap();
        let fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(fields, ["active", "hash", "load", "sub", "target"]);
        let back: ReportedState = decode("k", json.to_string().as_bytes()).unwrap();
        assert_eq!(back, record);
        // An older agent's report has no target: systemd's states decide.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("target");
        let old: ReportedState = decode("k", old.to_string().as_bytes()).unwrap();
        assert_eq!(old.target, None);
        assert_eq!(old.current_state(), DesiredState::Launched);
    }

    #[test]
    fn current_state_is_what_the_agent_applied() {
        let reported = |active: &str, target| ReportedState {
            hash: UnitHash::of_text(""),
            state: UnitState {
                load: "loaded".into(),
                active: active.into(),
                sub: String::new(),
            },
            target,
            reason: None,
        };
        let cases = [
            ("failed", Some(Target::Launched), DesiredState::Launched),
            ("active", Some(Target::Loaded), DesiredState::Loaded),
            ("inactive", Some(Target::Launched), DesiredState::Launched),
            ("active", None, DesiredState::Launched),
            ("failed", None, DesiredState::Loaded),
        ];
        for (active, target, expected) in cases {
            let state = reported(active, target);
            assert_eq!(state.current_state(), expected, "{state:?}");
        }
    }
}
