//! Versioned encodings: log entries, snapshots and network frames.
//!
//! Everything flotilla writes to disk or sends to another process starts with a
//! format version byte, so a later release can read what this one wrote and a
//! cluster can be upgraded member by member: a reader accepts its own version
//! and the one before it, and writers keep writing the older version until the
//! whole cluster runs the new release.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::kv::KvStore;

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
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| CodecError::Malformed("empty".to_string()))?;
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::Version { found: version });
    }
    postcard::from_bytes(body).map_err(|e| CodecError::Malformed(e.to_string()))
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
pub struct SnapshotRef<'a> {
    /// The state machine.
    pub kv: &'a KvStore,
    /// Known members by Raft id.
    pub members: &'a BTreeMap<u64, MemberInfo>,
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
        let by_ref = encode(&SnapshotRef {
            kv: &kv,
            members: &members,
        });
        let decoded: SnapshotData = decode(&by_ref).unwrap();
        assert_eq!(decoded.kv, kv);
        assert_eq!(decoded.members, members);
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
