//! How the API says no: an HTTP status and fleet's error body,
//! `{"error":{"code":404,"message":"..."}}`, with flotilla's `"hint"` (the
//! next step) inside `"error"` where there is one.
//!
//! Every failure of a handler becomes an [`ApiError`] here, in one place, so
//! the same fact always gets the same status: bad input is 400 and changed
//! nothing, an unreachable store is 503 (try again later), a clash with what
//! is stored is 409.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::consensus::client::ClientError;
use crate::registry::RegistryError;
use crate::units;

/// A failed request: the status to answer with and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What happened.
    pub message: String,
    /// What to do next, when the message alone does not say.
    pub hint: Option<String>,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            hint: None,
        }
    }

    /// The same error with `hint` as the next step.
    pub fn with_hint(mut self, hint: impl Into<String>) -> ApiError {
        self.hint = Some(hint.into());
        self
    }

    /// 400: the request itself is wrong; nothing was changed.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: no such unit, machine or endpoint.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// 409: the request clashes with what is stored.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }

    /// 401: a TCP request without the configured bearer token.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this API needs the header `Authorization: Bearer TOKEN` with the daemon's \
             api_token (or use the unix socket as root)",
        )
    }

    /// fleet's error body, with the hint if any.
    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.status.as_u16(),
                message: self.message.clone(),
                hint: self.hint.clone(),
            },
        }
    }
}

/// fleet's error body, `{"error":{"code","message"}}`, plus flotilla's
/// `hint`; the CLI reads it back (every field optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorDetail {
    /// The HTTP status again.
    pub code: u16,
    /// What went wrong.
    pub message: String,
    /// What to do next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ClientError> for ApiError {
    /// A store that cannot answer now is 503 (nothing was changed, or for
    /// an unknown outcome, read before retrying); anything else it says is 500.
    fn from(err: ClientError) -> ApiError {
        let status = match err {
            ClientError::Unreachable { .. }
            | ClientError::NoLeader(_)
            | ClientError::Unknown(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, format!("the cluster's store: {err}"))
    }
}

impl From<units::Error> for ApiError {
    fn from(err: units::Error) -> ApiError {
        ApiError::bad_request(err.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> ApiError {
        match err {
            RegistryError::Client(err) => err.into(),
            RegistryError::NoSuchUnit(name) => ApiError::not_found("unit does not exist")
                .with_hint(format!(
                    "unit {name} is not submitted; PUT it with its options first"
                )),
            RegistryError::Exists(name) => different_options(&name),
            RegistryError::Raced(_) | RegistryError::AmbiguousMachine { .. } => {
                ApiError::conflict(err.to_string())
            }
            RegistryError::NoSuchMachine(_) => ApiError::not_found(err.to_string()),
            RegistryError::Invalid { .. } | RegistryError::Template(_) => {
                ApiError::bad_request(err.to_string())
            }
            RegistryError::Record(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
            }
        }
    }
}

/// 409 where a unit exists with other contents and the caller did not ask
/// to replace it.
pub fn different_options(name: &units::UnitName) -> ApiError {
    ApiError::conflict(format!("unit {name} already exists with different options"))
        .with_hint("PUT the unit with its new options to replace its body (fleet's --replace)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::UnitName;
    use serde_json::json;

    fn status(err: impl Into<ApiError>) -> u16 {
        err.into().status.as_u16()
    }

    #[test]
    fn each_fact_has_its_status() {
        let name = UnitName::parse("web.service").unwrap();
        let unreachable = ClientError::Unreachable {
            endpoints: "127.0.0.1:1".into(),
            last: "refused".into(),
        };
        let cases: Vec<(ApiError, u16)> = vec![
            (RegistryError::Client(unreachable).into(), 503),
            (
                ClientError::NoLeader(std::time::Duration::from_secs(1)).into(),
                503,
            ),
            (ClientError::Protocol("garbled".into()).into(), 500),
            (RegistryError::NoSuchUnit(name.clone()).into(), 404),
            (RegistryError::Exists(name.clone()).into(), 409),
            (RegistryError::Raced(name.clone()).into(), 409),
            (
                RegistryError::Template(UnitName::parse("web@.service").unwrap()).into(),
                400,
            ),
            (UnitName::parse("../../etc/x").unwrap_err().into(), 400),
        ];
        for (err, code) in cases {
            assert_eq!(err.status.as_u16(), code, "{err}");
        }
        assert_eq!(status(ApiError::unauthorized()), 401);
    }

    #[test]
    fn body_is_fleets_shape() {
        let body = serde_json::to_value(ApiError::not_found("no such unit").body()).unwrap();
        assert_eq!(
            body,
            json!({ "error": { "code": 404, "message": "no such unit" } })
        );
        let body =
            serde_json::to_value(ApiError::conflict("busy").with_hint("wait").body()).unwrap();
        assert_eq!(
            body,
            json!({ "error": { "code": 409, "message": "busy", "hint": "wait" } })
        );
        let response = ApiError::unauthorized().into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
