//! `GET /fleet/v1/discovery`: the API described in Google's discovery
//! format, as fleet served it, so clients generated from fleet's description
//! (and tools that fetch it) find the same resources and methods here.
//!
//! The document is built once from a constant description. Like fleet's, its
//! `rootUrl` is a placeholder: clients are pointed at an endpoint
//! themselves. flotilla's own additions (the extra fields, `PATCH` of
//! machines, `/flotilla/v1`) are not listed, so generated clients see
//! exactly fleet's surface.

use std::sync::OnceLock;

use axum::Json;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::error::ApiError;

/// `GET /fleet/v1/discovery`
pub async fn document() -> Json<Value> {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(build).clone())
}

/// Any other method on the discovery document: 400, as fleet answered.
pub async fn not_get() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "only HTTP GET supported against this resource",
    )
}

fn page_token() -> Value {
    json!({"type": "string", "location": "query"})
}

fn unit_name_param() -> Value {
    json!({"unitName": {"type": "string", "required": true, "location": "path"}})
}

fn states() -> Value {
    json!({"type": "string", "enum": ["inactive", "loaded", "launched"]})
}

fn string() -> Value {
    json!({"type": "string"})
}

/// An object schema.
fn object(id: &str, properties: Value) -> Value {
    json!({"id": id, "type": "object", "properties": properties})
}

/// An object schema whose properties are all strings.
fn strings(id: &str, names: &[&str]) -> Value {
    let properties = names.iter().map(|n| (n.to_string(), string())).collect();
    object(id, Value::Object(properties))
}

/// A page of `item`s under `list`, with the next page's token.
fn page(id: &str, list: &str, item: &str) -> Value {
    let mut properties = serde_json::Map::new();
    properties.insert(
        list.to_string(),
        json!({"type": "array", "items": {"$ref": item}}),
    );
    properties.insert("nextPageToken".to_string(), string());
    object(id, Value::Object(properties))
}

/// A method; `unit` methods take the unit's name in the path.
fn method(id: &str, description: &str, verb: &str, path: &str, parameters: Value) -> Value {
    let mut method = json!({
        "id": id,
        "description": description,
        "httpMethod": verb,
        "path": path,
        "parameters": parameters,
    });
    if path.ends_with("{unitName}") {
        method["parameterOrder"] = json!(["unitName"]);
    }
    method
}

fn build() -> Value {
    let mut machine = strings("Machine", &["id", "primaryIP"]);
    machine["properties"]["metadata"] = json!({
        "type": "object",
        "properties": {},
        "additionalProperties": string(),
    });
    let unit = object(
        "Unit",
        json!({
            "name": string(),
            "options": {"type": "array", "items": {"$ref": "UnitOption"}},
            "desiredState": states(),
            "currentState": states(),
            "machineID": {"type": "string", "required": true},
        }),
    );
    let state_fields = [
        "name",
        "hash",
        "machineID",
        "systemdLoadState",
        "systemdActiveState",
        "systemdSubState",
    ];
    let with = |mut method: Value, part: &str, schema: &str| {
        method[part] = json!({"$ref": schema});
        method
    };
    let paged = json!({"nextPageToken": page_token()});
    let state_query = json!({
        "nextPageToken": page_token(),
        "unitName": {"type": "string", "location": "query"},
        "machineID": {"type": "string", "location": "query"},
    });
    json!({
        "kind": "discovery#restDescription",
        "discoveryVersion": "v1",
        "id": "fleet:v1",
        "name": "schema",
        "version": "v1",
        "title": "fleet API",
        "description": "fleet's v1 API, served by flotilla",
        "documentationLink": "https://github.com/coreos/fleet",
        "protocol": "rest",
        "icons": {"x16": "", "x32": ""},
        "labels": [],
        "baseUrl": "$ENDPOINT/fleet/v1/",
        "basePath": "/fleet/v1/",
        "rootUrl": "$ENDPOINT/",
        "servicePath": "fleet/v1/",
        "batchPath": "batch",
        "parameters": {},
        "auth": {},
        "schemas": {
            "Machine": machine,
            "MachinePage": page("MachinePage", "machines", "Machine"),
            "UnitOption": strings("UnitOption", &["section", "name", "value"]),
            "Unit": unit,
            "UnitPage": page("UnitPage", "units", "Unit"),
            "UnitState": strings("UnitState", &state_fields),
            "UnitStatePage": page("UnitStatePage", "states", "UnitState"),
        },
        "resources": {
            "Machines": {"methods": {
                "List": with(
                    method("fleet.Machine.List", "Retrieve a page of Machine objects.", "GET", "machines", paged.clone()),
                    "response", "MachinePage"),
            }},
            "Units": {"methods": {
                "List": with(
                    method("fleet.Unit.List", "Retrieve a page of Unit objects.", "GET", "units", paged),
                    "response", "UnitPage"),
                "Get": with(
                    method("fleet.Unit.Get", "Retrieve a single Unit object.", "GET", "units/{unitName}", unit_name_param()),
                    "response", "Unit"),
                "Delete": method("fleet.Unit.Delete", "Delete the referenced Unit object.", "DELETE", "units/{unitName}", unit_name_param()),
                "Set": with(
                    method("fleet.Unit.Set", "Create or update a Unit.", "PUT", "units/{unitName}", unit_name_param()),
                    "request", "Unit"),
            }},
            "UnitState": {"methods": {
                "Get": with(
                    method("fleet.UnitState.Get", "Retrieve the state of one Unit.", "GET", "state/{unitName}", unit_name_param()),
                    "response", "UnitState"),
                "List": with(
                    method("fleet.UnitState.List", "Retrieve a page of UnitState objects.", "GET", "state", state_query),
                    "response", "UnitStatePage"),
            }},
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_points_at_a_route_and_a_known_schema() {
        let doc = build();
        assert_eq!(doc["id"], "fleet:v1");
        let schemas = doc["schemas"].as_object().unwrap();
        let mut ids = Vec::new();
        for resource in doc["resources"].as_object().unwrap().values() {
            for method in resource["methods"].as_object().unwrap().values() {
                ids.push(method["id"].as_str().unwrap().to_string());
                for part in ["request", "response"] {
                    if let Some(schema) = method[part]["$ref"].as_str() {
                        assert!(schemas.contains_key(schema), "{schema}");
                    }
                }
            }
        }
        ids.sort();
        assert_eq!(
            ids,
            [
                "fleet.Machine.List",
                "fleet.Unit.Delete",
                "fleet.Unit.Get",
                "fleet.Unit.List",
                "fleet.Unit.Set",
                "fleet.UnitState.Get",
                "fleet.UnitState.List",
            ]
        );
    }
}
