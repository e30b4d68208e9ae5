//! What the store's two listeners (peers, clients) share: TLS, and the
//! limits that bound what any caller, authenticated or not, can make a
//! member hold.
//!
//! * At most [`ListenerLimits::max_connections`] connections at a time; the
//!   next is accepted and closed at once (and logged once a minute), so the
//!   kernel's backlog never fills with connections nobody serves.
//! * A TLS handshake must finish within
//!   [`ListenerLimits::handshake_timeout`]: a caller that connects and says
//!   nothing holds its slot that long.
//! * Each frame obeys [`FrameLimits`]: a length cap checked from its header,
//!   memory that grows only as bytes arrive, and a deadline once it started.
//! * When the process is out of file descriptors (EMFILE, ENFILE) the accept
//!   loop says so once and pauses instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::codec::FrameLimits;
use crate::tls::stream::BoxStream;
use crate::tls::{Identity, ServerTls};

/// The limits of one listener; see the module docs. The daemon's come from
/// its configuration ([`crate::config::Config::listener_limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// What one frame may cost.
    pub frame: FrameLimits,
}

/// How long the accept loop pauses when the process has no file descriptor
/// left.
const OUT_OF_FILES_PAUSE: Duration = Duration::from_millis(200);
/// How often a refusal for the same reason is logged again.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// One accepted connection, ready for its protocol.
pub struct Accepted {
    /// Its stream: TLS when the listener has TLS.
    pub stream: BoxStream,
    /// Who it is, when the listener has TLS; `None` on a plaintext
    /// (loopback-only) listener.
    pub who: Option<Identity>,
    /// Where it came from.
    pub from: SocketAddr,
    /// Its slot among [`ListenerLimits::max_connections`]; freed on drop.
    pub slot: OwnedSemaphorePermit,
}

/// A listener with its TLS and limits.
pub struct Listener {
    tcp: TcpListener,
    tls: Option<Arc<ServerTls>>,
    limits: ListenerLimits,
    slots: Arc<Semaphore>,
    what: &'static str,
}

/// Logs a recurring condition at most once per [`LOG_EVERY`].
struct Throttle(Option<Instant>);

impl Throttle {
    fn due(&mut self) -> bool {
        let due = self.0.is_none_or(|last| last.elapsed() >= LOG_EVERY);
        if due {
            self.0 = Some(Instant::now());
        }
        due
    }
}

impl Listener {
    /// Wraps `tcp`; `what` names it in logs ("peer", "client").
    pub fn new(
        tcp: TcpListener,
        tls: Option<Arc<ServerTls>>,
        limits: ListenerLimits,
        what: &'static str,
    ) -> Listener {
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        Listener {
            tcp,
            tls,
            limits,
            slots,
            what,
        }
    }

    /// The limits, for the protocol's frame reads.
    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// Accepts connections forever; runs `serve` on each one that gets a
    /// slot and completes its handshake, in a task of its own.
    pub async fn serve<F, Fut>(self, serve: F)
    where
        F: Fn(Accepted) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let serve = Arc::new(serve);
        let mut full = Throttle(None);
        let mut out_of_files = Throttle(None);
        loop {
            let (tcp, from) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) if is_out_of_files(&e) => {
                    if out_of_files.due() {
                        tracing::error!(
                            "{} listener: out of file descriptors ({e}); pausing accepts \
                             (raise LimitNOFILE, or lower max_connections)",
                            self.what
                        );
                    }
                    tokio::time::sleep(OUT_OF_FILES_PAUSE).await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!("{} listener: accept failed: {e}", self.what);
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                if full.due() {
                    tracing::warn!(
                        "{} listener: {} connections open (max_connections); refusing {from} \
                         and others for now",
                        self.what,
                        self.limits.max_connections
                    );
                }
                drop(tcp);
                continue;
            };
            let tls = self.tls.clone();
            let timeout = self.limits.handshake_timeout;
            let serve = serve.clone();
            let what = self.what;
            tokio::spawn(async move {
                let (stream, who) = match handshake(tcp, tls.as_deref(), timeout).await {
                    Ok(done) => done,
                    Err(e) => {
                        tracing::info!("{what} connection from {from} refused: {e}");
                        return;
                    }
                };
                serve(Accepted {
                    stream,
                    who,
                    from,
                    slot,
                })
                .await;
            });
        }
    }
}

async fn handshake(
    tcp: TcpStream,
    tls: Option<&ServerTls>,
    timeout: Duration,
) -> Result<(BoxStream, Option<Identity>), crate::tls::TlsError> {
    let _ = tcp.set_nodelay(true);
    // A caller that went away without a reset (its host died) is noticed:
    // when what we send stays unacknowledged, or by keepalive probes on an
    // idle connection. Its task and slot end either way.
    super::sockets::limit_unacked(&tcp);
    super::sockets::probe_when_idle(&tcp);
    match tls {
        Some(tls) => {
            let (stream, who) = tls.accept(tcp, timeout).await?;
            Ok((stream, Some(who)))
        }
        None => Ok((Box::new(tcp), None)),
    }
}

fn is_out_of_files(e: &std::io::Error) -> bool {
    // EMFILE (24): this process; ENFILE (23): the whole system.
    matches!(e.raw_os_error(), Some(23 | 24))
}
