//! `GET /flotilla/v1/units/UNIT/status` and `.../journal`: systemd's own
//! words about a unit (`systemctl status -l`, `journalctl`), for people
//! without ssh keys to the unit's host.
//!
//! systemd answers on the unit's host only. The daemon there runs
//! `systemctl` or `journalctl` itself, on a checked unit name, with a fixed
//! argument list (no shell). A daemon on another host asks that one for the
//! caller, over HTTPS with its own certificate ([`super::forward`]), and
//! streams its answer back (with the answering machine in the
//! `Flotilla-Machine` header); without TLS it cannot, and says so (502),
//! naming the unit's host. A request another daemon forwarded is answered
//! only for units of this host (409 otherwise: the unit moved meanwhile).
//!
//! `status` answers `text/plain` with systemctl's exit status in the
//! `Flotilla-Exit-Status` header (3 for a unit that is not running, as
//! systemctl has it). `journal` takes `lines` (default 10, at most
//! [`MAX_LINES`]), `output` (one of journalctl's modes, default `short`) and
//! `follow=true`, which streams until the caller hangs up (journalctl is
//! then killed).

use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::process::{Child, ChildStdout, Command};

use super::Shared;
use super::error::ApiError;
use super::forward::{self, FORWARDED_HEADER};
use super::paging::Query;
use super::units::unit_name;
use crate::registry::ops;
use crate::registry::records::MachineRecord;
use crate::units::UnitName;

/// The most journal lines one request may ask for.
pub const MAX_LINES: u32 = 100_000;

/// How long `systemctl status` or a non-following `journalctl` may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The header carrying systemctl's exit status.
pub const EXIT_STATUS_HEADER: &str = "flotilla-exit-status";

/// journalctl's output modes.
const OUTPUT_MODES: [&str; 15] = [
    "short",
    "short-full",
    "short-iso",
    "short-iso-precise",
    "short-precise",
    "short-monotonic",
    "short-unix",
    "verbose",
    "export",
    "json",
    "json-pretty",
    "json-sse",
    "json-seq",
    "cat",
    "with-unit",
];

/// `GET /flotilla/v1/units/UNIT/status`
pub async fn status(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let name = unit_name(path)?;
    if let Where::There(machine) = locate(&shared, &name, &headers).await? {
        return ask(&shared, &name, &machine, &uri, false, "status").await;
    }
    let mut command = Command::new("systemctl");
    command.args(["status", "-l", "--no-pager", "--", name.as_str()]);
    run_to_end(command).await
}

/// `GET /flotilla/v1/units/UNIT/journal?lines=N&follow=BOOL&output=MODE`
pub async fn journal(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let name = unit_name(path)?;
    let query = Query::parse(query.as_deref());
    let lines = match query.first("lines") {
        None => 10,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_LINES)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "lines={text:?} is not a number from 0 to {MAX_LINES}"
                ))
            })?,
    };
    let output = query.first("output").unwrap_or("short");
    if !OUTPUT_MODES.contains(&output) {
        return Err(ApiError::bad_request(format!(
            "output={output:?} is not a journalctl output mode; use one of {}",
            OUTPUT_MODES.join(", ")
        )));
    }
    let follow = match query.first("follow") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "follow={other:?}: use true or false"
            )));
        }
    };
    if let Where::There(machine) = locate(&shared, &name, &headers).await? {
        return ask(&shared, &name, &machine, &uri, follow, "journal").await;
    }
    let mut command = Command::new("journalctl");
    let lines = lines.to_string();
    command.args([
        "--unit",
        name.as_str(),
        "--no-pager",
        "-n",
        &lines,
        "--output",
        output,
    ]);
    if !follow {
        return run_to_end(command).await;
    }
    command.arg("--follow");
    let mut child = spawn(command, Stdio::null())?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| failed("journalctl", "no output"))?;
    let stream = Output {
        _child: child,
        stdout,
        buffer: vec![0; 8192],
    };
    Ok(text_response(StatusCode::OK, Body::from_stream(stream)))
}

