//! Serving the API's router on a listener with the bounds an open port
//! needs: a deadline for a request's headers, a cap on open connections, and
//! a back-off when `accept` fails (the process out of file descriptors).
//!
//! `axum::serve` has none of them configurable: a client that opens a
//! connection and sends nothing (or one byte a minute) would hold a task and
//! a descriptor for ever, thousands of them exhaust the process's descriptors
//! (and with them the store's and the agent's), and then accept fails in a
//! loop. So each listener here runs its own accept loop and serves every
//! connection with hyper's HTTP/1 server, the header timeout armed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use crate::config::ApiLimits;

/// What a client over the cap reads before its connection closes.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
Connection: close\r\nContent-Length: 96\r\n\r\n\
{\"error\":{\"code\":503,\"message\":\"too many connections to this API (api_max_connections); retry\"}}";

/// A listener the API serves: TCP or the unix socket.
pub trait Accept: Send + 'static {
    /// One accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection, or why accepting failed.
    fn next(&mut self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
    /// Writes what it can of `bytes` without waiting (the over-cap answer).
    fn try_write(io: &Self::Io, bytes: &[u8]);
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn next(&mut self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(io, _)| io)
    }
    fn try_write(io: &Self::Io, bytes: &[u8]) {
        let _ = io.try_write(bytes);
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn next(&mut self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(io, _)| io)
    }
    fn try_write(io: &Self::Io, bytes: &[u8]) {
        let _ = io.try_write(bytes);
    }
}

/// Serves `app` on `listener` until the task is dropped, within `limits`;
/// `name` says which listener in the logs.
pub async fn serve<L: Accept>(mut listener: L, app: Router, limits: ApiLimits, name: String) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut failures = Backoff::new(limits.accept_backoff);
    let (mut refused, mut failed) = (Throttled::default(), Throttled::default());
    loop {
        let io = match listener.next().await {
            Ok(io) => io,
            Err(err) if is_per_connection(&err) => continue,
            Err(err) => {
                let pause = failures.failed();
                if let Some(count) = failed.tick() {
                    tracing::warn!(
                        "the API on {name} cannot accept connections: {err} ({count} \
                         failures in the last minute); retrying with pauses up to {:?} \
                         (is the process out of file descriptors? see LimitNOFILE and \
                         api_max_connections)",
                        limits.accept_backoff
                    );
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if failures.count > 0 {
            tracing::debug!(
                "the API on {name} accepts again after {} failed attempts",
                failures.count
            );
            failures = Backoff::new(limits.accept_backoff);
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            L::try_write(&io, BUSY);
            if let Some(count) = refused.tick() {
                tracing::warn!(
                    "the API on {name} serves {} connections (api_max_connections) and \
                     refused {count} more in the last minute",
                    limits.max_connections
                );
            }
            continue;
        };
        let app = app.clone();
        let timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _ = connection(io, app, timeout).await;
            drop(slot);
        });
    }
}

/// Serves HTTP/1 requests on one connection until either side closes it or
/// its client is slower than `header_timeout` sending a request's headers.
/// Public so the fuzz target drives the real server in memory.
pub async fn connection<I>(io: I, app: Router, header_timeout: Duration) -> hyper::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .await
}

/// An `accept` error that concerns only the connection being accepted
/// (gone before it was taken): take the next one at once.
fn is_per_connection(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}

/// Pauses between failed accepts: 10 ms, doubling up to a maximum.
struct Backoff {
    max: Duration,
    next: Duration,
    count: u64,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            max,
            next: Duration::from_millis(10).min(max),
            count: 0,
        }
    }

    /// One more failure: the pause to take now.
    fn failed(&mut self) -> Duration {
        self.count += 1;
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }
}

/// Counts events and says how many there were at most once a minute, so a
/// flood is logged without flooding the log.
#[derive(Default)]
struct Throttled {
    since: Option<Instant>,
    count: u64,
}

impl Throttled {
    /// One more event; `Some(count)` when it is time to log them.
    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        match self.since {
            Some(since) if since.elapsed() < Duration::from_secs(60) => None,
            _ => {
                self.since = Some(Instant::now());
                Some(std::mem::take(&mut self.count))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(parsed["error"]["code"], 503);
    }

    #[test]
    fn backoff_doubles_to_its_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(70));
        let pauses: Vec<u128> = (0..5).map(|_| backoff.failed().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 70, 70]);
        assert_eq!(backoff.count, 5);
    }

    #[test]
    fn throttled_reports_the_first_then_once_a_minute() {
        let mut throttled = Throttled::default();
        assert_eq!(throttled.tick(), Some(1));
        assert_eq!(throttled.tick(), None);
        assert_eq!(throttled.tick(), None);
        throttled.since = Some(Instant::now() - Duration::from_secs(61));
        assert_eq!(throttled.tick(), Some(3));
    }
}
