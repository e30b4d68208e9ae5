//! The HTTP JSON API of `flotilla daemon`, in the shapes and semantics of
//! CoreOS fleet v1.0.0's `/fleet/v1` (stock fleetctl works against it), plus
//! flotilla's own `/flotilla/v1`, served on a unix socket and on TCP.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /fleet/v1/units[?nextPageToken=T]` | `{"units":[unit...],"nextPageToken"?}`, by name, 100 a page |
//! | `GET /fleet/v1/units/NAME` | one unit: name, options, desiredState, currentState, machineID; hash, reason, machines |
//! | `PUT /fleet/v1/units/NAME` | create (201), replace the body (201), or set `desiredState` (204); JSON only (415) |
//! | `DELETE /fleet/v1/units/NAME` | destroy (204) |
//! | `GET /fleet/v1/state[?unitName=&machineID=&nextPageToken=]` | `{"states":[...]}`: systemd's states per unit and machine |
//! | `GET /fleet/v1/state/NAME` | one unit's states where it runs (404 while none is reported) |
//! | `GET /fleet/v1/machines[?nextPageToken=T]` | `{"machines":[{id, primaryIP, metadata, hostname, lastRenewal, renewedSecsAgo, overdue, drained, units}]}` |
//! | `PATCH /fleet/v1/machines` | JSON-patch of machine metadata (204; 400 and nothing applied for a bad one) |
//! | `GET /fleet/v1/discovery` | fleet's discovery document |
//! | `POST`/`DELETE /flotilla/v1/machines/M/drain` | drain / undrain machine M (id, id prefix, host name or address) |
//! | `GET /flotilla/v1/explain/NAME` | every machine and why the unit may or may not run there |
//! | `GET /flotilla/v1/units/NAME/status` | `systemctl status -l NAME` on the unit's host (text; asked of that host's API when elsewhere) |
//! | `GET /flotilla/v1/units/NAME/journal?lines=&follow=&output=` | `journalctl` of the unit on its host (text, streamed with `follow=true`) |
//! | `GET /health` | `ok` |
//! | `GET /metrics` | Prometheus text format ([`crate::metrics`]) |
//! | `GET /ui` | the status page: members, alarms, machines, units, reboot locks (HTML, reloads itself) |
//!
//! Errors are fleet's `{"error":{"code":N,"message":"..."}}`, with a `"hint"`
//! where flotilla knows the next step ([`error`]). Unknown query parameters
//! are ignored (fleetctl sends `alt=json`); a bad `nextPageToken` is 400.
//!
//! Who may call it: the unix socket is mode 0600, so only root ([`socket`]).
//! On TCP, loopback included (any local user reaches a loopback port), every
//! request is authenticated ([`router_tcp`]). Without TLS it must carry
//! `Authorization: Bearer TOKEN` (without `api_token` there is no TCP
//! listener). With the daemon's `tls_*` settings the listener speaks HTTPS
//! only, presenting the host's certificate ([`serve::TlsListener`]), and a
//! request is let in by the token OR by a client certificate of this
//! cluster: a member's or an admin's may do everything the token may; an
//! agent's (a host's) may only read (`GET`/`HEAD`: lists, states, explain,
//! status and journal, which is what one daemon asks another on a caller's
//! behalf, see [`status`]) and gets 403 for any write; a certificate of
//! another CA fails the handshake. Each listener bounds what clients may take
//! ([`serve`]): a header timeout, a body limit, a connection cap and a
//! back-off when accepting fails. The API is a client of the store like the
//! CLI: it goes through [`crate::registry`] with a [`Client`] of this
//! daemon's store endpoints, connected on first use, so it serves (with
//! 503s) before the store answers.
//!
//! * [`error`]: failures as statuses and fleet's error body.
//! * [`paging`]: fleet's page tokens and lenient query strings.
//! * [`units`]: `/fleet/v1/units` and `/fleet/v1/state`.
//! * [`machines`]: the machines, their metadata and drain.
//! * [`discovery`]: fleet's discovery document.
//! * [`explain`]: why a unit runs where it does, machine by machine.
//! * [`status`]: `systemctl status` and `journalctl` of a unit, from its host.
//! * [`forward`]: asking another host's API for them, over mutual TLS.
//! * [`page`]: `GET /ui`, the read-only status page.
//! * [`scrape`]: `GET /metrics` and the timing of every request by route.
//! * [`socket`]: binding the root-only unix socket.
//! * [`serve`]: the accept loop and its limits.

