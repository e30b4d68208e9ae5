//! The one-line protocol between the CLI and a lab's supervisor, over the unix
//! socket `DIR/supervisor.sock`.
//!
//! A request is one line, `VERB HOST` or `ping`; the answer is one line,
//! `ok MESSAGE` or `error MESSAGE`. The supervisor serves one request at a time,
//! so two verbs on one lab never interleave.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::dir::LabDir;

/// How long a request may take: a reboot waits for systemd to shut down.
const TIMEOUT: Duration = Duration::from_secs(120);

/// What the CLI asks the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// SIGKILL the host's PID 1.
    Kill(String),
    /// Boot a host that is down.
    Start(String),
    /// `systemctl reboot` inside the host, and wait until it booted again.
    Reboot(String),
    /// Cut the host's link.
    Partition(String),
    /// Restore the host's link.
    Heal(String),
    /// Is the supervisor there and done booting?
    Ping,
    /// Power off every host, reap every process, and exit (`lab down`).
    Shutdown,
}

impl Request {
    /// The request as a line (without the newline).
    pub fn to_line(&self) -> String {
        match self {
            Request::Kill(h) => format!("kill {h}"),
            Request::Start(h) => format!("start {h}"),
            Request::Reboot(h) => format!("reboot {h}"),
            Request::Partition(h) => format!("partition {h}"),
            Request::Heal(h) => format!("heal {h}"),
            Request::Ping => "ping".to_string(),
            Request::Shutdown => "shutdown".to_string(),
        }
    }

    /// Parses a line.
    pub fn parse(line: &str) -> Result<Request> {
        let mut words = line.split_whitespace();
        let verb = words.next().unwrap_or_default();
        let host = words.next().map(str::to_string);
        if words.next().is_some() {
            bail!("too many words in {line:?}");
        }
        let need = |host: Option<String>| host.with_context(|| format!("{verb} needs a host"));
        Ok(match verb {
            "kill" => Request::Kill(need(host)?),
            "start" => Request::Start(need(host)?),
            "reboot" => Request::Reboot(need(host)?),
            "partition" => Request::Partition(need(host)?),
            "heal" => Request::Heal(need(host)?),
            "ping" if host.is_none() => Request::Ping,
            "shutdown" if host.is_none() => Request::Shutdown,
            _ => bail!("unknown request {line:?}"),
        })
    }
}

/// Sends a request to the lab's supervisor; returns its `ok` message.
pub fn send(dir: &LabDir, request: &Request) -> Result<String> {
    let socket = dir.socket();
    let mut stream = UnixStream::connect(&socket).with_context(|| {
        format!(
            "the lab's supervisor is not answering on {} (see {}); \
             recreate the lab with `flotilla lab down --dir {}` and `flotilla lab up`",
            socket.display(),
            dir.supervisor_log().display(),
            dir.path().display()
        )
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream
        .write_all(format!("{}\n", request.to_line()).as_bytes())
        .context("cannot write to the supervisor")?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("no answer from the supervisor")?;
    let reply = reply.trim_end();
    if let Some(message) = reply.strip_prefix("ok") {
        return Ok(message.trim_start().to_string());
    }
    match reply.strip_prefix("error ") {
        Some(message) => bail!("{message}"),
        None => bail!(
            "the supervisor closed the connection without answering (see {})",
            dir.supervisor_log().display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_nonsense_is_refused() {
        for request in [
            Request::Kill("h1".into()),
            Request::Start("h2".into()),
            Request::Reboot("h3".into()),
            Request::Partition("h4".into()),
            Request::Heal("h5".into()),
            Request::Ping,
            Request::Shutdown,
        ] {
            assert_eq!(Request::parse(&request.to_line()).unwrap(), request);
        }
        for bad in ["", "kill", "kill h1 h2", "explode h1", "ping h1"] {
            assert!(Request::parse(bad).is_err(), "{bad:?}");
        }
    }
}
