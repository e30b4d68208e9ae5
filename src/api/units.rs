//! `/fleet/v1/units` and `/fleet/v1/state`: fleet's unit resources over the
//! registry's operations ([`crate::registry::ops`]), with fleet v1.0.0's
//! semantics, which stock fleetctl relies on.
//!
//! A unit travels as fleet's options list, `[{"section","name","value"}]`,
//! which is also the canonical form flotilla hashes, so a unit PUT twice with
//! the same options is the same unit. Every name and body is checked before
//! the store is asked anything: bad input changes nothing.
//!
//! `currentState` is fleet's, not systemd's health: `launched` once the agent
//! on the unit's machine asked systemd to start it (a failing ExecStart is
//! still `launched`; `/state` shows `failed`), `loaded` once it loaded it
//! there, else `inactive` ([`ReportedState::current_state`]). fleet's
//! `currentState` lagged a lowered desired state by the agent's heartbeat,
//! and `fleetctl restart` depends on that lag (it sets `loaded`, then waits
//! for `launched`); so for [`STOP_GRACE`] after this daemon lowered a unit
//! from launched to loaded, a unit the agent reports `loaded` still shows
//! `launched` ([`RecentStops`]).
//!
//! `PUT` follows fleet: `Content-Type: application/json` or 415; options for
//! a unit that does not exist create it (201); options with another body
//! replace it and set its desired state to the body's, or `inactive` (201,
//! fleetctl's `--replace`); otherwise `desiredState` is required (409
//! without it, and for a unit that does not exist).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::Shared;
use super::error::ApiError;
use super::paging::{Query, page_from};
use crate::consensus::client::Client;
use crate::registry::index::Index;
use crate::registry::ops::{self, Submitted, UnitRow};
use crate::registry::records::{DesiredState, ReportedState, UnitRecord};
use crate::registry::{BodyCache, RegistryError, UnitState};
use crate::units::{Unit, UnitFile, UnitKind, UnitName, UnitOption};

/// How long a unit lowered from launched to loaded through this daemon
/// keeps showing `launched` (see the module doc): longer than fleetctl takes
/// to ask after its PUT, shorter than its 500 ms between polls twice over.
pub const STOP_GRACE: Duration = Duration::from_millis(900);

/// A unit as `GET /fleet/v1/units[/NAME]` shows it: fleet's fields, then
/// flotilla's (fleetctl ignores fields it does not know). The CLI reads it
/// back leniently, as fleetctl read fleet's: every field but the name may be
/// missing, and unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UnitJson {
    /// The unit's name.
    pub name: String,
    /// Its body, option by option.
    pub options: Vec<UnitOption>,
    /// What the user asked for: `inactive`, `loaded` or `launched`.
    pub desired_state: DesiredState,
    /// fleet's current state (see the module doc).
    pub current_state: DesiredState,
    /// The machine it is scheduled to, when exactly one.
    #[serde(rename = "machineID", skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// The content address of its body (64 hex digits).
    pub hash: String,
    /// Why the scheduler cannot place it, while it cannot; else why a
    /// machine that claimed it refused to load it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The machines that claimed it (several for a global unit).
    pub machines: Vec<String>,
}

impl UnitJson {
    /// The body as a validated unit (its hash, `[X-Fleet]` rules, text).
    pub fn unit(&self) -> Result<Unit, crate::units::Error> {
        let name = UnitName::parse(&self.name)?;
        Unit::from_file(&name, UnitFile::from_options(self.options.clone())?)
    }

    /// Whether its `[X-Fleet]` says `Global=true` (an unreadable body is not).
    pub fn is_global(&self) -> bool {
        self.unit().is_ok_and(|u| u.requirements().global)
    }
}

/// `GET /fleet/v1/units`: fleet's page of units.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UnitList {
    /// The units of this page, by name.
    pub units: Vec<UnitJson>,
    /// The next page's token, while more may follow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// `GET /fleet/v1/state`: fleet's page of unit states.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StateList {
    /// One per unit and machine, by unit name then machine.
    pub states: Vec<StateJson>,
    /// The next page's token, while more may follow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
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
    pub options: Option<Vec<UnitOption>>,
    /// Read-only; ignored.
    #[serde(default)]
    pub current_state: Option<IgnoredAny>,
    /// Read-only; ignored.
    #[serde(default, rename = "machineID")]
    pub machine_id: Option<IgnoredAny>,
    /// Read-only; ignored.
    #[serde(default)]
    pub hash: Option<IgnoredAny>,
    /// Read-only; ignored.
    #[serde(default)]
    pub reason: Option<IgnoredAny>,
    /// Read-only; ignored.
    #[serde(default)]
    pub machines: Option<IgnoredAny>,
}

