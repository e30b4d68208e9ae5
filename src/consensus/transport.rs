//! Raft messages between members over TCP, as length-prefixed frames.
//!
//! Each frame is `[u32 length][format version byte][protobuf raft Message]`.
//! Every peer has one outbound connection, fed by a bounded queue: sending
//! never blocks the Raft thread, and when the queue is full or the peer is down
//! messages are dropped. That is safe: Raft retransmits, and the peer is
//! reported unreachable so the leader stops pipelining to it. Reconnects back
//! off up to one second.
//!
//! With TLS (the cluster's normal setting) every peer connection is mutual
//! TLS: a member dials only peers whose certificate names the member it
//! meant to reach, and accepts only connections holding a member
//! certificate. Every Raft message received must then come `from` the Raft
//! id of the member its certificate names, that member must be a current
//! one (or the address book of a member still joining, or vouched for, see
//! below), and it must be addressed to this member; anything else is
//! dropped with the connection, before the Raft node sees it ([`admit`]).
//!
//! A member's writers and admission follow the membership it has applied,
//! so a member behind the addition of a newcomer could neither answer nor
//! (with TLS) hear it, and once the newcomer led it never caught up. Members
//! therefore announce their applied membership to each other
//! ([`super::announce`]): the listener offers to hear announcements on an
//! ordinary connection (after the first Raft message it admits, or after
//! [`OFFER_AFTER`] without any, as a peer's writer dials before it has
//! anything to say), the writer reads its connection for that offer and
//! then sends its member's announcement, and a new one whenever that
//! membership changes. An announcement is judged like a message
//! ([`admit_announcement`]); when it is newer than this member's own
//! membership, the members it names that this one does not know get a
//! writer and are admitted until this member's own applied membership is as
//! new. Releases before announcements neither offer (so they are sent
//! none) nor read the offer (it stays in their socket buffer); snapshot
//! streams are offered nothing, since they open with their header at once,
//! and a sender skips an offer made before its confirmation.
//!
//! A peer whose host died (power off, a killed network namespace) sends no
//! reset: the kernel would keep a connection to it "open" and queue our
//! messages into it for minutes, and once the peer was back, TCP's backed-off
//! retransmission could take seconds more to find out. So outbound
//! connections carry `TCP_USER_TIMEOUT` (see `sockets.rs`):
//! unacknowledged data that old ends the connection. And a peer that dials in is evidently
//! back, so its writer, if it is waiting to reconnect, tries again at once.
//! Inbound connections carry TCP keepalive so a dead peer's reader ends too.
//!
//! A snapshot does not fit the ordinary stream: it can outgrow any frame (a
//! store of 100k units makes one of hundreds of MiB) and, sent there, would
//! hold up heartbeats for as long as it takes. Each `MsgSnapshot` gets a
//! connection of its own: a header frame starting with [`SNAPSHOT_STREAM`]
//! (the message without its data, and the data's length), then the data in
//! [`CHUNK`]-sized frames, written as fast as the receiver reads them (TCP's
//! flow control paces the sender), then one byte back from the receiver once
//! it has the whole snapshot and handed it to its node. Only then is the
//! snapshot reported delivered ([`Msg::SnapshotSent`]); any failure on the
//! way reports it failed, and Raft sends a fresh one later. The sender reads
//! the data from the snapshot's file as it writes (the log view keeps no copy
//! in memory, see `storage::LogStore`), so a large snapshot costs it a chunk
//! or two of memory, not the whole.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncWrite, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, watch};

use super::announce::{self, Announcement, Book};
use super::codec::{self, CodecError, FrameLimits, MemberInfo};
use super::listener::{Accepted, Listener};
use super::node::member_id;
use super::runner::{self, Handle, Msg};
use super::sockets::limit_unacked;
use super::storage::snapshot_file_name;
use crate::tls::stream::BoxStream;
use crate::tls::{ClientTls, Identity, Role};

/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first pause before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// First byte of the frame that opens a snapshot stream; an ordinary frame
/// starts with the format version, which is far below it.
const SNAPSHOT_STREAM: u8 = 0x80;
/// Snapshot data travels in frames of this size.
pub const CHUNK: usize = 4 * 1024 * 1024;
/// The largest snapshot a member accepts (bounds what a peer can make it hold).
const MAX_SNAPSHOT: u64 = 16 * 1024 * 1024 * 1024;
/// The longest a snapshot stream may go without progress, either way.
const SNAPSHOT_STALL: Duration = Duration::from_secs(30);
/// The receiver's confirmation that it has the whole snapshot.
const SNAPSHOT_RECEIVED: u8 = 1;
/// How long the peer listener waits for a connection's first frame before
/// it offers announcements anyway (see [`peer_connection`]).
const OFFER_AFTER: Duration = Duration::from_millis(200);
/// How long a frame from the listener may take to arrive once begun.
const OFFER_DEADLINE: Duration = Duration::from_secs(10);

fn encode(message: &Message) -> Vec<u8> {
    let mut frame = vec![codec::FORMAT_VERSION];
    message
        .write_to_vec(&mut frame)
        .expect("protobuf encoding of an in-memory message cannot fail");
    frame
}

