//! `GET /flotilla/v1/units/UNIT/status` and `.../journal`: systemd's own
//! words about a unit (`systemctl status -l`, `journalctl`), for people
//! without ssh keys to the unit's host.
//!
//! Only the daemon on the unit's host answers: it runs `systemctl` or
//! `journalctl` itself, on a checked unit name, with a fixed argument list
//! (no shell). A request that reaches another host's daemon is NOT forwarded:
//! it gets 501 naming the unit's host and address. Forwarding would mean
//! sending the cluster's API token to whatever address a machine publishes
//! in its presence record, and any agent host may write its own record, so
//! one compromised agent host could collect the admin token; without
//! verified TLS between daemons that cannot be made safe. Ask the unit's
//! host's API instead, or use ssh (`flotilla status UNIT`).
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
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::process::{Child, ChildStdout, Command};

use super::Shared;
use super::error::ApiError;
use super::paging::Query;
use super::units::unit_name;
use crate::registry::ops;
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
) -> Result<Response, ApiError> {
    let name = unit_name(path)?;
    ensure_here(&shared, &name, "status").await?;
    let mut command = Command::new("systemctl");
    command.args(["status", "-l", "--no-pager", "--", name.as_str()]);
    run_to_end(command).await
}

/// `GET /flotilla/v1/units/UNIT/journal?lines=N&follow=BOOL&output=MODE`
pub async fn journal(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
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
    ensure_here(&shared, &name, "journal").await?;
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

/// Refuses unless the unit is claimed by this host (see the module doc).
async fn ensure_here(shared: &Shared, name: &UnitName, verb: &str) -> Result<(), ApiError> {
    let client = shared.client().await?;
    ops::unit_record(client, name).await?;
    let rows = ops::unit_rows(client).await?;
    let claimed: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.name == *name && r.claimed)
        .filter_map(|r| Some((r.machine.as_deref()?, r.ip.as_deref().unwrap_or("-"))))
        .collect();
    let here = shared.machine_id.as_deref();
    if claimed.iter().any(|(id, _)| Some(*id) == here) {
        return Ok(());
    }
    let Some((id, ip)) = claimed.first() else {
        return Err(ApiError::conflict(format!(
            "unit {name} does not appear to be loaded: no machine runs it"
        ))
        .with_hint(format!("start it first: flotilla start {name}")));
    };
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "unit {name} runs on machine {id} ({ip}); this daemon reads systemd only on its own \
             host, and does not forward requests to other hosts"
        ),
    )
    .with_hint(format!(
        "ask the API of {ip} (flotilla --endpoint http://{ip}:PORT {verb} --via-api {name}), \
         or use ssh: flotilla {verb} {name}"
    )))
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