/// One unit on one machine, as `GET /fleet/v1/state` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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

impl StateJson {
    /// systemd's three states in this row, so a client asks the questions
    /// of [`UnitState`] rather than reading the strings itself.
    pub fn unit_state(&self) -> UnitState {
        UnitState {
            load: self.load.clone(),
            active: self.active.clone(),
            sub: self.sub.clone(),
        }
    }

    /// The state a row reports, if any.
    fn of(row: &UnitRow) -> Option<StateJson> {
        let (machine, state) = (row.machine.as_ref()?, row.state.as_ref()?);
        Some(StateJson::reported(&row.name, machine, state))
    }

    /// What systemd on `machine` reported of `name`.
    fn reported(name: &UnitName, machine: &str, state: &ReportedState) -> StateJson {
        StateJson {
            name: name.to_string(),
            hash: state.hash.to_string(),
            machine_id: machine.to_string(),
            load: state.state.load.clone(),
            active: state.state.active.clone(),
            sub: state.state.sub.clone(),
        }
    }
}

/// Units this daemon lowered from launched to loaded, and when (see the
/// module doc). Only this daemon's PUTs count: fleetctl asks the daemon it
/// just told.
#[derive(Debug, Default)]
pub struct RecentStops(Mutex<HashMap<UnitName, Instant>>);

impl RecentStops {
    /// Notes that `unit` was lowered from launched to loaded now.
    fn note(&self, unit: &UnitName) {
        let mut stops = self.0.lock().expect("recent stops lock");
        stops.retain(|_, at| at.elapsed() < STOP_GRACE);
        stops.insert(unit.clone(), Instant::now());
    }

    /// Whether `unit` was lowered less than [`STOP_GRACE`] ago.
    fn recent(&self, unit: &UnitName) -> bool {
        let stops = self.0.lock().expect("recent stops lock");
        stops.get(unit).is_some_and(|at| at.elapsed() < STOP_GRACE)
    }
}

/// The unit name in a path: checked like the CLI checks one (`web` means
/// `web.service`), so a hostile name is refused before anything is read.
pub fn unit_name(path: Result<Path<String>, PathRejection>) -> Result<UnitName, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(UnitName::from_user(&raw)?)
}

/// fleet's check of a PUT's `Content-Type`, made before the body is read:
/// exactly one header, media type `application/json` (parameters allowed).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let given: Vec<_> = headers.get_all(header::CONTENT_TYPE).iter().collect();
    let unsupported = |message: String| {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, message)
            .with_hint("send the body as JSON with the header Content-Type: application/json")
    };
    let [one] = given.as_slice() else {
        return Err(unsupported(format!(
            "expected 1 Content-Type, got {}",
            given.len()
        )));
    };
    let media = one.to_str().unwrap_or("").split(';').next().unwrap_or("");
    if media.trim() != "application/json" {
        return Err(unsupported(
            "only acceptable Content-Type is application/json".to_string(),
        ));
    }
    Ok(())
}

/// Parses a PUT body; every problem is a 400.
pub fn parse_put(body: &[u8]) -> Result<PutUnit, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("unable to decode body: {e}")).with_hint(
            "send e.g. {\"desiredState\":\"launched\",\"options\":[{\"section\":\"Service\",\
             \"name\":\"ExecStart\",\"value\":\"/bin/true\"}]}",
        )
    })
}

/// Builds and validates the unit `name` from fleet's options list.
pub fn unit_from_options(name: &UnitName, options: &[UnitOption]) -> Result<Unit, ApiError> {
    let file = UnitFile::from_options(options.to_vec())?;
    Ok(Unit::from_file(name, file)?)
}

/// fleet's current state of a unit on one machine; `inactive` where nothing
/// was reported ([`ReportedState::current_state`]).
pub fn current_state(state: Option<&ReportedState>) -> DesiredState {
    state.map_or(DesiredState::Inactive, ReportedState::current_state)
}

/// The options of `record`'s stored body.
async fn options(
    client: &Client,
    bodies: &BodyCache,
    record: &UnitRecord,
) -> Result<Vec<UnitOption>, ApiError> {
    let body = bodies.of(client, record).await?;
    let file = body.file().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the stored body of {} is unreadable: {e}", record.name),
        )
    })?;
    Ok(file.options().to_vec())
}

