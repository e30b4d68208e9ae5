//! Asking another host's API, on a caller's behalf, for the status or the
//! journal of a unit that runs there ([`super::status`]).
//!
//! systemd answers only on the unit's host, so the daemon a caller reached
//! finds the unit's machine in the registry and calls the API that machine
//! publishes with its presence ([`MachineRecord::api`]), over HTTPS with
//! THIS host's certificate: mutual TLS, the cluster CA checking both ends.
//! No token travels: the other host lets the call in because it comes from a
//! node of the cluster (an agent's certificate may read, see
//! [`super::access`]), and this host accepts the answer only from that
//! machine (an agent certificate named by its machine id) or a member. A
//! forwarded request carries [`FORWARDED_HEADER`], and the host that gets
//! it answers only for itself, so a request is forwarded at most once.
//!
//! Bounds: connecting and the handshake take at most [`CONNECT_TIMEOUT`],
//! the answer's headers at most [`ANSWER_TIMEOUT`]; a whole answer
//! (status, a journal without `follow`) at most [`ANSWER_TIMEOUT`] and
//! [`MAX_ANSWER_BYTES`]. A followed journal streams as long as the caller
//! reads it, at the caller's pace (nothing is buffered beyond one chunk);
//! when the caller hangs up, the connection to the other host closes and its
//! journalctl ends.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::error::ApiError;
use crate::registry::records::MachineRecord;
use crate::tls::{ClientTls, Role};

/// The header marking a request one daemon forwarded to another; its value
/// names the forwarding host.
pub const FORWARDED_HEADER: &str = "flotilla-forwarded-by";

/// How long reaching the other host's API, TLS included, may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the other host may take to answer, and to send a whole answer
/// that is not followed (its `systemctl`/`journalctl` get 30 s).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(40);

/// The largest answer passed on that is not followed.
pub const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// Asks `machine`'s API for `path_and_query` as `client` (this host's
/// certificate) and streams its answer back; `follow` lifts the bounds on
/// the answer's body (see the module doc).
pub async fn forward(
    client: &ClientTls,
    machine: &MachineRecord,
    path_and_query: &str,
    follow: bool,
) -> Result<Response, ApiError> {
    let named = format!(
        "machine {} ({}, {})",
        machine.id, machine.hostname, machine.ip
    );
    let Some(addr) = machine.api.as_deref() else {
        return Err(ApiError::bad_gateway(format!(
            "{named} publishes no API address, so this daemon cannot ask it"
        ))
        .with_hint(
            "its daemon needs TLS (tls_ca, tls_cert, tls_key) and api_listen on an address \
             other hosts reach; or use ssh (without --via-api)",
        ));
    };
    let unreachable = |why: String| {
        ApiError::bad_gateway(format!("cannot reach the API of {named} at {addr}: {why}"))
            .with_hint("check that host's daemon (systemctl status flotilla); or use ssh (without --via-api)")
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (stream, _) = client
        .connect_to(tcp, CONNECT_TIMEOUT, |who| {
            who.role == Role::Member || (who.role == Role::Agent && who.name == machine.id)
        })
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let connection = Connection(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let request = Request::get(path_and_query)
        .header(header::HOST, addr)
        .header(FORWARDED_HEADER, client.me().name.as_str())
        .body(Body::empty())
        .map_err(|e| unreachable(e.to_string()))?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| unreachable(format!("no answer within {ANSWER_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let (head, incoming) = answer.into_parts();
    if matches!(
        head.status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) {
        return Err(ApiError::bad_gateway(format!(
            "the API of {named} refused this host ({}): is its certificate of this cluster?",
            head.status
        )));
    }
    let body = Bounded {
        inner: Body::new(incoming).into_data_stream(),
        left: (!follow).then_some(MAX_ANSWER_BYTES),
        deadline: (!follow).then(|| Box::pin(tokio::time::sleep(ANSWER_TIMEOUT))),
        _connection: connection,
    };
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = head.status;
    for name in [
        header::CONTENT_TYPE.as_str(),
        super::status::EXIT_STATUS_HEADER,
    ] {
        if let Some(value) = head.headers.get(name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    if let Ok(value) = HeaderValue::from_str(&machine.id) {
        response.headers_mut().insert(ANSWERED_BY_HEADER, value);
    }
    Ok(response)
}

/// The header naming the machine whose systemd answered.
pub const ANSWERED_BY_HEADER: &str = "flotilla-machine";

/// The task driving the connection to the other host; ended when dropped,
/// which closes the connection.
struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The other host's answer, cut off at a size and a deadline when set.
struct Bounded {
    inner: BodyDataStream,
    left: Option<u64>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _connection: Connection,
}

impl futures_core::Stream for Bounded {
    type Item = std::io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(std::io::Error::other(format!(
                "the answer took longer than {ANSWER_TIMEOUT:?}"
            )))));
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                if let Some(left) = &mut this.left {
                    let size = bytes.len() as u64;
                    if size > *left {
                        return Poll::Ready(Some(Err(std::io::Error::other(format!(
                            "the answer is larger than {MAX_ANSWER_BYTES} bytes"
                        )))));
                    }
                    *left -= size;
                }
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
