//! Versioned encodings: log entries, snapshots and network frames.
//!
//! Everything flotilla writes to disk or sends to another process starts with a
//! format version byte, so a later release can read what this one wrote and a
//! cluster can be upgraded member by member: a reader accepts its own version
//! and the one before it, and writers keep writing the older version until the
//! whole cluster runs the new release.
//!
//! A value may also be followed by an *extension*: more data, after the
//! value's end, that an older release never reads (postcard stops reading
//! at the end of the value it was asked for). A snapshot carries the lease
//! owners there and a log entry the agent it was proposed for, so members
//! of the first release still read what this one writes during a rolling
//! upgrade; they only do not learn the owners.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::kv::{Command, KvStore, LeaseId};

/// The format this release writes.
pub const FORMAT_VERSION: u8 = 1;

/// The oldest format this release still reads.
pub const OLDEST_READABLE: u8 = 1;

/// Largest frame accepted from the network: bounds memory per connection.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Written by a release this one cannot read.
    #[error(
        "data has format version {found}, this release reads {OLDEST_READABLE}..={FORMAT_VERSION}; upgrade flotilla on this member"
    )]
    Version {
        /// The version found.
        found: u8,
    },
    /// Nothing after the version byte, or not what the version promises.
    #[error("malformed data: {0}")]
    Malformed(String),
    /// A frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Encodes a value with the version byte in front.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, vec![FORMAT_VERSION])
        .expect("postcard cannot fail on serde types that hold no maps with non-string keys")
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(version_checked(bytes)?).map_err(|e| CodecError::Malformed(e.to_string()))
}

/// The bytes after the version byte, if this release reads that version.
fn version_checked(bytes: &[u8]) -> Result<&[u8], CodecError> {
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| CodecError::Malformed("empty".to_string()))?;
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::Version { found: version });
    }
    Ok(body)
}

/// Serde for byte strings (`#[serde(with = "codec::bytes")]`): one copy of
/// the bytes, where serde's default for `Vec<u8>` visits them one by one (a
/// debug build took seconds over a snapshot of values). postcard writes both
/// the same way (a varint length, then the bytes), so data written either
/// way reads back either way.
pub mod bytes {
    use serde::{Deserializer, Serializer};

    /// Writes `value` as a byte string.
    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value)
    }

    /// Reads a byte string (or a sequence of bytes) into a `Vec<u8>`.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(Visitor)
    }

    struct Visitor;

    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

/// A member of the Raft group as recorded in the log and snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Its name (`--name`).
    pub name: String,
    /// Where its peers reach it.
    pub peer_addr: String,
}

/// What a snapshot carries besides Raft's own metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotData {
    /// The state machine, history included, so watches survive an install.
    pub kv: KvStore,
    /// Known members by Raft id.
    pub members: BTreeMap<u64, MemberInfo>,
}

/// [`SnapshotData`] by reference: encodes to the same bytes without copying the
/// state machine first (a large store takes ~100 ms to clone).
#[derive(Serialize)]
struct SnapshotRef<'a> {
    kv: &'a KvStore,
    members: &'a BTreeMap<u64, MemberInfo>,
}

/// What follows a snapshot's body: data this release keeps that the first
/// release's format has no room for. An older release reads the body and
/// never looks past it (postcard stops at a value's end), so a snapshot
/// with an extension still installs there; it only loses what the
/// extension says.
#[derive(Serialize, Deserialize, Default)]
struct SnapshotExtension {
    /// The owner of every lease that has one ([`super::kv::Lease::owner`]).
    lease_owners: BTreeMap<LeaseId, String>,
}

/// A snapshot's bytes: the versioned [`SnapshotData`] of `kv` and `members`,
/// then, when some lease has an owner, a [`SnapshotExtension`]. Without
/// owners the bytes are exactly what the first release wrote.
pub fn encode_snapshot(kv: &KvStore, members: &BTreeMap<u64, MemberInfo>) -> Vec<u8> {
    let body = encode(&SnapshotRef { kv, members });
    let lease_owners = kv.lease_owners();
    if lease_owners.is_empty() {
        return body;
    }
    postcard::to_extend(&SnapshotExtension { lease_owners }, body)
        .expect("postcard cannot fail on maps of integers and strings")
}

