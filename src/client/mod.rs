//! The CLI's HTTP client of the daemon's API, as fleetctl was of fleet's.
//!
//! Every unit verb goes through here, so the API is the one door by which
//! people change the cluster: root on a cluster host uses the unix socket
//! with no configuration; anyone else an `https://` endpoint with the cluster
//! CA and a certificate or the bearer token (`http://` with the token where
//! the daemons have no TLS), or `--tunnel` over ssh. Lists are read page by page
//! (`nextPageToken`), as fleet served them.
//!
//! * [`endpoint`]: parsing `--endpoint`, and remembering which one answered.
//! * [`ssh`]: the system ssh command for tunnels and `flotilla ssh`.
//! * [`tunnel`]: `--tunnel`: the API through an ssh-forwarded socket.
//!
//! The JSON it reads is the API's own types ([`crate::api`]), each read
//! leniently (missing fields default, unknown ones are ignored), so the CLI
//! works against flotilla's API today and a newer one tomorrow.

pub mod endpoint;
pub mod ssh;
pub mod tunnel;

use std::sync::Mutex;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::api::error::ErrorBody;
use crate::api::explain::Explanation;
use crate::api::machines::{MachineJson, MachineList};
use crate::api::units::{StateJson, StateList, UnitJson, UnitList};
use crate::registry::records::DesiredState;
use crate::units::{UnitName, UnitOption};
use endpoint::{Endpoint, Memory};
use tunnel::Tunnel;

