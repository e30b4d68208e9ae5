//! A seeded fault layer between real Raft transports on loopback
//! (tests/transport_faults.rs).
//!
//! Each member's peer address, the one its `MemberInfo` carries and every
//! other member's [`flotilla::consensus::transport::TcpTransport`] dials,
//! is a proxy of this layer; the proxy relays each connection to the
//! member's real peer listener (`transport::serve_peers`) wherever that
//! listens now, so a member restarted on a new port keeps its address. The
//! transport's own code runs on both ends, unchanged: dialing and
//! reconnecting with back-off, framing, the snapshot streams and their
//! confirmation, the listener's frame limits. No seam in the production
//! code is needed.
//!
//! The first frame of each connection names the sender (an ordinary frame's
//! message, or a snapshot stream's header), so the layer knows each
//! connection's direction, and can:
//! - delay what it relays (a latency drawn per connection, plus jitter;
//!   bytes of one connection stay in order, as TCP's do);
//! - cut a connection: at once, losing whatever it holds ("reset"), or
//!   closing the sender's side while what it already took still arrives,
//!   late ("late"), so the sender's next connection can overtake the old
//!   one: messages reordered across reconnects;
//! - block a direction (`from` to `to`): its connections are cut and new
//!   ones are closed after their first frame, so a partition can be
//!   two-way or one-way;
//! - refuse everything to a member that is down.
//!
//! Real threads and real time run underneath, so a seed fixes the faults
//! a run draws, not its interleavings.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla::consensus::{codec, transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::rng::Rng;

/// How a connection is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Both sides close at once; what was in flight is lost.
    Reset,
    /// The sender's side closes; what the layer already took arrives this
    /// many milliseconds late, then the receiver's side closes.
    Late(u64),
}

/// What the layer did and saw, for the run's coverage report.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Connections relayed.
    pub connections: u64,
    /// Connections closed after their first frame: the direction was
    /// blocked or the member down.
    pub refused: u64,
    /// Connections cut at once.
    pub resets: u64,
    /// Connections cut with their tail delivered late.
    pub late_cuts: u64,
    /// Snapshot streams relayed: (from, to, bytes of data announced).
    pub snapshot_streams: Vec<(u64, u64, u64)>,
    /// Snapshot streams relayed whole to their receiver's listener (the
    /// confirmation may still be lost): (from, to, bytes).
    pub snapshots_relayed: Vec<(u64, u64, u64)>,
    /// Snapshot streams whose receiver's confirmation came back through
    /// the layer: (from, to, bytes).
    pub snapshots_confirmed: Vec<(u64, u64, u64)>,
}

struct Link {
    from: u64,
    to: u64,
    cut: watch::Sender<Option<Cut>>,
}

struct State {
    rng: Rng,
    /// Where each running member's real peer listener is.
    targets: BTreeMap<u64, SocketAddr>,
    /// Directions (from, to) that carry nothing.
    blocked: BTreeSet<(u64, u64)>,
    links: HashMap<u64, Link>,
    next_link: u64,
    /// The most latency a connection gets, in milliseconds.
    max_latency_ms: u64,
    counts: Counts,
}

/// The fault layer; see the module docs.
pub struct Net {
    state: Mutex<State>,
}

