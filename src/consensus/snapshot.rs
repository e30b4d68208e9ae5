//! Snapshots encoded and written off the Raft thread.
//!
//! Writing a snapshot costs the whole state: encoding a few hundred MB and
//! writing and fsyncing them took seconds, and done on the Raft thread it
//! held up every request and heartbeat behind it (a put timed out; followers
//! started elections). So the Raft thread only takes a consistent copy of the
//! state at the snapshot's index, which is cheap because [`KvStore`] shares
//! its values between copies, and hands it over as a [`Job`]; the member's
//! runner encodes and writes it on a thread of its own
//! ([`Job::write`], straight into the file: the encoded state is never held
//! whole in memory), and the Raft thread then records it and compacts the log
//! ([`super::node::Core::snapshot_written`]).
//!
//! A crash between the write and the compaction loses nothing: until the
//! database names the new snapshot it names the previous one, whose file stays
//! until then, and the log still holds every entry after that one, so the
//! member restarts from the previous snapshot and replays its log. The new
//! file is then an unnamed leftover, removed by the next snapshot's save.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use raft::eraftpb::{Snapshot, SnapshotMetadata};

use super::codec::{self, MemberInfo};
use super::kv::KvStore;
use super::storage::{self, DiskError};

/// A snapshot to encode and write: a copy of the state as of its index.
pub struct Job {
    meta: SnapshotMetadata,
    kv: KvStore,
    members: BTreeMap<u64, MemberInfo>,
    dir: PathBuf,
    /// How long taking the copy held up the Raft thread.
    pub copied_in: Duration,
}

impl Job {
    /// A job for the state `kv` and `members` at `meta`, to be written into
    /// `dir` (the disk's [`storage::Durable::snapshot_dir`]). The copy is
    /// taken here, on the caller's (the Raft) thread.
    pub fn new(
        meta: SnapshotMetadata,
        kv: &KvStore,
        members: &BTreeMap<u64, MemberInfo>,
        dir: PathBuf,
    ) -> Job {
        let started = Instant::now();
        let kv = kv.clone();
        Job {
            meta,
            kv,
            members: members.clone(),
            dir,
            copied_in: started.elapsed(),
        }
    }

    /// The snapshot's index.
    pub fn index(&self) -> u64 {
        self.meta.index
    }

    /// Encodes the snapshot and writes it durably; returns it without its
    /// data (which is in its file), for [`super::node::Core::snapshot_written`].
    /// Runs on any thread.
    pub fn write(self) -> Result<Snapshot, DiskError> {
        let started = Instant::now();
        let (kv, members) = (&self.kv, &self.members);
        let bytes = storage::write_snapshot_with(&self.dir, &self.meta, |file| {
            codec::write_snapshot(kv, members, file)
        })?;
        tracing::info!(
            "snapshot at index {}: copied in {:.1} ms on the Raft thread, {} bytes encoded and \
             written in {:.0} ms off it",
            self.meta.index,
            self.copied_in.as_secs_f64() * 1000.0,
            bytes,
            started.elapsed().as_secs_f64() * 1000.0,
        );
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(self.meta);
        Ok(snapshot)
    }
}
