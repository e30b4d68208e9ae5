//! Raft messages between members over TCP, as length-prefixed frames.
//!
//! Each frame is `[u32 length][format version byte][protobuf raft Message]`.
//! Every peer has one outbound connection, fed by a bounded queue: sending
//! never blocks the Raft thread, and when the queue is full or the peer is down
//! messages are dropped. That is safe: Raft retransmits, and the peer is
//! reported unreachable so the leader stops pipelining to it. Reconnects back
//! off up to one second. TLS wraps the stream here when it comes.
//!
//! A peer whose host died (power off, a killed network namespace) sends no
//! reset: the kernel would keep a connection to it "open" and queue our
//! messages into it for minutes, and once the peer was back, TCP's backed-off
//! retransmission could take seconds more to find out. So outbound
//! connections carry `TCP_USER_TIMEOUT` (see `sockets.rs`):
//! unacknowledged data that old ends the connection. And a peer that dials in is evidently
//! back, so its writer, if it is waiting to reconnect, tries again at once.
//! Inbound connections carry TCP keepalive so a dead peer's reader ends too.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::io::BufWriter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use super::codec::{self, CodecError, MemberInfo};
use super::runner::{self, Handle, Msg};
use super::sockets::{limit_unacked, probe_when_idle};

/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first pause before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

fn encode(message: &Message) -> Vec<u8> {
    let mut frame = vec![codec::FORMAT_VERSION];
    message
        .write_to_vec(&mut frame)
        .expect("protobuf encoding of an in-memory message cannot fail");
    frame
}

fn decode(frame: &[u8]) -> Result<Message, CodecError> {
    let (&version, body) = frame
        .split_first()
        .ok_or_else(|| CodecError::Malformed("empty frame".into()))?;
    if !(codec::OLDEST_READABLE..=codec::FORMAT_VERSION).contains(&version) {
        return Err(CodecError::Version { found: version });
    }
    Message::parse_from_bytes(body).map_err(|e| CodecError::Malformed(e.to_string()))
}

struct Peer {
    addr: String,
    queue: mpsc::Sender<Message>,
    /// Woken when this peer dials in: it is reachable again.
    back: Arc<Notify>,
}

/// The peers' writers, shared by the transport (which sends through them)
/// and the peer listener (which tells a writer when its peer dialed in).
#[derive(Clone, Default)]
pub struct Peers(Arc<Mutex<HashMap<u64, Peer>>>);

impl Peers {
    /// Peer `id` connected to us: if its writer is waiting to reconnect, it
    /// tries at once instead of sitting out its back-off.
    fn dialed_in(&self, id: u64) {
        if let Some(peer) = self.0.lock().expect("peer table lock").get(&id) {
            peer.back.notify_one();
        }
    }
}

/// The TCP transport: one writer task per peer, created as members appear.
pub struct TcpTransport {
    me: u64,
    runtime: tokio::runtime::Handle,
    peers: Peers,
    node: Handle,
}

impl TcpTransport {
    /// A transport for member `me` whose writer tasks run on `runtime`;
    /// give the same `peers` to [`serve_peers`].
    pub fn new(me: u64, runtime: tokio::runtime::Handle, node: Handle, peers: Peers) -> Self {
        TcpTransport {
            me,
            runtime,
            peers,
            node,
        }
    }
}

impl runner::Transport for TcpTransport {
    fn send(&self, messages: Vec<Message>) {
        let peers = self.peers.0.lock().expect("peer table lock");
        for message in messages {
            let to = message.to;
            match peers.get(&to) {
                Some(peer) => {
                    if peer.queue.try_send(message).is_err() {
                        let _ = self.node.send(Msg::Unreachable(to));
                    }
                }
                None => tracing::debug!("no address for raft peer {to:x}; message dropped"),
            }
        }
    }