/// Decodes one ordinary peer frame (version byte, protobuf Raft message).
/// Public for the fuzz target (`fuzz/fuzz_targets/peer_frame.rs`).
pub fn decode(frame: &[u8]) -> Result<Message, CodecError> {
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

/// The peers' writers and the current members, shared by the transport
/// (which sends through the writers) and the peer listener (which tells a
/// writer when its peer dialed in, admits only current members, and
/// records the members peers announce).
#[derive(Clone)]
pub struct Peers {
    table: Arc<Mutex<PeerTable>>,
    tls: Option<Arc<ClientTls>>,
    /// The announcement frame of this member's applied membership, for
    /// every writer whose peer offered to hear it (`None`: nothing to say).
    announcement: Arc<watch::Sender<Option<Arc<Vec<u8>>>>>,
}

#[derive(Default)]
struct PeerTable {
    writers: HashMap<u64, Peer>,
    /// Every member this one admits (itself included), by Raft id: its
    /// name; [`Book::members`], kept ready for [`admit`].
    members: BTreeMap<u64, String>,
    /// The applied membership and the members announcements vouched for.
    book: Book,
    /// Set by [`TcpTransport::new`]: what starting a writer needs.
    spawner: Option<Spawner>,
}

#[derive(Clone)]
struct Spawner {
    me: u64,
    runtime: tokio::runtime::Handle,
    node: Handle,
}

impl Peers {
    /// An empty table whose writers dial with `tls` (`None`: plaintext).
    pub fn new(tls: Option<Arc<ClientTls>>) -> Peers {
        Peers {
            table: Arc::default(),
            tls,
            announcement: Arc::new(watch::Sender::new(None)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PeerTable> {
        self.table.lock().expect("peer table lock")
    }

    /// Brings the writers and the admitted names in line with the book:
    /// a writer for every member but this one, redialled where its address
    /// changed, stopped where the member is gone.
    fn sync(&self, table: &mut PeerTable) {
        let wanted = table.book.members();
        table.members = wanted.iter().map(|(id, m)| (*id, m.name.clone())).collect();
        let Some(spawner) = table.spawner.clone() else {
            return;
        };
        let writers = &mut table.writers;
        writers.retain(|id, peer| wanted.get(id).is_some_and(|m| m.peer_addr == peer.addr));
        for (id, member) in wanted {
            if id == spawner.me || writers.contains_key(&id) {
                continue;
            }
            let (queue, rx) = mpsc::channel(QUEUE);
            let back = Arc::new(Notify::new());
            let addr = member.peer_addr.clone();
            spawner.runtime.spawn(write_to_peer(
                id,
                member,
                rx,
                spawner.node.clone(),
                back.clone(),
                self.tls.clone(),
                self.announcement.subscribe(),
            ));
            writers.insert(id, Peer { addr, queue, back });
        }
    }

    /// Records an announcement from an admitted sender ([`Book::vouch`]);
    /// true when it vouched for members this one did not know.
    fn vouch(&self, announcement: &Announcement) -> bool {
        let mut table = self.lock();
        if !table.book.vouch(announcement) {
            return false;
        }
        tracing::info!(
            "raft peer {} announced members this one has not applied yet (as of log index {}): {}",
            announcement.name,
            announcement.index,
            table
                .book
                .vouched()
                .values()
                .map(|m| format!("{} at {}", m.name, m.peer_addr))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.sync(&mut table);
        true
    }

    /// Peer `id` connected to us: if its writer is waiting to reconnect, it
    /// tries at once instead of sitting out its back-off.
    fn dialed_in(&self, id: u64) {
        if let Some(peer) = self.lock().writers.get(&id) {
            peer.back.notify_one();
        }
    }
}

/// Whether a Raft message that arrived on a connection authenticated as
/// `who` may reach member `me`, whose known members are `members` (empty
/// while it has not even an address book); `who` is `None` on a plaintext,
/// loopback-only listener. See the module docs.
pub fn admit(
    who: Option<&Identity>,
    message: &Message,
    me: u64,
    members: &BTreeMap<u64, String>,
) -> Result<(), String> {
    let Some(who) = who else {
        return Ok(());
    };
    let claimed = certified_member(who)?;
    if message.from != claimed {
        return Err(format!(
            "{who} (raft id {claimed:x}) sent a message from raft id {:x}",
            message.from
        ));
    }
    is_admitted(who, claimed, members)?;
    if message.to != me {
        return Err(format!(
            "{who} sent a message for raft id {:x}, not this member ({me:x})",
            message.to
        ));
    }
    Ok(())
}

/// Whether an announcement that arrived on a connection authenticated as
/// `who` may be recorded by a member whose admitted members are `members`:
/// the rules of [`admit`], with the announcement's sender in place of a
/// message's. Under TLS the sender must hold a member certificate, announce
/// as the member it names, and be a member this one admits; `who` is `None`
/// on a plaintext, loopback-only listener, where anything is heard.
pub fn admit_announcement(
    who: Option<&Identity>,
    announcement: &Announcement,
    members: &BTreeMap<u64, String>,
) -> Result<(), String> {
    let Some(who) = who else {
        return Ok(());
    };
    let claimed = certified_member(who)?;
    if announcement.from != claimed || announcement.name != who.name {
        return Err(format!(
            "{who} (raft id {claimed:x}) sent an announcement as {} (raft id {:x})",
            announcement.name, announcement.from
        ));
    }
    is_admitted(who, claimed, members)
}

/// The Raft id of the member `who`'s certificate names; an error when it
/// is no member certificate.
fn certified_member(who: &Identity) -> Result<u64, String> {
    if who.role != Role::Member {
        return Err(format!("{who} holds no member certificate"));
    }
    Ok(member_id(&who.name))
}

/// Whether `who`, Raft id `claimed`, is among the admitted `members`
/// (empty while this member has not even an address book: then anyone).
fn is_admitted(
    who: &Identity,
    claimed: u64,
    members: &BTreeMap<u64, String>,
) -> Result<(), String> {
    if !members.is_empty() && members.get(&claimed) != Some(&who.name) {
        return Err(format!("{who} is not a current member"));
    }
    Ok(())
}

/// The TCP transport: one writer task per peer, created as members appear.
pub struct TcpTransport {
    runtime: tokio::runtime::Handle,
    peers: Peers,
    node: Handle,
    /// Where snapshot data is read from when a `MsgSnapshot` comes without
    /// it ([`super::storage::Durable::snapshot_dir`]).
    snapshot_dir: Option<PathBuf>,
}

impl TcpTransport {
    /// A transport for member `me` whose writer tasks run on `runtime`;
    /// give the same `peers` to [`serve_peers`]. `snapshot_dir` is the
    /// disk's [`super::storage::Durable::snapshot_dir`].
    pub fn new(
        me: u64,
        runtime: tokio::runtime::Handle,
        node: Handle,
        peers: Peers,
        snapshot_dir: Option<PathBuf>,
    ) -> Self {
        {
            let mut table = peers.lock();
            table.book = Book::new(me);
            table.spawner = Some(Spawner {
                me,
                runtime: runtime.clone(),
                node: node.clone(),
            });
        }
        TcpTransport {
            runtime,
            peers,
            node,
            snapshot_dir,
        }
    }
}

impl runner::Transport for TcpTransport {
    fn send(&self, messages: Vec<Message>) {
        let table = self.peers.lock();
        for message in messages {
            let to = message.to;
            if message.get_msg_type() == MessageType::MsgSnapshot {
                let peer = table
                    .writers
                    .get(&to)
                    .map(|p| (p.addr.clone(), table.members.get(&to).cloned()));
                self.runtime.spawn(stream_snapshot(
                    peer,
                    message,
                    self.snapshot_dir.clone(),
                    self.node.clone(),
                    self.peers.tls.clone(),
                ));
                continue;
            }
            match table.writers.get(&to) {
                Some(peer) => {
                    if peer.queue.try_send(message).is_err() {
                        let _ = self.node.send(Msg::Unreachable(to));
                    }
                }
                None => tracing::debug!("no address for raft peer {to:x}; message dropped"),
            }
        }
    }

    fn set_peers(&self, members: &BTreeMap<u64, MemberInfo>, at: u64) {
        let mut table = self.peers.lock();
        table.book.set_own(members, at);
        self.peers.sync(&mut table);
        let frame = table.book.announcement().and_then(|a| {
            let frame = announce::encode(&a);
            if frame.is_none() {
                tracing::warn!(
                    "this member's membership exceeds an announcement's limits \
                     ({} members); peers behind on it are not told",
                    members.len()
                );
            }
            frame
        });
        self.peers.announcement.send_replace(frame.map(Arc::new));
    }
}

/// Sends one snapshot on a connection of its own and reports how it ended;
/// `peer` is the peer's address and name. A message without data takes it
/// from its file under `dir`, a chunk at a time: the sender never holds the
/// whole snapshot in memory.
async fn stream_snapshot(
    peer: Option<(String, Option<String>)>,
    message: Message,
    dir: Option<PathBuf>,
    node: Handle,
    tls: Option<Arc<ClientTls>>,
) {
    let to = message.to;
    let sent = async {
        let (addr, name) = peer.ok_or_else(|| format!("no address for raft peer {to:x}"))?;
        let snapshot = message.get_snapshot();
        let file = match &dir {
            Some(dir) if snapshot.get_data().is_empty() => {
                let path = dir.join(snapshot_file_name(snapshot.get_metadata()));
                // Opened before connecting: a newer snapshot may replace
                // the file, and an open file outlives its name.
                let unreadable = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
                let file = std::fs::File::open(&path).map_err(unreadable)?;
                let len = file.metadata().map_err(unreadable)?.len();
                Some((read_in_background(file), len))
            }
            _ => None,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        limit_unacked(&tcp);
        let mut stream = secure(tcp, tls.as_deref(), name.as_deref().unwrap_or_default())
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let sent = match file {
            Some((file, len)) => send_snapshot(&mut stream, &message, file, len).await,
            None => {
                let data = message.get_snapshot().get_data();
                send_snapshot(&mut stream, &message, data, data.len() as u64).await
            }
        };
        sent.map_err(|e| format!("sending to {addr}: {e}"))
    };
    let delivered = match sent.await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("snapshot for raft peer {to:x} not delivered: {e}");
            false
        }
    };
    let _ = node.send(Msg::SnapshotSent { to, delivered });
}

/// A file's bytes as an async reader: read on a blocking thread into a
/// pipe one chunk deep, so a slow receiver holds the reads back and no more
/// than a chunk or two of the file is in memory at once.
fn read_in_background(mut file: std::fs::File) -> tokio::io::DuplexStream {
    use tokio::io::AsyncWriteExt;
    let (reader, mut writer) = tokio::io::duplex(CHUNK);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut chunk = vec![0u8; CHUNK];
        // A read error ends the pipe early: the sender sees the data end
        // before its announced length and reports the snapshot failed.
        while let Ok(n @ 1..) = file.read(&mut chunk) {
            if runtime.block_on(writer.write_all(&chunk[..n])).is_err() {
                return;
            }
        }
    });
    reader
}

/// Writes a snapshot stream (header, then the `len` bytes of `data` in
/// chunks, read as they are sent) and waits for the receiver's
/// confirmation. Each step must progress within [`SNAPSHOT_STALL`]; TCP's
/// flow control paces the reads.
pub async fn send_snapshot<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    message: &Message,
    data: impl AsyncRead + Unpin,
    len: u64,
) -> Result<(), CodecError> {
    send_snapshot_within(stream, message, data, len, SNAPSHOT_STALL).await
}

/// [`send_snapshot`] with each step allowed `stall` instead of
/// [`SNAPSHOT_STALL`]: tests/transport_faults.rs stalls streams on purpose
/// and must not wait 30 s for each.
pub async fn send_snapshot_within<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    message: &Message,
    mut data: impl AsyncRead + Unpin,
    len: u64,
    stall: Duration,
) -> Result<(), CodecError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stalled = || CodecError::Io(std::io::ErrorKind::TimedOut.into());
    let mut header = message.clone();
    header.mut_snapshot().data = Default::default();
    let mut frame = vec![SNAPSHOT_STREAM, codec::FORMAT_VERSION];
    frame.extend_from_slice(&len.to_be_bytes());
    header
        .write_to_vec(&mut frame)
        .expect("protobuf encoding of an in-memory message cannot fail");
    let mut writer = BufWriter::new(&mut *stream);
    tokio::time::timeout(stall, codec::write_frame(&mut writer, &frame))
        .await
        .map_err(|_| stalled())??;
    let mut chunk = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        data.read_exact(&mut chunk[..want]).await?;
        tokio::time::timeout(stall, codec::write_frame(&mut writer, &chunk[..want]))
            .await
            .map_err(|_| stalled())??;
        left -= want as u64;
    }
    tokio::time::timeout(stall, writer.flush())
        .await
        .map_err(|_| stalled())??;
    drop(writer);
    tokio::time::timeout(stall, confirmation(stream))
        .await
        .map_err(|_| stalled())?
}