/// Where a unit's systemd answers.
enum Where {
    /// On this host.
    Here,
    /// On this other machine.
    There(MachineRecord),
}

/// Finds the unit's host: this one if it claimed the unit, else the first
/// machine that did (one that publishes its API, if any does). A request
/// another daemon forwarded must be for this host (see the module doc).
async fn locate(shared: &Shared, name: &UnitName, headers: &HeaderMap) -> Result<Where, ApiError> {
    let client = shared.client().await?;
    ops::unit_record(client, name).await?;
    let mut hosts = ops::claimed_by(client, name).await?;
    let here = shared.machine_id.as_deref();
    if hosts.iter().any(|m| Some(m.id.as_str()) == here) {
        return Ok(Where::Here);
    }
    hosts.sort_by_key(|m| m.api.is_none());
    let Some(machine) = hosts.into_iter().next() else {
        return Err(ApiError::conflict(format!(
            "unit {name} does not appear to be loaded: no machine runs it"
        ))
        .with_hint(format!("start it first: flotilla start {name}")));
    };
    if let Some(from) = headers.get(FORWARDED_HEADER) {
        return Err(ApiError::conflict(format!(
            "unit {name} runs on machine {} ({}), not on this host, which {} asked; it \
             moved meanwhile",
            machine.id,
            machine.ip,
            String::from_utf8_lossy(from.as_bytes())
        ))
        .with_hint("ask again"));
    }
    Ok(Where::There(machine))
}

/// Asks `machine`'s API for this request (see [`forward`]); without TLS
/// here, says that it cannot.
async fn ask(
    shared: &Shared,
    name: &UnitName,
    machine: &MachineRecord,
    uri: &Uri,
    follow: bool,
    verb: &str,
) -> Result<Response, ApiError> {
    let Some(client) = &shared.forwarder else {
        return Err(ApiError::bad_gateway(format!(
            "unit {name} runs on machine {} ({}); this daemon has no TLS (tls_ca, tls_cert, \
             tls_key), so it cannot ask that host's API",
            machine.id, machine.ip
        ))
        .with_hint(format!(
            "turn on TLS (see SECURITY.md), ask that host's API (flotilla --endpoint \
             https://{}:PORT {verb} --via-api {name}), or use ssh: flotilla {verb} {name}",
            machine.ip
        )));
    };
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    forward::forward(client, machine, path, follow).await
}

/// Runs `command` to its end (within [`COMMAND_TIMEOUT`]) and answers its
/// output, stdout then stderr, with its exit status in a header.
async fn run_to_end(command: Command) -> Result<Response, ApiError> {
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    let child = spawn(command, Stdio::piped())?;
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| failed(&program, "it did not finish within 30 s"))?
        .map_err(|e| failed(&program, &e.to_string()))?;
    let mut text = output.stdout;
    text.extend_from_slice(&output.stderr);
    let mut response = text_response(StatusCode::OK, Body::from(text));
    let code = output.status.code().unwrap_or(-1).to_string();
    if let Ok(value) = HeaderValue::from_str(&code) {
        response.headers_mut().insert(EXIT_STATUS_HEADER, value);
    }
    Ok(response)
}

/// Starts `command` with stdout piped, killed when dropped.
fn spawn(mut command: Command, stderr: Stdio) -> Result<Child, ApiError> {
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(&program, &e.to_string()))
}

fn failed(program: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot run {program} on this host: {why}"),
    )
}

fn text_response(status: StatusCode, body: Body) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A running command's stdout as a response body; dropping it (the caller
/// hung up) kills the command.
struct Output {
    _child: Child,
    stdout: ChildStdout,
    buffer: Vec<u8>,
}

impl futures_core::Stream for Output {
    type Item = std::io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut read = ReadBuf::new(&mut this.buffer);
        match Pin::new(&mut this.stdout).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(Bytes::copy_from_slice(read.filled())))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}
