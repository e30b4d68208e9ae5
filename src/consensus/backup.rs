//! Backups and disaster recovery of the store.
//!
//! * A **backup file** (`flotilla snapshot save`) is one live member's state
//!   machine, read at a linearizable point (after a ReadIndex, like any
//!   linearizable read), with the membership of the time: the magic line
//!   [`MAGIC`], the SHA-256 of the body, then the body in the versioned
//!   snapshot encoding ([`codec`]). A truncated or altered file is refused.
//! * **Restore** (`flotilla snapshot restore`) makes a new cluster's data dir
//!   from a backup: the founding snapshot a new cluster starts from
//!   ([`founding_batch`]), holding the backup's state machine instead of an
//!   empty one, and the new cluster's members. Every founding member restores
//!   the same file with the same members; the dirs are identical.
//! * **Force new cluster** (`flotilla daemon --force-new-cluster`), for when
//!   a quorum is lost for good: this member's own disk becomes a one-member
//!   cluster. Every entry its log holds, committed or not, is applied onto
//!   its last snapshot, as a newly elected leader holding that log would
//!   commit them all; the result is saved as an installed snapshot whose only
//!   voter is this member. Raft's term is kept, so the new cluster's terms
//!   only grow.

use std::collections::BTreeMap;
use std::path::Path;

use raft::eraftpb::{ConfState, EntryType, Snapshot};
use sha2::{Digest, Sha256};

use super::codec::{self, CodecError, MemberInfo, SnapshotData};
use super::kv::{KvStore, Revision};
use super::node::founding_batch;
use super::storage::{Batch, DiskError, Durable, RedbDisk};

/// The first bytes of every backup file.
pub const MAGIC: &[u8] = b"flotilla-snapshot\n";

/// Why a backup could not be read, restored or a cluster forced.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The file is no flotilla backup.
    #[error("not a flotilla snapshot file (it must start with {:?})", String::from_utf8_lossy(MAGIC).trim())]
    NotABackup,
    /// The body does not match its checksum: truncated or altered.
    #[error(
        "the snapshot file is damaged (its checksum does not match: truncated or altered); \
         save a new one with flotilla snapshot save"
    )]
    Damaged,
    /// The body could not be decoded.
    #[error("cannot decode the snapshot: {0}")]
    Codec(#[from] CodecError),
    /// The Raft store could not be read or written.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Restore never overwrites a store.
    #[error(
        "{} already holds a Raft store; restore into a new, empty data dir",
        .0.display()
    )]
    StoreExists(std::path::PathBuf),
    /// Force-new-cluster found nothing to keep.
    #[error(
        "this data dir holds no Raft state to recover; --force-new-cluster starts from a \
         surviving member's data dir (or restore a backup: flotilla snapshot restore)"
    )]
    NothingToRecover,
}

/// The bytes of a backup file of `kv` and `members`.
pub fn encode(kv: &KvStore, members: &BTreeMap<u64, MemberInfo>) -> Vec<u8> {
    let body = codec::encode_snapshot(kv, members);
    let mut file = Vec::with_capacity(MAGIC.len() + 32 + body.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&Sha256::digest(&body));
    file.extend_from_slice(&body);
    file
}

/// Reads a backup file's bytes, checking its checksum.
pub fn decode(file: &[u8]) -> Result<SnapshotData, BackupError> {
    let rest = file.strip_prefix(MAGIC).ok_or(BackupError::NotABackup)?;
    if rest.len() < 32 {
        return Err(BackupError::Damaged);
    }
    let (sum, body) = rest.split_at(32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(BackupError::Damaged);
    }
    Ok(codec::decode_snapshot(body)?)
}

/// Writes a new cluster's Raft store into `raft_dir` from a backup, with
/// `members` as its founding members. Refuses a dir that holds a store.
pub fn restore(
    data: &SnapshotData,
    raft_dir: &Path,
    members: &BTreeMap<u64, MemberInfo>,
) -> Result<(), BackupError> {
    if raft_dir.join("raft.redb").exists() {
        return Err(BackupError::StoreExists(raft_dir.to_path_buf()));
    }
    let mut disk = RedbDisk::open(raft_dir)?;
    disk.save(&founding_batch(&data.kv, members))?;
    Ok(())
}

