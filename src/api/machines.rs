//! The machines: fleet's `/fleet/v1/machines` (list, and `PATCH` of their
//! metadata) and flotilla's drain at `/flotilla/v1/machines/M/drain`.
//!
//! A machine shows the metadata placement sees: its own with what was set
//! through `PATCH` merged in ([`crate::registry::metadata`]). `PATCH` takes
//! a JSON-patch list, `[{"op":"add","path":"/ID/metadata/KEY","value":"V"}]`,
//! checks every operation before applying any (400 for the first bad one,
//! nothing changed), and applies them all in one transaction: `add` and
//! `replace` set the key, `remove` hides it (even a configured one).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Shared;
use super::error::ApiError;
use super::paging::{Query, page_from};
use crate::registry::metadata::{self, Change};
use crate::registry::ops::{self, MachineRow};
use crate::units::fleet::is_metadata_key;

/// A machine as `GET /fleet/v1/machines` shows it: fleet's fields, then
/// flotilla's. The CLI reads it back leniently (fleet sent only the first
/// three): every field may be missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MachineJson {
    /// Its `/etc/machine-id`.
    pub id: String,
    /// The address other hosts reach it at.
    #[serde(rename = "primaryIP")]
    pub primary_ip: String,
    /// What `MachineMetadata=` matches: its own, with what was set through
    /// `PATCH` merged in.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Its host name.
    pub hostname: String,
    /// When it last renewed its presence (RFC 3339, UTC, by its own clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_renewal: Option<String>,
    /// How many whole seconds ago that was, by this daemon's clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewed_secs_ago: Option<u64>,
    /// Two renewals are missing: it is likely cut off or dead, and its units
    /// move once its lease runs out.
    pub overdue: bool,
    /// It takes no new units, and its units move away.
    pub drained: bool,
    /// How many units it has claimed.
    pub units: usize,
}

impl MachineJson {
    /// The view of `row`, with ages counted to `now_ms` (Unix milliseconds).
    fn of(row: MachineRow, now_ms: u64) -> MachineJson {
        let age_ms = row.renewal.map(|r| now_ms.saturating_sub(r.at_ms));
        MachineJson {
            id: row.record.id,
            primary_ip: row.record.ip,
            metadata: row.record.metadata,
            hostname: row.record.hostname,
            last_renewal: row.renewal.map(|r| rfc3339(r.at_ms)),
            renewed_secs_ago: age_ms.map(|ms| ms / 1000),
            overdue: row.renewal.is_some_and(|r| r.is_overdue(now_ms)),
            drained: row.drained,
            units: row.units,
        }
    }
}

/// `GET /fleet/v1/machines`: fleet's page of machines.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MachineList {
    /// The machines with a live presence, by id.
    pub machines: Vec<MachineJson>,
    /// The next page's token, while more may follow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// `GET /fleet/v1/machines[?nextPageToken=T]`
pub async fn list(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Result<Json<MachineList>, ApiError> {
    let page = Query::parse(query.as_deref()).page()?;
    let index = shared.registry().await?;
    let seen = ops::renewals_seen(shared.client().await?).await?;
    let now = now_ms();
    let (rows, next_page_token) = page_from(index.machine_rows(&seen, now), page);
    let machines = rows.into_iter().map(|r| MachineJson::of(r, now)).collect();
    Ok(Json(MachineList {
        machines,
        next_page_token,
    }))
}

/// `PATCH /fleet/v1/machines`: see the module doc. 204 on success.
pub async fn patch(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let changes = parse_patch(&body)?;
    if !changes.is_empty() {
        let client = shared.client().await?;
        metadata::apply(client, &changes).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The changes a `PATCH` body asks for, every operation checked.
pub fn parse_patch(body: &[u8]) -> Result<Vec<Change>, ApiError> {
    let example = r#"send e.g. [{"op":"add","path":"/MACHINE_ID/metadata/region","value":"eu"}]"#;
    let parsed: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("unable to decode body: {e}")).with_hint(example)
    })?;
    let items = match parsed {
        Value::Null => Vec::new(),
        Value::Array(items) => items,
        _ => {
            return Err(
                ApiError::bad_request("the body must be a JSON array of operations")
                    .with_hint(example),
            );
        }
    };
    items
        .iter()
        .map(|item| parse_operation(item, example))
        .collect()
}

/// One operation: `op` exact, `path` and `value` in any case, as fleet.
fn parse_operation(item: &Value, example: &str) -> Result<Change, ApiError> {
    let Value::Object(fields) = item else {
        return Err(
            ApiError::bad_request("each operation must be a JSON object").with_hint(example),
        );
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    };
    let text = |name: &str| match field(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ApiError::bad_request(format!(
            "unable to decode body: {name} must be a string, not {other}"
        ))
        .with_hint(example)),
    };
    let op = match fields.get("op") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "unable to decode body: op must be a string",
            ));
        }
    };
    let (path, value) = (text("path")?, text("value")?);
    if !matches!(op.as_str(), "add" | "remove" | "replace") {
        return Err(ApiError::bad_request(
            "invalid op: expect add, remove, or replace",
        ));
    }
    let Some((machine, key)) = metadata_path(&path) else {
        return Err(
            ApiError::bad_request("machine metadata path invalid").with_hint(
                "the path is /MACHINE_ID/metadata/KEY; keys use letters, digits, '-', '_', '.'",
            ),
        );
    };
    if op != "remove" && value.is_empty() {
        return Err(ApiError::bad_request(
            "invalid value: add and replace require a value",
        ));
    }
    Ok(Change {
        machine: machine.to_string(),
        key: key.to_string(),
        value: (op != "remove").then_some(value),
    })
}