/// Writes the bytes of [`encode_snapshot`] to `out` as they are made, and
/// returns how many: a snapshot job writes its file this way, so a member
/// never holds the encoded state whole beside the state itself (at 100,000
/// units the encoded buffer, grown by doubling, was the largest single
/// allocation in the Raft leader's heap profile, 178 MiB; issue 14). Pass a
/// buffered writer: the encoder writes a few bytes at a time.
pub fn write_snapshot<W: std::io::Write>(
    kv: &KvStore,
    members: &BTreeMap<u64, MemberInfo>,
    out: W,
) -> std::io::Result<u64> {
    let mut out = Tally {
        out,
        bytes: 0,
        failed: None,
    };
    std::io::Write::write_all(&mut out, &[FORMAT_VERSION])?;
    let mut out = out.encoded(&SnapshotRef { kv, members })?;
    let lease_owners = kv.lease_owners();
    if !lease_owners.is_empty() {
        out = out.encoded(&SnapshotExtension { lease_owners })?;
    }
    Ok(out.bytes)
}

/// A writer that counts the bytes written through it and keeps the first
/// I/O error, which postcard's writer would report only as a full buffer.
struct Tally<W> {
    out: W,
    bytes: u64,
    failed: Option<std::io::Error>,
}

impl<W: std::io::Write> Tally<W> {
    /// Appends `value`'s postcard encoding.
    fn encoded<T: Serialize>(mut self, value: &T) -> std::io::Result<Tally<W>> {
        match postcard::to_io(value, &mut self) {
            Ok(_) => Ok(self),
            Err(e) => Err(self
                .failed
                .take()
                .unwrap_or_else(|| std::io::Error::other(e.to_string()))),
        }
    }
}

impl<W: std::io::Write> std::io::Write for Tally<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.out.write(buf) {
            Ok(n) => {
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.failed.get_or_insert(e);
                Err(kind.into())
            }
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self.out.write_all(buf) {
            Ok(()) => {
                self.bytes += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let kind = e.kind();
                self.failed.get_or_insert(e);
                Err(kind.into())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Reads bytes written by [`encode_snapshot`] (or by a release before it).
pub fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotData, CodecError> {
    let (mut data, extension): (SnapshotData, Option<SnapshotExtension>) = decode_extended(bytes)?;
    if let Some(extension) = extension {
        data.kv.set_lease_owners(extension.lease_owners);
    }
    Ok(data)
}

/// A log entry's bytes: the versioned `command`, then, for a command a member
/// proposed on behalf of an agent, that agent's machine id (as a trailing
/// string an older release does not read: see [`SnapshotExtension`]).
pub fn encode_entry(command: &Command, agent: Option<&str>) -> Vec<u8> {
    let body = encode(command);
    match agent {
        None => body,
        Some(agent) => postcard::to_extend(agent, body).expect("postcard cannot fail on a string"),
    }
}

/// Reads bytes written by [`encode_entry`]: the command and its agent.
pub fn decode_entry(bytes: &[u8]) -> Result<(Command, Option<String>), CodecError> {
    decode_extended(bytes)
}

/// Decodes a value written by [`encode`] and the extension after it, if any.
fn decode_extended<T: DeserializeOwned, E: DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, Option<E>), CodecError> {
    let body = version_checked(bytes)?;
    let malformed = |e: postcard::Error| CodecError::Malformed(e.to_string());
    let (value, rest) = postcard::take_from_bytes(body).map_err(malformed)?;
    if rest.is_empty() {
        return Ok((value, None));
    }
    Ok((value, Some(postcard::from_bytes(rest).map_err(malformed)?)))
}

/// Writes one length-prefixed frame: `u32` big-endian length, then the bytes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), CodecError> {
    if bytes.len() > MAX_FRAME {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let len = u32::try_from(bytes.len()).map_err(|_| CodecError::TooLarge(bytes.len()))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(bytes).await?;
    Ok(())
}

/// Reads one frame written by [`write_frame`]; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, CodecError> {
    read_frame_within(r, &FrameLimits::UNBOUNDED_WAIT).await
}

/// What a listener lets one frame cost it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameLimits {
    /// The largest frame accepted (at most [`MAX_FRAME`]).
    pub max_bytes: usize,
    /// How long a frame may take to arrive once its first byte has: a
    /// sender that dribbles a frame ties up a connection for this long at
    /// most. Waiting for a frame to start is not limited.
    pub deadline: Duration,
}

