//! The lab's persisted state, `DIR/lab.json`, and the JSON views the CLI prints.
//!
//! `lab up` writes the first version; from then on the supervisor is its only
//! writer (it owns the hosts), and every other verb reads it. Writes replace the
//! file atomically (write, then rename), so a reader never sees half of one.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::dir::LabDir;

/// The format version of `lab.json`.
pub const VERSION: u32 = 1;

/// The port every server's `flotilla daemon` serves clients on.
pub const CLIENT_PORT: u16 = 4001;

/// The port Raft peers talk on.
pub const PEER_PORT: u16 = 4002;

/// The port every host's API listens on (with the lab's token).
pub const API_PORT: u16 = 4003;

/// Everything the lab knows about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Format version, [`VERSION`].
    pub version: u32,
    /// The lab's canonical directory.
    pub dir: PathBuf,
    /// The first three octets of the lab's /24; hosts are .1 to .N, the outer machine .254.
    pub subnet: [u8; 3],
    /// How many of the first hosts are Raft servers.
    pub servers: usize,
    /// The agent presence TTL asked for, in seconds. Recorded for the agent, which does
    /// not exist yet; nothing consumes it today.
    pub ttl_secs: u64,
    /// The servers' Raft election timeout.
    pub election_timeout_ms: u64,
    /// The supervisor's pid, once it runs.
    pub supervisor_pid: Option<u32>,
    /// The pid of the process holding the switch network namespace.
    pub switch_pid: Option<u32>,
    /// Every host's API token (`api_token`): the bearer token its API on
    /// [`API_PORT`] wants.
    #[serde(default)]
    pub api_token: String,
    /// The hosts, h1..hN.
    pub hosts: Vec<HostState>,
}

/// One host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostState {
    /// h1, h2, ...: its hostname and Raft member name.
    pub name: String,
    /// Its address on the lab's bridge.
    pub ip: Ipv4Addr,
    /// Its /etc/machine-id (32 hex digits), kept across boots.
    pub machine_id: String,
    /// Whether it is one of the Raft servers.
    pub server: bool,
    /// The outer machine's pid of its PID 1 (systemd), while it runs.
    pub pid: Option<u32>,
    /// The id of its current (or last) boot, also in its /run/flotilla/boot_id.
    pub boot_id: Option<String>,
    /// How many times it has booted.
    pub boots: u32,
    /// Whether its link is cut (`lab partition`); kept across its reboots.
    pub partitioned: bool,
    /// The switch-side interface of its current boot.
    pub port: Option<String>,
    /// How its last boot ended ("rebooted", "killed", ...), if it ended.
    pub last_exit: Option<String>,
}

impl LabState {
    /// A lab that has not booted yet.
    pub fn new(
        dir: &LabDir,
        subnet: [u8; 3],
        hosts: usize,
        servers: usize,
        ttl_secs: u64,
        election_timeout_ms: u64,
    ) -> LabState {
        let hosts = (1..=hosts)
            .map(|i| HostState {
                name: format!("h{i}"),
                ip: host_ip(subnet, i),
                machine_id: String::new(),
                server: i <= servers,
                pid: None,
                boot_id: None,
                boots: 0,
                partitioned: false,
                port: None,
                last_exit: None,
            })
            .collect();
        LabState {
            version: VERSION,
            dir: dir.path().to_path_buf(),
            subnet,
            servers,
            ttl_secs,
            election_timeout_ms,
            supervisor_pid: None,
            switch_pid: None,
            api_token: String::new(),
            hosts,
        }
    }