/// `/ID/metadata/KEY` taken apart (fleet's `^/([^/]+)/metadata/([A-Za-z0-9_.-]+)$`;
/// the id may not hold spaces or control characters either).
fn metadata_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (machine, rest) = rest.split_once('/')?;
    let key = rest.strip_prefix("metadata/")?;
    let machine_ok = !machine.is_empty() && machine.chars().all(|c| c.is_ascii_graphic());
    (machine_ok && is_metadata_key(key)).then_some((machine, key))
}

/// `POST /flotilla/v1/machines/M/drain`: machine M (an id, id prefix, host
/// name or address) takes no new units and its units move away. 204.
pub async fn drain(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    set_drained(&shared, path, true).await
}

/// `DELETE /flotilla/v1/machines/M/drain`: undoes [`drain`]. 204.
pub async fn undrain(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    set_drained(&shared, path, false).await
}

async fn set_drained(
    shared: &Shared,
    path: Result<Path<String>, PathRejection>,
    drained: bool,
) -> Result<StatusCode, ApiError> {
    let Path(given) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let client = shared.client().await?;
    let machine = ops::find_machine(client, &given).await?;
    ops::set_drained(client, &machine.id, drained).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

/// `ms` after the Unix epoch as RFC 3339 in UTC, to the second.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::lock::window::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::records::{MachineRecord, Renewal};
    use std::collections::BTreeMap;

    #[test]
    fn machine_json_is_fleets_shape_and_more() {
        let row = MachineRow {
            record: MachineRecord {
                id: "abc".into(),
                instance: "i1".into(),
                hostname: "h1".into(),
                ip: "10.0.0.1".into(),
                metadata: BTreeMap::from([("region".to_string(), "eu".to_string())]),
                api: None,
            },
            drained: false,
            units: 2,
            renewal: Some(Renewal {
                at_ms: 1_700_000_000_000,
                ttl_ms: 9000,
            }),
        };
        assert_eq!(
            serde_json::to_value(MachineJson::of(row.clone(), 1_700_000_002_500)).unwrap(),
            serde_json::json!({
                "id": "abc", "primaryIP": "10.0.0.1", "metadata": {"region": "eu"},
                "hostname": "h1", "lastRenewal": "2023-11-14T22:13:20Z",
                "renewedSecsAgo": 2, "overdue": false, "drained": false, "units": 2,
            })
        );
        assert!(MachineJson::of(row, 1_700_000_006_001).overdue);
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn patches_are_checked_whole() {
        let ok = br#"[{"op":"add","path":"/m1/metadata/region","value":"eu"},
            {"op":"replace","Path":"/m1/metadata/disk","Value":"ssd"},
            {"op":"remove","path":"/m2/metadata/rack"}]"#;
        let changes = parse_patch(ok).unwrap();
        assert_eq!(
            changes,
            [
                Change {
                    machine: "m1".into(),
                    key: "region".into(),
                    value: Some("eu".into())
                },
                Change {
                    machine: "m1".into(),
                    key: "disk".into(),
                    value: Some("ssd".into())
                },
                Change {
                    machine: "m2".into(),
                    key: "rack".into(),
                    value: None
                },
            ]
        );
        assert!(parse_patch(b"[]").unwrap().is_empty());
        assert!(parse_patch(b"null").unwrap().is_empty());
        let bad: [(&[u8], &str); 9] = [
            (b"{}", "array"),
            (b"", "decode"),
            (br#"[{"op":"move","path":"/m1/metadata/a","value":"x"}]"#, "invalid op"),
            (br#"[{"op":"add","path":"/m1/foo","value":"x"}]"#, "path invalid"),
            (br#"[{"op":"add","path":"/m1/metadata/a b","value":"x"}]"#, "path invalid"),
            (br#"[{"op":"add","path":"//metadata/a","value":"x"}]"#, "path invalid"),
            (br#"[{"op":"add","path":"/m1/metadata/a","value":""}]"#, "require a value"),
            (br#"[{"op":"add","path":"/m1/metadata/a","value":1}]"#, "string"),
            (
                br#"[{"op":"add","path":"/m1/metadata/a","value":"x"},{"op":"replace","path":"/m1/metadata/b"}]"#,
                "require a value",
            ),
        ];
        for (body, why) in bad {
            let err = parse_patch(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(
                err.message.contains(why),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