impl FrameLimits {
    /// [`MAX_FRAME`] and no practical deadline: for answers a client waits for.
    pub const UNBOUNDED_WAIT: FrameLimits = FrameLimits {
        max_bytes: MAX_FRAME,
        deadline: Duration::from_secs(24 * 3600),
    };
}

/// How much of an announced frame is allocated before its bytes arrive: the
/// buffer grows with the data, never to what a header merely claims.
const FIRST_ALLOCATION: usize = 64 * 1024;

/// [`read_frame`] within `limits`: a frame longer than `limits.max_bytes` is
/// refused from its header, and one that does not arrive in full within
/// `limits.deadline` of its first byte fails with `TimedOut`.
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &FrameLimits,
) -> Result<Option<Vec<u8>>, CodecError> {
    let mut len = [0u8; 4];
    match r.read(&mut len[..1]).await {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    let rest = async {
        r.read_exact(&mut len[1..]).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > limits.max_bytes.min(MAX_FRAME) {
            return Err(CodecError::TooLarge(len));
        }
        let mut buf = Vec::with_capacity(len.min(FIRST_ALLOCATION));
        (&mut *r).take(len as u64).read_to_end(&mut buf).await?;
        if buf.len() < len {
            return Err(CodecError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(Some(buf))
    };
    tokio::time::timeout(limits.deadline, rest)
        .await
        .map_err(|_| CodecError::Io(io::ErrorKind::TimedOut.into()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::kv::Command;

    #[test]
    fn snapshot_refs_encode_like_snapshots() {
        let mut kv = KvStore::default();
        kv.apply(&Command::put("k", "v", None));
        let members = BTreeMap::from([(
            1,
            MemberInfo {
                name: "n1".into(),
                peer_addr: "127.0.0.1:1".into(),
            },
        )]);
        let by_ref = encode_snapshot(&kv, &members);
        assert_eq!(
            by_ref,
            encode(&SnapshotData {
                kv: kv.clone(),
                members: members.clone()
            })
        );
        let decoded: SnapshotData = decode(&by_ref).unwrap();
        assert_eq!(decoded.kv, kv);
        assert_eq!(decoded.members, members);
    }

    /// A snapshot written to a file as it is encoded is byte for byte the
    /// one encoded in memory, lease owners' extension included, and a write
    /// that fails reports the I/O error.
    #[test]
    fn snapshots_stream_the_bytes_they_encode() {
        let mut kv = KvStore::default();
        for i in 0..300 {
            kv.apply(&Command::put(format!("k{i}"), "v".repeat(i), None));
        }
        let members = BTreeMap::from([(
            1,
            MemberInfo {
                name: "n1".into(),
                peer_addr: "127.0.0.1:1".into(),
            },
        )]);
        let check = |kv: &KvStore| {
            let mut streamed = Vec::new();
            let n = write_snapshot(kv, &members, &mut streamed).unwrap();
            assert_eq!(streamed, encode_snapshot(kv, &members));
            assert_eq!(n, streamed.len() as u64);
        };
        check(&kv);
        kv.apply_for(&Command::LeaseGrant { ttl_ms: 1000 }, Some("aaaa"));
        assert!(!kv.lease_owners().is_empty());
        check(&kv);
        let mut small = [0u8; 100];
        let err = write_snapshot(&kv, &members, &mut small[..]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WriteZero, "{err}");
    }

    #[test]
    fn lease_owners_and_agents_ride_in_extensions_older_readers_skip() {
        let mut kv = KvStore::default();
        let grant = Command::LeaseGrant { ttl_ms: 1000 };
        kv.apply_for(&grant, Some("aaaa"));
        kv.apply(&grant);
        let members = BTreeMap::new();
        let bytes = encode_snapshot(&kv, &members);
        // This release reads the owners back...
        let back = decode_snapshot(&bytes).unwrap();
        assert_eq!(back.kv, kv);
        assert_eq!(back.kv.lease(1).unwrap().owner.as_deref(), Some("aaaa"));
        assert_eq!(back.kv.lease(2).unwrap().owner, None);
        // ...a reader of the first format (plain decode) reads the rest.
        let old: SnapshotData = decode(&bytes).unwrap();
        assert_eq!(old.kv.lease(1).unwrap().owner, None);
        assert_eq!(old.kv.key_count(), kv.key_count());
        // Entries alike.
        let entry = encode_entry(&grant, Some("aaaa"));
        assert_eq!(
            decode_entry(&entry).unwrap(),
            (grant.clone(), Some("aaaa".into()))
        );
        assert_eq!(decode::<Command>(&entry).unwrap(), grant);
        assert_eq!(decode_entry(&encode(&grant)).unwrap(), (grant, None));
        // A damaged extension is refused, not ignored.
        let mut bad = encode(&Command::LeaseGrant { ttl_ms: 5 });
        bad.push(200);
        assert!(decode_entry(&bad).is_err());
    }

    #[test]
    fn byte_strings_encode_as_sequences_of_bytes_did() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Fast(#[serde(with = "bytes")] Vec<u8>);
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain(Vec<u8>);
        let data: Vec<u8> = (0..=255).collect();
        let fast = encode(&Fast(data.clone()));
        assert_eq!(fast, encode(&Plain(data.clone())));
        assert_eq!(decode::<Plain>(&fast).unwrap(), Plain(data.clone()));
        assert_eq!(decode::<Fast>(&fast).unwrap(), Fast(data));
    }

    #[test]
    fn versioned_round_trip_and_refusals() {
        let cmd = Command::put("k", "v", None);
        let bytes = encode(&cmd);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Command>(&bytes).unwrap(), cmd);
        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<Command>(&future),
            Err(CodecError::Version { .. })
        ));
        assert!(matches!(
            decode::<Command>(&[]),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Command>(&[FORMAT_VERSION, 200]),
            Err(CodecError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, b"hello").await.unwrap();
        write_frame(&mut a, b"").await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap().unwrap(), b"hello");
        assert_eq!(read_frame(&mut b).await.unwrap().unwrap(), b"");
        assert!(read_frame(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_announced_frame_is_not_allocated_before_it_arrives() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let limits = FrameLimits {
            max_bytes: MAX_FRAME,
            deadline: Duration::from_millis(200),
        };
        a.write_all(&(MAX_FRAME as u32).to_be_bytes())
            .await
            .unwrap();
        a.write_all(b"only a little").await.unwrap();
        // Reads into a buffer sized by what arrived; gives up at the deadline.
        let started = std::time::Instant::now();
        let err = read_frame_within(&mut b, &limits).await.unwrap_err();
        assert!(matches!(err, CodecError::Io(ref e) if e.kind() == io::ErrorKind::TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(200));
        let small = FrameLimits {
            max_bytes: 10,
            deadline: Duration::from_secs(1),
        };
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&11u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame_within(&mut b, &small).await,
            Err(CodecError::TooLarge(11))
        ));
        drop(a);
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, b"0123456789").await.unwrap();
        drop(a);
        assert_eq!(
            read_frame_within(&mut b, &small).await.unwrap().unwrap(),
            b"0123456789"
        );
        assert!(read_frame_within(&mut b, &small).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame(&mut b).await,
            Err(CodecError::TooLarge(_))
        ));
    }
}
