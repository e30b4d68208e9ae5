//! Running the system tools the lab drives (`ip`, `mount`, `nsenter`, `kill`,
//! `ssh-keygen`), and reading processes from /proc.
//!
//! The lab shells out instead of making syscalls itself: util-linux and iproute2
//! already do namespaces, mounts and links correctly, their error messages are
//! the ones an operator knows, and flotilla needs no `unsafe` for them. Every
//! failure carries the command line and what the tool printed.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs a command to completion; returns its stdout, or an error with its stderr.
pub fn run(command: &mut Command) -> Result<String> {
    run_with_input(command, None)
}

/// Like [`run`], feeding `input` on stdin (for `ip -batch -`).
pub fn run_with_input(command: &mut Command, input: Option<&str>) -> Result<String> {
    let line = describe(command);
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run `{line}` (is it installed?)"))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin was piped above");
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("cannot write to `{line}`"))?;
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("cannot wait for `{line}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!("`{line}` failed ({}): {}", output.status, stderr.trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The command as a shell-like line, for messages.
pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends `signal` (a name such as `KILL`) to processes. Processes that are already
/// gone are not an error.
pub fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    // kill(1) reports the pids it could not signal; they are gone, which is the
    // point, so its status is ignored.
    let _ = Command::new("kill")
        .arg("-s")
        .arg(signal)
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether a process exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may itself
        // contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// A process's command line, or `None` when it is gone.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Every pid on the machine (as this process's /proc sees them).
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Waits until none of `pids` is alive, or `timeout` passes; returns the survivors.
pub fn wait_gone(pids: &[u32], timeout: std::time::Duration) -> Vec<u32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| is_alive(*p)).collect();
        if alive.is_empty() || std::time::Instant::now() >= deadline {
            return alive;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// This process's effective uid, from /proc (no libc needed).
pub fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("cannot read /proc")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        .context("/proc/self/status has no Uid line")
}

/// 32 random hex digits from the kernel (machine-ids, boot ids).
pub fn random_hex() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_command_and_its_complaint() {
        let err = run(Command::new("sh").args(["-c", "echo nope >&2; exit 3"])).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("sh -c") && text.contains("nope"), "{text}");
        assert_eq!(run(Command::new("echo").arg("hi")).unwrap(), "hi\n");
    }

    #[test]
    fn this_process_is_alive_and_has_a_command_line() {
        assert!(is_alive(std::process::id()));
        assert!(!cmdline(std::process::id()).unwrap().is_empty());
        assert_eq!(random_hex().unwrap().len(), 32);
    }
}
