//! The real disk (`RedbDisk`, the daemon's) failing in the middle of a
//! batch.
//!
//! The simulation's `MemDisk` refuses a failing batch whole, which is what
//! redb promises of a commit. This checks the promise on the real thing: a
//! child process saves batches of log entries, each larger than a database
//! page, under a file-size limit (`ulimit -f`, with `SIGXFSZ` ignored so the
//! kernel fails the write with `EFBIG` instead of killing the process) until
//! a save fails partway through its writes. A second child does the same
//! with a snapshot whose data file outgrows the limit. Afterwards, without
//! the limit, the database must open and hold exactly the batches whose
//! save returned, none of the failed one, every entry byte for byte, and
//! take the failed batch again: a failed save never leaves a half-written
//! batch nor a database that cannot go on (the member stops on the error,
//! systemd restarts it, and it must come back from what it acknowledged).

use std::path::Path;
use std::process::Command;

use flotilla::consensus::storage::{Batch, Durable, RedbDisk};
use raft::eraftpb::{Entry, HardState, Snapshot};

/// Entries per batch.
const ENTRIES: u64 = 40;
/// Bytes of data per entry: a batch is about 160 KiB, many pages.
const ENTRY_BYTES: usize = 4096;
/// The child's file-size limit, in `ulimit -f`'s 512-byte blocks (4 MiB).
const LIMIT_BLOCKS: u64 = 8192;
/// Tells the test binary it runs as the child, and in which directory.
const CHILD_DIR: &str = "FLOTILLA_DISK_FAULT_DIR";
/// Tells the child what to write: `entries` or `snapshot`.
const CHILD_MODE: &str = "FLOTILLA_DISK_FAULT_MODE";

/// The data of the entry at `index`: different for every index, so a stray
/// or misplaced entry cannot pass for the right one.
fn data(index: u64) -> Vec<u8> {
    (0..ENTRY_BYTES)
        .map(|i| (index.wrapping_mul(31).wrapping_add(i as u64) % 251) as u8)
        .collect()
}

fn entry(index: u64) -> Entry {
    Entry {
        index,
        term: 1,
        data: data(index).into(),
        ..Entry::default()
    }
}

/// Batch `n` (from 0): entries `n * ENTRIES + 1 ..= (n + 1) * ENTRIES` and
/// a hard state committing its last one.
fn batch(n: u64) -> Batch {
    let first = n * ENTRIES + 1;
    let last = first + ENTRIES - 1;
    Batch {
        entries: (first..=last).map(entry).collect(),
        hard_state: Some(HardState {
            term: 1,
            vote: 1,
            commit: last,
            ..HardState::default()
        }),
        ..Batch::default()
    }
}

/// A snapshot of the state at `index` whose data is `len` bytes.
fn snapshot(index: u64, len: usize) -> Snapshot {
    let mut snapshot = Snapshot {
        data: (0..len)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<u8>>()
            .into(),
        ..Snapshot::default()
    };
    snapshot.mut_metadata().index = index;
    snapshot.mut_metadata().term = 1;
    snapshot.mut_metadata().mut_conf_state().voters = vec![1];
    snapshot
}

