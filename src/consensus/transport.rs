//! Raft messages between members over TCP, as length-prefixed frames.
//!
//! Each frame is `[u32 length][format version byte][protobuf raft Message]`.
//! Every peer has one outbound connection, fed by a bounded queue: sending
//! never blocks the Raft thread, and when the queue is full or the peer is down
//! messages are dropped. That is safe: Raft retransmits, and the peer is
//! reported unreachable so the leader stops pipelining to it. Reconnects back
//! off up to two seconds. TLS wraps the stream here when it comes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::io::BufWriter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::codec::{self, CodecError, MemberInfo};
use super::runner::{self, Handle, Msg};

/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

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
}

/// The TCP transport: one writer task per peer, created as members appear.
pub struct TcpTransport {
    me: u64,
    runtime: tokio::runtime::Handle,
    peers: Arc<Mutex<HashMap<u64, Peer>>>,
    node: Handle,
}

impl TcpTransport {
    /// A transport for member `me` whose writer tasks run on `runtime`.
    pub fn new(me: u64, runtime: tokio::runtime::Handle, node: Handle) -> Self {
        TcpTransport {
            me,
            runtime,
            peers: Arc::default(),
            node,
        }
    }
}

impl runner::Transport for TcpTransport {
    fn send(&self, messages: Vec<Message>) {
        let peers = self.peers.lock().expect("peer table lock");
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
        let mut peers = self.peers.lock().expect("peer table lock");
        peers.retain(|id, peer| members.get(id).is_some_and(|m| m.peer_addr == peer.addr));
        for (id, member) in members {
            if *id == self.me || peers.contains_key(id) {
                continue;
            }
            let (queue, rx) = mpsc::channel(QUEUE);
            self.runtime.spawn(write_to_peer(
                *id,
                member.peer_addr.clone(),
                rx,
                self.node.clone(),
            ));
            peers.insert(
                *id,
                Peer {
                    addr: member.peer_addr.clone(),
                    queue,
                },
            );
        }
    }
}

/// Keeps one connection to a peer and writes its queue to it; ends when the
/// peer is removed (its queue's sender is dropped).
async fn write_to_peer(id: u64, addr: String, mut queue: mpsc::Receiver<Message>, node: Handle) {
    use tokio::io::AsyncWriteExt;
    let mut backoff = Duration::from_millis(50);
    loop {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
            Ok(Ok(stream)) => stream,
            _ => {
                let _ = node.send(Msg::Unreachable(id));
                // Drop what queued up while the peer was away; Raft resends.
                while queue.try_recv().is_ok() {}
                if queue.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let _ = stream.set_nodelay(true);
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

/// Accepts peer connections and hands their messages to the node thread.
pub async fn serve_peers(listener: TcpListener, node: Handle) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let node = node.clone();
        tokio::spawn(async move {
            let mut stream = tokio::io::BufReader::new(stream);
            loop {
                match codec::read_frame(&mut stream).await {
                    Ok(Some(frame)) => match decode(&frame) {
                        Ok(message) => {
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
