//! A lab of real-systemd hosts for the benches (`schedule`, `lab-failover`):
//! booted with `flotilla lab up` in a fresh directory, driven through the
//! `flotilla lab` verbs and the CLI as a user would (the lab's API token,
//! store endpoint and admin certificate in the environment), torn down with
//! `flotilla lab down` when dropped. Needs root on Debian 12.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use flotilla::lab::dir::LabDir;
use flotilla::lab::state::{LabState, UpOutput};
use flotilla::tls::stream::{ClientTls, Trust};
use serde_json::Value;

/// A running lab, removed on drop.
pub struct Lab {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// What `lab up` printed: endpoints, credentials, hosts.
    pub up: UpOutput,
    /// What the lab recorded of itself: servers, TTL, election timeout.
    pub state: LabState,
}

impl Lab {
    /// Boots a lab with `bin` (`flotilla lab up ARGS...` in a fresh
    /// temporary directory) and waits until it is ready, as `lab up` does.
    pub fn up(bin: &Path, args: &[&str]) -> Result<Lab> {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-bench-lab")
            .tempdir()?;
        let mut up_args = vec!["up"];
        up_args.extend(args);
        let out = run_lab(bin, dir.path(), &up_args)?;
        let up: UpOutput =
            serde_json::from_slice(&out.stdout).context("lab up prints one JSON object")?;
        let state = LabState::load(&LabDir::existing(dir.path())?)?;
        Ok(Lab {
            bin: bin.to_path_buf(),
            dir,
            up,
            state,
        })
    }

    /// The lab's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `flotilla lab ARGS...` on this lab; fails unless it succeeds.
    pub fn lab(&self, args: &[&str]) -> Result<Output> {
        run_lab(&self.bin, self.dir.path(), args)
    }

    /// Runs `command` inside host `host` (`lab exec`).
    pub fn exec(&self, host: &str, command: &[&str]) -> Result<Output> {
        let mut args = vec!["exec", host, "--"];
        args.extend(command);
        self.lab(&args)
    }

    /// `flotilla ARGS...` from the outer machine, set up for this lab (its
    /// API with the token, its store with the admin certificate); fails
    /// unless it succeeds.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new(&self.bin)
            .env("FLOTILLA_ENDPOINT", &self.up.endpoint)
            .env("FLOTILLA_API_TOKEN", &self.up.api_token)
            .env("FLOTILLA_STORE_ENDPOINT", &self.up.store_endpoint)
            .env("FLOTILLA_TLS_CA", &self.up.tls_ca)
            .env("FLOTILLA_TLS_CERT", &self.up.tls_cert)
            .env("FLOTILLA_TLS_KEY", &self.up.tls_key)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env_remove("FLOTILLA_TUNNEL")
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "flotilla {:?}: {}",
                args.first(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// The admin identity of the lab's CA, for store clients in this process.
    pub fn admin_tls(&self) -> Result<Arc<ClientTls>> {
        let trust = Trust::load(&self.up.tls_ca, &self.up.tls_cert, &self.up.tls_key)
            .context("loading the lab's admin certificate")?;
        Ok(trust.client)
    }

    /// The Raft servers' client addresses, `host:port`, in host order.
    pub fn store_endpoints(&self) -> Vec<String> {
        self.up
            .store_endpoint
            .split(',')
            .map(str::to_string)
            .collect()
    }

    /// The host at store endpoint `endpoint` (`host:port`).
    pub fn host_at(&self, endpoint: &str) -> Option<&str> {
        let ip = endpoint.rsplit_once(':').map_or(endpoint, |(ip, _)| ip);
        self.up
            .hosts
            .iter()
            .find(|h| h.ip.to_string() == ip)
            .map(|h| h.name.as_str())
    }

    /// The host with machine id `machine`.
    pub fn host_of(&self, machine: &str) -> Option<&str> {
        self.up
            .hosts
            .iter()
            .find(|h| h.machine_id == machine)
            .map(|h| h.name.as_str())
    }

    /// The machine id of host `name`.
    pub fn id_of(&self, name: &str) -> Option<&str> {
        self.up
            .hosts
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.machine_id.as_str())
    }

    /// Units `list-units` reports active, each with its host's name.
    pub fn active(&self) -> Result<Vec<(String, String)>> {
        let out = self.cli(&["list-units", "--json"])?;
        let rows: Value = serde_json::from_slice(&out.stdout)?;
        let mut active = Vec::new();
        for row in rows.as_array().context("list-units --json is a list")? {
            if row["active"] == "active"
                && let Some(machine) = row["machine"].as_str()
                && let Some(host) = self.host_of(machine)
            {
                active.push((
                    row["unit"].as_str().unwrap_or_default().to_string(),
                    host.to_string(),
                ));
            }
        }
        Ok(active)
    }

    /// The host whose Raft member leads, as `member list` says.
    pub fn leader(&self) -> Result<String> {
        let out = self.cli(&["member", "list"])?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.trim_end().ends_with("yes"))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
            .context("member list names no leader")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.lab(&["down"]) {
            eprintln!("{e:#}");
        }
    }
}

/// `BIN lab ARGS...` for the lab in `dir`; fails unless it succeeds.
fn run_lab(bin: &Path, dir: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new(bin)
        .arg("lab")
        .args(args)
        .env("FLOTILLA_LAB_DIR", dir)
        .env_remove("FLOTILLA_ENDPOINT")
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "flotilla lab {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}
