//! Durable Raft state: the log, the hard state and the latest snapshot.
//!
//! Two layers. [`Durable`] is the contract with the disk: `save` MUST NOT return
//! before what it was given is on stable storage, because the node acknowledges
//! writes and sends votes right after. [`RedbDisk`] keeps it with redb (one
//! commit, one fsync per batch); [`MemDisk`] keeps it in memory for the
//! deterministic simulation, where a "crash" discards whatever was not synced.
//!
//! [`LogStore`] is the in-memory view raft-rs reads through its `Storage` trait:
//! raft-rs's own `MemStorage` for entries and states (only the log since the
//! last snapshot: snapshots are taken every `snapshot_entries` entries or
//! `snapshot_bytes` bytes, whichever comes first, so a restart reads back a
//! bounded log), plus our snapshot, whose data stays in its file on a real
//! disk and is streamed from there to a lagging member. On a disk that can
//! read entries back ([`Durable::log_reader`], the daemon's), the view keeps
//! only the newest applied entries in memory ([`LogStore::evict`]) and reads
//! older ones, which only a lagging follower needs, from the disk.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::codec;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";
const FORMAT: &str = "format";

/// Why the disk failed; the node stops rather than continue without durability.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// redb reported an error.
    #[error("storage error in {path}: {message}")]
    Redb {
        /// The database file.
        path: String,
        /// redb's message.
        message: String,
    },
    /// Stored bytes could not be decoded.
    #[error("corrupt raft state on disk: {0}")]
    Corrupt(String),
    /// The disk refused a write (failed or full; the simulation's disks fail
    /// on request).
    #[error("the disk refused a write: {0}")]
    Failed(String),
    /// Written by a newer release.
    #[error(transparent)]
    Format(#[from] codec::CodecError),
}

/// Everything read back from the disk at start.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    /// Term, vote and commit.
    pub hard_state: HardState,
    /// Voters and learners, as of the last applied change or snapshot.
    pub conf_state: ConfState,
    /// The latest snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Log entries after the snapshot, in order.
    pub entries: Vec<Entry>,
}

impl Recovered {
    /// True when nothing was ever stored: a brand-new member.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state == HardState::default()
    }
}

/// One batch of changes, saved atomically.
#[derive(Debug, Default)]
pub struct Batch {
    /// A snapshot received from the leader: it replaces the whole log.
    pub installed: Option<Snapshot>,
    /// A snapshot this member took of its own state: entries before its index
    /// are dropped (the entry at the index is kept, so the log is never empty).
    pub taken: Option<Snapshot>,
    /// The `taken` snapshot's data is already durable in its file (written
    /// off the Raft thread by [`write_snapshot_data`]); `save` only records
    /// it. Only for a disk with a [`Durable::snapshot_dir`].
    pub taken_written: bool,
    /// New entries; any stored entries at or after the first one are replaced.
    pub entries: Vec<Entry>,
    /// The new hard state.
    pub hard_state: Option<HardState>,
    /// The new membership.
    pub conf_state: Option<ConfState>,
}

impl Batch {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.installed.is_none()
            && self.taken.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.conf_state.is_none()
    }
}

/// The disk contract.
pub trait Durable: Send {
    /// Reads back everything saved.
    fn load(&self) -> Result<Recovered, DiskError>;
    /// Saves a batch. MUST NOT return before the batch is on stable storage.
    fn save(&mut self, batch: &Batch) -> Result<(), DiskError>;
    /// Bytes the store takes on disk, for health reports (0: no files).
    fn size_bytes(&self) -> u64 {
        0
    }
    /// Where snapshot data is kept as files named by [`snapshot_file_name`],
    /// if it is: then the log view keeps no copy of it in memory, and the
    /// transport streams it to a follower from the file.
    fn snapshot_dir(&self) -> Option<&Path> {
        None
    }
    /// A reader of the saved log, if this disk can read entries back while
    /// it is written: then the log view keeps only the newest entries in
    /// memory. `None`: the view keeps the whole log since the last snapshot.
    fn log_reader(&self) -> Option<Arc<dyn LogRead>> {
        None
    }
}

