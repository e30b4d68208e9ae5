//! Booting a host from the supervisor's side, reading how a boot ended, and
//! entering a running host.
//!
//! A host is one `unshare` process (a child of the supervisor) whose forked
//! child is the host's PID 1: first `flotilla lab init-host` (see [`super::init`]),
//! then systemd. `--kill-child` ties them: if the `unshare` dies, PID 1 gets
//! SIGKILL. When PID 1 ends, `unshare` ends the same way (it re-raises a fatal
//! signal on itself), so the supervisor learns from its own child's status how
//! the host went down. The exception is SIGKILL, which unshare cannot re-raise:
//! it exits with status 1 instead, so `lab kill` records the kill itself. For a PID namespace's init the kernel turns `reboot(2)`
//! into death by SIGHUP (restart) or SIGINT (power-off or halt), which is what
//! systemd's shutdown does at the end of `systemctl reboot` in a container.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdout, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::dir::LabDir;
use super::shell;

/// The PATH commands get inside a host.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A host between `unshare` and `go`: its PID 1 is mounting its root.
pub struct Booting {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// The outer pid of its PID 1.
    pub pid: u32,
    console: std::path::PathBuf,
}

/// Starts a host's namespaces and its PID 1; returns once PID 1 reported its pid.
pub fn start(dir: &LabDir, name: &str, boot_id: &str) -> Result<Booting> {
    let console = dir.console_log(name);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&console)
        .with_context(|| format!("cannot open {}", console.display()))?;
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--mount",
            "--uts",
            "--net",
            "--ipc",
            "--fork",
            "--kill-child",
        ])
        .arg(dir.binary())
        .args(["lab", "init-host", "--dir"])
        .arg(dir.path())
        .args(["--host", name, "--boot-id", boot_id])
        .env_remove("FLOTILLA_LAB_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot run unshare")?;
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout was piped above"));
    let line = read_line(&mut stdout);
    let mut booting = Booting {
        child,
        stdout,
        pid: 0,
        console,
    };
    match line.as_deref().and_then(|l| l.strip_prefix("pid ")) {
        Some(pid) => {
            booting.pid = pid.trim().parse().context("init-host printed a bad pid")?;
            Ok(booting)
        }
        None => Err(booting.fail(name, "did not start")),
    }
}

impl Booting {
    /// Waits until PID 1 has mounted the host's root, tells it to exec systemd, and
    /// returns the `unshare` process to watch.
    pub fn release(mut self, name: &str) -> Result<Child> {
        if read_line(&mut self.stdout).as_deref() != Some("ready") {
            return Err(self.fail(name, "could not mount its root"));
        }
        let mut stdin = self.child.stdin.take().expect("stdin was piped above");
        if stdin.write_all(b"go\n").is_err() {
            return Err(self.fail(name, "stopped before booting"));
        }
        drop(stdin);
        // Up means systemd runs: wait for the exec, so that nobody who reads the
        // state next finds init-host still there.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_running(self.pid) {
            if Instant::now() >= deadline || !matches!(self.child.try_wait(), Ok(None)) {
                return Err(self.fail(name, "did not exec systemd"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(self.child)
    }

    /// Kills a host that failed to boot and explains, with its console's last lines.
    pub fn fail(mut self, name: &str, what: &str) -> anyhow::Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.console).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!(
            "host {name} {what}: {} (from {})",
            tail.join(" | "),
            self.console.display()
        )
    }
}

fn read_line(reader: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end().to_string()),
    }
}

/// How a host's boot ended, read from its `unshare` process's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// PID 1 asked for a restart (`systemctl reboot`): boot it again.
    Reboot,
    /// `systemctl poweroff` or `halt`.
    PowerOff,
    /// SIGKILL (`lab kill`; seen by the supervisor only because it sent it).
    Killed,
    /// PID 1 exited with this status (`systemctl exit N`, or a failed init).
    Code(i32),
    /// Killed by another signal.
    Signal(i32),
}

impl Exit {
    /// Classifies an exit status.
    pub fn of(status: ExitStatus) -> Exit {
        match (status.signal(), status.code()) {
            (Some(1), _) => Exit::Reboot,
            (Some(2), _) => Exit::PowerOff,
            (Some(9), _) => Exit::Killed,
            (Some(signal), _) => Exit::Signal(signal),
            (None, code) => Exit::Code(code.unwrap_or(-1)),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Reboot => write!(f, "rebooted"),
            Exit::PowerOff => write!(f, "powered off"),
            Exit::Killed => write!(f, "killed"),
            Exit::Code(code) => write!(f, "exited with status {code}"),
            Exit::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// Whether `pid` is a running host's systemd.
pub fn is_running(pid: u32) -> bool {
    shell::is_alive(pid)
        && shell::cmdline(pid)
            .and_then(|c| c.into_iter().next())
            .is_some_and(|program| program.ends_with("systemd"))
}

/// A command that runs `program` inside the host whose PID 1 is `pid`: in all its
/// namespaces, its root and its working directory, with a clean environment.
pub fn enter(pid: u32, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command
        .args([
            "-t",
            &pid.to_string(),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "-r",
            "-w",
            "--",
        ])
        .arg(program)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8");
    if let Ok(term) = std::env::var("TERM") {
        command.env("TERM", term);
    }
    command
}

/// `lab exec`: runs a command inside a host with the caller's stdio; its exit code
/// (or 128 + the signal that killed it) becomes ours.
pub fn exec(pid: u32, command: &[String]) -> Result<ExitCode> {
    let (program, args) = command.split_first().context("no command given")?;
    let status = enter(pid, program)
        .args(args)
        .status()
        .context("cannot run nsenter")?;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Waits until the host's systemd has finished starting up (`running`, or
/// `degraded` with the failed units named on stderr).
pub fn wait_booted(name: &str, pid: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        if !is_running(pid) {
            bail!("its PID 1 (pid {pid}) is gone");
        }
        let left = deadline.saturating_duration_since(Instant::now()).as_secs() + 1;
        // Before systemd listens on its socket this fails at once; then --wait
        // blocks until start-up is over.
        let output = enter(pid, "timeout")
            .args([
                &left.to_string(),
                "systemctl",
                "is-system-running",
                "--wait",
            ])
            .stdin(Stdio::null())
            .output()
            .context("cannot run nsenter")?;
        let state = String::from_utf8_lossy(&output.stdout).trim().to_string();
        match state.as_str() {
            "running" => return Ok(()),
            "degraded" => {
                let failed = enter(pid, "systemctl")
                    .args(["--failed", "--no-legend", "--plain"])
                    .output()
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .trim()
                            .replace('\n', "; ")
                    })
                    .unwrap_or_default();
                super::say(&format!("warning: {name} booted degraded: {failed}"));
                return Ok(());
            }
            _ => {
                last = format!("{state} {}", String::from_utf8_lossy(&output.stderr).trim());
                std::thread::sleep(Duration::from_millis(30));
            }
        }
    }
    bail!(
        "systemd did not finish starting within {:.1} s (last: {last})",
        timeout.as_secs_f64()
    )
}