impl Net {
    /// A layer drawing latencies and cut modes from `rng`; each connection
    /// gets up to `max_latency_ms` of latency.
    pub fn new(rng: Rng, max_latency_ms: u64) -> Arc<Net> {
        Arc::new(Net {
            state: Mutex::new(State {
                rng,
                targets: BTreeMap::new(),
                blocked: BTreeSet::new(),
                links: HashMap::new(),
                next_link: 0,
                max_latency_ms,
                counts: Counts::default(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fault layer lock")
    }

    /// Opens the proxy for member `to` (on the current runtime) and returns
    /// its address: the member's peer address for the whole run.
    pub async fn listen(self: &Arc<Net>, to: u64) -> String {
        let proxy = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback proxy");
        let addr = proxy.local_addr().expect("the proxy's address");
        let net = self.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = proxy.accept().await {
                tokio::spawn(relay(net.clone(), to, conn));
            }
        });
        addr.to_string()
    }

    /// Member `id`'s real listener is at `target` now; `None`: it is down,
    /// and every connection to or from it is cut.
    pub fn set_target(&self, id: u64, target: Option<SocketAddr>) {
        let mut state = self.lock();
        match target {
            Some(target) => {
                state.targets.insert(id, target);
            }
            None => {
                state.targets.remove(&id);
                cut_where(&mut state, Cut::Reset, |l| l.from == id || l.to == id);
            }
        }
    }

    /// Stops the direction `from` → `to`: its connections are cut.
    pub fn block(&self, from: u64, to: u64) {
        let mut state = self.lock();
        state.blocked.insert((from, to));
        cut_where(&mut state, Cut::Reset, |l| l.from == from && l.to == to);
    }

    /// Every direction carries again.
    pub fn heal(&self) {
        self.lock().blocked.clear();
    }

    /// Whether any direction is blocked.
    pub fn partitioned(&self) -> bool {
        !self.lock().blocked.is_empty()
    }

    /// Cuts one open connection, drawn from the seed, in a mode drawn from
    /// it; false when none is open.
    pub fn cut_one(&self) -> bool {
        let mut state = self.lock();
        let mut ids: Vec<u64> = state.links.keys().copied().collect();
        if ids.is_empty() {
            return false;
        }
        ids.sort_unstable();
        let id = state.rng.pick(&ids);
        let how = draw_cut(&mut state.rng);
        cut_link(&mut state, id, how);
        true
    }

    /// Cuts every open connection from or to member `id`, each in a mode
    /// drawn from the seed.
    pub fn cut_member(&self, id: u64) {
        let mut state = self.lock();
        let mut ids: Vec<u64> = state
            .links
            .iter()
            .filter(|(_, l)| l.from == id || l.to == id)
            .map(|(k, _)| *k)
            .collect();
        ids.sort_unstable();
        for link in ids {
            let how = draw_cut(&mut state.rng);
            cut_link(&mut state, link, how);
        }
    }

    /// The open connections and blocked directions, for a failure report.
    pub fn describe(&self) -> String {
        let state = self.lock();
        let mut links: Vec<(u64, u64)> = state.links.values().map(|l| (l.from, l.to)).collect();
        links.sort_unstable();
        format!(
            "open connections (from, to) {links:?}, blocked {:?}, targets {:?}, {:?}",
            state.blocked, state.targets, state.counts
        )
    }

    /// What the layer did so far.
    pub fn counts(&self) -> Counts {
        self.lock().counts.clone()
    }

    /// Registers a connection from `from` to `to`: its target, latency and
    /// cut signal, or `None` when it must be refused.
    fn open(&self, from: u64, to: u64) -> Option<Opened> {
        let mut state = self.lock();
        let target = match state.targets.get(&to) {
            Some(target) if !state.blocked.contains(&(from, to)) => *target,
            _ => {
                state.counts.refused += 1;
                return None;
            }
        };
        let max = state.max_latency_ms;
        let latency = Duration::from_millis(state.rng.between(0, max));
        let id = state.next_link;
        state.next_link += 1;
        let (cut, cut_rx) = watch::channel(None);
        state.links.insert(id, Link { from, to, cut });
        state.counts.connections += 1;
        Some(Opened {
            id,
            target,
            latency,
            cut: cut_rx,
        })
    }

    fn close(&self, id: u64) {
        self.lock().links.remove(&id);
    }

    fn note_snapshot(&self, from: u64, to: u64, len: u64, stage: Stage) {
        let mut state = self.lock();
        let list = match stage {
            Stage::Opened => &mut state.counts.snapshot_streams,
            Stage::Relayed => &mut state.counts.snapshots_relayed,
            Stage::Confirmed => &mut state.counts.snapshots_confirmed,
        };
        list.push((from, to, len));
    }
}

/// How far a snapshot stream got through the layer.
#[derive(Clone, Copy)]
enum Stage {
    Opened,
    Relayed,
    Confirmed,
}

struct Opened {
    id: u64,
    target: SocketAddr,
    latency: Duration,
    cut: watch::Receiver<Option<Cut>>,
}

fn draw_cut(rng: &mut Rng) -> Cut {
    if rng.per_mille(500) {
        Cut::Reset
    } else {
        Cut::Late(rng.between(20, 300))
    }
}

fn cut_link(state: &mut State, id: u64, how: Cut) {
    if let Some(link) = state.links.remove(&id) {
        match how {
            Cut::Reset => state.counts.resets += 1,
            Cut::Late(_) => state.counts.late_cuts += 1,
        }
        let _ = link.cut.send(Some(how));
    }
}

fn cut_where(state: &mut State, how: Cut, matches: impl Fn(&Link) -> bool) {
    let mut ids: Vec<u64> = state
        .links
        .iter()
        .filter(|(_, l)| matches(l))
        .map(|(k, _)| *k)
        .collect();
    ids.sort_unstable();
    for id in ids {
        cut_link(state, id, how);
    }
}

/// The sender of a connection, from its first frame, and the length of
/// the snapshot data it announces when it opens a snapshot stream.
fn sender(first: &[u8]) -> Option<(u64, Option<u64>)> {
    if first.first() == Some(&0x80) {
        let (message, len) = transport::snapshot_header(first).ok()?;
        Some((message.from, Some(len as u64)))
    } else {
        Some((transport::decode(first).ok()?.from, None))
    }
}

/// Relays one connection to member `to`; see the module docs.
async fn relay(net: Arc<Net>, to: u64, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let Ok(Some(first)) = codec::read_frame(&mut client_read).await else {
        return;
    };
    let Some((from, snapshot)) = sender(&first) else {
        return;
    };
    let Some(opened) = net.open(from, to) else {
        return;
    };
    let Opened {
        id,
        target,
        latency,
        cut: mut cut_signal,
    } = opened;
    let Ok(upstream) = TcpStream::connect(target).await else {
        net.close(id);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    // A snapshot stream is whole once its header, its data and the data's
    // frame headers went through.
    let whole = snapshot.map(|len| {
        let chunks = len.div_ceil(transport::CHUNK as u64);
        4 + first.len() as u64 + len + 4 * chunks
    });
    if let Some(len) = snapshot {
        net.note_snapshot(from, to, len, Stage::Opened);
    }

    // Toward the member: each piece is held until its time, in order.
    let extra = Arc::new(AtomicU64::new(0));
    let (pieces, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut framed = (first.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&first);
    let _ = pieces.send((Instant::now() + latency, framed));
    let late = extra.clone();
    let relayed = net.clone();
    let mut forward = tokio::spawn(async move {
        let mut written = 0;
        while let Some((at, bytes)) = queued.recv().await {
            let at = at + Duration::from_millis(late.load(Ordering::SeqCst));
            tokio::time::sleep_until(at).await;
            if upstream_write.write_all(&bytes).await.is_err() {
                return;
            }
            let before = written;
            written += bytes.len() as u64;
            if let (Some(whole), Some(len)) = (whole, snapshot)
                && before < whole
                && written >= whole
            {
                relayed.note_snapshot(from, to, len, Stage::Relayed);
            }
        }
        let _ = upstream_write.shutdown().await;
    });
    // Back to the sender: only a snapshot stream's confirmation.
    let note = net.clone();
    let back = tokio::spawn(async move {
        let mut byte = [0u8; 1];
        while let Ok(1..) = upstream_read.read(&mut byte).await {
            if let Some(len) = snapshot {
                note.note_snapshot(from, to, len, Stage::Confirmed);
            }
            if client_write.write_all(&byte).await.is_err() {
                return;
            }
        }
    });
    let mut jitter = Rng::new(id ^ latency.as_nanos() as u64);
    let mut last = Instant::now() + latency;
    let reading = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let at = (Instant::now() + latency + Duration::from_millis(jitter.below(3)))
                        .max(last);
                    last = at;
                    if pieces.send((at, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = reading => {
            // The sender closed: what is queued still arrives.
            drop(pieces);
            let _ = (&mut forward).await;
        }
        how = async { cut_signal.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
            match how {
                Some(Cut::Late(ms)) => {
                    extra.store(ms, Ordering::SeqCst);
                    back.abort();
                    drop(pieces);
                    drop(client_read);
                    let _ = (&mut forward).await;
                }
                _ => {
                    forward.abort();
                    back.abort();
                }
            }
        }
    }
    back.abort();
    net.close(id);
}