/// Why a call to the API failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No endpoint answered.
    #[error("cannot reach the flotilla API at {tried} ({last}){hint}")]
    Unreachable {
        /// The endpoints tried.
        tried: String,
        /// The last failure.
        last: String,
        /// What to try next.
        hint: String,
    },
    /// The API answered with an error.
    #[error("{message}{}", hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default())]
    Api {
        /// The HTTP status.
        status: u16,
        /// The API's message.
        message: String,
        /// The API's next step, if it gave one.
        hint: Option<String>,
    },
    /// The API took longer than `--request-timeout`.
    #[error(
        "the API at {endpoint} did not answer within {timeout:?}; raise --request-timeout \
         or check the daemon there (systemctl status flotilla)"
    )]
    Timeout {
        /// Where.
        endpoint: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer was not what the API sends.
    #[error("the API at {endpoint} answered {what} with something unexpected: {reason}")]
    Unexpected {
        /// Where.
        endpoint: String,
        /// Which request.
        what: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The TLS handshake with an endpoint failed: the wrong CA, a refused
    /// or expired certificate, or no TLS at the other end.
    #[error("TLS with the API at {endpoint} failed ({reason}); {hint}")]
    Tls {
        /// Where.
        endpoint: String,
        /// What rustls said.
        reason: String,
        /// The likely cause and what to do.
        hint: String,
    },
    /// The tunnel could not be opened.
    #[error(transparent)]
    Tunnel(#[from] tunnel::TunnelError),
    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

impl Error {
    /// The HTTP status of an error answer, if it was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How long an endpoint that has not answered yet gets before the next one
/// is tried (the last one gets the full request timeout).
const FIRST_TRY: Duration = Duration::from_secs(2);

/// How to reach the API: the CLI's global flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The endpoints, tried in order (the remembered good one first).
    pub endpoints: Vec<Endpoint>,
    /// The TLS of `https://` endpoints: the cluster CA, a server name
    /// pinned to the cluster, and this user's certificate if given
    /// ([`crate::tls::https`]); `None` when no endpoint is https.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The bearer token for TCP endpoints.
    pub token: Option<String>,
    /// The limit on one request (not on `journal --follow`'s stream).
    pub timeout: Duration,
    /// `--tunnel HOST[:PORT]`, with the ssh options to reach it.
    pub tunnel: Option<(String, ssh::SshOptions)>,
    /// Where the last good endpoint is remembered, if anywhere.
    pub memory: Option<Memory>,
}

/// One endpoint made ready: the base URL requests go to and its client.
#[derive(Debug, Clone)]
struct Connection {
    shown: String,
    base: String,
    http: reqwest::Client,
}

/// A client of the API.
#[derive(Debug)]
pub struct ApiClient {
    settings: Settings,
    order: Vec<Endpoint>,
    connected: Mutex<Option<Connection>>,
    // Declared last: dropped after every use of its socket.
    tunnel: Option<Tunnel>,
}

/// The unit name as a path segment (unit names need no escaping).
fn unit_path(prefix: &str, name: &UnitName) -> String {
    format!("{prefix}/{}", name.as_str())
}

/// Percent-encodes a path segment the user typed (a machine's id, name or IP).
fn segment(raw: &str) -> String {
    // "." and ".." would be read as path steps, not as a name.
    let dots_only = raw.bytes().all(|b| b == b'.');
    raw.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_~".contains(&b) || (b == b'.' && !dots_only) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl ApiClient {
    /// A client for `settings`; opens the tunnel now if there is one.
    pub fn new(settings: Settings) -> Result<ApiClient, Error> {
        // One crypto provider for the whole binary; installing twice is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let list = list_key(&settings.endpoints);
        let remembered = settings.memory.as_ref().and_then(|m| m.recall(&list));
        let order = endpoint::ordered(&settings.endpoints, remembered.as_deref());
        let tunnel = match &settings.tunnel {
            Some((host, ssh)) => {
                // One forward per endpoint, tried in order on the far side.
                let wait = settings.timeout.max(Duration::from_secs(10));
                Some(Tunnel::open(ssh, host, &order, wait)?)
            }
            None => None,
        };
        Ok(ApiClient {
            settings,
            order,
            connected: Mutex::new(None),
            tunnel,
        })
    }

    /// The HTTP client and base URL for `endpoint`.
    fn connection(&self, endpoint: &Endpoint) -> Result<Connection, Error> {
        let connect_timeout = self.settings.timeout.min(FIRST_TRY);
        let builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(connect_timeout)
            .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")));
        let forwarded = self.order.iter().position(|e| e == endpoint);
        let socket = match (&self.tunnel, endpoint) {
            (Some(tunnel), _) => {
                let index = forwarded.expect("every endpoint tried is in the order");
                Some(tunnel.socket(index).to_path_buf())
            }
            (None, Endpoint::Unix(path)) => Some(path.clone()),
            (None, Endpoint::Http(_)) => None,
        };
        let base = match endpoint {
            Endpoint::Unix(_) => "http://localhost".to_string(),
            Endpoint::Http(url) => url.clone(),
        };
        let builder = match socket {
            Some(path) => builder.unix_socket(path),
            None => builder,
        };
        let builder = match &self.settings.tls {
            Some(tls) if endpoint.is_https() => builder.tls_backend_preconfigured((**tls).clone()),
            _ => builder,
        };
        let http = builder.build().map_err(|e| Error::Setup(e.to_string()))?;
        let shown = match &self.settings.tunnel {
            Some((host, _)) => format!("{endpoint} (through {host})"),
            None => endpoint.to_string(),
        };
        Ok(Connection { shown, base, http })
    }

    /// Sends one request, trying the endpoints in order until one answers.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<(String, reqwest::Response), Error> {
        let known = self.connected.lock().expect("not poisoned").clone();
        let settled = known.is_some();
        let candidates: Vec<Result<Connection, Error>> = match known {
            Some(connection) => vec![Ok(connection)],
            None => self.order.iter().map(|e| self.connection(e)).collect(),
        };
        let mut last = String::from("no endpoint given");
        let count = candidates.len();
        for (index, candidate) in candidates.into_iter().enumerate() {
            let connection = candidate?;
            // Until one endpoint has answered, one that accepts but does not
            // answer (a frozen daemon) gets a short try when others remain.
            let trying = !settled && index + 1 < count;
            let timeout = match timeout {
                Some(t) if trying => Some(t.min(FIRST_TRY)),
                other => other,
            };
            let mut request = connection
                .http
                .request(method.clone(), format!("{}{path}", connection.base))
                .query(query);
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            if let Some(token) = &self.settings.token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let sent = request.send().await;
            if let Err(err) = &sent
                && let Some(hint) = tls_hint(err)
            {
                return Err(Error::Tls {
                    endpoint: connection.shown,
                    reason: cause(err),
                    hint,
                });
            }
            match sent {
                Ok(response) => {
                    self.settle(&connection);
                    return Ok((connection.shown, response));
                }
                Err(err) if err.is_timeout() && !err.is_connect() && !trying => {
                    return Err(Error::Timeout {
                        endpoint: connection.shown,
                        timeout: timeout.unwrap_or_default(),
                    });
                }
                Err(err) if err.is_connect() || err.is_timeout() => {
                    last = format!("{}: {}", connection.shown, cause(&err));
                }
                // Through a tunnel, an endpoint ssh cannot reach on the far
                // side is a connection that closes unanswered: try the next.
                Err(err) if self.tunnel.is_some() && index + 1 < count && !settled => {
                    last = format!("{}: {}", connection.shown, cause(&err));
                }
                Err(err) => {
                    return Err(Error::Unexpected {
                        endpoint: connection.shown,
                        what: format!("{method} {path}"),
                        reason: cause(&err),
                    });
                }
            }
        }
        Err(Error::Unreachable {
            tried: self
                .order
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            hint: unreachable_hint(&self.order, &last),
            last,
        })
    }

    /// Keeps using the endpoint that answered, and remembers it for next time.
    fn settle(&self, connection: &Connection) {
        let mut known = self.connected.lock().expect("not poisoned");
        if known.is_none() {
            if let Some(memory) = &self.settings.memory
                && self.settings.endpoints.len() > 1
                && self.settings.tunnel.is_none()
            {
                memory.remember(&list_key(&self.settings.endpoints), &connection.shown);
            }
            *known = Some(connection.clone());
        }
    }

    /// A request whose JSON answer is read as `T`; `None` for a 404 when
    /// `missing_ok` (fleetctl's "no such unit").
    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<T>, Error> {
        let Some((endpoint, response)) = self.call(method.clone(), path, query, body).await? else {
            return Ok(None);
        };
        let bytes = response.bytes().await.map_err(|e| Error::Unexpected {
            endpoint: endpoint.clone(),
            what: format!("{method} {path}"),
            reason: cause(&e),
        })?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Unexpected {
                endpoint,
                what: format!("{method} {path}"),
                reason: e.to_string(),
            })
    }

    /// A request; `None` for a 404, an [`Error::Api`] for any other error status.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<(String, reqwest::Response)>, Error> {
        let (endpoint, response) = self
            .send(method, path, query, body, Some(self.settings.timeout))
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some((endpoint, checked(response).await?)))
    }

    /// Like [`ApiClient::call`], with a 404 as an error too.
    async fn call_found(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, Error> {
        let (_, response) = self
            .send(method, path, &[], body, Some(self.settings.timeout))
            .await?;
        checked(response).await
    }

    /// Every item of a paged list, following `nextPageToken`.
    async fn pages<P: DeserializeOwned, T>(
        &self,
        path: &str,
        query: &[(&str, String)],
        split: impl Fn(P) -> (Vec<T>, Option<String>),
    ) -> Result<Vec<T>, Error> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = query.to_vec();
            if let Some(token) = &token {
                query.push(("nextPageToken", token.clone()));
            }
            let page: P = self
                .json(Method::GET, path, &query, None)
                .await?
                .ok_or_else(|| Error::Api {
                    status: 404,
                    message: format!("{path} does not exist on this API; is it flotilla's?"),
                    hint: None,
                })?;
            let (items, next) = split(page);
            all.extend(items);
            match next.filter(|t| !t.is_empty()) {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// `GET /fleet/v1/units`: every unit, templates included.
    pub async fn units(&self) -> Result<Vec<UnitJson>, Error> {
        self.pages("/fleet/v1/units", &[], |p: UnitList| {
            (p.units, p.next_page_token)
        })
        .await
    }

    /// `GET /fleet/v1/units/NAME`; `None` when there is no such unit.
    pub async fn unit(&self, name: &UnitName) -> Result<Option<UnitJson>, Error> {
        self.json(Method::GET, &unit_path("/fleet/v1/units", name), &[], None)
            .await
    }

    /// `PUT /fleet/v1/units/NAME` with options and a desired state: creates
    /// the unit, or replaces its body (fleet's CreateUnit, with the state).
    pub async fn create_unit(
        &self,
        name: &UnitName,
        options: &[UnitOption],
        desired: DesiredState,
    ) -> Result<(), Error> {
        self.put_unit(
            name,
            json!({ "name": name.as_str(), "options": options, "desiredState": desired }),
        )
        .await
    }

    /// `PUT /fleet/v1/units/NAME` with a desired state.
    pub async fn set_desired(&self, name: &UnitName, desired: DesiredState) -> Result<(), Error> {
        self.put_unit(
            name,
            json!({ "name": name.as_str(), "desiredState": desired }),
        )
        .await
    }

    async fn put_unit(&self, name: &UnitName, body: Value) -> Result<(), Error> {
        let path = unit_path("/fleet/v1/units", name);
        self.call_found(Method::PUT, &path, Some(&body))
            .await
            .map(drop)
    }

    /// `DELETE /fleet/v1/units/NAME`; false when there was no such unit.
    pub async fn destroy(&self, name: &UnitName) -> Result<bool, Error> {
        let found = self
            .call(
                Method::DELETE,
                &unit_path("/fleet/v1/units", name),
                &[],
                None,
            )
            .await?;
        Ok(found.is_some())
    }

    /// `GET /fleet/v1/state`, only `unit`'s rows when given.
    pub async fn states(&self, unit: Option<&UnitName>) -> Result<Vec<StateJson>, Error> {
        let query: Vec<(&str, String)> = unit
            .map(|u| vec![("unitName", u.to_string())])
            .unwrap_or_default();
        let mut states = self
            .pages("/fleet/v1/state", &query, |p: StateList| {
                (p.states, p.next_page_token)
            })
            .await?;
        // An API that ignores the filter still gives the right answer.
        if let Some(unit) = unit {
            states.retain(|s| s.name == unit.as_str());
        }
        Ok(states)
    }

    /// `GET /fleet/v1/machines`.
    pub async fn machines(&self) -> Result<Vec<MachineJson>, Error> {
        self.pages("/fleet/v1/machines", &[], |p: MachineList| {
            (p.machines, p.next_page_token)
        })
        .await
    }

    /// `POST` (or, to undo, `DELETE`) `/flotilla/v1/machines/M/drain`.
    pub async fn drain(&self, machine: &str, undo: bool) -> Result<(), Error> {
        let method = if undo { Method::DELETE } else { Method::POST };
        let path = format!("/flotilla/v1/machines/{}/drain", segment(machine));
        match self.call(method, &path, &[], None).await? {
            Some(_) => Ok(()),
            None => Err(Error::Api {
                status: 404,
                message: format!("no machine matches {machine:?}"),
                hint: Some("see flotilla list-machines --fields machine,ip,hostname".into()),
            }),
        }
    }

    /// `GET /flotilla/v1/explain/UNIT`.
    pub async fn explain(&self, name: &UnitName) -> Result<Option<Explanation>, Error> {
        self.json(
            Method::GET,
            &unit_path("/flotilla/v1/explain", name),
            &[],
            None,
        )
        .await
    }

    /// `GET /flotilla/v1/units/UNIT/status`: `systemctl status` from its
    /// host, and systemctl's exit status (header `Flotilla-Exit-Status`).
    pub async fn status_text(&self, name: &UnitName) -> Result<(String, i32), Error> {
        let path = format!("{}/status", unit_path("/flotilla/v1/units", name));
        let response = self.call_found(Method::GET, &path, None).await?;
        let exit = response
            .headers()
            .get("Flotilla-Exit-Status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let text = response.text().await.map_err(|e| Error::Unexpected {
            endpoint: String::new(),
            what: format!("GET {path}"),
            reason: cause(&e),
        })?;
        Ok((text, exit))
    }

    /// `GET /flotilla/v1/units/UNIT/journal`: its journal from its host,
    /// each chunk handed to `sink` as it arrives (for ever with `follow`).
    pub async fn journal(
        &self,
        name: &UnitName,
        lines: u32,
        follow: bool,
        output: &str,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), JournalError> {
        let path = format!("{}/journal", unit_path("/flotilla/v1/units", name));
        let query = [
            ("lines", lines.to_string()),
            ("follow", follow.to_string()),
            ("output", output.to_string()),
        ];
        let timeout = (!follow).then_some(self.settings.timeout);
        let (endpoint, response) = self.send(Method::GET, &path, &query, None, timeout).await?;
        let mut response = checked(response).await?;
        loop {
            match response.chunk().await {
                Ok(Some(bytes)) => sink(&bytes).map_err(JournalError::Output)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    return Err(JournalError::Api(Error::Unexpected {
                        endpoint,
                        what: format!("GET {path}"),
                        reason: cause(&e),
                    }));
                }
            }
        }
    }
}

