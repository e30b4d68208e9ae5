//! Where a lab keeps its files, and every name derived from its directory.
//!
//! A lab is identified by its directory alone: the id, the cgroup, the bridge and
//! the uplink interface all come from a hash of the canonical path. So `lab down`
//! can find and remove what a lab left behind even when its `lab.json` is gone,
//! and two labs in different directories never share a name.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::shell;

/// A lab's directory and the paths and names inside it.
#[derive(Debug, Clone)]
pub struct LabDir {
    path: PathBuf,
    hash: [u8; 32],
}

impl LabDir {
    /// Creates the directory if needed (for `lab up`).
    pub fn create(path: &Path) -> Result<LabDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create the lab directory {}", path.display()))?;
        LabDir::existing(path)
    }

    /// A directory that must exist: every verb but `up` and `down` needs a lab there.
    pub fn existing(path: &Path) -> Result<LabDir> {
        let canonical = path.canonicalize().with_context(|| {
            format!(
                "no lab at {}; start one with: flotilla lab up --hosts 3 --dir {}",
                path.display(),
                path.display()
            )
        })?;
        LabDir::from_canonical(canonical)
    }

    /// For `lab down`, which must also work on a directory that no longer exists
    /// (the names it derives are then those of the path as given, made absolute).
    pub fn for_teardown(path: &Path) -> Result<LabDir> {
        match path.canonicalize() {
            Ok(canonical) => LabDir::from_canonical(canonical),
            Err(_) => LabDir::from_canonical(
                std::path::absolute(path)
                    .with_context(|| format!("cannot make {} an absolute path", path.display()))?,
            ),
        }
    }

    fn from_canonical(path: PathBuf) -> Result<LabDir> {
        let text = path
            .to_str()
            .with_context(|| format!("the lab directory {} is not UTF-8", path.display()))?;
        // The path goes into overlayfs mount options, where these characters separate
        // options and layers.
        if let Some(bad) = text
            .chars()
            .find(|c| matches!(c, ',' | ':' | '\\') || c.is_whitespace())
        {
            bail!(
                "the lab directory {text:?} contains {bad:?}, which overlayfs mount options cannot \
                 carry; choose another --dir"
            );
        }
        let hash = Sha256::digest(text.as_bytes()).into();
        Ok(LabDir { path, hash })
    }

    /// The canonical directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Eight hex digits naming this lab in cgroups and interface names.
    pub fn id(&self) -> String {
        self.hash[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Bytes of the directory's hash, from which the subnet is first chosen.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The lab's cgroup, relative to each hierarchy's root.
    pub fn cgroup(&self) -> String {
        format!("flotilla-lab-{}", self.id())
    }

    /// The bridge, inside the switch namespace (unique per lab all the same).
    pub fn bridge(&self) -> String {
        format!("flbr{}", self.id())
    }

    /// The outer machine's end of the uplink, in the root network namespace.
    pub fn uplink(&self) -> String {
        format!("flup{}", self.id())
    }

    /// `DIR/lab.json`: the persisted state.
    pub fn state_file(&self) -> PathBuf {
        self.path.join("lab.json")
    }

    /// Whether `pid` is this lab's supervisor: a live process whose command
    /// line is `flotilla lab supervise --dir` this directory. Lives with the
    /// directory because the directory is what identifies a lab, so the
    /// supervisor, `lab up`, `lab down` and the status all ask it here.
    pub fn is_supervisor(&self, pid: u32) -> bool {
        shell::is_alive(pid)
            && shell::cmdline(pid).is_some_and(|args| {
                args.iter().any(|a| a == "supervise")
                    && args
                        .iter()
                        .any(|a| a.as_str() == self.path.to_string_lossy())
            })
    }

    /// The supervisor's control socket.
    pub fn socket(&self) -> PathBuf {
        self.path.join("supervisor.sock")
    }

    /// Logs: the supervisor's and each host's console.
    pub fn logs(&self) -> PathBuf {
        self.path.join("logs")
    }

    /// The supervisor's log.
    pub fn supervisor_log(&self) -> PathBuf {
        self.logs().join("supervisor.log")
    }

    /// What a host's PID 1 wrote before systemd took over its output.
    pub fn console_log(&self, host: &str) -> PathBuf {
        self.logs().join(format!("{host}.console.log"))
    }

    /// The lab's copy of the flotilla binary: the supervisor runs it and every host
    /// has it (hard-linked) as /usr/bin/flotilla, where the Debian package puts it, so rebuilding the checkout
    /// never changes a running lab.
    pub fn binary(&self) -> PathBuf {
        self.path.join("bin").join("flotilla")
    }

    /// The ssh key pair whose public half every host's root accepts.
    pub fn ssh_key(&self) -> PathBuf {
        self.path.join("ssh").join("id_ed25519")
    }

    /// The lab's cluster CA (`ca.pem`, `ca.key`) and the outer CLI's admin
    /// certificate (`admin.pem`, `admin.key`).
    pub fn tls(&self) -> PathBuf {
        self.path.join("tls")
    }

    /// The known_hosts file listing every host's ssh host keys, by IP and name.
    pub fn known_hosts(&self) -> PathBuf {
        self.path.join("ssh").join("known_hosts")
    }

    /// Every host's disk lives under here.
    pub fn hosts(&self) -> PathBuf {
        self.path.join("hosts")
    }

    /// A host's disk: the overlay's upper dir.
    pub fn upper(&self, host: &str) -> PathBuf {
        self.hosts().join(host).join("upper")
    }

    /// The host's persistent journal, readable after the host is gone with
    /// `journalctl -D`.
    pub fn journal(&self, host: &str) -> PathBuf {
        self.upper(host).join("var/log/journal")
    }

    /// The overlay's work dir.
    pub fn work(&self, host: &str) -> PathBuf {
        self.hosts().join(host).join("work")
    }

    /// Where the host's root is mounted, inside its own mount namespace only.
    pub fn root(&self, host: &str) -> PathBuf {
        self.hosts().join(host).join("root")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_limits_and_differ_per_directory() {
        let a = LabDir::from_canonical(PathBuf::from("/var/lib/a")).unwrap();
        let b = LabDir::from_canonical(PathBuf::from("/var/lib/b")).unwrap();
        assert_eq!(a.id().len(), 8);
        assert!(a.bridge().len() <= 15 && a.uplink().len() <= 15);
        assert_ne!(a.id(), b.id());
        assert_ne!(a.uplink(), b.uplink());
    }

    #[test]
    fn directories_overlayfs_cannot_name_are_refused() {
        for bad in ["/tmp/a,b", "/tmp/a:b", "/tmp/a b"] {
            let err = LabDir::from_canonical(PathBuf::from(bad)).unwrap_err();
            assert!(err.to_string().contains("overlayfs"), "{err}");
        }
    }
}