    fn set_peers(&self, members: &BTreeMap<u64, MemberInfo>) {
        let mut peers = self.peers.0.lock().expect("peer table lock");
        peers.retain(|id, peer| members.get(id).is_some_and(|m| m.peer_addr == peer.addr));
        for (id, member) in members {
            if *id == self.me || peers.contains_key(id) {
                continue;
            }
            let (queue, rx) = mpsc::channel(QUEUE);
            let back = Arc::new(Notify::new());
            self.runtime.spawn(write_to_peer(
                *id,
                member.peer_addr.clone(),
                rx,
                self.node.clone(),
                back.clone(),
            ));
            peers.insert(
                *id,
                Peer {
                    addr: member.peer_addr.clone(),
                    queue,
                    back,
                },
            );
        }
    }
}

/// Connects to a peer within [`CONNECT_TIMEOUT`], with [`limit_unacked`] set.
/// `None` when it cannot, or when `back` says to start over at once.
async fn dial(addr: &str, back: &Notify) -> Option<TcpStream> {
    let attempt = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
    let stream = tokio::select! {
        connected = attempt => connected.ok()?.ok()?,
        () = back.notified() => return None,
    };
    // Connected: a "peer is back" from before this is news no longer.
    tokio::select! {
        biased;
        () = back.notified() => {}
        () = std::future::ready(()) => {}
    }
    let _ = stream.set_nodelay(true);
    limit_unacked(&stream);
    Some(stream)
}

/// Keeps one connection to a peer and writes its queue to it; ends when the
/// peer is removed (its queue's sender is dropped).
async fn write_to_peer(
    id: u64,
    addr: String,
    mut queue: mpsc::Receiver<Message>,
    node: Handle,
    back: Arc<Notify>,
) {
    use tokio::io::AsyncWriteExt;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let Some(stream) = dial(&addr, &back).await else {
            let _ = node.send(Msg::Unreachable(id));
            // Drop what queued up while the peer was away; Raft resends.
            while queue.try_recv().is_ok() {}
            if queue.is_closed() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(MAX_BACKOFF),
                () = back.notified() => backoff = FIRST_BACKOFF,
            }
            continue;
        };
        backoff = FIRST_BACKOFF;
        let mut writer = BufWriter::new(stream);
        loop {
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut failed = codec::write_frame(&mut writer, &encode(&first))
                .await
                .is_err();
            while !failed {
                match queue.try_recv() {
                    Ok(next) => {
                        failed = codec::write_frame(&mut writer, &encode(&next))
                            .await
                            .is_err()
                    }
                    Err(_) => break,
                }
            }
            if failed || writer.flush().await.is_err() {
                let _ = node.send(Msg::Unreachable(id));
                break;
            }
        }
    }
}

/// Accepts peer connections and hands their messages to the node thread;
/// `peers` is the transport's, so a peer that dials in is redialled at once.
pub async fn serve_peers(listener: TcpListener, node: Handle, peers: Peers) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        probe_when_idle(&stream);
        let node = node.clone();
        let peers = peers.clone();
        tokio::spawn(async move {
            let mut stream = tokio::io::BufReader::new(stream);
            let mut greeted = false;
            loop {
                match codec::read_frame(&mut stream).await {
                    Ok(Some(frame)) => match decode(&frame) {
                        Ok(message) => {
                            if !greeted {
                                greeted = true;
                                peers.dialed_in(message.from);
                            }
                            if node.send(Msg::Raft(message)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!("dropping connection from peer {from}: {e}");
                            return;
                        }
                    },
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!("peer connection from {from} ended: {e}");
                        return;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_version_and_refuse_others() {
        let m = Message {
            to: 7,
            term: 3,
            ..Message::default()
        };
        let frame = encode(&m);
        assert_eq!(frame[0], codec::FORMAT_VERSION);
        assert_eq!(decode(&frame).unwrap(), m);
        let mut newer = frame.clone();
        newer[0] = codec::FORMAT_VERSION + 1;
        assert!(matches!(decode(&newer), Err(CodecError::Version { .. })));
        assert!(decode(&[]).is_err());
    }
}