/// Reads the receiver's confirmation of a snapshot stream. A listener that
/// found the stream slow to start may have offered announcements first (see
/// [`peer_connection`]): that frame starts with a zero byte (its length's
/// first), never the confirmation's, and is skipped.
async fn confirmation<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(), CodecError> {
    use tokio::io::AsyncReadExt;
    loop {
        let mut ack = [0u8];
        stream.read_exact(&mut ack).await?;
        match ack[0] {
            SNAPSHOT_RECEIVED => return Ok(()),
            0 => {
                let mut rest = [0u8; 3];
                stream.read_exact(&mut rest).await?;
                let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
                if len > announce::MAX_OFFER {
                    return Err(CodecError::TooLarge(len));
                }
                let mut frame = vec![0u8; len];
                stream.read_exact(&mut frame).await?;
                if !announce::is_capability(&frame) {
                    return Err(CodecError::Malformed(
                        "unexpected frame instead of the snapshot confirmation".into(),
                    ));
                }
            }
            other => {
                return Err(CodecError::Malformed(format!(
                    "unexpected snapshot confirmation {other}"
                )));
            }
        }
    }
}

/// Reads the data of a snapshot stream whose first frame was `header`, and
/// returns the whole message; `admitted` judges the header's message before
/// any data is read.
pub async fn receive_snapshot<R: AsyncRead + Unpin>(
    reader: &mut R,
    header: &[u8],
    admitted: &(dyn Fn(&Message) -> Result<(), String> + Sync),
) -> Result<Message, CodecError> {
    receive_snapshot_within(reader, header, admitted, SNAPSHOT_STALL).await
}

