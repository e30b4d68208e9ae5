//! `/fleet/v1/units` and `/fleet/v1/state`: fleet's unit resources over the
//! registry's operations ([`crate::registry::ops`]).
//!
//! A unit travels as fleet's options list, `[{"section","name","value"}]`,
//! which is also the canonical form flotilla hashes, so a unit PUT twice with
//! the same options is the same unit. Every name and body is checked before
//! the store is asked anything: bad input changes nothing.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::Shared;
use super::error::{ApiError, different_options};
use crate::consensus::client::Client;
use crate::registry::BodyCache;
use crate::registry::ops::{self, RegistryError, Submitted, UnitRow};
use crate::registry::records::{DesiredState, ReportedState, UnitRecord};
use crate::units::{Unit, UnitFile, UnitKind, UnitName, UnitOption};

/// One unit-file option as fleet's API writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionJson {
    /// Section without brackets, e.g. `Service`.
    pub section: String,
    /// Key, e.g. `ExecStart`.
    pub name: String,
    /// Value; may be empty.
    pub value: String,
}

impl From<&UnitOption> for OptionJson {
    fn from(option: &UnitOption) -> OptionJson {
        OptionJson {
            section: option.section.clone(),
            name: option.name.clone(),
            value: option.value.clone(),
        }
    }
}

/// A unit as `GET /fleet/v1/units[/NAME]` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitJson {
    /// The unit's name.
    pub name: String,
    /// Its body, option by option.
    pub options: Vec<OptionJson>,
    /// What the user asked for: `inactive`, `loaded` or `launched`.
    pub desired_state: DesiredState,
    /// Where it got, from systemd's reports (see [`current_state`]).
    pub current_state: DesiredState,
    /// The machine it is on, when exactly one.
    #[serde(rename = "machineID", skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
}

/// `GET /fleet/v1/units`: fleet's list of units (not paginated).
#[derive(Debug, Serialize)]
pub struct UnitList {
    /// Every unit.
    pub units: Vec<UnitJson>,
}

/// `GET /fleet/v1/state`: fleet's list of unit states (not paginated).
#[derive(Debug, Serialize)]
pub struct StateList {
    /// One per unit and machine.
    pub states: Vec<StateJson>,
}

/// The body of `PUT /fleet/v1/units/NAME`.
///
/// `currentState` and `machineID` are read-only: they are accepted (so a unit
/// fetched with GET can be PUT back) and ignored. Any other field is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PutUnit {
    /// Must match the name in the path when given.
    pub name: Option<String>,
    /// The state to set.
    pub desired_state: Option<DesiredState>,
    /// The unit's body; an empty list counts as absent, as in fleet.
    pub options: Option<Vec<OptionJson>>,
    /// Read-only; ignored.
    #[serde(default)]
    pub current_state: Option<IgnoredAny>,
    /// Read-only; ignored.
    #[serde(default, rename = "machineID")]
    pub machine_id: Option<IgnoredAny>,
}

/// One unit on one machine, as `GET /fleet/v1/state` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateJson {
    /// The unit.
    pub name: String,
    /// The body loaded there.
    pub hash: String,
    /// The machine.
    #[serde(rename = "machineID")]
    pub machine_id: String,
    /// systemd's LoadState there.
    #[serde(rename = "systemdLoadState")]
    pub load: String,
    /// systemd's ActiveState there.
    #[serde(rename = "systemdActiveState")]
    pub active: String,
    /// systemd's SubState there.
    #[serde(rename = "systemdSubState")]
    pub sub: String,
}

/// The unit name in a path: checked like the CLI checks one (`web` means
/// `web.service`), so a hostile name is refused before anything is read.
fn unit_name(path: Result<Path<String>, PathRejection>) -> Result<UnitName, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(UnitName::from_user(&raw)?)
}

/// Parses a PUT body; every problem is a 400.
pub fn parse_put(body: &[u8]) -> Result<PutUnit, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not a unit ({e}); send e.g. {{\"desiredState\":\"launched\",\
             \"options\":[{{\"section\":\"Service\",\"name\":\"ExecStart\",\"value\":\"/bin/true\"}}]}}"
        ))
    })
}

/// Builds and validates the unit `name` from fleet's options list.
pub fn unit_from_options(name: &UnitName, options: &[OptionJson]) -> Result<Unit, ApiError> {
    let options = options
        .iter()
        .map(|o| UnitOption {
            section: o.section.clone(),
            name: o.name.clone(),
            value: o.value.clone(),
        })
        .collect();
    let file = UnitFile::from_options(options)?;
    Ok(Unit::from_file(name, file)?)
}

