//! A lab running flotilla on every host, driven through the CLI, for the
//! end-to-end tests of the agent and scheduler. Torn down when dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{FLOTILLA, lab_with, succeeded, text};

/// One lab host, as `lab up` printed it.
#[derive(Debug, Clone)]
pub struct Host {
    /// h1, h2, ...
    pub name: String,
    /// Its /etc/machine-id.
    pub machine_id: String,
}

/// One row of `flotilla list-units --json`.
#[derive(Debug, Clone)]
pub struct Row {
    /// The unit.
    pub unit: String,
    /// The machine id, if placed.
    pub machine: Option<String>,
    /// systemd's ACTIVE there, if reported.
    pub active: Option<String>,
}

/// A running lab with flotilla on every host.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// The flotilla that booted the lab (and so runs on its hosts until
    /// replaced) and drives its `lab` verbs.
    lab_binary: PathBuf,
    /// `--endpoint` value: every host's API.
    pub endpoint: String,
    /// `--api-token` value.
    pub api_token: String,
    /// `--store-endpoint` value: the Raft servers.
    pub store_endpoint: String,
    /// The lab's known_hosts file.
    pub known_hosts: String,
    /// The lab's ssh key (root on every host).
    pub ssh_key: String,
    /// The lab's CA, and the admin certificate and key for the store verbs.
    pub tls: [String; 3],
    /// The hosts, in order.
    pub hosts: Vec<Host>,
    /// The presence TTL the lab was booted with.
    pub ttl: Duration,
}

impl Cluster {
    /// Boots `hosts` hosts with presence TTL `ttl_secs` and a 300 ms election
    /// timeout; the first min(hosts, 3) are Raft servers.
    pub fn up(hosts: u16, ttl_secs: u64) -> Cluster {
        Cluster::up_with(hosts, hosts.min(3), ttl_secs)
    }

    /// Like [`Cluster::up`] with the first `servers` hosts as Raft servers and
    /// the others agent-only.
    pub fn up_with(hosts: u16, servers: u16, ttl_secs: u64) -> Cluster {
        Cluster::up_on(Path::new(FLOTILLA), hosts, servers, ttl_secs)
    }