/// A unit's view from its record, its body and the rows placing it
/// ([`Index::rows_of`]).
async fn unit_json(
    client: &Client,
    bodies: &BodyCache,
    index: &Index,
    record: &UnitRecord,
    stops: &RecentStops,
) -> Result<UnitJson, ApiError> {
    let rows = index.rows_of(record);
    let placed: Vec<&UnitRow> = rows.iter().filter(|r| r.machine.is_some()).collect();
    let machine_id = match placed.as_slice() {
        [one] => one.machine.clone(),
        _ => None,
    };
    let mut current = placed
        .iter()
        .map(|r| current_state(r.state.as_ref()))
        .max()
        .unwrap_or(DesiredState::Inactive);
    if record.desired == DesiredState::Loaded
        && current == DesiredState::Loaded
        && stops.recent(&record.name)
    {
        current = DesiredState::Launched;
    }
    Ok(UnitJson {
        name: record.name.to_string(),
        options: options(client, bodies, record).await?,
        desired_state: record.desired,
        current_state: current,
        machine_id,
        hash: record.hash.to_string(),
        reason: index.reason(&record.name).cloned().or_else(|| {
            placed
                .iter()
                .find_map(|r| r.state.as_ref().and_then(|s| s.reason.clone()))
        }),
        machines: placed
            .iter()
            .filter(|r| r.claimed)
            .filter_map(|r| r.machine.clone())
            .collect(),
    })
}