pub mod discovery;
pub mod error;
pub mod explain;
pub mod forward;
pub mod machines;
pub mod page;
pub mod paging;
pub mod scrape;
pub mod serve;
pub mod socket;
pub mod status;
pub mod units;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use crate::config::{ApiLimits, Loaded, Origin};
use crate::consensus::client::Client;
use crate::registry::BodyCache;
use crate::registry::RegistryError;
use crate::registry::index::Index;
use crate::registry::mirror::Mirror;
use crate::tls::{ClientTls, Identity, Role, Trust};
use error::ApiError;
use serve::Caller;

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The unix socket could not be put in place.
    #[error("cannot serve the API on the unix socket {}: {source}", path.display())]
    Socket {
        /// `api_socket`.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Another live process answers on the socket.
    #[error(
        "another process already serves {}; is another flotilla daemon running? \
         (stop it, or set api_socket to another path or to \"\" to disable the socket)",
        .0.display()
    )]
    SocketInUse(PathBuf),
    /// The socket path holds something else, which is left alone.
    #[error(
        "{} exists and is not a socket; remove it or set api_socket to another path",
        .0.display()
    )]
    NotASocket(PathBuf),
    /// The TCP address could not be bound.
    #[error(
        "cannot serve the API on {addr} (api_listen): {source}; is another daemon using it? \
         (set api_listen to another address, or to \"\" to disable TCP)"
    )]
    Listen {
        /// `api_listen`.
        addr: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// What every handler shares: the way to the store, the unit bodies
/// already read from it, and this host's identity.
pub struct Shared {
    endpoints: Vec<String>,
    client: OnceCell<Client>,
    /// The registry's copy the read routes answer from.
    mirror: Mirror,
    /// Bodies by hash, kept across requests (a body never changes under its
    /// hash); `GET /fleet/v1/units` drops those of units no longer stored.
    bodies: Arc<BodyCache>,
    /// Units this daemon recently lowered from launched to loaded.
    stops: units::RecentStops,
    /// This host's machine id, if known: status and journal are answered
    /// only for units claimed here.
    machine_id: Option<String>,
    /// The largest request body accepted (`api_max_body_bytes`).
    max_body_bytes: usize,
    /// This host's certificate as a client, with which it asks the unit's
    /// host's API for status and journal; `None` without TLS (then it cannot).
    forwarder: Option<Arc<ClientTls>>,
}

impl Shared {
    /// A state whose client connects to `endpoints` on first use, on the
    /// host with `machine_id`.
    pub fn new(endpoints: Vec<String>, machine_id: Option<String>) -> Shared {
        Shared {
            mirror: Mirror::new(endpoints.clone()),
            endpoints,
            client: OnceCell::new(),
            bodies: Arc::new(BodyCache::new()),
            stops: units::RecentStops::default(),
            machine_id,
            max_body_bytes: ApiLimits::default().max_body_bytes,
            forwarder: None,
        }
    }

    /// The same, asking other hosts' APIs as `client` (this host's
    /// certificate) for status and journal of their units.
    pub fn with_forwarder(self, client: Arc<ClientTls>) -> Shared {
        Shared {
            forwarder: Some(client),
            ..self
        }
    }

    /// The same, reading the registry from `mirror` (the member's one copy,
    /// which its scheduler follows too).
    pub fn with_mirror(self, mirror: Mirror) -> Shared {
        Shared { mirror, ..self }
    }

    /// The same, reading unit bodies through `bodies` (the daemon's one cache).
    pub fn with_bodies(self, bodies: Arc<BodyCache>) -> Shared {
        Shared { bodies, ..self }
    }

    /// The same, accepting request bodies up to `max_body_bytes`.
    pub fn with_max_body_bytes(self, max_body_bytes: usize) -> Shared {
        Shared {
            max_body_bytes,
            ..self
        }
    }

    /// The store's client, connecting now if no request has yet; while the
    /// store does not answer, each request tries again (and gets a 503).
    pub async fn client(&self) -> Result<&Client, ApiError> {
        Ok(self
            .client
            .get_or_try_init(|| Client::connect(&self.endpoints))
            .await?)
    }

    /// What a read route reads: the registry's index, the mirror's once it
    /// holds every change acknowledged before this call, else read from the
    /// store; refused while it holds a record that does not decode.
    pub async fn registry(&self) -> Result<Index, ApiError> {
        let client = self.client().await?;
        let index = self.mirror.read(client).await?;
        index.check().map_err(RegistryError::from)?;
        Ok(index)
    }
}

/// A 405 with fleet's message for a resource's other methods.
fn only(allowed: &'static str) -> impl Fn() -> std::future::Ready<ApiError> + Clone {
    move || {
        std::future::ready(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("only {allowed} supported against this resource"),
        ))
    }
}