/// Why `journal --via-api` stopped.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The API failed.
    #[error(transparent)]
    Api(#[from] Error),
    /// Writing what arrived failed (a closed pipe, say).
    #[error("cannot write the journal: {0}")]
    Output(#[source] std::io::Error),
}

/// The key an endpoint list is remembered under.
fn list_key(endpoints: &[Endpoint]) -> String {
    endpoints
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A 2xx response as is; anything else as [`Error::Api`] with fleet's message.
async fn checked(response: reqwest::Response) -> Result<reqwest::Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let bytes = response.bytes().await.unwrap_or_default();
    let (message, hint) = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) if !body.error.message.is_empty() => (body.error.message, body.error.hint),
        _ => {
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            let reason = status.canonical_reason().unwrap_or("error");
            if text.is_empty() || text.starts_with('{') {
                (
                    format!("the API answered {} {reason}", status.as_u16()),
                    None,
                )
            } else {
                (text, None)
            }
        }
    };
    Err(Error::Api {
        status: status.as_u16(),
        message,
        hint,
    })
}

/// The innermost cause of a reqwest error, which says what really failed.
fn cause(err: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = err;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// The rustls error inside a reqwest error, if TLS is what failed.
fn tls_error(err: &reqwest::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = next {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An io::Error's source() skips the error it wraps: go into it.
        next = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => cause.source(),
        };
    }
    None
}