/// fleet's current state from systemd's report on one machine
/// ([`crate::registry::UnitState::current_state`]); `inactive` where nothing was reported.
pub fn current_state(state: Option<&ReportedState>) -> DesiredState {
    state.map_or(DesiredState::Inactive, |s| s.state.current_state())
}

/// The options of `record`'s stored body.
async fn options(
    client: &Client,
    bodies: &BodyCache,
    record: &UnitRecord,
) -> Result<Vec<OptionJson>, ApiError> {
    let body = bodies.of(client, record).await?;
    let file = body.file().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the stored body of {} is unreadable: {e}", record.name),
        )
    })?;
    Ok(file.options().iter().map(OptionJson::from).collect())
}

/// A unit's view from its record, its body and the rows placing it.
async fn unit_json(
    client: &Client,
    bodies: &BodyCache,
    record: UnitRecord,
    rows: &[UnitRow],
) -> Result<UnitJson, ApiError> {
    let placed: Vec<&UnitRow> = rows
        .iter()
        .filter(|r| r.name == record.name && r.machine.is_some())
        .collect();
    let machine_id = match placed.as_slice() {
        [one] => one.machine.clone(),
        _ => None,
    };
    let current = placed
        .iter()
        .map(|r| current_state(r.state.as_ref()))
        .max()
        .unwrap_or(DesiredState::Inactive);
    Ok(UnitJson {
        name: record.name.to_string(),
        options: options(client, bodies, &record).await?,
        desired_state: record.desired,
        current_state: current,
        machine_id,
    })
}