/// The routes, without authentication (the unix socket's router).
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(scrape::metrics).fallback(only("GET")))
        .route("/ui", get(page::page).fallback(only("GET")))
        .route("/fleet/v1/units", get(units::list).fallback(only("GET")))
        .route(
            // A catch-all, so a name with '/' in it reaches the name check (400)
            // instead of falling through to "no such endpoint".
            "/fleet/v1/units/{*name}",
            get(units::get)
                .put(units::put)
                .delete(units::delete)
                .fallback(only("GET, PUT and DELETE")),
        )
        .route("/fleet/v1/state", get(units::states).fallback(only("GET")))
        .route(
            "/fleet/v1/state/{*name}",
            get(units::state_of).fallback(only("GET")),
        )
        .route(
            "/fleet/v1/machines",
            get(machines::list)
                .patch(machines::patch)
                .fallback(only("GET and PATCH")),
        )
        .route(
            "/fleet/v1/discovery",
            get(discovery::document).fallback(discovery::not_get),
        )
        .route("/fleet/v1", any(only("resources below /fleet/v1/")))
        .route(
            "/flotilla/v1/machines/{machine}/drain",
            delete(machines::undrain)
                .post(machines::drain)
                .fallback(only("POST and DELETE")),
        )
        .route(
            "/flotilla/v1/explain/{*name}",
            get(explain::explain).fallback(only("GET")),
        )
        .route(
            "/flotilla/v1/units/{name}/status",
            get(status::status).fallback(only("GET")),
        )
        .route(
            "/flotilla/v1/units/{name}/journal",
            get(status::journal).fallback(only("GET")),
        )
        .route_layer(middleware::from_fn(scrape::time_request))
        .fallback(|| async {
            ApiError::not_found("no such endpoint").with_hint(
                "see /fleet/v1/units, /fleet/v1/state, /fleet/v1/machines, \
                 /fleet/v1/discovery and /flotilla/v1/explain/UNIT",
            )
        })
        .layer(DefaultBodyLimit::max(shared.max_body_bytes))
        .with_state(shared)
}

/// `router` behind a bearer-token check (the TCP router without TLS).
pub fn router_with_token(shared: Arc<Shared>, token: &str) -> Router {
    router_tcp(shared, Some(token), false)
}

/// `router` behind the TCP listener's authentication (see the module doc):
/// the bearer `token` if set, or with `tls` a client certificate of the
/// cluster (its [`Caller`], which the TLS listener puts in every request).
pub fn router_tcp(shared: Arc<Shared>, token: Option<&str>, tls: bool) -> Router {
    let auth = Arc::new(Auth {
        token: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        tls,
    });
    router(shared).layer(middleware::from_fn_with_state(auth, authorize))
}

/// What the TCP router accepts as proof of who calls.
struct Auth {
    /// The SHA-256 of `api_token`, if one is set.
    token: Option<[u8; 32]>,
    /// Whether the listener speaks TLS (client certificates are possible).
    tls: bool,
}