/// Reads saved entries back, for a log view that keeps only the newest
/// entries in memory ([`LogStore::evict`]).
pub trait LogRead: Send + Sync {
    /// The saved entries from `low` up to, not including, `high`, in order;
    /// fewer only when their encoded size passed `max_bytes` (the first one
    /// always comes back). An entry that is not there is an error: the view
    /// asks only for entries it saved and the disk has not compacted.
    fn read_entries(&self, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, DiskError>;
}

/// The file name of a snapshot's data under [`Durable::snapshot_dir`].
pub fn snapshot_file_name(meta: &raft::eraftpb::SnapshotMetadata) -> String {
    format!("snapshot-{:016x}-{:016x}.bin", meta.term, meta.index)
}

/// Writes the data of the snapshot `meta` describes durably into `dir`, under
/// [`snapshot_file_name`]: to a `.partial` file, fsynced, renamed into place,
/// and the directory fsynced. Safe on any thread: a snapshot file counts only
/// once the database names it ([`Durable::save`] of a `taken` snapshot), so
/// one written before a crash, or superseded, is an unnamed leftover that
/// the next snapshot's save removes.
pub fn write_snapshot_data(
    dir: &Path,
    meta: &raft::eraftpb::SnapshotMetadata,
    data: &[u8],
) -> Result<(), DiskError> {
    use std::io::Write;
    write_snapshot_with(dir, meta, |file| file.write_all(data))
}

/// [`write_snapshot_data`] with the data made by `fill` as it writes it
/// into the (buffered) file: a snapshot job encodes the state straight into
/// its file ([`super::codec::write_snapshot`]) rather than into memory first.
/// Returns what `fill` returned.
pub fn write_snapshot_with<T>(
    dir: &Path,
    meta: &raft::eraftpb::SnapshotMetadata,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<T>,
) -> Result<T, DiskError> {
    let target = dir.join(snapshot_file_name(meta));
    let partial = target.with_extension("partial");
    let io = |e: std::io::Error| DiskError::Failed(format!("writing {}: {e}", partial.display()));
    let file = std::fs::File::create(&partial).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
    let filled = fill(&mut out).map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&partial, &target).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(filled)
}

/// The most memory redb may keep for the log's pages (read cache and write
/// buffer together).
///
/// redb's default is 1 GiB, and it keeps every page it writes cached up to
/// that: a member's resident memory then grew with the log it had written
/// (55–86 MiB per member at 30,000 units in `flotilla-bench sim`, measured
/// with heaptrack). The log is written far more than it is read: entries a
/// follower needs come from the in-memory log view ([`LogStore`]), and the
/// database is read back whole only at start. A commit touches the tail of
/// the log's B-tree and the metadata table, a few pages, so a small cache
/// loses nothing that matters.
pub const REDB_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The Raft state in a redb database under the member's data directory.
///
/// Snapshot data lives beside it in `snapshot-<term>-<index>.bin` (written,
/// fsynced and renamed into place before the database names it), because
/// rewriting tens of megabytes inside the B-tree costs several times a plain
/// sequential write; the database keeps the snapshot's metadata.
pub struct RedbDisk {
    db: Arc<redb::Database>,
    dir: std::path::PathBuf,
    path: String,
}

impl RedbDisk {
    /// Opens or creates `dir/raft.redb`.
    pub fn open(dir: &Path) -> Result<RedbDisk, DiskError> {
        let file = dir.join("raft.redb");
        let path = file.display().to_string();
        let err = |e: &dyn std::fmt::Display| DiskError::Redb {
            path: path.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        let db = redb::Database::builder()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(&file)
            .map_err(|e| err(&e))?;
        let disk = RedbDisk {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            path,
        };
        disk.check_format()?;
        Ok(disk)
    }

    fn error(&self, e: impl std::fmt::Display) -> DiskError {
        DiskError::Redb {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn snapshot_file(&self, snapshot: &Snapshot) -> std::path::PathBuf {
        self.dir.join(snapshot_file_name(snapshot.get_metadata()))
    }

    /// Writes a snapshot's data durably under its own name.
    fn write_snapshot_file(&self, snapshot: &Snapshot) -> Result<(), DiskError> {
        write_snapshot_data(&self.dir, snapshot.get_metadata(), &snapshot.data)
    }

    /// Removes snapshot files other than `keep` (older ones, or a crash's leftovers).
    fn remove_other_snapshot_files(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("snapshot-") && path != keep {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Refuses a database written by a newer release; stamps a new one.
    fn check_format(&self) -> Result<(), DiskError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.error(e))?;
            let found = meta
                .get(FORMAT)
                .map_err(|e| self.error(e))?
                .map(|v| v.value().first().copied().unwrap_or(0));
            match found {
                Some(v) if !(codec::OLDEST_READABLE..=codec::FORMAT_VERSION).contains(&v) => {
                    return Err(codec::CodecError::Version { found: v }.into());
                }
                Some(_) => {}
                None => {
                    meta.insert(FORMAT, [codec::FORMAT_VERSION].as_slice())
                        .map_err(|e| self.error(e))?;
                }
            }
            txn.open_table(LOG).map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))
    }
}

fn parse<M: protobuf::Message>(bytes: &[u8]) -> Result<M, DiskError> {
    M::parse_from_bytes(bytes).map_err(|e| DiskError::Corrupt(e.to_string()))
}

fn bytes<M: protobuf::Message>(m: &M) -> Vec<u8> {
    m.write_to_bytes()
        .expect("protobuf encoding of an in-memory message cannot fail")
}

impl Durable for RedbDisk {
    fn load(&self) -> Result<Recovered, DiskError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let meta = txn.open_table(META).map_err(|e| self.error(e))?;
        let log = txn.open_table(LOG).map_err(|e| self.error(e))?;
        let mut recovered = Recovered::default();
        if let Some(v) = meta.get(HARD_STATE).map_err(|e| self.error(e))? {
            recovered.hard_state = parse(v.value())?;
        }
        if let Some(v) = meta.get(CONF_STATE).map_err(|e| self.error(e))? {
            recovered.conf_state = parse(v.value())?;
        }
        if let Some(v) = meta.get(SNAPSHOT).map_err(|e| self.error(e))? {
            let mut snapshot: Snapshot = parse(v.value())?;
            let file = self.snapshot_file(&snapshot);
            let data = std::fs::read(&file).map_err(|e| {
                DiskError::Corrupt(format!("snapshot data {} unreadable: {e}", file.display()))
            })?;
            snapshot.data = data.into();
            recovered.snapshot = Some(snapshot);
        }
        for item in log.iter().map_err(|e| self.error(e))? {
            let (_, v) = item.map_err(|e| self.error(e))?;
            recovered.entries.push(parse(v.value())?);
        }
        Ok(recovered)
    }

