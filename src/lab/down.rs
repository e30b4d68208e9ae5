//! Tearing a lab down, leaving no process, mount, namespace, cgroup or interface.
//!
//! Order matters: the supervisor goes first, so nothing boots a host again. It is
//! asked to shut down (it kills the hosts and the switch holder and reaps them,
//! so no zombie keeps a namespace alive) and killed if it does not. Then every
//! process still in the lab's cgroups is killed (the hosts' PID 1s, their
//! `unshare` parents, the switch holder, when the supervisor could not). A namespace lives only as long as its
//! processes, so the hosts' mounts, PID, UTS, IPC and network namespaces go with
//! them, and the kernel deletes every veth of a dead network namespace, the
//! uplink included. Then the cgroups are removed, and what is left is checked.
//!
//! It is idempotent and needs no `lab.json`: every name it looks for is derived
//! from the directory, so it also cleans up after a lab whose supervisor or state
//! was lost.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::cgroup;
use super::control::{self, Request};
use super::dir::LabDir;
use super::host;
use super::net;
use super::shell;
use super::state::LabState;

/// `lab down`: tear down, then remove the lab's files but its logs (and, with
/// `keep_disks`, the hosts' disks).
pub fn run(dir: &LabDir, keep_disks: bool) -> Result<()> {
    let found = teardown(dir)?;
    remove_files(dir, keep_disks);
    if found {
        super::say(&format!(
            "the lab in {} is down; its logs are in {}",
            dir.path().display(),
            dir.logs().display()
        ));
    } else {
        super::say(&format!("no lab was running in {}", dir.path().display()));
    }
    Ok(())
}

/// Kills and removes everything of the lab that lives outside its files; returns
/// whether there was anything. Fails, naming them, if leftovers remain.
pub fn teardown(dir: &LabDir) -> Result<bool> {
    let state = LabState::load(dir).ok();
    let mut found = false;

    let mut supervisors: Vec<u32> = shell::all_pids()
        .into_iter()
        .filter(|pid| dir.is_supervisor(*pid))
        .collect();
    supervisors.extend(
        state
            .as_ref()
            .and_then(|s| s.supervisor_pid)
            .filter(|pid| dir.is_supervisor(*pid)),
    );
    supervisors.sort_unstable();
    supervisors.dedup();
    if !supervisors.is_empty() {
        found = true;
        // The supervisor reaps what it stops; killed, it would leave its children
        // to init, which reaps them when it gets round to it.
        if control::send(dir, &Request::Shutdown).is_ok() {
            shell::wait_gone(&supervisors, Duration::from_secs(5));
        }
        shell::signal(&supervisors, "KILL");
        shell::wait_gone(&supervisors, Duration::from_secs(5));
    }

    let layout = cgroup::detect()?;
    let rel = dir.cgroup();
    if !layout.dirs(&rel).is_empty() {
        found = true;
        layout.kill_all(&rel, Duration::from_secs(10))?;
    }
    // Hosts whose PID 1 is outside the cgroups (none, unless someone moved them).
    if let Some(state) = &state {
        let pids: Vec<u32> = state
            .hosts
            .iter()
            .filter_map(|h| h.pid)
            .filter(|pid| host::is_running(*pid))
            .collect();
        if !pids.is_empty() {
            found = true;
            shell::signal(&pids, "KILL");
            shell::wait_gone(&pids, Duration::from_secs(5));
        }
    }
    layout.remove(&rel, Duration::from_secs(5))?;

    // The kernel dismantles a dead network namespace in the background.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !net::root_interfaces(dir).is_empty() && Instant::now() < deadline {
        found = true;
        std::thread::sleep(Duration::from_millis(20));
    }
    for name in net::root_interfaces(dir) {
        net::delete_interface(&name)?;
    }
    let _ = std::fs::remove_file(dir.socket());

    let leftovers = leftovers(dir, &layout);
    if !leftovers.is_empty() {
        bail!(
            "the lab in {} left behind: {}",
            dir.path().display(),
            leftovers.join("; ")
        );
    }
    Ok(found || state.is_some())
}

/// Whatever of the lab still exists outside its files.
pub fn leftovers(dir: &LabDir, layout: &cgroup::Layout) -> Vec<String> {
    let mut found = Vec::new();
    let path = dir.path().to_string_lossy().into_owned();
    for pid in shell::all_pids() {
        if pid == std::process::id() {
            continue;
        }
        if let Some(args) = shell::cmdline(pid) {
            let ours = args.iter().any(|a| a == "supervise" || a == "init-host");
            if ours && args.iter().any(|a| a == &path) && shell::is_alive(pid) {
                found.push(format!("process {pid} ({})", args.join(" ")));
            }
        }
    }
    let procs = layout.procs(&dir.cgroup());
    if !procs.is_empty() {
        found.push(format!("processes {procs:?} in the lab's cgroups"));
    }
    for cgroup in layout.dirs(&dir.cgroup()) {
        found.push(format!("cgroup {}", cgroup.display()));
    }
    for name in net::root_interfaces(dir) {
        found.push(format!("interface {name}"));
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mounts.lines().filter(|l| l.contains(&path)) {
            found.push(format!("mount {line}"));
        }
    }
    found
}

/// Removes the lab's files, but its logs and, if asked, the hosts' disks.
pub fn remove_files(dir: &LabDir, keep_disks: bool) {
    let _ = std::fs::remove_file(dir.state_file());
    let _ = std::fs::remove_dir_all(dir.path().join("bin"));
    let _ = std::fs::remove_dir_all(dir.path().join("ssh"));
    if !keep_disks {
        let _ = std::fs::remove_dir_all(dir.hosts());
    }
}
