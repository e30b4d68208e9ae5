//! TCP options for the store's connections (Raft peers and clients) that
//! make a host which vanished without a reset (powered off, cut off) end its
//! connections within seconds instead of holding them open for minutes.

use std::time::Duration;

use tokio::net::TcpStream;

/// How long sent data may stay unacknowledged before the connection is
/// given up (a live peer's kernel acknowledges within milliseconds, however
/// busy the peer is).
const UNACKED_LIMIT: Duration = Duration::from_secs(2);

/// Keepalive on connections we only read from: idle time, probe interval,
/// probes.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(5), Duration::from_secs(1), 3);

/// Sets `TCP_USER_TIMEOUT` to [`UNACKED_LIMIT`]: data a live peer's kernel
/// would have acknowledged long ago ends the connection instead of queueing
/// behind it for minutes.
pub(super) fn limit_unacked(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(UNACKED_LIMIT)) {
        tracing::debug!("cannot set TCP_USER_TIMEOUT: {e}");
    }
}

/// Turns on TCP keepalive ([`KEEPALIVE`]) for a connection we only read
/// from: an idle one to a host that died without a reset then ends within
/// seconds instead of holding its task and socket forever.
pub(super) fn probe_when_idle(stream: &TcpStream) {
    let (idle, interval, probes) = KEEPALIVE;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(probes);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
}