    fn save(&mut self, batch: &Batch) -> Result<(), DiskError> {
        if batch.is_empty() {
            return Ok(());
        }
        let snapshot = batch.installed.as_ref().or(batch.taken.as_ref());
        if let Some(snapshot) = snapshot
            && !(batch.taken_written && batch.installed.is_none())
        {
            self.write_snapshot_file(snapshot)?;
        }
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.error(e))?;
            let mut log = txn.open_table(LOG).map_err(|e| self.error(e))?;
            if let Some(snapshot) = snapshot {
                let index = snapshot.get_metadata().index;
                if batch.installed.is_some() {
                    log.retain(|_, _| false).map_err(|e| self.error(e))?;
                } else {
                    log.retain_in(..index, |_, _| false)
                        .map_err(|e| self.error(e))?;
                }
                let mut metadata_only = Snapshot::default();
                metadata_only.set_metadata(snapshot.get_metadata().clone());
                meta.insert(SNAPSHOT, bytes(&metadata_only).as_slice())
                    .map_err(|e| self.error(e))?;
                meta.insert(
                    CONF_STATE,
                    bytes(snapshot.get_metadata().get_conf_state()).as_slice(),
                )
                .map_err(|e| self.error(e))?;
            }
            if let Some(first) = batch.entries.first() {
                log.retain_in(first.index.., |_, _| false)
                    .map_err(|e| self.error(e))?;
                for entry in &batch.entries {
                    log.insert(entry.index, bytes(entry).as_slice())
                        .map_err(|e| self.error(e))?;
                }
            }
            if let Some(hs) = &batch.hard_state {
                meta.insert(HARD_STATE, bytes(hs).as_slice())
                    .map_err(|e| self.error(e))?;
            }
            if let Some(cs) = &batch.conf_state {
                meta.insert(CONF_STATE, bytes(cs).as_slice())
                    .map_err(|e| self.error(e))?;
            }
        }
        // redb's default durability is Immediate: commit returns after fsync.
        let started = std::time::Instant::now();
        txn.commit().map_err(|e| self.error(e))?;
        crate::metrics::METRICS
            .disk_fsync_seconds
            .observe(started.elapsed());
        if let Some(snapshot) = snapshot {
            self.remove_other_snapshot_files(&self.snapshot_file(snapshot));
        }
        Ok(())
    }

    fn snapshot_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn log_reader(&self) -> Option<Arc<dyn LogRead>> {
        Some(Arc::new(RedbLog {
            db: self.db.clone(),
            path: self.path.clone(),
        }))
    }

    fn size_bytes(&self) -> u64 {
        // The database and the snapshot files beside it.
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Reads a [`RedbDisk`]'s log back (redb serves readers beside its writer).
struct RedbLog {
    db: Arc<redb::Database>,
    path: String,
}

impl LogRead for RedbLog {
    fn read_entries(&self, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, DiskError> {
        let error = |e: &dyn std::fmt::Display| DiskError::Redb {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let txn = self.db.begin_read().map_err(|e| error(&e))?;
        let log = txn.open_table(LOG).map_err(|e| error(&e))?;
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0u64;
        for item in log.range(low..high).map_err(|e| error(&e))? {
            let (index, value) = item.map_err(|e| error(&e))?;
            let expected = low + entries.len() as u64;
            if index.value() != expected {
                return Err(DiskError::Corrupt(format!(
                    "the log on disk lacks entry {expected} (found {} next)",
                    index.value()
                )));
            }
            bytes += value.value().len() as u64;
            if !entries.is_empty() && bytes > max_bytes {
                break;
            }
            entries.push(parse(value.value())?);
        }
        if entries.is_empty() && low < high {
            return Err(DiskError::Corrupt(format!(
                "the log on disk lacks entry {low}"
            )));
        }
        Ok(entries)
    }
}

/// An in-memory disk for simulation: `save` is durable only while `sync` is on.
///
/// Cloning shares the same platters, so a simulated crash rebuilds the node
/// from the same `MemDisk` and sees only what was synced.
///
/// It reads entries back ([`Durable::log_reader`]) as a real disk does, from
/// everything written since the last [`Durable::load`] (a start), synced or
/// not, as the page cache serves unsynced writes until a crash loses them.
#[derive(Clone)]
pub struct MemDisk {
    synced: Arc<Mutex<Recovered>>,
    /// What this start wrote, synced or not: what reads are served from.
    written: Arc<Mutex<Recovered>>,
    sync: Arc<AtomicBool>,
    /// Saves left before every save fails; `u64::MAX` for never.
    saves_left: Arc<AtomicU64>,
    /// Power, and where a power cut inside a Ready pass is armed.
    power: Arc<Mutex<Power>>,
    /// Bytes the platters hold; a save that would need more is refused
    /// whole (a full disk). `u64::MAX` for no limit.
    capacity: Arc<AtomicU64>,
}

/// A [`MemDisk`]'s power supply, for crashes between the steps of a pass.
#[derive(Debug, Default)]
struct Power {
    /// Cut at the save this many saves (of one kind, if given) from now
    /// (0: the next one), before or after its write.
    armed: Option<(u64, bool, Option<SaveKind>)>,
    /// Where the power was cut, while it is off.
    cut: Option<String>,
}

impl Default for MemDisk {
    fn default() -> Self {
        MemDisk::new()
    }
}

impl MemDisk {
    /// A disk that honours the durability contract.
    pub fn new() -> MemDisk {
        MemDisk {
            synced: Arc::default(),
            written: Arc::default(),
            sync: Arc::new(AtomicBool::new(true)),
            saves_left: Arc::new(AtomicU64::new(u64::MAX)),
            power: Arc::default(),
            capacity: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// Arms a power cut at the save `saves` saves from now, counting only
    /// saves of kind `only` if given: before its write reaches the platters,
    /// or just after (`after_write`). Once the power is off every save fails
    /// and nothing more reaches the platters, so the Core stops within the
    /// pass; the simulation mutes what it still says.
    pub fn cut_power_at_save(&self, saves: u64, after_write: bool, only: Option<SaveKind>) {
        self.power.lock().expect("sim disk lock").armed = Some((saves, after_write, only));
    }

    /// Cuts the power now (between two saves), saying where.
    pub fn cut_power(&self, at: impl Into<String>) {
        let mut power = self.power.lock().expect("sim disk lock");
        power.armed = None;
        power.cut = Some(at.into());
    }

    /// Where the power was cut, while it is off.
    pub fn power_cut(&self) -> Option<String> {
        self.power.lock().expect("sim disk lock").cut.clone()
    }

    /// True unless the power was cut.
    pub fn is_powered(&self) -> bool {
        self.power.lock().expect("sim disk lock").cut.is_none()
    }

    /// Power back on, with no cut armed (the member is restarted).
    pub fn restore_power(&self) {
        *self.power.lock().expect("sim disk lock") = Power::default();
    }

    /// Lets the platters hold `bytes` (entries, snapshots, states, by their
    /// encoded size); a save that would need more fails whole, as a full
    /// disk refuses a commit. `u64::MAX` lifts the limit.
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::SeqCst);
    }

    /// Bytes the platters hold now.
    pub fn used_bytes(&self) -> u64 {
        recovered_bytes(&self.synced.lock().expect("sim disk lock"))
    }

    /// The synced hard state (term, vote, commit).
    pub fn synced_hard_state(&self) -> HardState {
        self.synced
            .lock()
            .expect("sim disk lock")
            .hard_state
            .clone()
    }

    /// The last log index on the platters: the last entry's, or the
    /// snapshot's when no entry follows it.
    pub fn synced_last_index(&self) -> u64 {
        let disk = self.synced.lock().expect("sim disk lock");
        let snapshot = disk.snapshot.as_ref().map_or(0, |s| s.get_metadata().index);
        disk.entries
            .last()
            .map_or(snapshot, |e| e.index.max(snapshot))
    }

    /// Whether the power cut armed for this save fires, before or after its
    /// write (`after_write`); counts the save down otherwise.
    fn power_cut_fires(&self, after_write: bool, batch: &Batch) -> bool {
        let mut power = self.power.lock().expect("sim disk lock");
        let Some((left, after, only)) = power.armed else {
            return false;
        };
        let kind = SaveKind::of(batch);
        if only.is_some_and(|only| only != kind) {
            return false;
        }
        if left > 0 {
            if after_write {
                power.armed = Some((left - 1, after, only));
            }
            return false;
        }
        if after != after_write {
            return false;
        }
        power.armed = None;
        let when = if after_write { "after" } else { "before" };
        power.cut = Some(format!("{when} the {} write", kind.name()));
        true
    }

    /// Turns syncing off (or back on) for this disk and all its clones. With
    /// sync off, saves are acknowledged but never reach the platters: the
    /// mutation the simulation's checker must catch.
    pub fn set_sync(&self, on: bool) {
        self.sync.store(on, Ordering::SeqCst);
    }

    /// Lets `saves` more saves succeed, then fails every one after (a disk
    /// that died or filled up), for this disk and all its clones.
    pub fn fail_after(&self, saves: u64) {
        self.saves_left.store(saves, Ordering::SeqCst);
    }
}

impl Durable for MemDisk {
    fn load(&self) -> Result<Recovered, DiskError> {
        let synced = self.synced.lock().expect("sim disk lock").clone();
        // A start: whatever was written but not synced is gone.
        *self.written.lock().expect("sim disk lock") = synced.clone();
        Ok(synced)
    }

    fn log_reader(&self) -> Option<Arc<dyn LogRead>> {
        Some(Arc::new(MemLog {
            written: self.written.clone(),
        }))
    }

    fn save(&mut self, batch: &Batch) -> Result<(), DiskError> {
        if !self.is_powered() || self.power_cut_fires(false, batch) {
            return Err(DiskError::Failed("simulated power cut".into()));
        }
        let left = self.saves_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(DiskError::Failed("simulated disk failure".into()));
        }
        if left != u64::MAX {
            self.saves_left.store(left - 1, Ordering::SeqCst);
        }
        if !self.sync.load(Ordering::SeqCst) {
            write_batch(&mut self.written.lock().expect("sim disk lock"), batch);
            return Ok(());
        }
        let mut disk = self.synced.lock().expect("sim disk lock");
        let capacity = self.capacity.load(Ordering::SeqCst);
        if capacity != u64::MAX {
            let mut after = disk.clone();
            write_batch(&mut after, batch);
            if recovered_bytes(&after) > capacity {
                return Err(DiskError::Failed(
                    "simulated full disk: no space left on device".into(),
                ));
            }
        }
        write_batch(&mut disk, batch);
        drop(disk);
        write_batch(&mut self.written.lock().expect("sim disk lock"), batch);
        // Written: a cut armed "after the write" fires now; the Core learns
        // of it at its next save, and the simulation at once.
        self.power_cut_fires(true, batch);
        Ok(())
    }
}

/// Reads a [`MemDisk`]'s log back: what its member wrote since it started.
struct MemLog {
    written: Arc<Mutex<Recovered>>,
}

impl LogRead for MemLog {
    fn read_entries(&self, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, DiskError> {
        let written = self.written.lock().expect("sim disk lock");
        // Entries are kept in index order ([`write_batch`]).
        let from = written.entries.partition_point(|e| e.index < low);
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0u64;
        for index in low..high {
            let Some(entry) = written
                .entries
                .get(from + entries.len())
                .filter(|e| e.index == index)
            else {
                return Err(DiskError::Corrupt(format!(
                    "the simulated log lacks entry {index}"
                )));
            };
            bytes += u64::from(entry.compute_size());
            if !entries.is_empty() && bytes > max_bytes {
                break;
            }
            entries.push(entry.clone());
        }
        Ok(entries)
    }
}

/// Which step of a Ready pass a save belongs to, by what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveKind {
    /// Entries, hard state or a snapshot received (the pass's fsync).
    Persist,
    /// A membership change recorded while applying it.
    MembershipRecord,
    /// A snapshot the member took of its own state.
    Snapshot,
}

impl SaveKind {
    fn of(batch: &Batch) -> SaveKind {
        if batch.taken.is_some() {
            SaveKind::Snapshot
        } else if batch.entries.is_empty()
            && batch.installed.is_none()
            && batch.hard_state.is_none()
        {
            SaveKind::MembershipRecord
        } else {
            SaveKind::Persist
        }
    }

    fn name(self) -> &'static str {
        match self {
            SaveKind::Persist => "persist",
            SaveKind::MembershipRecord => "membership record",
            SaveKind::Snapshot => "snapshot",
        }
    }
}

/// Bytes `disk` takes, by the encoded size of what it holds.
fn recovered_bytes(disk: &Recovered) -> u64 {
    use protobuf::Message as _;
    let entries: u64 = disk
        .entries
        .iter()
        .map(|e| u64::from(e.compute_size()))
        .sum();
    let snapshot = disk
        .snapshot
        .as_ref()
        .map_or(0, |s| u64::from(s.compute_size()));
    entries + snapshot + u64::from(disk.hard_state.compute_size())
}

/// Writes `batch` onto `disk`, as one atomic commit.
fn write_batch(disk: &mut Recovered, batch: &Batch) {
    if let Some(snapshot) = batch.installed.as_ref().or(batch.taken.as_ref()) {
        let index = snapshot.get_metadata().index;
        if batch.installed.is_some() {
            disk.entries.clear();
        } else {
            disk.entries.retain(|e| e.index >= index);
        }
        disk.conf_state = snapshot.get_metadata().get_conf_state().clone();
        disk.snapshot = Some(snapshot.clone());
    }
    if let Some(first) = batch.entries.first() {
        disk.entries.retain(|e| e.index < first.index);
        disk.entries.extend(batch.entries.iter().cloned());
    }
    if let Some(hs) = &batch.hard_state {
        disk.hard_state = hs.clone();
    }
    if let Some(cs) = &batch.conf_state {
        disk.conf_state = cs.clone();
    }
}

/// The log as raft-rs reads it: entries and states in memory, plus our snapshot.
#[derive(Clone)]
pub struct LogStore {
    mem: MemStorage,
    snapshot: Arc<RwLock<Snapshot>>,
    /// The snapshot's data lives in a file ([`Durable::snapshot_dir`]): the
    /// view keeps its metadata only, and hands raft-rs a `MsgSnapshot`
    /// without data, which the transport fills from the file as it sends.
    data_in_file: bool,
    /// Where entries evicted from memory are read back; `None`: nothing is
    /// evicted.
    disk: Option<Arc<dyn LogRead>>,
    /// Applied entries kept in memory behind the applied index.
    window: u64,
    /// The first index the log holds, in memory or on the disk: raft-rs's
    /// `first_index` (memory's own first index moves on with evictions).
    first: Arc<AtomicU64>,
}

/// Applied entries a log view keeps in memory by default when its disk can
/// read older ones back ([`LogStore::reading_from`]). Every follower that
/// keeps up is sent entries from memory; one further behind than this, from
/// the disk.
pub const DEFAULT_LOG_MEMORY_ENTRIES: u64 = 8192;

impl LogStore {
    /// Rebuilds the in-memory view from what the disk recovered;
    /// `data_in_file` as [`Durable::snapshot_dir`] says.
    pub fn from_recovered(
        recovered: &Recovered,
        data_in_file: bool,
    ) -> Result<LogStore, DiskError> {
        let mem = MemStorage::new();
        let mut snapshot = Snapshot::default();
        {
            let mut core = mem.wl();
            if let Some(snap) = &recovered.snapshot {
                // Index 0 is the founding membership, taken before any entry.
                if snap.get_metadata().index > 0 {
                    core.apply_snapshot(snap.clone())
                        .map_err(|e| DiskError::Corrupt(e.to_string()))?;
                }
                snapshot = snap.clone();
            }
            let after = snapshot.get_metadata().index;
            let tail: Vec<Entry> = recovered
                .entries
                .iter()
                .filter(|e| e.index > after)
                .cloned()
                .collect();
            core.append(&tail)
                .map_err(|e| DiskError::Corrupt(e.to_string()))?;
            core.set_conf_state(recovered.conf_state.clone());
            // The commit index is saved lazily; a snapshot proves at least its
            // own index was committed, and raft-rs requires applied <= commit.
            let mut hard_state = recovered.hard_state.clone();
            hard_state.commit = hard_state.commit.max(after);
            core.set_hardstate(hard_state);
        }
        let first = raft::Storage::first_index(&mem).unwrap_or(1);
        let store = LogStore {
            mem,
            snapshot: Arc::new(RwLock::new(Snapshot::default())),
            data_in_file,
            disk: None,
            window: DEFAULT_LOG_MEMORY_ENTRIES,
            first: Arc::new(AtomicU64::new(first)),
        };
        store.keep(&snapshot);
        Ok(store)
    }

    /// The same view, keeping only the `window` newest applied entries in
    /// memory ([`LogStore::evict`]) and reading older ones from `disk`.
    pub fn reading_from(mut self, disk: Arc<dyn LogRead>, window: u64) -> LogStore {
        self.disk = Some(disk);
        self.window = window.max(1);
        self
    }

    /// Drops from memory the entries more than the window behind `applied`
    /// (in steps of a window, so the log is not moved on every pass). Only
    /// applied entries, which are saved and committed and so never replaced,
    /// leave memory; raft-rs then reads them through [`LogRead`]. Nothing
    /// happens for a view without a disk reader.
    pub fn evict(&self, applied: u64) {
        if self.disk.is_none() {
            return;
        }
        let Ok(in_memory) = raft::Storage::first_index(&self.mem) else {
            return;
        };
        if applied > in_memory + 2 * self.window {
            let mut core = self.mem.wl();
            // Cannot fail: the index is past the first one and not past the last.
            let _ = core.compact(applied - self.window);
        }
    }

    /// The error raft-rs gets when the disk cannot read an entry back: the
    /// node stops on it (a disk failure, as any other).
    fn read_error(e: DiskError) -> raft::Error {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }

    /// Makes `snapshot` the one raft-rs is handed, without its data when
    /// that is in a file.
    fn keep(&self, snapshot: &Snapshot) {
        let mut kept = self.snapshot.write().expect("snapshot lock");
        if self.data_in_file {
            kept.set_metadata(snapshot.get_metadata().clone());
            kept.data = Default::default();
        } else {
            *kept = snapshot.clone();
        }
    }

    /// Applies a saved batch to the in-memory view (after [`Durable::save`]).
    pub fn apply(&self, batch: &Batch) -> raft::Result<()> {
        let mut core = self.mem.wl();
        if let Some(snap) = &batch.installed {
            let mut metadata_only = Snapshot::default();
            metadata_only.set_metadata(snap.get_metadata().clone());
            core.apply_snapshot(metadata_only)?;
            self.keep(snap);
            // The whole log was replaced, on the disk too.
            self.first
                .store(snap.get_metadata().index + 1, Ordering::SeqCst);
        }
        if let Some(snap) = &batch.taken {
            core.compact(snap.get_metadata().index)?;
            self.keep(snap);
            // The disk keeps the entry at the snapshot's index, as memory does.
            self.first
                .fetch_max(snap.get_metadata().index, Ordering::SeqCst);
        }
        core.append(&batch.entries)?;
        if let Some(hs) = &batch.hard_state {
            core.set_hardstate(hs.clone());
        }
        if let Some(cs) = &batch.conf_state {
            core.set_conf_state(cs.clone());
        }
        Ok(())
    }

    /// The membership the latest snapshot records.
    pub fn snapshot_conf_state(&self) -> ConfState {
        self.snapshot
            .read()
            .expect("snapshot lock")
            .get_metadata()
            .get_conf_state()
            .clone()
    }

    /// The latest snapshot's index (0 when there is none).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot
            .read()
            .expect("snapshot lock")
            .get_metadata()
            .index
    }

    /// The term of the entry at `index`, when the log still has it.
    pub fn term_of(&self, index: u64) -> Option<u64> {
        raft::Storage::term(self, index).ok()
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let in_memory = self.mem.first_index()?;
        let Some(disk) = self.disk.as_ref().filter(|_| low < in_memory) else {
            return self.mem.entries(low, high, max_size, context);
        };
        if low < self.first.load(Ordering::SeqCst) {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let budget = max_size.unwrap_or(u64::MAX);
        let mut entries = disk
            .read_entries(low, high.min(in_memory), budget)
            .map_err(Self::read_error)?;
        let read: u64 = entries.iter().map(|e| u64::from(e.compute_size())).sum();
        let complete = entries.last().is_some_and(|e| e.index + 1 == in_memory);
        if complete && high > in_memory && read < budget {
            entries.extend(self.mem.entries(in_memory, high, budget - read, context)?);
        }
        raft::util::limit_size(&mut entries, max_size);
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        match self.mem.term(idx) {
            Err(raft::Error::Store(StorageError::Compacted))
                if idx >= self.first.load(Ordering::SeqCst) =>
            {
                let Some(disk) = &self.disk else {
                    return Err(raft::Error::Store(StorageError::Compacted));
                };
                let entries = disk
                    .read_entries(idx, idx + 1, 0)
                    .map_err(Self::read_error)?;
                Ok(entries[0].term)
            }
            other => other,
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        match self.disk {
            Some(_) => Ok(self.first.load(Ordering::SeqCst)),
            None => self.mem.first_index(),
        }
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snapshot = self.snapshot.read().expect("snapshot lock").clone();
        let has_data = self.data_in_file || !snapshot.data.is_empty();
        if snapshot.get_metadata().index < request_index || !has_data {
            // The node makes a fresh snapshot soon; raft-rs asks again.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Entry::default()
        }
    }

    fn hard(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            commit,
            ..HardState::default()
        }
    }

    fn exercise(disk: &mut dyn Durable) {
        assert!(disk.load().unwrap().is_empty());
        disk.save(&Batch {
            entries: vec![entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")],
            hard_state: Some(hard(1, 2)),
            ..Batch::default()
        })
        .unwrap();
        // A new leader overwrites the uncommitted tail.
        disk.save(&Batch {
            entries: vec![entry(3, 2, b"x")],
            hard_state: Some(hard(2, 3)),
            ..Batch::default()
        })
        .unwrap();
        let r = disk.load().unwrap();
        let got: Vec<_> = r.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, [(1, 1), (2, 1), (3, 2)]);
        assert_eq!(r.hard_state, hard(2, 3));

        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 2;
        snap.mut_metadata().term = 1;
        snap.data = b"state".to_vec().into();
        disk.save(&Batch {
            taken: Some(snap.clone()),
            ..Batch::default()
        })
        .unwrap();
        let r = disk.load().unwrap();
        assert_eq!(r.snapshot.unwrap().data.as_ref(), b"state");
        assert_eq!(
            r.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            [2, 3]
        );
        snap.mut_metadata().index = 5;
        disk.save(&Batch {
            installed: Some(snap),
            ..Batch::default()
        })
        .unwrap();
        let r = disk.load().unwrap();
        assert!(r.entries.is_empty());
        assert_eq!(r.snapshot.unwrap().get_metadata().index, 5);
    }

    #[test]
    fn redb_disk_keeps_its_contract_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut disk = RedbDisk::open(dir.path()).unwrap();
            exercise(&mut disk);
        }
        let disk = RedbDisk::open(dir.path()).unwrap();
        let r = disk.load().unwrap();
        assert!(r.entries.is_empty());
        assert_eq!(r.hard_state, hard(2, 3));
        assert_eq!(r.snapshot.unwrap().data.as_ref(), b"state");
        let files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snapshot-"))
            .collect();
        assert_eq!(
            files.len(),
            1,
            "older snapshot files are removed: {files:?}"
        );
        std::fs::remove_file(dir.path().join(&files[0])).unwrap();
        assert!(
            matches!(disk.load(), Err(DiskError::Corrupt(_))),
            "a missing snapshot file is corruption"
        );
    }

    /// Saves `batch` and applies it to `view`, as the node does.
    fn save_and_view(disk: &mut RedbDisk, view: &LogStore, batch: Batch) {
        disk.save(&batch).unwrap();
        view.apply(&batch).unwrap();
    }

    #[test]
    fn a_view_with_a_disk_reader_keeps_a_window_and_reads_the_rest_back() {
        use raft::Storage as _;
        let dir = tempfile::tempdir().unwrap();
        let mut disk = RedbDisk::open(dir.path()).unwrap();
        let view = LogStore::from_recovered(&disk.load().unwrap(), true)
            .unwrap()
            .reading_from(disk.log_reader().unwrap(), 4);
        let all: Vec<Entry> = (1..=40)
            .map(|i| entry(i, 1 + i / 10, format!("entry {i:03}").as_bytes()))
            .collect();
        for chunk in all.chunks(7) {
            save_and_view(
                &mut disk,
                &view,
                Batch {
                    entries: chunk.to_vec(),
                    ..Batch::default()
                },
            );
        }
        view.evict(38);
        let in_memory = view.mem.first_index().unwrap();
        assert_eq!(in_memory, 34, "applied 38, a window of 4");
        assert_eq!(
            view.first_index().unwrap(),
            1,
            "the disk still has them all"
        );
        assert_eq!(view.last_index().unwrap(), 40);
        let ctx = || GetEntriesContext::empty(false);
        assert_eq!(view.entries(1, 41, None, ctx()).unwrap(), all);
        assert_eq!(view.entries(3, 9, None, ctx()).unwrap(), all[2..8]);
        assert_eq!(view.entries(30, 36, None, ctx()).unwrap(), all[29..35]);
        for e in &all {
            assert_eq!(view.term(e.index).unwrap(), e.term, "term of {}", e.index);
        }
        // A size limit gives a prefix, at least one entry, from either part.
        let one = u64::from(all[0].compute_size());
        assert_eq!(view.entries(1, 41, one * 3, ctx()).unwrap(), all[..3]);
        assert_eq!(view.entries(1, 41, 0, ctx()).unwrap(), all[..1]);
        assert_eq!(view.entries(32, 41, one * 4, ctx()).unwrap(), all[31..35]);
        // Not yet a window's step behind: nothing more leaves memory.
        view.evict(40);
        assert_eq!(view.mem.first_index().unwrap(), 34);

        // A snapshot at 20 compacts the disk and the view alike.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 3;
        snap.data = b"state".to_vec().into();
        save_and_view(
            &mut disk,
            &view,
            Batch {
                taken: Some(snap),
                ..Batch::default()
            },
        );
        assert_eq!(view.first_index().unwrap(), 20);
        assert!(matches!(
            view.entries(19, 25, None, ctx()),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(matches!(
            view.term(19),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(view.entries(20, 41, None, ctx()).unwrap(), all[19..]);
        assert_eq!(view.term(20).unwrap(), 3);

        // A snapshot from the leader replaces the whole log.
        let mut installed = Snapshot::default();
        installed.mut_metadata().index = 50;
        installed.mut_metadata().term = 6;
        save_and_view(
            &mut disk,
            &view,
            Batch {
                installed: Some(installed),
                entries: vec![entry(51, 6, b"after")],
                ..Batch::default()
            },
        );
        assert_eq!(view.first_index().unwrap(), 51);
        assert_eq!(
            view.entries(51, 52, None, ctx()).unwrap(),
            [entry(51, 6, b"after")]
        );
        assert_eq!(view.term(50).unwrap(), 6);
    }

    #[test]
    fn a_view_without_a_disk_reader_keeps_the_whole_log() {
        use raft::Storage as _;
        let disk = MemDisk::new();
        // Not made `reading_from` a disk: it evicts nothing.
        let view = LogStore::from_recovered(&disk.load().unwrap(), false).unwrap();
        let all: Vec<Entry> = (1..=40).map(|i| entry(i, 1, b"x")).collect();
        view.apply(&Batch {
            entries: all.clone(),
            ..Batch::default()
        })
        .unwrap();
        view.evict(40);
        assert_eq!(view.mem.first_index().unwrap(), 1);
        let ctx = GetEntriesContext::empty(false);
        assert_eq!(view.entries(1, 41, None, ctx).unwrap(), all);
    }

    #[test]
    fn a_mem_disk_reads_back_what_this_start_wrote_synced_or_not() {
        let mut disk = MemDisk::new();
        disk.load().unwrap();
        let reader = disk.log_reader().unwrap();
        disk.save(&Batch {
            entries: vec![entry(1, 1, b"a"), entry(2, 1, b"b")],
            ..Batch::default()
        })
        .unwrap();
        disk.set_sync(false);
        disk.save(&Batch {
            entries: vec![entry(3, 1, b"c")],
            ..Batch::default()
        })
        .unwrap();
        let read = reader.read_entries(1, 4, u64::MAX).unwrap();
        assert_eq!(
            read,
            [entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")]
        );
        assert_eq!(reader.read_entries(2, 4, 0).unwrap(), [entry(2, 1, b"b")]);
        // A restart: the unsynced entry is gone, for reads too.
        assert_eq!(disk.load().unwrap().entries.len(), 2);
        assert!(matches!(
            reader.read_entries(3, 4, u64::MAX),
            Err(DiskError::Corrupt(_))
        ));
    }

    #[test]
    fn mem_disk_keeps_its_contract_and_forgets_unsynced_writes() {
        let mut disk = MemDisk::new();
        exercise(&mut disk);
        let mut unsynced = MemDisk::new();
        unsynced.set_sync(false);
        unsynced
            .save(&Batch {
                entries: vec![entry(1, 1, b"a")],
                ..Batch::default()
            })
            .unwrap();
        assert!(unsynced.load().unwrap().is_empty());
    }

    #[test]
    fn newer_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(RedbDisk::open(dir.path()).unwrap());
        {
            let db = redb::Database::create(dir.path().join("raft.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(FORMAT, [codec::FORMAT_VERSION + 1].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(
            RedbDisk::open(dir.path()),
            Err(DiskError::Format(_))
        ));
    }
}
