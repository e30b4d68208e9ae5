//! The unit files this agent has written, under `/run/flotilla/units/`.
//!
//! The directory is the agent's memory of what it loaded: after a daemon
//! restart it lists the files to know which units are flotilla's, and hashes
//! each one to know which body it holds. It lives on /run, a tmpfs, so a
//! reboot starts from nothing, as systemd's runtime links do.
//!
//! Every file system call runs on tokio's blocking pool, never on the
//! runtime's workers: a disk that stalls (or, in the simulator, a thousand
//! hosts' files on one disk) must not hold up the tasks beside the agent's
//! pass, the lease keep-alive first among them.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::units::{Unit, UnitHash, UnitName};

/// The default directory of unit files.
pub const DEFAULT_DIR: &str = "/run/flotilla/units";

/// A unit file on disk, as read back.
#[derive(Debug, Clone)]
pub struct LocalUnit {
    /// The hash of its body.
    pub hash: UnitHash,
    /// The parsed unit (for its `[X-Fleet]` rules and `[Install]` section).
    pub unit: Unit,
}

/// The agent's unit-file directory. Listing it is on the agent's hot path
/// (every pass and every state report), so parsed files are cached and a
/// file is parsed again only when its size or modification time changes.
#[derive(Debug, Clone)]
pub struct UnitFiles {
    dir: PathBuf,
    parsed: Cache,
}

/// What identifies one version of a file: size and modification time.
type Stamp = (u64, Option<SystemTime>);

/// Each file parsed, with the version it was parsed at.
type Cache = HashMap<UnitName, (Stamp, Option<LocalUnit>)>;

impl UnitFiles {
    /// The directory at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> UnitFiles {
        UnitFiles {
            dir: dir.into(),
            parsed: HashMap::new(),
        }
    }

    /// Where unit `name`'s file is.
    pub fn path(&self, name: &UnitName) -> PathBuf {
        path_in(&self.dir, name)
    }

    /// Writes each unit's file atomically, mode 0644, in order: where each
    /// one is, or why it could not be written.
    pub async fn write_all(&self, files: Vec<(UnitName, String)>) -> Vec<std::io::Result<PathBuf>> {
        let dir = self.dir.clone();
        off_runtime(move || {
            files
                .iter()
                .map(|(name, text)| write(&dir, name, text))
                .collect()
        })
        .await
    }

    /// Removes each unit's file, in order; a missing file is fine.
    pub async fn remove_all(&self, names: Vec<UnitName>) -> Vec<std::io::Result<()>> {
        let dir = self.dir.clone();
        off_runtime(move || names.iter().map(|name| remove(&dir, name)).collect()).await
    }

    /// Every unit file here, parsed. A file that no longer parses (or is not
    /// a unit name) maps to `None`: the agent unloads it.
    pub async fn list(&mut self) -> std::io::Result<BTreeMap<UnitName, Option<LocalUnit>>> {
        let dir = self.dir.clone();
        let parsed = std::mem::take(&mut self.parsed);
        let (parsed, found) = off_runtime(move || list(&dir, parsed)).await;
        self.parsed = parsed;
        found
    }
}

/// Runs `work` (file system calls) on the blocking pool; a panic there is
/// this task's panic.
async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Where unit `name`'s file is under `dir`.
fn path_in(dir: &Path, name: &UnitName) -> PathBuf {
    dir.join(name.as_str())
}

/// Writes unit `name`'s file under `dir` atomically, mode 0644.
fn write(dir: &Path, name: &UnitName, text: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = path_in(dir, name);
    let temp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(text.as_bytes())?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    drop(file);
    std::fs::rename(&temp, &path)?;
    Ok(path)
}

/// Removes unit `name`'s file under `dir`; a missing file is fine.
fn remove(dir: &Path, name: &UnitName) -> std::io::Result<()> {
    match std::fs::remove_file(path_in(dir, name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The unit files under `dir`, parsed, reusing what `parsed` holds of files
/// unchanged since; with the cache for the next listing.
fn list(
    dir: &Path,
    mut parsed: Cache,
) -> (
    Cache,
    std::io::Result<BTreeMap<UnitName, Option<LocalUnit>>>,
) {
    let mut found = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return (Cache::new(), Ok(found));
        }
        Err(e) => return (parsed, Err(e)),
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => return (parsed, Err(e)),
        };
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name.starts_with('.') {
            continue;
        }
        let Ok(name) = UnitName::parse(&file_name) else {
            continue;
        };
        let metadata = match entry.metadata() {
            Ok(metadata) => metadata,
            Err(e) => return (parsed, Err(e)),
        };
        let stamp = (metadata.len(), metadata.modified().ok());
        let unit = match parsed.get(&name) {
            Some((seen, unit)) if *seen == stamp && stamp.1.is_some() => unit.clone(),
            _ => {
                let unit = read(&entry.path(), &name);
                parsed.insert(name.clone(), (stamp, unit.clone()));
                unit
            }
        };
        found.insert(name, unit);
    }
    parsed.retain(|name, _| found.contains_key(name));
    (parsed, Ok(found))
}

fn read(path: &Path, name: &UnitName) -> Option<LocalUnit> {
    let text = std::fs::read_to_string(path).ok()?;
    let unit = Unit::from_text(name, &text).ok()?;
    Some(LocalUnit {
        hash: unit.hash(),
        unit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = UnitFiles::new(dir.path().join("units"));
        assert!(files.list().await.unwrap().is_empty());
        let name = UnitName::parse("a@1.service").unwrap();
        let text = "[Service]\nExecStart=/bin/true\n";
        let written = files.write_all(vec![(name.clone(), text.into())]).await;
        let path = written[0].as_ref().unwrap();
        assert_eq!(*path, files.path(&name));
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let listed = files.list().await.unwrap();
        let local = listed[&name].as_ref().unwrap();
        assert_eq!(local.hash, Unit::from_text(&name, text).unwrap().hash());
        let bad = UnitName::parse("bad.service").unwrap();
        std::fs::write(files.path(&bad), "x").unwrap();
        assert!(files.list().await.unwrap()[&bad].is_none());
        let other = "[Service]\nExecStart=/bin/false\n";
        let written = files.write_all(vec![(name.clone(), other.into())]).await;
        assert!(written[0].is_ok());
        let relisted = files.list().await.unwrap();
        assert_eq!(
            relisted[&name].as_ref().unwrap().hash,
            Unit::from_text(&name, other).unwrap().hash(),
            "a rewritten file is parsed again"
        );
        let removed = files.remove_all(vec![name.clone(), name.clone()]).await;
        assert!(removed.iter().all(|r| r.is_ok()), "{removed:?}");
        assert!(!files.list().await.unwrap().contains_key(&name));
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_written_is_said_and_the_rest_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let files = UnitFiles::new(dir.path().join("units"));
        let a = UnitName::parse("a.service").unwrap();
        let b = UnitName::parse("b.service").unwrap();
        // A directory where a's file would go: its rename fails.
        std::fs::create_dir_all(files.path(&a).join("in-the-way")).unwrap();
        let written = files
            .write_all(vec![
                (a, "[Service]\n".into()),
                (b.clone(), "[Service]\n".into()),
            ])
            .await;
        assert!(written[0].is_err(), "{written:?}");
        assert_eq!(*written[1].as_ref().unwrap(), files.path(&b));
    }
}