/// [`receive_snapshot`], each frame allowed `stall` to arrive.
async fn receive_snapshot_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    header: &[u8],
    admitted: &(dyn Fn(&Message) -> Result<(), String> + Sync),
    stall: Duration,
) -> Result<Message, CodecError> {
    let malformed = |what: &str| CodecError::Malformed(format!("snapshot stream: {what}"));
    let (mut message, len) = snapshot_header(header)?;
    admitted(&message).map_err(CodecError::Malformed)?;
    // Grows as data arrives: a header alone must not make us allocate what
    // it announces.
    let mut data = Vec::with_capacity(len.min(CHUNK));
    while data.len() < len {
        let chunk = tokio::time::timeout(stall, codec::read_frame(reader))
            .await
            .map_err(|_| CodecError::Io(std::io::ErrorKind::TimedOut.into()))??
            .ok_or_else(|| malformed("ended early"))?;
        if data.len() + chunk.len() > len {
            return Err(malformed("more data than announced"));
        }
        data.extend_from_slice(&chunk);
    }
    message.mut_snapshot().data = data.into();
    Ok(message)
}

/// Decodes the frame that opens a snapshot stream: the `MsgSnapshot`
/// without its data, and the data's announced length (within the limit).
/// Public for the fuzz target (`fuzz/fuzz_targets/peer_frame.rs`).
pub fn snapshot_header(header: &[u8]) -> Result<(Message, usize), CodecError> {
    let malformed = |what: &str| CodecError::Malformed(format!("snapshot stream: {what}"));
    let rest = header
        .strip_prefix(&[SNAPSHOT_STREAM])
        .ok_or_else(|| malformed("no stream header"))?;
    let (&version, rest) = rest
        .split_first()
        .ok_or_else(|| malformed("empty header"))?;
    if !(codec::OLDEST_READABLE..=codec::FORMAT_VERSION).contains(&version) {
        return Err(CodecError::Version { found: version });
    }
    let (len, body) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| malformed("no length"))?;
    let len = u64::from_be_bytes(*len);
    if len > MAX_SNAPSHOT {
        return Err(malformed(&format!(
            "{len} bytes exceeds the {MAX_SNAPSHOT}-byte limit"
        )));
    }
    let message =
        Message::parse_from_bytes(body).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if message.get_msg_type() != MessageType::MsgSnapshot {
        return Err(malformed("not a snapshot message"));
    }
    let len = usize::try_from(len).map_err(|_| malformed("too long for this machine"))?;
    Ok((message, len))
}

