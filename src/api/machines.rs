//! `/fleet/v1/machines`: the machines with a live presence, in fleet's shape.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::Shared;
use super::error::ApiError;
use crate::registry::ops::{self, MachineRow};

/// A machine as `GET /fleet/v1/machines` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineJson {
    /// Its `/etc/machine-id`.
    pub id: String,
    /// The address other hosts reach it at.
    #[serde(rename = "primaryIP")]
    pub primary_ip: String,
    /// What `MachineMetadata=` matches.
    pub metadata: BTreeMap<String, String>,
}

impl From<MachineRow> for MachineJson {
    fn from(row: MachineRow) -> MachineJson {
        MachineJson {
            id: row.record.id,
            primary_ip: row.record.ip,
            metadata: row.record.metadata,
        }
    }
}

/// `GET /fleet/v1/machines`: fleet's list of machines (not paginated).
#[derive(Debug, Serialize)]
pub struct MachineList {
    /// Every machine with a live presence.
    pub machines: Vec<MachineJson>,
}

/// `GET /fleet/v1/machines`
pub async fn list(State(shared): State<Arc<Shared>>) -> Result<Json<MachineList>, ApiError> {
    let client = shared.client().await?;
    let machines: Vec<MachineJson> = ops::machines(client)
        .await?
        .into_iter()
        .map(MachineJson::from)
        .collect();
    Ok(Json(MachineList { machines }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::records::MachineRecord;

    #[test]
    fn machine_json_is_fleets_shape() {
        let row = MachineRow {
            record: MachineRecord {
                id: "abc".into(),
                instance: "i1".into(),
                hostname: "h1".into(),
                ip: "10.0.0.1".into(),
                metadata: BTreeMap::from([("region".to_string(), "eu".to_string())]),
            },
            drained: false,
            units: 2,
        };
        assert_eq!(
            serde_json::to_value(MachineJson::from(row)).unwrap(),
            serde_json::json!({"id": "abc", "primaryIP": "10.0.0.1", "metadata": {"region": "eu"}})
        );
    }
}