/// The likely cause of a failed TLS handshake and what to do, or `None`
/// when TLS is not what failed.
fn tls_hint(err: &reqwest::Error) -> Option<String> {
    use rustls::{AlertDescription, CertificateError};
    let hint = match tls_error(err)? {
        rustls::Error::InvalidCertificate(CertificateError::Expired) => {
            "the daemon's certificate has expired: issue it a new one (flotilla tls issue) and \
             restart it"
        }
        rustls::Error::InvalidCertificate(_) | rustls::Error::General(_) => {
            "the daemon's certificate is not one of this cluster's: is --tls-ca (FLOTILLA_TLS_CA) \
             the ca.pem of this cluster?"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => {
            "the daemon refused this certificate as expired: issue a new one (flotilla tls \
             issue NAME --role admin)"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "the daemon wants a client certificate: give --tls-cert and --tls-key"
        }
        rustls::Error::AlertReceived(_) => {
            "the daemon refused this certificate (--tls-cert): is it one of this cluster's, \
             issued by `flotilla tls issue` with this cluster's CA?"
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the other end does not speak TLS: a daemon without tls_* serves http://, not \
             https://"
        }
        _ => "check --tls-ca, --tls-cert and --tls-key against the daemon's tls_* settings",
    };
    Some(hint.to_string())
}

/// What to try when no endpoint answered.
fn unreachable_hint(order: &[Endpoint], last: &str) -> String {
    let unix_only = order.iter().all(|e| matches!(e, Endpoint::Unix(_)));
    if unix_only && last.contains("ermission denied") {
        "; the API's socket is root's only: run as root, or use \
         --endpoint https://HOST:4003 with --tls-ca and a certificate (--tls-cert, --tls-key) \
         or --api-token"
            .to_string()
    } else if unix_only {
        "; is the daemon running on this host (systemctl status flotilla)? From elsewhere use \
         --endpoint https://HOST:4003 (or FLOTILLA_ENDPOINT) with --tls-ca and a certificate \
         or --api-token, or --tunnel HOST"
            .to_string()
    } else {
        "; check the address and that the daemon there serves api_listen".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_typed_segments_are_escaped() {
        assert_eq!(segment("1a2b3c4d"), "1a2b3c4d");
        assert_eq!(segment("10.0.0.5"), "10.0.0.5");
        assert_eq!(segment("../x y"), "..%2Fx%20y");
        assert_eq!(segment("fe80::1"), "fe80%3A%3A1");
        assert_eq!(segment(".."), "%2E%2E");
    }
}
