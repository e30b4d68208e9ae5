//! The API's JSON as the client reads it: fleet's `Unit`, `UnitState` and
//! `Machine`, flotilla's extras on them, and flotilla's own answers.
//!
//! Read leniently, as fleetctl read fleet's: unknown fields are ignored and
//! every field fleet leaves out when empty may be missing, so the CLI works
//! against flotilla's API today and a newer one tomorrow.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::registry::records::DesiredState;
use crate::units::{self, Unit, UnitFile, UnitName, UnitOption};

/// A unit as `GET /fleet/v1/units[/NAME]` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitJson {
    /// Its name.
    pub name: String,
    /// Its body, option by option.
    #[serde(default)]
    pub options: Vec<UnitOption>,
    /// What was asked for.
    pub desired_state: Option<DesiredState>,
    /// fleet's current state: where its machine got.
    pub current_state: Option<DesiredState>,
    /// The machine it is scheduled on (one; none for global units).
    #[serde(rename = "machineID")]
    pub machine_id: Option<String>,
    /// Why the scheduler could not place it (flotilla).
    pub reason: Option<String>,
    /// Every machine that claimed it, for global units (flotilla).
    #[serde(default)]
    pub machines: Vec<String>,
}

impl UnitJson {
    /// The body as a validated unit (its hash, `[X-Fleet]` rules, text).
    pub fn unit(&self) -> Result<Unit, units::Error> {
        let name = UnitName::parse(&self.name)?;
        Unit::from_file(&name, UnitFile::from_options(self.options.clone())?)
    }

    /// Whether its `[X-Fleet]` says `Global=true` (an unreadable body is not).
    pub fn is_global(&self) -> bool {
        self.unit().is_ok_and(|u| u.requirements().global)
    }

    /// The current state, `inactive` when the API left it out (as fleet does).
    pub fn current(&self) -> DesiredState {
        self.current_state.unwrap_or(DesiredState::Inactive)
    }

    /// The desired state, `inactive` when left out.
    pub fn desired(&self) -> DesiredState {
        self.desired_state.unwrap_or(DesiredState::Inactive)
    }
}

/// One page of `GET /fleet/v1/units`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitPage {
    /// The units on this page.
    #[serde(default)]
    pub units: Vec<UnitJson>,
    /// The next page's token, while there is one.
    pub next_page_token: Option<String>,
}

/// systemd's states of one unit on one machine (`GET /fleet/v1/state`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StateJson {
    /// The unit.
    pub name: String,
    /// The body loaded there.
    #[serde(default)]
    pub hash: String,
    /// The machine.
    #[serde(rename = "machineID", default)]
    pub machine_id: String,
    /// systemd's LoadState.
    #[serde(rename = "systemdLoadState", default)]
    pub load: String,
    /// systemd's ActiveState.
    #[serde(rename = "systemdActiveState", default)]
    pub active: String,
    /// systemd's SubState.
    #[serde(rename = "systemdSubState", default)]
    pub sub: String,
}

/// One page of `GET /fleet/v1/state`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatePage {
    /// The states on this page.
    #[serde(default)]
    pub states: Vec<StateJson>,
    /// The next page's token, while there is one.
    pub next_page_token: Option<String>,
}

/// A machine (`GET /fleet/v1/machines`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineJson {
    /// Its machine id.
    pub id: String,
    /// The address other hosts (and ssh) reach it at.
    #[serde(rename = "primaryIP", default)]
    pub primary_ip: String,
    /// Its metadata, merged.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Its host name (flotilla).
    pub hostname: Option<String>,
    /// When it last renewed its presence, RFC 3339 (flotilla).
    pub last_renewal: Option<String>,
    /// Seconds since it last renewed its presence (flotilla).
    pub renewed_secs_ago: Option<u64>,
    /// Whether it is drained (flotilla).
    #[serde(default)]
    pub drained: bool,
    /// Whether its renewal is overdue (flotilla).
    #[serde(default)]
    pub overdue: bool,
}

/// One page of `GET /fleet/v1/machines`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachinePage {
    /// The machines on this page.
    #[serde(default)]
    pub machines: Vec<MachineJson>,
    /// The next page's token, while there is one.
    pub next_page_token: Option<String>,
}

/// `GET /flotilla/v1/explain/UNIT`: where a unit may run and why not elsewhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The unit.
    pub unit: String,
    /// What was asked for.
    pub desired_state: Option<DesiredState>,
    /// The machines it is placed on.
    #[serde(default)]
    pub placed_on: Vec<String>,
    /// Why the scheduler could not place it, if it could not.
    pub reason: Option<String>,
    /// Every machine and its verdict.
    #[serde(default)]
    pub machines: Vec<MachineVerdict>,
}

/// One machine in an [`Explanation`].
#[derive(Debug, Clone, Deserialize)]
pub struct MachineVerdict {
    /// Its id.
    pub id: String,
    /// Its host name.
    #[serde(default)]
    pub hostname: String,
    /// Its address.
    #[serde(default)]
    pub ip: String,
    /// Whether the unit may run there.
    pub eligible: bool,
    /// The rule that decided.
    #[serde(default)]
    pub why: String,
}

/// fleet's error body, `{"error":{"code","message"}}`, plus flotilla's `hint`.
#[derive(Debug, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong.
    #[serde(default)]
    pub message: String,
    /// What to do next.
    pub hint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleets_sparse_json_and_flotillas_extras_both_read() {
        let sparse: UnitJson = serde_json::from_str(r#"{"name":"a.service"}"#).unwrap();
        assert_eq!(sparse.current(), DesiredState::Inactive);
        assert!(sparse.options.is_empty() && sparse.machine_id.is_none());
        let rich: UnitJson = serde_json::from_str(
            r#"{"name":"g.service","desiredState":"launched","currentState":"launched",
                "options":[{"section":"Service","name":"ExecStart","value":"/bin/true"},
                           {"section":"X-Fleet","name":"Global","value":"true"}],
                "hash":"abc","reason":"none eligible","machines":["m1","m2"],"future":1}"#,
        )
        .unwrap();
        assert!(rich.is_global());
        assert_eq!(rich.machines.len(), 2);
        assert_eq!(rich.reason.as_deref(), Some("none eligible"));
        let page: UnitPage = serde_json::from_str("{}").unwrap();
        assert!(page.units.is_empty() && page.next_page_token.is_none());
        let machine: MachineJson =
            serde_json::from_str(r#"{"id":"m1","primaryIP":"10.0.0.1"}"#).unwrap();
        assert!(machine.metadata.is_empty() && !machine.drained);
    }
}