/// `GET /fleet/v1/units`: every submitted unit, templates included.
pub async fn list(State(shared): State<Arc<Shared>>) -> Result<Json<UnitList>, ApiError> {
    let client = shared.client().await?;
    let records = ops::unit_records(client).await?;
    let rows = ops::unit_rows(client).await?;
    let live = records.iter().map(|r| r.hash).collect();
    shared.bodies.keep_only(&live);
    let mut units = Vec::with_capacity(records.len());
    for record in records {
        match unit_json(client, &shared.bodies, record, &rows).await {
            Ok(unit) => units.push(unit),
            // Destroyed while this list was read: it is gone, leave it out.
            Err(e) if e.status == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Json(UnitList { units }))
}

/// `GET /fleet/v1/units/NAME`
pub async fn get(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<UnitJson>, ApiError> {
    let name = unit_name(path)?;
    let client = shared.client().await?;
    let record = ops::unit_record(client, &name).await?;
    let rows = ops::unit_rows(client).await?;
    Ok(Json(
        unit_json(client, &shared.bodies, record, &rows).await?,
    ))
}

/// `PUT /fleet/v1/units/NAME`: creates the unit from `options` (201), and/or
/// sets its `desiredState` (204). Options that differ from the stored unit's
/// are a 409: DELETE it first.
pub async fn put(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let name = unit_name(path)?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let request = parse_put(&body)?;
    if let Some(given) = &request.name
        && UnitName::from_user(given).ok().as_ref() != Some(&name)
    {
        return Err(ApiError::bad_request(format!(
            "the body names unit {given:?} but the path names {name}"
        )));
    }
    let desired = request.desired_state;
    let unit = match request.options.as_deref() {
        Some(options) if !options.is_empty() => Some(unit_from_options(&name, options)?),
        _ => None,
    };
    if name.kind() == UnitKind::Template && desired.is_some_and(|d| d != DesiredState::Inactive) {
        return Err(RegistryError::Template(name).into());
    }
    if unit.is_none() && desired.is_none() {
        return Err(ApiError::bad_request(
            "nothing to do: give options (to create the unit), desiredState, or both",
        ));
    }

    let client = shared.client().await?;
    let mut status = StatusCode::NO_CONTENT;
    if let Some(unit) = &unit {
        match ops::submit(client, unit, false).await {
            Ok(Submitted::Created) => status = StatusCode::CREATED,
            Ok(Submitted::Unchanged | Submitted::Replaced) => {}
            Err(RegistryError::Exists(_)) => return Err(different_options(&name)),
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(desired) = desired {
        ops::set_desired(client, std::slice::from_ref(&name), desired).await?;
    }
    Ok(status)
}

/// `DELETE /fleet/v1/units/NAME`: destroys the unit (its machine stops it).
pub async fn delete(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let name = unit_name(path)?;
    let client = shared.client().await?;
    if ops::destroy(client, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(RegistryError::NoSuchUnit(name).into())
    }
}

/// `GET /fleet/v1/state`: one entry per unit and machine that systemd
/// reported on; units not yet reported anywhere are not listed (as in fleet).
pub async fn states(State(shared): State<Arc<Shared>>) -> Result<Json<StateList>, ApiError> {
    let client = shared.client().await?;
    let states: Vec<StateJson> = ops::unit_rows(client)
        .await?
        .into_iter()
        .filter_map(|row| {
            let (machine, state) = (row.machine?, row.state?);
            Some(StateJson {
                name: row.name.to_string(),
                hash: state.hash.to_string(),
                machine_id: machine,
                load: state.state.load,
                active: state.state.active,
                sub: state.state.sub,
            })
        })
        .collect();
    Ok(Json(StateList { states }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::UnitState;
    use crate::units::UnitHash;

    fn name(n: &str) -> UnitName {
        UnitName::parse(n).unwrap()
    }

    fn option(section: &str, key: &str, value: &str) -> OptionJson {
        OptionJson {
            section: section.into(),
            name: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn options_become_the_same_unit_as_its_text() {
        let request = parse_put(
            br#"{"name":"web.service","desiredState":"launched","options":[
                {"section":"Service","name":"ExecStart","value":"/bin/sleep infinity"},
                {"section":"X-Fleet","name":"Conflicts","value":"web*.service"}]}"#,
        )
        .unwrap();
        assert_eq!(request.desired_state, Some(DesiredState::Launched));
        let unit = unit_from_options(&name("web.service"), &request.options.unwrap()).unwrap();
        let text =
            "[Service]\nExecStart=/bin/sleep infinity\n\n[X-Fleet]\nConflicts=web*.service\n";
        let parsed = Unit::from_text(&name("web.service"), text).unwrap();
        assert_eq!(unit.hash(), parsed.hash());
        let back: Vec<OptionJson> = unit.file().options().iter().map(OptionJson::from).collect();
        assert_eq!(
            back[0],
            option("Service", "ExecStart", "/bin/sleep infinity")
        );
    }

    #[test]
    fn bad_bodies_are_400() {
        let bodies: [&[u8]; 6] = [
            b"",
            b"[]",
            br#"{"desiredState":"running"}"#,
            br#"{"desiredState":"launched","bogus":1}"#,
            br#"{"options":[{"section":"Service","name":"ExecStart","value":"x","extra":1}]}"#,
            b"{\"options\":\"\xff\"}",
        ];
        for body in bodies {
            let err = parse_put(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body:?}: {err}");
        }
        // A unit fetched with GET can be PUT back: read-only fields are ignored.
        let back = parse_put(
            br#"{"name":"a.service","desiredState":"loaded","currentState":"launched","machineID":"m1","options":[]}"#,
        )
        .unwrap();
        assert_eq!(back.desired_state, Some(DesiredState::Loaded));
    }

    #[test]
    fn invalid_options_are_400() {
        let cases = [
            vec![],
            vec![option("Service", "Exec Start", "x")],
            vec![option("Serv]ice", "ExecStart", "x")],
            vec![option("Service", "ExecStart", "a\nb")],
            vec![
                option("Service", "ExecStart", "x"),
                option("X-Fleet", "Conflicts", "[["),
            ],
        ];
        for options in cases {
            let err = unit_from_options(&name("a.service"), &options).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{options:?}: {err}");
        }
    }

    #[test]
    fn current_state_follows_systemd() {
        let reported = |load: &str, active: &str| ReportedState {
            hash: UnitHash::of_text(""),
            state: UnitState {
                load: load.into(),
                active: active.into(),
                sub: String::new(),
            },
        };
        let cases = [
            (Some(reported("loaded", "active")), DesiredState::Launched),
            (
                Some(reported("loaded", "activating")),
                DesiredState::Launched,
            ),
            (Some(reported("loaded", "failed")), DesiredState::Loaded),
            (Some(reported("loaded", "inactive")), DesiredState::Loaded),
            (
                Some(reported("not-found", "inactive")),
                DesiredState::Inactive,
            ),
            (None, DesiredState::Inactive),
        ];
        for (state, expected) in cases {
            assert_eq!(current_state(state.as_ref()), expected, "{state:?}");
        }
    }

    #[test]
    fn unit_json_is_fleets_shape() {
        let unit = UnitJson {
            name: "a.service".into(),
            options: vec![option("Service", "ExecStart", "/bin/true")],
            desired_state: DesiredState::Launched,
            current_state: DesiredState::Inactive,
            machine_id: Some("m1".into()),
        };
        assert_eq!(
            serde_json::to_value(&unit).unwrap(),
            serde_json::json!({
                "name": "a.service",
                "options": [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}],
                "desiredState": "launched",
                "currentState": "inactive",
                "machineID": "m1",
            })
        );
    }
}
