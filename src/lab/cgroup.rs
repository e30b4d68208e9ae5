//! One cgroup per host, and killing everything in a lab's cgroups.
//!
//! Several systemd instances booted on one machine collide unless each starts in
//! a cgroup of its own: it takes its own cgroup as its root and builds its tree
//! below it. A host's PID 1 joins `flotilla-lab-<id>/<host>` in the hierarchies
//! systemd uses (the `name=systemd` v1 one and the unified cgroup2 one, on the
//! "hybrid" layout of Debian's default and of this kind of machine; just cgroup2
//! on a unified machine) before it execs systemd. The supervisor and everything
//! it starts live in `flotilla-lab-<id>/supervisor`, so `lab down` finds every
//! process of a lab by its cgroups, even when `lab.json` is lost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::shell;

/// How cgroups are mounted on this machine.
#[derive(Debug, Clone)]
pub struct Layout {
    /// "unified", "hybrid" or "legacy", for `lab doctor`.
    pub kind: &'static str,
    /// The hierarchies a host gets a cgroup in.
    pub managed: Vec<PathBuf>,
    /// Every cgroup hierarchy, searched when cleaning up.
    pub all: Vec<PathBuf>,
}

/// Reads the cgroup mounts from /proc/self/mountinfo.
pub fn detect() -> Result<Layout> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    let mut systemd_v1 = None;
    let mut unified = None;
    let mut all = Vec::new();
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = before.split(' ').nth(4) else {
            continue;
        };
        let mut after = after.split(' ');
        let fs_type = after.next().unwrap_or_default();
        let options = after.nth(1).unwrap_or_default();
        let path = PathBuf::from(mount_point);
        match fs_type {
            "cgroup2" => {
                unified.get_or_insert(path.clone());
                all.push(path);
            }
            "cgroup" => {
                if options.split(',').any(|o| o == "name=systemd") {
                    systemd_v1.get_or_insert(path.clone());
                }
                all.push(path);
            }
            _ => {}
        }
    }
    let kind = match (&systemd_v1, &unified) {
        (None, Some(_)) => "unified",
        (Some(_), Some(_)) => "hybrid",
        (Some(_), None) => "legacy",
        (None, None) => bail!(
            "no cgroup2 or name=systemd cgroup hierarchy is mounted; systemd cannot run \
             without one (mount cgroup2 on /sys/fs/cgroup)"
        ),
    };
    let managed = systemd_v1.into_iter().chain(unified).collect();
    Ok(Layout { kind, managed, all })
}

impl Layout {
    /// Creates `rel` (e.g. `flotilla-lab-1a2b3c4d/h1`) in every managed hierarchy.
    pub fn create(&self, rel: &str) -> Result<()> {
        for root in &self.managed {
            let path = root.join(rel);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create the cgroup {}", path.display()))?;
        }
        Ok(())
    }

    /// Moves the calling process into `rel` in every managed hierarchy.
    pub fn join(&self, rel: &str) -> Result<()> {
        for root in &self.managed {
            let procs = root.join(rel).join("cgroup.procs");
            // "0" is the writing process itself.
            std::fs::write(&procs, "0")
                .with_context(|| format!("cannot join the cgroup {}", procs.display()))?;
        }
        Ok(())
    }

    /// Every process in `rel` and below, in any hierarchy.
    pub fn procs(&self, rel: &str) -> Vec<u32> {
        let mut pids = Vec::new();
        for dir in self.dirs(rel) {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process in `rel` and below until none is left, or fails after
    /// `timeout` naming the survivors.
    pub fn kill_all(&self, rel: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // cgroup2's cgroup.kill takes the whole subtree at once, forks included.
            for root in &self.all {
                let kill = root.join(rel).join("cgroup.kill");
                if kill.exists() {
                    let _ = std::fs::write(&kill, "1");
                }
            }
            let pids = self.procs(rel);
            if pids.is_empty() {
                return Ok(());
            }
            shell::signal(&pids, "KILL");
            if Instant::now() >= deadline {
                bail!("processes {pids:?} in the cgroup {rel} survived SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes `rel` and every cgroup below it, in every hierarchy (systemd may
    /// have made some in controller hierarchies too). A cgroup whose last process
    /// is still exiting is busy for a moment, so this retries until `timeout`.
    pub fn remove(&self, rel: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut busy = Vec::new();
            // Deepest first: a cgroup can only be removed once it has no children.
            let mut dirs = self.dirs(rel);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                if let Err(err) = std::fs::remove_dir(&dir)
                    && err.kind() != std::io::ErrorKind::NotFound
                {
                    busy.push(format!("{}: {err}", dir.display()));
                }
            }
            if busy.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("cannot remove cgroups: {}", busy.join("; "));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The cgroup directories `rel` and below that exist, in any hierarchy.
    pub fn dirs(&self, rel: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for root in &self.all {
            collect_dirs(&root.join(rel), &mut found);
        }
        found
    }
}

fn collect_dirs(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    found.push(dir.to_path_buf());
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_a_layout_systemd_can_use() {
        let layout = detect().unwrap();
        assert!(!layout.managed.is_empty());
        assert!(layout.managed.iter().all(|m| layout.all.contains(m)));
    }
}
