//! What runs as PID 1 inside a new host until it execs systemd.
//!
//! The supervisor starts it as
//! `unshare --pid --mount --uts --net --ipc --fork --kill-child flotilla lab init-host ...`,
//! so it is PID 1 of fresh namespaces, its mounts already private (unshare's
//! default). It talks to the supervisor over stdin/stdout:
//!
//! 1. prints `pid N`: its pid as the outer machine sees it, so the supervisor can
//!    create its network link while it mounts;
//! 2. mounts the host's root: an overlay over `/` with the host's disk as upper
//!    dir, a new /proc, /sys (read-only but for the cgroup trees) and /dev from
//!    the outer machine, /dev/console as /dev/null, fresh tmpfs on /run, /tmp and
//!    /dev/shm, an empty one over the lab's directory; writes the boot id to
//!    /run/flotilla/boot_id; prints `ready`;
//! 3. waits for `go` (the link is configured), joins the host's cgroups, chroots
//!    and execs systemd with `container=flotilla-lab`.

use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

use super::cgroup;
use super::dir::LabDir;
use super::shell;

/// The value of `$container` for systemd, and what `systemd-detect-virt` reports
/// (as `container-other`).
pub const CONTAINER: &str = "flotilla-lab";

/// Where a host finds the id of its current boot. The kernel's boot_id is shared
/// by every host, so the lab writes its own.
pub const BOOT_ID_FILE: &str = "/run/flotilla/boot_id";

/// Runs the steps above; returns only on failure.
pub fn run(dir: &LabDir, host: &str, boot_id: &str) -> Result<ExitCode> {
    // /proc is still the outer machine's here, so /proc/self is our outer pid.
    let outer_pid = std::fs::read_link("/proc/self").context("cannot read /proc/self")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "pid {}", outer_pid.display())?;
    stdout.flush()?;

    let root = dir.root(host);
    mount_root(dir, host)?;
    let run_flotilla = root.join(BOOT_ID_FILE.trim_start_matches('/'));
    std::fs::create_dir_all(run_flotilla.parent().expect("the file has a parent"))?;
    std::fs::write(&run_flotilla, format!("{boot_id}\n"))
        .with_context(|| format!("cannot write {}", run_flotilla.display()))?;
    writeln!(stdout, "ready")?;
    stdout.flush()?;

    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "go" {
        bail!("the supervisor went away before the network was ready");
    }

    let layout = cgroup::detect()?;
    layout.join(&format!("{}/{host}", dir.cgroup()))?;
    std::os::unix::fs::chroot(&root)
        .with_context(|| format!("cannot chroot to {}", root.display()))?;
    std::env::set_current_dir("/")?;
    // Our stderr is the host's console log; systemd's output goes there too until
    // its journal runs.
    let console = std::io::stderr().as_fd().try_clone_to_owned()?;
    let err = Command::new("/lib/systemd/systemd")
        .arg("--show-status=no")
        .env_clear()
        .env("container", CONTAINER)
        .stdin(Stdio::null())
        .stdout(Stdio::from(console.try_clone()?))
        .stderr(Stdio::from(console))
        .exec();
    Err(err).context("cannot exec /lib/systemd/systemd")
}

/// Mounts everything the host's root needs, in this (private) mount namespace.
fn mount_root(dir: &LabDir, host: &str) -> Result<()> {
    let root = dir.root(host);
    let at = |rel: &str| root.join(rel);
    let overlay = format!(
        "lowerdir=/,upperdir={},workdir={}",
        dir.upper(host).display(),
        dir.work(host).display()
    );
    mount(&["-t", "overlay", "overlay", "-o", &overlay], &root)?;
    mount(&["-t", "proc", "proc"], &at("proc"))?;
    // The kernel's knobs stay read-only: a host must not change the outer machine.
    mount(&["--bind", &text(&at("proc/sys"))], &at("proc/sys"))?;
    mount(&["-o", "remount,bind,ro"], &at("proc/sys"))?;
    mount(&["--rbind", "/sys"], &at("sys"))?;
    // Only the top sysfs mount becomes read-only; the cgroup trees below stay
    // writable, as systemd needs.
    mount(&["-o", "remount,bind,ro"], &at("sys"))?;
    mount(&["--rbind", "/dev"], &at("dev"))?;
    mount(
        &["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs"],
        &at("dev/shm"),
    )?;
    // systemd writes to /dev/console; the outer machine's console is not ours.
    mount(&["--bind", "/dev/null"], &at("dev/console"))?;
    mount(
        &["-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "tmpfs"],
        &at("run"),
    )?;
    mount(
        &["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs"],
        &at("tmp"),
    )?;
    // The lab's own directory (the lab's private key, the other hosts' disks) is
    // none of a host's business; under /tmp it is hidden already.
    let own = root.join(dir.path().strip_prefix("/").unwrap_or(dir.path()));
    if own.is_dir() {
        mount(&["-t", "tmpfs", "-o", "ro,mode=000,size=4k", "tmpfs"], &own)?;
    }
    Ok(())
}

fn text(path: &Path) -> String {
    // LabDir refuses directories that are not UTF-8.
    path.to_string_lossy().into_owned()
}

fn mount(args: &[&str], target: &Path) -> Result<()> {
    shell::run(Command::new("mount").args(args).arg(target)).map(|_| ())
}