    /// Reads `DIR/lab.json`.
    pub fn load(dir: &LabDir) -> Result<LabState> {
        let path = dir.state_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
                "no lab at {} (no lab.json); start one with: flotilla lab up --hosts 3 --dir {}",
                dir.path().display(),
                dir.path().display()
            ),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let state: LabState = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a lab state file", path.display()))?;
        if state.version != VERSION {
            bail!(
                "{} has format version {}, this flotilla reads {VERSION}; run `flotilla lab down --dir {}` with the flotilla that made it",
                path.display(),
                state.version,
                dir.path().display()
            );
        }
        Ok(state)
    }

    /// Replaces `DIR/lab.json` atomically.
    pub fn save(&self, dir: &LabDir) -> Result<()> {
        let path = dir.state_file();
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).context("cannot encode the lab state")?;
        std::fs::write(&tmp, text + "\n")
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Option<&HostState> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// A host by name, to change it.
    pub fn host_mut(&mut self, name: &str) -> Option<&mut HostState> {
        self.hosts.iter_mut().find(|h| h.name == name)
    }

    /// Every host's name, for error messages.
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// The outer machine's address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        host_ip(self.subnet, 254)
    }

    /// Every host's API, comma-separated: a `flotilla --endpoint` value.
    pub fn api_endpoint(&self) -> String {
        self.hosts
            .iter()
            .map(|h| format!("https://{}:{API_PORT}", h.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The servers' store addresses, comma-separated: a `flotilla
    /// --store-endpoint` value (and agent-only hosts' `endpoints`).
    pub fn endpoint(&self) -> String {
        self.hosts
            .iter()
            .filter(|h| h.server)
            .map(|h| format!("{}:{CLIENT_PORT}", h.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The daemon's `initial_cluster`: every server's name and peer address.
    pub fn initial_cluster(&self) -> String {
        self.hosts
            .iter()
            .filter(|h| h.server)
            .map(|h| format!("{}={}:{PEER_PORT}", h.name, h.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The subnet in CIDR notation.
    pub fn subnet_cidr(&self) -> String {
        let [a, b, c] = self.subnet;
        format!("{a}.{b}.{c}.0/24")
    }
}

/// The address of host `i` (1-based) in `subnet`.
pub fn host_ip(subnet: [u8; 3], i: usize) -> Ipv4Addr {
    let last = u8::try_from(i).expect("hosts are limited to 250 by the CLI");
    Ipv4Addr::new(subnet[0], subnet[1], subnet[2], last)
}

/// What `lab up` prints: the stable interface tests and tools read.
#[derive(Debug, Serialize, Deserialize)]
pub struct UpOutput {
    /// `flotilla --endpoint` value: every host's API, from the outer machine.
    pub endpoint: String,
    /// `flotilla --api-token` value for those endpoints.
    pub api_token: String,
    /// `flotilla --store-endpoint` value: the Raft servers' store.
    pub store_endpoint: String,
    /// A known_hosts file with every host's ssh host keys (by IP and name).
    pub known_hosts: PathBuf,
    /// The hosts.
    pub hosts: Vec<UpHost>,
    /// Path of a private key that root on every host accepts.
    pub ssh_key: PathBuf,
    /// The lab's cluster CA certificate: `flotilla --tls-ca`.
    pub tls_ca: PathBuf,
    /// An admin certificate of the lab's CA, for the store verbs: `--tls-cert`.
    pub tls_cert: PathBuf,
    /// Its key: `--tls-key`.
    pub tls_key: PathBuf,
    /// The lab's directory (pass it as `--dir` to the other verbs).
    pub dir: PathBuf,
}

/// A host in [`UpOutput`].
#[derive(Debug, Serialize, Deserialize)]
pub struct UpHost {
    /// Its name.
    pub name: String,
    /// Its machine-id.
    pub machine_id: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The outer pid of its PID 1.
    pub pid: u32,
}

/// What `lab status` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// The lab's directory.
    pub dir: PathBuf,
    /// Whether the supervisor (which honours reboots) is running.
    pub supervisor: bool,
    /// The lab's subnet.
    pub subnet: String,
    /// The `flotilla --endpoint` value (every host's API).
    pub endpoint: String,
    /// The `flotilla --store-endpoint` value.
    pub store_endpoint: String,
    /// The hosts.
    pub hosts: Vec<StatusHost>,
}

/// A host in [`Status`].
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusHost {
    /// Its name.
    pub name: String,
    /// Whether its PID 1 is running.
    pub up: bool,
    /// The outer pid of its PID 1, when up.
    pub pid: Option<u32>,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its machine-id.
    pub machine_id: String,
    /// Whether it is a Raft server.
    pub server: bool,
    /// The id of its current (or last) boot.
    pub boot_id: Option<String>,
    /// How many times it booted.
    pub boots: u32,
    /// Whether its link is cut.
    pub partitioned: bool,
    /// How its last boot ended, if it ended.
    pub last_exit: Option<String>,
}

impl Status {
    /// The status as `lab.json` records it, checked against the running processes.
    pub fn read(dir: &LabDir) -> Result<Status> {
        let lab = LabState::load(dir)?;
        let supervisor = lab.supervisor_pid.is_some_and(|pid| dir.is_supervisor(pid));
        let hosts = lab
            .hosts
            .iter()
            .map(|h| {
                let pid = h.pid.filter(|pid| super::host::is_running(*pid));
                StatusHost {
                    name: h.name.clone(),
                    up: pid.is_some(),
                    pid,
                    ip: h.ip,
                    machine_id: h.machine_id.clone(),
                    server: h.server,
                    boot_id: h.boot_id.clone(),
                    boots: h.boots,
                    partitioned: h.partitioned,
                    last_exit: h.last_exit.clone(),
                }
            })
            .collect();
        Ok(Status {
            dir: lab.dir.clone(),
            supervisor,
            subnet: lab.subnet_cidr(),
            endpoint: lab.api_endpoint(),
            store_endpoint: lab.endpoint(),
            hosts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_the_first_hosts_and_make_the_endpoint() {
        let dir = LabDir::for_teardown(std::path::Path::new("/nonexistent/lab")).unwrap();
        let lab = LabState::new(&dir, [10, 99, 7], 4, 3, 3, 300);
        assert_eq!(lab.host_names(), ["h1", "h2", "h3", "h4"]);
        assert!(lab.hosts[2].server && !lab.hosts[3].server);
        assert_eq!(
            lab.endpoint(),
            "10.99.7.1:4001,10.99.7.2:4001,10.99.7.3:4001"
        );
        assert_eq!(
            lab.initial_cluster(),
            "h1=10.99.7.1:4002,h2=10.99.7.2:4002,h3=10.99.7.3:4002"
        );
        assert_eq!(lab.gateway(), Ipv4Addr::new(10, 99, 7, 254));
        assert_eq!(
            lab.api_endpoint(),
            "https://10.99.7.1:4003,https://10.99.7.2:4003,https://10.99.7.3:4003,https://10.99.7.4:4003"
        );
        let json = serde_json::to_string(&lab).unwrap();
        let back: LabState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.hosts[3].ip, lab.hosts[3].ip);
    }
}