/// What [`force_new_cluster`] kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forced {
    /// The log index the new cluster starts after.
    pub index: u64,
    /// Log entries applied onto the last snapshot.
    pub entries: usize,
    /// The state machine's revision.
    pub revision: Revision,
    /// The members left behind, by name.
    pub dropped: Vec<String>,
}

/// Turns the Raft state on `disk` into a one-member cluster of `me`. See the
/// module documentation.
pub fn force_new_cluster<D: Durable>(
    disk: &mut D,
    me: u64,
    info: MemberInfo,
) -> Result<Forced, BackupError> {
    let recovered = disk.load()?;
    if recovered.is_empty() {
        return Err(BackupError::NothingToRecover);
    }
    let (mut data, mut index, mut term) = match &recovered.snapshot {
        Some(snap) => (
            codec::decode_snapshot(&snap.data)?,
            snap.get_metadata().index,
            snap.get_metadata().term,
        ),
        None => (
            SnapshotData {
                kv: KvStore::new(super::kv::DEFAULT_HISTORY_LIMIT),
                members: BTreeMap::new(),
            },
            0,
            0,
        ),
    };
    let mut entries = 0;
    let after = index;
    for entry in recovered.entries.iter().filter(|e| e.index > after) {
        if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
            let (command, agent) = codec::decode_entry(&entry.data)?;
            data.kv.apply_for(&command, agent.as_deref());
        }
        // Membership changes are not replayed: the only member is `me`.
        index = entry.index;
        term = entry.term;
        entries += 1;
    }
    let dropped = data
        .members
        .iter()
        .filter(|(id, _)| **id != me)
        .map(|(_, m)| m.name.clone())
        .collect();
    let members = BTreeMap::from([(me, info)]);
    let cs = ConfState {
        voters: vec![me],
        ..ConfState::default()
    };
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = index;
    snap.mut_metadata().term = term;
    snap.mut_metadata().set_conf_state(cs.clone());
    snap.data = codec::encode_snapshot(&data.kv, &members).into();
    let mut hard_state = recovered.hard_state.clone();
    hard_state.term = hard_state.term.max(term);
    hard_state.commit = index;
    disk.save(&Batch {
        installed: Some(snap),
        conf_state: Some(cs),
        hard_state: Some(hard_state),
        ..Batch::default()
    })?;
    Ok(Forced {
        index,
        entries,
        revision: data.kv.revision(),
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::kv::Command;

    fn members(names: &[&str]) -> BTreeMap<u64, MemberInfo> {
        names
            .iter()
            .map(|n| {
                let info = MemberInfo {
                    name: n.to_string(),
                    peer_addr: format!("127.0.0.1:{}", n.len()),
                };
                (super::super::node::member_id(n), info)
            })
            .collect()
    }

    #[test]
    fn a_backup_file_reads_back_and_a_damaged_one_is_refused() {
        let mut kv = KvStore::new(100);
        kv.apply(&Command::put("/a", "1", None));
        kv.apply(&Command::put("/b", "2", None));
        let file = encode(&kv, &members(&["n1"]));
        let back = decode(&file).unwrap();
        assert_eq!(back.kv.get("/b").unwrap().value, b"2");
        assert_eq!(back.kv.revision(), 2);
        assert!(matches!(
            decode(&file[..file.len() - 1]),
            Err(BackupError::Damaged)
        ));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&flipped), Err(BackupError::Damaged)));
        assert!(matches!(decode(b"hello"), Err(BackupError::NotABackup)));
    }

    #[test]
    fn restore_refuses_a_dir_that_holds_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let data = SnapshotData {
            kv: KvStore::new(100),
            members: BTreeMap::new(),
        };
        restore(&data, dir.path(), &members(&["n1"])).unwrap();
        let again = restore(&data, dir.path(), &members(&["n1"]));
        assert!(
            matches!(again, Err(BackupError::StoreExists(_))),
            "{again:?}"
        );
    }

    #[test]
    fn forcing_an_empty_disk_is_refused() {
        let mut disk = super::super::storage::MemDisk::new();
        let info = MemberInfo {
            name: "n1".into(),
            peer_addr: "127.0.0.1:1".into(),
        };
        let forced = force_new_cluster(&mut disk, 1, info);
        assert!(matches!(forced, Err(BackupError::NothingToRecover)));
    }
}