/// Lets a request through when [`access`] allows it.
async fn authorize(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = match (given, &auth.token) {
        (Some(given), Some(expected)) => {
            same_digest(&Sha256::digest(given.as_bytes()).into(), expected)
        }
        _ => false,
    };
    let caller = request
        .extensions()
        .get::<Caller>()
        .and_then(|c| c.0.as_ref());
    match access(caller, token, request.method(), auth.tls) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// Whether a TCP request may go on: with the token, or a member's or an
/// admin's certificate, anything; with an agent's certificate, reads only.
pub fn access(
    caller: Option<&Identity>,
    token: bool,
    method: &Method,
    tls: bool,
) -> Result<(), ApiError> {
    if token {
        return Ok(());
    }
    match caller {
        None => Err(ApiError::unauthorized(tls)),
        Some(who) => match who.role {
            Role::Member | Role::Admin => Ok(()),
            Role::Agent if method == Method::GET || method == Method::HEAD => Ok(()),
            Role::Agent => Err(ApiError::forbidden(format!(
                "{who} may only read through the API; changes need an admin's certificate \
                 (flotilla tls issue NAME --role admin) or the api_token"
            ))),
        },
    }
}

/// Compares two digests in time independent of where they differ, so
/// response times tell an attacker nothing about the token.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The running API: its server tasks, and the socket file it placed. Dropping
/// it stops serving and removes the socket file.
#[derive(Debug, Default)]
pub struct Api {
    tasks: Vec<JoinHandle<()>>,
    socket: Option<socket::Owned>,
}

impl Drop for Api {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the API on `api_socket` and `api_listen` (each unless empty), with
/// a store client for `endpoints`, reading the registry from `mirror`; with
/// `trust` (this host's certificate) `api_listen` speaks HTTPS and the API
/// asks other hosts' APIs for the status and journal of their units.
///
/// A listener left at its default that cannot be bound (a second daemon on
/// one machine, as tests run them; a daemon without root) is logged and
/// skipped; one the operator configured must bind, or the daemon stops.
/// TCP always wants the token or, with TLS, a client certificate (config
/// refuses an `api_listen` with neither `api_token` nor TLS).
pub async fn start(
    loaded: &Loaded,
    endpoints: &[String],
    bodies: Arc<BodyCache>,
    mirror: Mirror,
    trust: Option<&Trust>,
) -> Result<Api, Error> {
    let config = &loaded.config;
    let limits = config.api_limits().unwrap_or_default();
    let machine_id = crate::agent::identity::machine_id(std::path::Path::new("/etc/machine-id"))
        .map_err(|e| tracing::debug!("the API does not know this host's machine id: {e}"))
        .ok();
    let mut shared = Shared::new(endpoints.to_vec(), machine_id)
        .with_max_body_bytes(limits.max_body_bytes)
        .with_bodies(bodies)
        .with_mirror(mirror);
    if let Some(trust) = trust {
        shared = shared.with_forwarder(trust.client.clone());
    }
    let shared = Arc::new(shared);
    let mut api = Api::default();
    let tolerated = |key: &str, err: Error| {
        if loaded.origin(key) == Origin::Default {
            tracing::warn!("not serving the API there: {err}");
            Ok(())
        } else {
            Err(err)
        }
    };

    if !config.api_socket.as_os_str().is_empty() {
        match socket::bind(&config.api_socket).await {
            Ok((listener, owned)) => {
                let name = format!("unix socket {}", config.api_socket.display());
                tracing::info!("API on {name}");
                let app = router(shared.clone());
                api.tasks.push(tokio::spawn(serve::serve(
                    listener,
                    app,
                    limits.clone(),
                    name,
                )));
                api.socket = Some(owned);
            }
            Err(err) => tolerated("api_socket", err)?,
        }
    }

    let token = Some(config.api_token.as_str()).filter(|t| !t.is_empty());
    if !config.api_listen.is_empty() && token.is_none() && trust.is_none() {
        // The config check refuses this; never serve TCP unauthenticated anyway.
        tracing::error!(
            "not serving the API on {}: api_listen needs api_token or TLS",
            config.api_listen
        );
    } else if !config.api_listen.is_empty() {
        match TcpListener::bind(&config.api_listen).await {
            Ok(listener) => {
                let addr = listener
                    .local_addr()
                    .map_or_else(|_| config.api_listen.clone(), |a| a.to_string());
                let app = router_tcp(shared.clone(), token, trust.is_some());
                let task = match trust {
                    Some(trust) => {
                        tracing::info!(
                            "API on https://{addr} (a client certificate of this cluster{})",
                            if token.is_some() {
                                " or the bearer token"
                            } else {
                                ""
                            }
                        );
                        let listener = serve::TlsListener {
                            tcp: listener,
                            tls: trust.api_server.clone(),
                        };
                        tokio::spawn(serve::serve(
                            listener,
                            app,
                            limits,
                            format!("https://{addr}"),
                        ))
                    }
                    None => {
                        tracing::info!("API on http://{addr} (bearer token required)");
                        tokio::spawn(serve::serve(
                            listener,
                            app,
                            limits,
                            format!("http://{addr}"),
                        ))
                    }
                };
                api.tasks.push(task);
            }
            Err(source) => tolerated(
                "api_listen",
                Error::Listen {
                    addr: config.api_listen.clone(),
                    source,
                },
            )?,
        }
    }
    Ok(api)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `app` on a fresh unix socket; returns its path (and the dir).
    async fn serve(app: Router) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (listener, owned) = socket::bind(&path).await.unwrap();
        std::mem::forget(owned);
        let limits = ApiLimits::default();
        tokio::spawn(serve::serve(listener, app, limits, "test".to_string()));
        (dir, path)
    }

    /// Sends one raw HTTP/1.1 request; returns the status and the body.
    async fn call(path: &std::path::Path, request: Vec<u8>) -> (u16, String) {
        let mut stream = tokio::net::UnixStream::connect(path).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    }

    fn request(method: &str, target: &str, headers: &str, body: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    }

    /// A store nobody answers at: every request that reaches it is a 503.
    fn unreachable() -> Arc<Shared> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Arc::new(Shared::new(vec![format!("127.0.0.1:{port}")], None))
    }

    #[tokio::test]
    async fn input_is_checked_before_the_store_is_asked() {
        let (_dir, path) = serve(router(unreachable())).await;
        let json = "Content-Type: application/json\r\n";
        let put = |target: &str, body: &[u8]| request("PUT", target, json, body);
        let get = |target: &str| request("GET", target, "", b"");
        let launched = br#"{"desiredState":"launched"}"#;
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (get("/health"), 200),
            (get("/metrics"), 200),
            (request("POST", "/metrics", "", b""), 405),
            (get("/fleet/v1/units"), 503),
            (get("/fleet/v1/discovery?alt=json"), 200),
            (request("POST", "/fleet/v1/discovery", "", b""), 400),
            (put("/fleet/v1/units/..%2F..%2Fetc%2Fx", launched), 400),
            (put("/fleet/v1/units/../../etc/x", launched), 400),
            (put("/fleet/v1/units/a%00.service", launched), 400),
            (put("/fleet/v1/units/a.service", b"{\"bogus\":1}"), 400),
            (put("/fleet/v1/units/a.service", b"{"), 400),
            (
                put("/fleet/v1/units/a.service", br#"{"name":"b.service"}"#),
                400,
            ),
            (put("/fleet/v1/units/web@.service", launched), 400),
            (put("/fleet/v1/units/a.service", launched), 503),
            (
                request("PUT", "/fleet/v1/units/a.service", "", launched),
                415,
            ),
            (
                request(
                    "PUT",
                    "/fleet/v1/units/a.service",
                    "Content-Type: text/plain\r\n",
                    launched,
                ),
                415,
            ),
            (
                put(
                    "/fleet/v1/units/a.service",
                    &vec![b' '; ApiLimits::default().max_body_bytes + 1],
                ),
                413,
            ),
            (get("/fleet/v1/units?nextPageToken=garbage!"), 400),
            (get("/fleet/v1/state?nextPageToken=EwBMLg%3D%3D"), 400),
            (get("/fleet/v1/machines?nextPageToken=ZAAAAA%3D%3D"), 400),
            (request("PATCH", "/fleet/v1/machines", "", b"{}"), 400),
            (
                request(
                    "PATCH",
                    "/fleet/v1/machines",
                    "",
                    br#"[{"op":"add","path":"/m/foo","value":"x"}]"#,
                ),
                400,
            ),
            (request("PATCH", "/fleet/v1/machines", "", b"[]"), 204),
            (request("POST", "/fleet/v1/units", "", b""), 405),
            (request("POST", "/fleet/v1/units/a.service", "", b""), 405),
            (request("PUT", "/fleet/v1/machines", "", b""), 405),
            (get("/fleet/v1"), 405),
            (get("/flotilla/v1/journal/a.service"), 404),
            (get("/flotilla/v1/units/a.service/journal?lines=x"), 400),
            (get("/flotilla/v1/units/a.service/journal?output=rm"), 400),
            (get("/flotilla/v1/explain/web@.service"), 400),
            (get("/nope"), 404),
        ];
        for (raw, expected) in cases {
            let shown = String::from_utf8_lossy(&raw[..raw.len().min(60)]).into_owned();
            let (status, body) = call(&path, raw).await;
            assert_eq!(status, expected, "{shown}: {body}");
            if expected >= 400 {
                let parsed: serde_json::Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("{shown}: body {body:?} is not JSON: {e}"));
                assert_eq!(parsed["error"]["code"], expected, "{shown}: {body}");
            }
        }
    }

    #[test]
    fn certificates_grant_by_role_and_agents_only_read() {
        let who = |role| Identity {
            cluster: "c".into(),
            role,
            name: "x".into(),
        };
        let (admin, member, agent) = (who(Role::Admin), who(Role::Member), who(Role::Agent));
        let status = |caller: Option<&Identity>, token, method: Method| {
            access(caller, token, &method, true).map_err(|e| e.status.as_u16())
        };
        for method in [
            Method::GET,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::POST,
        ] {
            assert_eq!(status(Some(&admin), false, method.clone()), Ok(()));
            assert_eq!(status(Some(&member), false, method.clone()), Ok(()));
            assert_eq!(status(None, true, method.clone()), Ok(()));
            assert_eq!(status(Some(&agent), true, method.clone()), Ok(()), "token");
            assert_eq!(status(None, false, method.clone()), Err(401));
        }
        assert_eq!(status(Some(&agent), false, Method::GET), Ok(()));
        assert_eq!(status(Some(&agent), false, Method::HEAD), Ok(()));
        for method in [Method::PUT, Method::DELETE, Method::PATCH, Method::POST] {
            assert_eq!(status(Some(&agent), false, method), Err(403));
        }
        let plain = access(None, false, &Method::GET, false).unwrap_err();
        assert!(!plain.message.contains("certificate"), "{}", plain.message);
    }

    #[tokio::test]
    async fn tcp_router_wants_the_token() {
        let token = "0123456789abcdef";
        let (_dir, path) = serve(router_with_token(unreachable(), token)).await;
        let health = |headers: &str| request("GET", "/health", headers, b"");
        let (status, body) = call(&path, health("")).await;
        assert_eq!(status, 401, "{body}");
        let (status, _) = call(&path, health("Authorization: Bearer wrong\r\n")).await;
        assert_eq!(status, 401);
        let good = format!("Authorization: Bearer {token}\r\n");
        let (status, body) = call(&path, health(&good)).await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        let metrics = |headers: &str| request("GET", "/metrics", headers, b"");
        let (status, _) = call(&path, metrics("")).await;
        assert_eq!(status, 401, "/metrics wants the token too");
        let (status, _) = call(&path, request("GET", "/ui", "", b"")).await;
        assert_eq!(status, 401, "the status page wants the token too");
        let (status, body) = call(&path, metrics(&good)).await;
        assert_eq!(status, 200);
        assert!(body.contains("flotilla_store_reachable 0"), "{body}");
        assert!(
            body.contains(
                "flotilla_api_request_duration_seconds_count{method=\"GET\",route=\"/health\"}"
            ),
            "{body}"
        );
    }
}
