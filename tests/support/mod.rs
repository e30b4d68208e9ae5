//! Helpers shared by the integration test binaries (each includes this with `mod support;`).

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::{Command, Output};

/// The flotilla binary under test.
pub const FLOTILLA: &str = env!("CARGO_BIN_EXE_flotilla");

/// A template whose instances conflict, and prove it: each takes a per-host
/// `flock -n` on /run/hello.lock and exits 99 (failing loudly) when another
/// instance already holds it, so two instances on one host never go unnoticed.
pub const HELLO: &str = "\
[Unit]
Description=hello %i: holds this host's hello lock or fails
[Service]
ExecStart=/usr/bin/flock -n -E 99 /run/hello.lock /bin/sleep infinity
[X-Fleet]
Conflicts=hello@*.service
";

/// Runs `flotilla lab ARGS...` for the lab in `dir`.
pub fn lab_in(dir: &Path, args: &[&str]) -> Output {
    lab_with(Path::new(FLOTILLA), dir, args)
}

/// Runs `BINARY lab ARGS...` for the lab in `dir`: a lab is driven by the
/// flotilla that booted it (the rolling-upgrade test boots one on an older
/// release).
pub fn lab_with(binary: &Path, dir: &Path, args: &[&str]) -> Output {
    Command::new(binary)
        .arg("lab")
        .args(args)
        .env("FLOTILLA_LAB_DIR", dir)
        .env_remove("FLOTILLA_ENDPOINT")
        .output()
        .unwrap()
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One answer of the HTTP API: the status and the body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

impl Answer {
    /// The body as JSON, which it must be.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The message of fleet's error body.
    pub fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {self:?}"))
            .to_string()
    }
}

/// One scrape of `GET /metrics`: each series (name and labels) with its value.
pub type Scrape = std::collections::BTreeMap<String, f64>;

/// Reads Prometheus's text format (comments skipped) into a [`Scrape`].
pub fn parse_metrics(exposition: &str) -> Scrape {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The stdout of a command that must have succeeded; a failure shows
/// `what` (the command) with its output.
pub fn succeeded(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The numbers of the `tick N` lines `journal -f` of a ticker prints, read
/// from `output` until `count` of them arrived or `limit` passed.
pub fn read_ticks(
    output: impl std::io::Read,
    count: usize,
    limit: std::time::Duration,
) -> Vec<u32> {
    use std::io::BufRead;
    let mut ticks = Vec::new();
    let deadline = std::time::Instant::now() + limit;
    for line in std::io::BufReader::new(output).lines() {
        let Ok(line) = line else { break };
        if let Some(n) = line
            .rsplit("tick ")
            .next()
            .and_then(|n| n.trim().parse::<u32>().ok())
        {
            ticks.push(n);
        }
        if ticks.len() >= count || std::time::Instant::now() > deadline {
            break;
        }
    }
    ticks
}

/// Process output as text, for assertions and messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub mod cluster;
pub mod daemon;
pub mod machine;
pub mod pki;
