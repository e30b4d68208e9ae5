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

fn build() -> Value {
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
            "Machine": {
                "id": "Machine",
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "primaryIP": {"type": "string"},
                    "metadata": {
                        "type": "object",
                        "properties": {},
                        "additionalProperties": {"type": "string"}
                    }
                }
            },
            "MachinePage": {
                "id": "MachinePage",
                "type": "object",
                "properties": {
                    "machines": {"type": "array", "items": {"$ref": "Machine"}},
                    "nextPageToken": {"type": "string"}
                }
            },
            "UnitOption": {
                "id": "UnitOption",
                "type": "object",
                "properties": {
                    "section": {"type": "string"},
                    "name": {"type": "string"},
                    "value": {"type": "string"}
                }
            },
            "Unit": {
                "id": "Unit",
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "options": {"type": "array", "items": {"$ref": "UnitOption"}},
                    "desiredState": states(),
                    "currentState": states(),
                    "machineID": {"type": "string", "required": true}
                }
            },
            "UnitPage": {
                "id": "UnitPage",
                "type": "object",
                "properties": {
                    "units": {"type": "array", "items": {"$ref": "Unit"}},
                    "nextPageToken": {"type": "string"}
                }
            },
            "UnitState": {
                "id": "UnitState",
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "hash": {"type": "string"},
                    "machineID": {"type": "string"},
                    "systemdLoadState": {"type": "string"},
                    "systemdActiveState": {"type": "string"},
                    "systemdSubState": {"type": "string"}
                }
            },
            "UnitStatePage": {
                "id": "UnitStatePage",
                "type": "object",
                "properties": {
                    "states": {"type": "array", "items": {"$ref": "UnitState"}},
                    "nextPageToken": {"type": "string"}
                }
            }
        },
        "resources": {
            "Machines": {
                "methods": {
                    "List": {
                        "id": "fleet.Machine.List",
                        "description": "Retrieve a page of Machine objects.",
                        "httpMethod": "GET",
                        "path": "machines",
                        "parameters": {"nextPageToken": page_token()},
                        "response": {"$ref": "MachinePage"}
                    }
                }
            },
            "Units": {
                "methods": {
                    "List": {
                        "id": "fleet.Unit.List",
                        "description": "Retrieve a page of Unit objects.",
                        "httpMethod": "GET",
                        "path": "units",
                        "parameters": {"nextPageToken": page_token()},
                        "response": {"$ref": "UnitPage"}
                    },
                    "Get": {
                        "id": "fleet.Unit.Get",
                        "description": "Retrieve a single Unit object.",
                        "httpMethod": "GET",
                        "path": "units/{unitName}",
                        "parameters": unit_name_param(),
                        "parameterOrder": ["unitName"],
                        "response": {"$ref": "Unit"}
                    },
                    "Delete": {
                        "id": "fleet.Unit.Delete",
                        "description": "Delete the referenced Unit object.",
                        "httpMethod": "DELETE",
                        "path": "units/{unitName}",
                        "parameters": unit_name_param(),
                        "parameterOrder": ["unitName"]
                    },
                    "Set": {
                        "id": "fleet.Unit.Set",
                        "description": "Create or update a Unit.",
                        "httpMethod": "PUT",
                        "path": "units/{unitName}",
                        "parameters": unit_name_param(),
                        "parameterOrder": ["unitName"],
                        "request": {"$ref": "Unit"}
                    }
                }
            },
            "UnitState": {
                "methods": {
                    "Get": {
                        "id": "fleet.UnitState.Get",
                        "description": "Retrieve the state of one Unit.",
                        "httpMethod": "GET",
                        "path": "state/{unitName}",
                        "parameters": unit_name_param(),
                        "parameterOrder": ["unitName"],
                        "response": {"$ref": "UnitState"}
                    },
                    "List": {
                        "id": "fleet.UnitState.List",
                        "description": "Retrieve a page of UnitState objects.",
                        "httpMethod": "GET",
                        "path": "state",
                        "parameters": {
                            "nextPageToken": page_token(),
                            "unitName": {"type": "string", "location": "query"},
                            "machineID": {"type": "string", "location": "query"}
                        },
                        "response": {"$ref": "UnitStatePage"}
                    }
                }
            }
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