/// `GET /fleet/v1/units[?nextPageToken=T]`: every submitted unit, templates
/// included, by name, a page at a time; only the page's units are looked
/// at past their names.
pub async fn list(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Result<Json<UnitList>, ApiError> {
    let page = Query::parse(query.as_deref()).page()?;
    let client = shared.client().await?;
    let index = shared.registry().await?;
    // Bodies of destroyed units go once the cache holds more bodies than
    // there are units (units share bodies, never the other way round).
    if shared.bodies.len() > index.unit_count() {
        let live = index.units().map(|r| r.hash).collect();
        shared.bodies.keep_only(&live);
    }
    let (records, next_page_token) = page_from(index.units(), page);
    let mut units = Vec::with_capacity(records.len());
    for record in records {
        match unit_json(client, &shared.bodies, &index, record, &shared.stops).await {
            Ok(unit) => units.push(unit),
            // Destroyed while this list was read: it is gone, leave it out.
            Err(e) if e.status == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Json(UnitList {
        units,
        next_page_token,
    }))
}

/// `GET /fleet/v1/units/NAME`
pub async fn get(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<UnitJson>, ApiError> {
    let name = unit_name(path)?;
    let client = shared.client().await?;
    let index = shared.registry().await?;
    let record = index
        .unit(&name)
        .ok_or_else(|| RegistryError::NoSuchUnit(name.clone()))?;
    Ok(Json(
        unit_json(client, &shared.bodies, &index, record, &shared.stops).await?,
    ))
}

/// `PUT /fleet/v1/units/NAME`, in fleet's order of checks (module doc):
/// 201 when the body was created or replaced, 204 when only the desired
/// state was set.
pub async fn put(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    require_json(&headers)?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let request = parse_put(&body)?;
    let name = unit_name(path)?;
    if let Some(given) = &request.name
        && !given.is_empty()
        && UnitName::from_user(given).ok().as_ref() != Some(&name)
    {
        return Err(ApiError::bad_request(format!(
            "name in URL {:?} differs from unit name in request body {given:?}",
            name.as_str()
        )));
    }
    let desired = request.desired_state;
    if name.kind() == UnitKind::Template && desired.is_some_and(|d| d != DesiredState::Inactive) {
        return Err(RegistryError::Template(name).into());
    }
    let unit = match request.options.as_deref() {
        Some(options) if !options.is_empty() => Some(unit_from_options(&name, options)?),
        _ => None,
    };

    let client = shared.client().await?;
    let stored = match ops::unit_record(client, &name).await {
        Ok(record) => Some(record),
        Err(RegistryError::NoSuchUnit(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(unit) = &unit
        && stored.as_ref().is_none_or(|r| r.hash != unit.hash())
    {
        let desired = desired.unwrap_or(DesiredState::Inactive);
        match ops::submit_as(client, unit, desired).await? {
            Submitted::Created | Submitted::Replaced => return Ok(StatusCode::CREATED),
            // Someone stored the same body meanwhile: the state rules apply.
            Submitted::Unchanged => {}
        }
    }
    let Some(desired) = desired else {
        return Err(match stored {
            None => ApiError::conflict("unit does not exist and options field empty")
                .with_hint("PUT the unit's options to create it"),
            Some(_) => ApiError::conflict("must provide DesiredState to update existing unit"),
        });
    };
    match ops::set_desired(client, std::slice::from_ref(&name), desired).await {
        Ok(_) => {}
        Err(RegistryError::NoSuchUnit(_)) => {
            return Err(
                ApiError::conflict("unit does not exist and options field empty").with_hint(
                    format!("PUT the options of {name} (or of its template) to create it"),
                ),
            );
        }
        Err(e) => return Err(e.into()),
    }
    if stored.is_some_and(|r| r.desired == DesiredState::Launched)
        && desired == DesiredState::Loaded
    {
        shared.stops.note(&name);
    }
    Ok(StatusCode::NO_CONTENT)
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

/// `GET /fleet/v1/state[?unitName=&machineID=&nextPageToken=]`: one entry
/// per unit and machine that systemd reported on (units not reported
/// anywhere are not listed, as in fleet), filtered by exact unit name and
/// machine id before paging.
pub async fn states(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Result<Json<StateList>, ApiError> {
    let query = Query::parse(query.as_deref());
    let page = query.page()?;
    let (unit, machine) = (query.first("unitName"), query.first("machineID"));
    let index = shared.registry().await?;
    // Exactly the name given: one that is not a unit's matches nothing.
    let named = unit.map(|u| UnitName::parse(u).ok().filter(|n| n.as_str() == u));
    let (states, next_page_token) = match named {
        Some(None) => (Vec::new(), None),
        Some(Some(name)) => page_from(index.reported(Some(&name), machine), page),
        None => page_from(index.reported(None, machine), page),
    };
    let states = states
        .into_iter()
        .map(|(record, id, state)| StateJson::reported(&record.name, id, state))
        .collect();
    Ok(Json(StateList {
        states,
        next_page_token,
    }))
}

/// `GET /fleet/v1/state/NAME`: systemd's states of one unit where it is
/// claimed (a global unit: any one machine's), what `fleetctl start` checks
/// after `launched`; 404 while nothing was reported.
pub async fn state_of(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<StateJson>, ApiError> {
    let name = unit_name(path)?;
    let index = shared.registry().await?;
    let rows = index
        .unit(&name)
        .map(|r| index.rows_of(r))
        .unwrap_or_default();
    let mut reported: Vec<&UnitRow> = rows.iter().filter(|r| r.state.is_some()).collect();
    reported.sort_by_key(|r| !r.claimed);
    reported
        .first()
        .and_then(|row| StateJson::of(row))
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found("unit state does not exist").with_hint(format!(
                "no machine reported {name} yet; is it submitted and loaded? (GET /fleet/v1/units/{name})"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::UnitState;
    use crate::units::UnitHash;

    fn name(n: &str) -> UnitName {
        UnitName::parse(n).unwrap()
    }

    fn option(section: &str, key: &str, value: &str) -> UnitOption {
        UnitOption {
            section: section.into(),
            name: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn fleets_sparse_json_and_flotillas_extras_both_read_back() {
        let sparse: UnitJson = serde_json::from_str(r#"{"name":"a.service"}"#).unwrap();
        assert_eq!(sparse.current_state, DesiredState::Inactive);
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
        let back: UnitJson = serde_json::from_value(serde_json::to_value(&rich).unwrap()).unwrap();
        assert_eq!(back, rich, "what the API writes, the CLI reads");
        let page: UnitList = serde_json::from_str("{}").unwrap();
        assert!(page.units.is_empty() && page.next_page_token.is_none());
        let machine: crate::api::machines::MachineJson =
            serde_json::from_str(r#"{"id":"m1","primaryIP":"10.0.0.1"}"#).unwrap();
        assert!(machine.metadata.is_empty() && !machine.drained && machine.hostname.is_empty());
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
        let back = unit.file().options();
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
    fn content_type_is_checked_as_fleet_does() {
        let headers = |values: &[&str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append(header::CONTENT_TYPE, v.parse().unwrap());
            }
            map
        };
        assert!(require_json(&headers(&["application/json"])).is_ok());
        assert!(require_json(&headers(&["application/json; charset=utf-8"])).is_ok());
        for bad in [
            headers(&[]),
            headers(&["text/plain"]),
            headers(&["application/json", "application/json"]),
            headers(&["application/jsonx"]),
        ] {
            let err = require_json(&bad).unwrap_err();
            assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad:?}");
        }
    }

    #[test]
    fn a_recent_stop_shows_launched_only_for_the_grace() {
        let stops = RecentStops::default();
        let unit = name("a.service");
        assert!(!stops.recent(&unit));
        stops.note(&unit);
        assert!(stops.recent(&unit));
        assert!(!stops.recent(&name("b.service")));
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
            target: None,
            reason: None,
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
            hash: "ab".into(),
            reason: None,
            machines: vec!["m1".into()],
        };
        assert_eq!(
            serde_json::to_value(&unit).unwrap(),
            serde_json::json!({
                "name": "a.service",
                "options": [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}],
                "desiredState": "launched",
                "currentState": "inactive",
                "machineID": "m1",
                "hash": "ab",
                "machines": ["m1"],
            })
        );
    }
}