/// Runs the TLS handshake (when the transport has TLS) with the peer that
/// should be member `name`; an error when it is anyone else.
async fn secure(tcp: TcpStream, tls: Option<&ClientTls>, name: &str) -> Result<BoxStream, String> {
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let (stream, who) = tls
        .connect(tcp, CONNECT_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    if who.name != name {
        return Err(format!("the peer is {who}, not member {name:?}"));
    }
    Ok(stream)
}

/// Connects to a peer within [`CONNECT_TIMEOUT`], with [`limit_unacked`] set.
/// `None` when it cannot, or when `back` says to start over at once.
async fn dial(member: &MemberInfo, back: &Notify, tls: Option<&ClientTls>) -> Option<BoxStream> {
    let addr = &member.peer_addr;
    let attempt = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
    let tcp = tokio::select! {
        connected = attempt => connected.ok()?.ok()?,
        () = back.notified() => return None,
    };
    // Connected: a "peer is back" from before this is news no longer.
    tokio::select! {
        biased;
        () = back.notified() => {}
        () = std::future::ready(()) => {}
    }
    let _ = tcp.set_nodelay(true);
    limit_unacked(&tcp);
    match secure(tcp, tls, &member.name).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::warn!("raft peer {} at {addr}: {e}", member.name);
            None
        }
    }
}

