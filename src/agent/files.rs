//! The unit files this agent has written, under `/run/flotilla/units/`.
//!
//! The directory is the agent's memory of what it loaded: after a daemon
//! restart it lists the files to know which units are flotilla's, and hashes
//! each one to know which body it holds. It lives on /run, a tmpfs, so a
//! reboot starts from nothing, as systemd's runtime links do.

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
    parsed: HashMap<UnitName, (Stamp, Option<LocalUnit>)>,
}

/// What identifies one version of a file: size and modification time.
type Stamp = (u64, Option<SystemTime>);

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
        self.dir.join(name.as_str())
    }

    /// Writes unit `name` atomically, mode 0644.
    pub fn write(&self, name: &UnitName, text: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(name);
        let temp = self.dir.join(format!(".{name}.tmp"));
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        drop(file);
        std::fs::rename(&temp, &path)?;
        Ok(path)
    }

    /// Removes unit `name`'s file; a missing file is fine.
    pub fn remove(&self, name: &UnitName) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every unit file here, parsed. A file that no longer parses (or is not
    /// a unit name) maps to `None`: the agent unloads it.
    pub fn list(&mut self) -> std::io::Result<BTreeMap<UnitName, Option<LocalUnit>>> {
        let mut found = BTreeMap::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.parsed.clear();
                return Ok(found);
            }
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.starts_with('.') {
                continue;
            }
            let Ok(name) = UnitName::parse(&file_name) else {
                continue;
            };
            let metadata = entry.metadata()?;
            let stamp = (metadata.len(), metadata.modified().ok());
            let unit = match self.parsed.get(&name) {
                Some((seen, unit)) if *seen == stamp && stamp.1.is_some() => unit.clone(),
                _ => {
                    let unit = read(&entry.path(), &name);
                    self.parsed.insert(name.clone(), (stamp, unit.clone()));
                    unit
                }
            };
            found.insert(name, unit);
        }
        self.parsed.retain(|name, _| found.contains_key(name));
        Ok(found)
    }
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

    #[test]
    fn write_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = UnitFiles::new(dir.path().join("units"));
        assert!(files.list().unwrap().is_empty());
        let name = UnitName::parse("a@1.service").unwrap();
        let text = "[Service]\nExecStart=/bin/true\n";
        let path = files.write(&name, text).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let listed = files.list().unwrap();
        let local = listed[&name].as_ref().unwrap();
        assert_eq!(local.hash, Unit::from_text(&name, text).unwrap().hash());
        std::fs::write(files.path(&UnitName::parse("bad.service").unwrap()), "x").unwrap();
        assert!(files.list().unwrap()[&UnitName::parse("bad.service").unwrap()].is_none());
        let other = "[Service]\nExecStart=/bin/false\n";
        files.write(&name, other).unwrap();
        let relisted = files.list().unwrap();
        assert_eq!(
            relisted[&name].as_ref().unwrap().hash,
            Unit::from_text(&name, other).unwrap().hash(),
            "a rewritten file is parsed again"
        );
        files.remove(&name).unwrap();
        files.remove(&name).unwrap();
        assert!(!files.list().unwrap().contains_key(&name));
    }
}