/// Runs this binary's `child` under the file-size limit, writing into
/// `dir`; returns what it printed (one line per save).
fn run_child(dir: &Path, mode: &str) -> String {
    let me = std::env::current_exe().expect("the test binary's path");
    let output = Command::new("sh")
        .arg("-c")
        // An ignored signal stays ignored across exec.
        .arg(format!(
            "trap '' XFSZ; ulimit -f {LIMIT_BLOCKS}; exec \"$0\" --exact child --ignored --nocapture --test-threads 1"
        ))
        .arg(me)
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .output()
        .expect("the child runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the child failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The saves the child reported: how many batches returned Ok, and the
/// error of the one that failed. (libtest may print the test's name on the
/// line of its first output, so a report is found anywhere in a line.)
fn outcome(stdout: &str) -> (u64, String) {
    let saved = stdout
        .lines()
        .filter(|l| l.contains("saved batch "))
        .count() as u64;
    let failed = stdout
        .lines()
        .find_map(|l| l.split_once("failed: ").map(|(_, e)| e))
        .unwrap_or_else(|| panic!("no save failed under the limit:\n{stdout}"))
        .to_string();
    (saved, failed)
}

/// The child: saves until a save fails, printing each outcome.
#[test]
#[ignore = "run by the tests below in a child process under a file-size limit"]
fn child() {
    let dir = std::env::var(CHILD_DIR).expect("run by the tests below");
    let mut disk = RedbDisk::open(Path::new(&dir)).expect("the database opens");
    let mode = std::env::var(CHILD_MODE).expect("a mode");
    for n in 0.. {
        let mut next = batch(n);
        if mode == "snapshot" && n == 3 {
            // Twice the limit: its data file cannot be written whole.
            let len = usize::try_from(LIMIT_BLOCKS * 512 * 2).expect("fits");
            next = Batch {
                taken: Some(snapshot(n * ENTRIES, len)),
                ..Batch::default()
            };
        }
        match disk.save(&next) {
            Ok(()) => println!("saved batch {n}"),
            Err(e) => {
                println!("failed: {e}");
                return;
            }
        }
        assert!(n < 10_000, "the file-size limit never stopped a save");
    }
}

/// Checks that `dir`'s database holds exactly batches `0..saved`, then
/// that it takes batch `saved` now that there is room.
fn assert_holds_exactly(dir: &Path, saved: u64) {
    let mut disk = RedbDisk::open(dir).expect("the database opens after the failed save");
    let recovered = disk.load().expect("the database reads back");
    let last = saved * ENTRIES;
    assert_eq!(
        recovered.entries.len() as u64,
        last,
        "entries after {saved} saved batches"
    );
    for (i, got) in recovered.entries.iter().enumerate() {
        let index = i as u64 + 1;
        assert_eq!(got.index, index);
        assert!(got.data == data(index), "entry {index} differs");
    }
    assert_eq!(recovered.hard_state.commit, last, "the hard state");
    assert!(recovered.snapshot.is_none(), "a snapshot was recorded");
    disk.save(&batch(saved))
        .expect("the database takes the failed batch once there is room");
    let recovered = disk.load().expect("the database reads back");
    assert_eq!(recovered.entries.len() as u64, last + ENTRIES);
    assert_eq!(recovered.hard_state.commit, last + ENTRIES);
}

#[test]
fn a_batch_cut_short_by_the_disk_is_not_saved_at_all() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (saved, failed) = outcome(&run_child(dir.path(), "entries"));
    assert!(saved > 0, "the limit stopped the first save: {failed}");
    // The error is the disk's, reported with the database's path.
    assert!(failed.contains("raft.redb"), "{failed}");
    let size = std::fs::metadata(dir.path().join("raft.redb"))
        .expect("the database file")
        .len();
    eprintln!("{saved} batches saved, then: {failed} (file {size} bytes)");
    assert_holds_exactly(dir.path(), saved);
}

#[test]
fn a_snapshot_whose_file_cannot_be_written_is_not_recorded() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (saved, failed) = outcome(&run_child(dir.path(), "snapshot"));
    assert_eq!(saved, 3, "the batches before the snapshot: {failed}");
    assert!(failed.contains("writing"), "{failed}");
    assert_holds_exactly(dir.path(), saved);
    // The partial file is a leftover the next snapshot's save removes; it
    // is never named by the database.
    let mut disk = RedbDisk::open(dir.path()).expect("the database opens");
    let index = (saved + 1) * ENTRIES;
    disk.save(&Batch {
        taken: Some(snapshot(index, 1024)),
        ..Batch::default()
    })
    .expect("a snapshot that fits");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("the directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot-"))
        .collect();
    assert_eq!(names.len(), 1, "snapshot files left: {names:?}");
    let recovered = disk.load().expect("the database reads back");
    let snapshot = recovered.snapshot.expect("the snapshot that fit");
    assert_eq!(snapshot.get_metadata().index, index);
    assert_eq!(snapshot.data.len(), 1024);
}