/// Keeps one connection to a peer and writes its queue to it; ends when the
/// peer is removed (its queue's sender is dropped). Once the peer offers to
/// hear announcements ([`announce`]), it is sent this member's, and a fresh
/// one whenever `announcement` changes.
async fn write_to_peer(
    id: u64,
    member: MemberInfo,
    mut queue: mpsc::Receiver<Message>,
    node: Handle,
    back: Arc<Notify>,
    tls: Option<Arc<ClientTls>>,
    mut announcement: watch::Receiver<Option<Arc<Vec<u8>>>>,
) {
    use tokio::io::AsyncWriteExt;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let Some(stream) = dial(&member, &back, tls.as_deref()).await else {
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
        let (reader, writer) = tokio::io::split(stream);
        let offered = Arc::new(Notify::new());
        let listening = AbortOnDrop(tokio::spawn(hear_offer(reader, offered.clone())));
        let mut writer = BufWriter::new(writer);
        let mut capable = false;
        loop {
            let first = tokio::select! {
                next = queue.recv() => match next {
                    Some(message) => Some(message),
                    None => return,
                },
                () = offered.notified(), if !capable => {
                    capable = true;
                    None
                }
                changed = announcement.changed(), if capable => {
                    if changed.is_err() {
                        // The transport is gone; the queue closes next.
                        capable = false;
                    }
                    None
                }
            };
            let mut failed = match first {
                Some(first) => codec::write_frame(&mut writer, &encode(&first))
                    .await
                    .is_err(),
                None => {
                    let frame = announcement.borrow_and_update().clone();
                    match frame {
                        Some(frame) => codec::write_frame(&mut writer, &frame).await.is_err(),
                        None => false,
                    }
                }
            };
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
        drop(listening);
    }
}

/// Aborts a task when dropped: a connection's reader ends with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads what a peer's listener sends back on an ordinary connection: its
/// offer to hear announcements, which wakes `offered`. Frames are bounded
/// to [`announce::MAX_OFFER`] bytes; anything else, or the end of the
/// connection, ends the reading (the writer finds out about a dead
/// connection when it writes).
async fn hear_offer<R: AsyncRead + Unpin>(reader: R, offered: Arc<Notify>) {
    let limits = FrameLimits {
        max_bytes: announce::MAX_OFFER,
        deadline: OFFER_DEADLINE,
    };
    let mut reader = tokio::io::BufReader::new(reader);
    loop {
        match codec::read_frame_within(&mut reader, &limits).await {
            Ok(Some(frame)) if announce::is_capability(&frame) => offered.notify_one(),
            Ok(Some(_)) => {
                tracing::debug!("a raft peer sent an unknown frame back; no longer read");
                return;
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Accepts peer connections and hands their messages to member `me`'s node
/// thread, each first put to [`admit`]; `peers` is the transport's, so a
/// peer that dials in is redialled at once.
pub async fn serve_peers(listener: Listener, node: Handle, peers: Peers, me: u64) {
    let frame = listener.limits().frame.clone();
    listener
        .serve(move |accepted: Accepted| {
            let (node, peers, frame) = (node.clone(), peers.clone(), frame.clone());
            async move { peer_connection(accepted, node, peers, me, frame).await }
        })
        .await;
}

/// Serves one peer connection. On an ordinary connection the listener
/// offers to hear announcements ([`announce`]): after the first Raft frame
/// it admits, or after [`OFFER_AFTER`] without any frame (a peer's writer
/// dials at once and may have nothing to say for long; the offer must
/// still reach it). A snapshot stream opens with its header at once and
/// is offered nothing, so a sender of the first release reads its
/// confirmation where it expects it.
async fn peer_connection(
    accepted: Accepted,
    node: Handle,
    peers: Peers,
    me: u64,
    frame: FrameLimits,
) {
    use tokio::io::AsyncBufReadExt;
    let Accepted {
        stream,
        who,
        from,
        slot: _slot,
    } = accepted;
    if let Some(who) = &who
        && who.role != Role::Member
    {
        tracing::warn!("peer connection from {from} refused: {who} holds no member certificate");
        return;
    }
    let admitted = |message: &Message| {
        let members = &peers.lock().members;
        admit(who.as_ref(), message, me, members)
    };
    let mut stream = tokio::io::BufReader::new(stream);
    let mut greeted = false;
    let mut offered = false;
    if tokio::time::timeout(OFFER_AFTER, stream.fill_buf())
        .await
        .is_err()
    {
        offered = true;
        if offer(&mut stream).await.is_err() {
            return;
        }
    }
    loop {
        match codec::read_frame_within(&mut stream, &frame).await {
            Ok(Some(frame)) if frame.first() == Some(&SNAPSHOT_STREAM) => {
                if let Err(e) = take_snapshot(&mut stream, &frame, &node, &admitted).await {
                    tracing::warn!("snapshot from peer {from} not received: {e}");
                }
                return;
            }
            Ok(Some(frame)) if frame.first() == Some(&announce::ANNOUNCEMENT) => {
                let heard = announce::decode(&frame)
                    .map_err(|e| e.to_string())
                    .and_then(|announcement| {
                        let members = &peers.lock().members;
                        admit_announcement(who.as_ref(), &announcement, members)?;
                        Ok(announcement)
                    });
                match heard {
                    Ok(announcement) => {
                        peers.vouch(&announcement);
                    }
                    Err(why) => {
                        tracing::warn!(
                            "ignoring an announcement and dropping the connection from peer \
                             {from}: {why}"
                        );
                        return;
                    }
                }
            }
            Ok(Some(frame)) => match decode(&frame) {
                Ok(message) => {
                    if let Err(why) = admitted(&message) {
                        tracing::warn!("dropping connection from peer {from}: {why}");
                        return;
                    }
                    if !greeted {
                        greeted = true;
                        peers.dialed_in(message.from);
                    }
                    if !offered {
                        offered = true;
                        if offer(&mut stream).await.is_err() {
                            return;
                        }
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
}

/// Writes the offer to hear announcements ([`announce::capability_frame`]).
async fn offer<S: AsyncWrite + Unpin>(stream: &mut S) -> Result<(), CodecError> {
    use tokio::io::AsyncWriteExt;
    codec::write_frame(stream, &announce::capability_frame()).await?;
    stream.flush().await?;
    Ok(())
}

/// Receives a snapshot stream whose header frame was `header`, hands the
/// snapshot to the node, and confirms. Public for
/// tests/transport_faults.rs, which drives it over a faulty pipe.
pub async fn take_snapshot<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    header: &[u8],
    node: &Handle,
    admitted: &(dyn Fn(&Message) -> Result<(), String> + Sync),
) -> Result<(), CodecError> {
    take_snapshot_within(stream, header, node, admitted, SNAPSHOT_STALL).await
}

/// [`take_snapshot`] with each step allowed `stall` instead of
/// [`SNAPSHOT_STALL`] (see [`send_snapshot_within`]).
pub async fn take_snapshot_within<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    header: &[u8],
    node: &Handle,
    admitted: &(dyn Fn(&Message) -> Result<(), String> + Sync),
    stall: Duration,
) -> Result<(), CodecError> {
    use tokio::io::AsyncWriteExt;
    let message = receive_snapshot_within(stream, header, admitted, stall).await?;
    node.send(Msg::Raft(message))
        .map_err(|e| CodecError::Io(std::io::Error::other(e.to_string())))?;
    let confirm = async {
        stream.write_all(&[SNAPSHOT_RECEIVED]).await?;
        stream.flush().await
    };
    tokio::time::timeout(stall, confirm)
        .await
        .map_err(|_| CodecError::Io(std::io::ErrorKind::TimedOut.into()))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_snapshot_larger_than_a_frame_streams_in_chunks_and_is_confirmed() {
        let mut message = Message {
            to: 2,
            from: 1,
            term: 4,
            ..Message::default()
        };
        message.set_msg_type(MessageType::MsgSnapshot);
        message.mut_snapshot().mut_metadata().index = 77;
        let data: Vec<u8> = (0..codec::MAX_FRAME + 3 * CHUNK + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        message.mut_snapshot().data = data.into();
        let (mut sender, receiver) = tokio::io::duplex(64 * 1024);
        assert_eq!(
            streamed(&mut sender, receiver, &message, false).await,
            message
        );
    }

    /// Sends `message` as a snapshot stream on `sender` while a task
    /// receives it on `receiver` (after offering announcements first when
    /// `offer_first`) and confirms it; returns what was received.
    async fn streamed(
        sender: &mut tokio::io::DuplexStream,
        receiver: tokio::io::DuplexStream,
        message: &Message,
        offer_first: bool,
    ) -> Message {
        let receiving = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut receiver = tokio::io::BufReader::new(receiver);
            if offer_first {
                offer(&mut receiver).await.unwrap();
            }
            let header = codec::read_frame(&mut receiver).await.unwrap().unwrap();
            assert!(header.len() < 1024, "the header carries no data");
            let got = receive_snapshot(&mut receiver, &header, &|_| Ok(()))
                .await
                .unwrap();
            receiver.write_all(&[SNAPSHOT_RECEIVED]).await.unwrap();
            got
        });
        let data = message.get_snapshot().get_data().to_vec();
        send_snapshot(sender, message, data.as_slice(), data.len() as u64)
            .await
            .unwrap();
        receiving.await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_in_a_file_streams_from_it_chunk_by_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgSnapshot);
        message.mut_snapshot().mut_metadata().index = 9;
        message.mut_snapshot().mut_metadata().term = 2;
        let data: Vec<u8> = (0..2 * CHUNK + 77).map(|i| (i % 253) as u8).collect();
        let path = dir
            .path()
            .join(snapshot_file_name(message.get_snapshot().get_metadata()));
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (mut sender, receiver) = tokio::io::duplex(64 * 1024);
        let receiving = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut receiver = tokio::io::BufReader::new(receiver);
            let header = codec::read_frame(&mut receiver).await.unwrap().unwrap();
            let got = receive_snapshot(&mut receiver, &header, &|_| Ok(()))
                .await
                .unwrap();
            receiver.write_all(&[SNAPSHOT_RECEIVED]).await.unwrap();
            got
        });
        let reader = read_in_background(file);
        send_snapshot(&mut sender, &message, reader, data.len() as u64)
            .await
            .unwrap();
        let got = receiving.await.unwrap();
        assert_eq!(got.get_snapshot().get_data(), data.as_slice());
        assert_eq!(got.get_snapshot().get_metadata().index, 9);
    }

    #[tokio::test]
    async fn a_snapshot_stream_cut_short_is_refused() {
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgSnapshot);
        message.mut_snapshot().data = vec![7u8; 3 * CHUNK].into();
        let (mut sender, receiver) = tokio::io::duplex(1024 * 1024);
        let sending = tokio::spawn(async move {
            let data = message.get_snapshot().get_data().to_vec();
            send_snapshot(&mut sender, &message, data.as_slice(), data.len() as u64).await
        });
        let mut receiver = tokio::io::BufReader::new(receiver);
        let header = codec::read_frame(&mut receiver).await.unwrap().unwrap();
        let first = codec::read_frame(&mut receiver).await.unwrap().unwrap();
        assert_eq!(first.len(), CHUNK);
        drop(receiver);
        assert!(
            sending.await.unwrap().is_err(),
            "no confirmation, no success"
        );
        let mut short = header.clone();
        short.truncate(5);
        assert!(
            receive_snapshot(&mut tokio::io::empty(), &short, &|_| Ok(()))
                .await
                .is_err()
        );
        assert!(
            receive_snapshot(&mut tokio::io::empty(), &header, &|_| Ok(()))
                .await
                .is_err(),
            "a stream that ends before its data is refused"
        );
    }

    /// A certificate identity maker, members m1 and m2's Raft ids, and the
    /// membership of the two: what the admission tests judge against.
    #[allow(clippy::type_complexity)]
    fn two_members() -> (fn(Role, &str) -> Identity, u64, u64, BTreeMap<u64, String>) {
        fn who(role: Role, name: &str) -> Identity {
            Identity {
                cluster: "c".into(),
                role,
                name: name.into(),
            }
        }
        let (m1, m2) = (member_id("m1"), member_id("m2"));
        let members = BTreeMap::from([(m1, "m1".to_string()), (m2, "m2".to_string())]);
        (who, m1, m2, members)
    }

    #[test]
    fn only_current_members_speaking_as_themselves_are_admitted() {
        let (who, m1, m2, members) = two_members();
        let from = |from, to| Message {
            from,
            to,
            ..Message::default()
        };
        let m2_cert = who(Role::Member, "m2");
        assert_eq!(admit(Some(&m2_cert), &from(m2, m1), m1, &members), Ok(()));
        assert_eq!(
            admit(None, &from(m2, m1), m1, &members),
            Ok(()),
            "plaintext"
        );
        let refused = [
            (who(Role::Member, "m2"), from(m1, m1), "sent a message from"),
            (
                who(Role::Agent, "m2"),
                from(m2, m1),
                "no member certificate",
            ),
            (
                who(Role::Admin, "m2"),
                from(m2, m1),
                "no member certificate",
            ),
            (
                who(Role::Member, "m9"),
                from(member_id("m9"), m1),
                "not a current member",
            ),
            (who(Role::Member, "m2"), from(m2, m2), "not this member"),
        ];
        for (cert, message, why) in refused {
            let err = admit(Some(&cert), &message, m1, &members).unwrap_err();
            assert!(err.contains(why), "{cert}: {err}");
        }
        // A member still joining knows nobody yet: any member certificate
        // speaking as itself is heard.
        let joiner = who(Role::Member, "m9");
        assert_eq!(
            admit(
                Some(&joiner),
                &from(member_id("m9"), m1),
                m1,
                &BTreeMap::new()
            ),
            Ok(())
        );
    }

    #[test]
    fn only_members_admitted_announcing_as_themselves_are_heard() {
        let (who, m1, m2, members) = two_members();
        let announced = |from, name: &str| Announcement {
            from,
            name: name.into(),
            index: 9,
            members: BTreeMap::new(),
        };
        let m2_cert = who(Role::Member, "m2");
        assert_eq!(
            admit_announcement(Some(&m2_cert), &announced(m2, "m2"), &members),
            Ok(())
        );
        assert_eq!(
            admit_announcement(None, &announced(m2, "m2"), &members),
            Ok(()),
            "plaintext"
        );
        let refused = [
            (who(Role::Member, "m2"), announced(m1, "m1"), "as m1"),
            (who(Role::Member, "m2"), announced(m2, "m1"), "as m1"),
            (who(Role::Member, "m2"), announced(m1, "m2"), "as m2"),
            (
                who(Role::Agent, "m2"),
                announced(m2, "m2"),
                "no member certificate",
            ),
            (
                who(Role::Member, "m9"),
                announced(member_id("m9"), "m9"),
                "not a current member",
            ),
        ];
        for (cert, announcement, why) in refused {
            let err = admit_announcement(Some(&cert), &announcement, &members).unwrap_err();
            assert!(err.contains(why), "{cert}: {err}");
        }
    }

    #[tokio::test]
    async fn a_snapshot_confirmation_after_an_offer_is_read_and_nothing_else_is_taken() {
        let mut offered = Vec::new();
        codec::write_frame(&mut offered, &announce::capability_frame())
            .await
            .unwrap();
        let mut stream = offered.clone();
        stream.push(SNAPSHOT_RECEIVED);
        assert!(confirmation(&mut stream.as_slice()).await.is_ok());
        assert!(
            confirmation(&mut [SNAPSHOT_RECEIVED].as_slice())
                .await
                .is_ok()
        );
        // Anything else in its place is refused, and an offer alone is no
        // confirmation.
        let mut other = Vec::new();
        codec::write_frame(&mut other, &[codec::FORMAT_VERSION, 0])
            .await
            .unwrap();
        other.push(SNAPSHOT_RECEIVED);
        assert!(confirmation(&mut other.as_slice()).await.is_err());
        assert!(confirmation(&mut offered.as_slice()).await.is_err());
        assert!(confirmation(&mut [7u8].as_slice()).await.is_err());
        let mut huge = vec![0, 0xff, 0xff, 0xff];
        huge.push(SNAPSHOT_RECEIVED);
        assert!(matches!(
            confirmation(&mut huge.as_slice()).await,
            Err(CodecError::TooLarge(_))
        ));
        // A whole stream whose receiver offered first is confirmed.
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgSnapshot);
        message.mut_snapshot().data = vec![3u8; 1000].into();
        let (mut sender, receiver) = tokio::io::duplex(64 * 1024);
        assert_eq!(
            streamed(&mut sender, receiver, &message, true).await,
            message
        );
    }

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