    /// Like [`Cluster::up_with`], the lab booted by (and its hosts running)
    /// the flotilla at `binary`; the CLI verbs stay the binary under test's.
    pub fn up_on(binary: &Path, hosts: u16, servers: u16, ttl_secs: u64) -> Cluster {
        let lab_in = |dir: &Path, args: &[&str]| lab_with(binary, dir, args);
        let dir = tempfile::Builder::new()
            .prefix("flotilla-cluster-test")
            .tempdir()
            .unwrap();
        let doctor = lab_in(dir.path(), &["doctor", "--install"]);
        assert!(
            doctor.status.success(),
            "lab doctor failed: {}{}",
            text(&doctor.stdout),
            text(&doctor.stderr)
        );
        let (hosts_arg, servers_arg) = (hosts.to_string(), servers.to_string());
        let ttl_arg = ttl_secs.to_string();
        let started = Instant::now();
        let out = lab_in(
            dir.path(),
            &[
                "up",
                "--hosts",
                &hosts_arg,
                "--servers",
                &servers_arg,
                "--ttl",
                &ttl_arg,
                "--election-timeout-ms",
                "300",
            ],
        );
        assert!(out.status.success(), "lab up failed: {}", text(&out.stderr));
        eprintln!("lab up --hosts {hosts}: {:?}", started.elapsed());
        let up: Value = serde_json::from_slice(&out.stdout).expect("lab up prints JSON");
        let hosts = up["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| Host {
                name: h["name"].as_str().unwrap().to_string(),
                machine_id: h["machine_id"].as_str().unwrap().to_string(),
            })
            .collect();
        let field = |key: &str| up[key].as_str().unwrap().to_string();
        Cluster {
            endpoint: field("endpoint"),
            api_token: field("api_token"),
            store_endpoint: field("store_endpoint"),
            known_hosts: field("known_hosts"),
            ssh_key: field("ssh_key"),
            tls: [field("tls_ca"), field("tls_cert"), field("tls_key")],
            dir,
            lab_binary: binary.to_path_buf(),
            hosts,
            ttl: Duration::from_secs(ttl_secs),
        }
    }

    /// The lab's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `flotilla` set up for this lab from the outer machine: its API and
    /// token, its store, and ssh as root with the lab's key and known_hosts.
    pub fn command(&self) -> Command {
        let mut command = Command::new(FLOTILLA);
        command
            .env("FLOTILLA_ENDPOINT", &self.endpoint)
            .env("FLOTILLA_API_TOKEN", &self.api_token)
            .env("FLOTILLA_STORE_ENDPOINT", &self.store_endpoint)
            .env("FLOTILLA_TLS_CA", &self.tls[0])
            .env("FLOTILLA_TLS_CERT", &self.tls[1])
            .env("FLOTILLA_TLS_KEY", &self.tls[2])
            .env("FLOTILLA_SSH_USERNAME", "root")
            .env("FLOTILLA_SSH_IDENTITY", &self.ssh_key)
            .env("FLOTILLA_KNOWN_HOSTS_FILE", &self.known_hosts)
            .env("XDG_CACHE_HOME", self.dir().join("cache"))
            .env_remove("FLOTILLA_TUNNEL");
        command
    }

    /// Runs `flotilla ARGS...` from the outer machine, set up for this lab.
    pub fn flotilla(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Runs a flotilla verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeded(&self.flotilla(args), &format!("flotilla {args:?}"))
    }

    /// Writes unit files into a temporary directory and submits them.
    pub fn submit(&self, units: &[(&str, &str)]) {
        let files = self.dir().join("units");
        std::fs::create_dir_all(&files).unwrap();
        let mut args = vec!["submit".to_string()];
        for (name, body) in units {
            let path = files.join(name);
            std::fs::write(&path, body).unwrap();
            args.push(path.to_string_lossy().into_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&args);
    }

    /// Like [`Cluster::submit`] with `--replace`.
    pub fn replace(&self, name: &str, body: &str) {
        let path = self.dir().join("units").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, body).unwrap();
        self.ok(&["submit", "--replace", path.to_str().unwrap()]);
    }

    /// Runs a command inside a host.
    pub fn exec(&self, host: &str, command: &[&str]) -> Output {
        let mut args = vec!["exec", host, "--"];
        args.extend(command);
        self.lab_out(&args)
    }

    /// Runs a shell script inside `host`; it must succeed. Returns stdout.
    pub fn sh(&self, host: &str, script: &str) -> String {
        let out = self.exec(host, &["sh", "-c", script]);
        succeeded(&out, &format!("on {host}: {script}"))
    }

    /// Copies a file of the outer machine into `host` (through `lab exec`'s
    /// stdin), as `to`; the shell command `then` runs after it if not empty.
    pub fn copy_in(&self, host: &str, from: &Path, to: &str, then: &str) {
        let script = if then.is_empty() {
            format!("cat > {to}")
        } else {
            format!("cat > {to} && {then}")
        };
        let out = Command::new(&self.lab_binary)
            .args(["lab", "exec", host, "--", "sh", "-c", &script])
            .env("FLOTILLA_LAB_DIR", self.dir())
            .stdin(std::fs::File::open(from).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "copying {} into {host}: {}",
            from.display(),
            text(&out.stderr)
        );
    }

    /// Runs `flotilla lab ARGS...` for this lab, with the binary that booted it.
    fn lab_out(&self, args: &[&str]) -> Output {
        lab_with(&self.lab_binary, self.dir(), args)
    }

    /// Runs a lab verb (kill, start, partition, heal, ...) that must succeed.
    pub fn lab(&self, args: &[&str]) {
        let out = self.lab_out(args);
        assert!(
            out.status.success(),
            "lab {args:?} failed: {}",
            text(&out.stderr)
        );
    }

    /// The host with this machine id.
    pub fn host_of(&self, machine: &str) -> &str {
        &self
            .hosts
            .iter()
            .find(|h| h.machine_id == machine)
            .unwrap_or_else(|| panic!("no host has machine id {machine}"))
            .name
    }

    /// The machine id of host `name`.
    pub fn id_of(&self, name: &str) -> &str {
        &self
            .hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap()
            .machine_id
    }

    /// `list-units --json`, parsed; `None` while the cluster does not answer.
    pub fn try_rows(&self) -> Option<Vec<Row>> {
        let out = self.flotilla(&["list-units", "--json"]);
        if !out.status.success() {
            return None;
        }
        let rows: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(
            rows.as_array()?
                .iter()
                .map(|r| Row {
                    unit: r["unit"].as_str().unwrap().to_string(),
                    machine: r["machine"].as_str().map(str::to_string),
                    active: r["active"].as_str().map(str::to_string),
                })
                .collect(),
        )
    }

    /// `list-units --json`, which must answer.
    pub fn rows(&self) -> Vec<Row> {
        self.try_rows().expect("list-units answers")
    }

    /// Units reported active, with the host running each.
    pub fn active(&self) -> BTreeMap<String, Vec<String>> {
        let mut active: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in self.try_rows().unwrap_or_default() {
            if let (Some(machine), Some("active")) = (&row.machine, row.active.as_deref()) {
                active
                    .entry(row.unit)
                    .or_default()
                    .push(self.host_of(machine).to_string());
            }
        }
        active
    }

    /// Ids of the machines with a live presence.
    pub fn machines(&self) -> Vec<String> {
        let out = self.flotilla(&["list-machines", "--json", "--full"]);
        if !out.status.success() {
            return Vec::new();
        }
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["machine"].as_str().unwrap().to_string())
            .collect()
    }

    /// Units systemd on `host` reports active among those matching `pattern`.
    pub fn systemd_active(&self, host: &str, pattern: &str) -> Vec<String> {
        self.systemd_units(host, "active", pattern)
    }

    /// Units systemd on `host` reports failed among those matching `pattern`.
    pub fn systemd_failed(&self, host: &str, pattern: &str) -> Vec<String> {
        self.systemd_units(host, "failed", pattern)
    }

    /// `systemctl list-units --state=STATE PATTERN` on `host`: the names.
    fn systemd_units(&self, host: &str, state: &str, pattern: &str) -> Vec<String> {
        let state = format!("--state={state}");
        let out = self.exec(
            host,
            &[
                "systemctl",
                "list-units",
                &state,
                "--no-legend",
                "--plain",
                pattern,
            ],
        );
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// systemd's ActiveEnterTimestampMonotonic of a unit on a host.
    pub fn entered(&self, host: &str, unit: &str) -> String {
        let out = self.exec(
            host,
            &[
                "systemctl",
                "show",
                "-P",
                "ActiveEnterTimestampMonotonic",
                unit,
            ],
        );
        text(&out.stdout).trim().to_string()
    }

    /// Prints the end of every host's flotilla journal, so a failed test
    /// shows what the daemons saw (hosts that are down print nothing).
    pub fn print_journals(&self) {
        for host in &self.hosts {
            let out = self.exec(
                &host.name,
                &[
                    "journalctl",
                    "-u",
                    "flotilla",
                    "--no-pager",
                    "-n",
                    "150",
                    "-o",
                    "short-monotonic",
                ],
            );
            eprintln!(
                "---- {} ({}) flotilla journal ----\n{}{}",
                host.name,
                host.machine_id,
                text(&out.stdout),
                text(&out.stderr)
            );
        }
    }

    /// The host whose Raft member leads.
    pub fn leader(&self) -> String {
        let out = self.ok(&["member", "list"]);
        out.lines()
            .find(|l| l.trim_end().ends_with("yes"))
            .and_then(|l| l.split_whitespace().nth(1))
            .expect("a leader")
            .to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_journals();
        }
        let out = self.lab_out(&["down"]);
        if !out.status.success() {
            eprintln!("lab down failed: {}", text(&out.stderr));
        }
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `limit`
/// naming `what`. Returns the value and how long it took.
pub fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    wait_for_state(limit, what, || check().ok_or_else(String::new))
}

/// [`wait_for`] whose `check` says what it saw while not there yet
/// (`Err`): the panic after `limit` names the last of it.
pub fn wait_for_state<T>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        let last = match check() {
            Ok(value) => return (value, started.elapsed()),
            Err(last) => last,
        };
        let seen = if last.is_empty() {
            String::new()
        } else {
            format!("; last seen: {last}")
        };
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}{seen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
