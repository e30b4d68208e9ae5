//! The command line, as clap types only; `main.rs` dispatches on them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// flotilla: keep systemd units running across a fleet of hosts.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, long_about = None)]
pub struct Cli {
    /// Cluster members to talk to, host:port, comma-separated; tried in order.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_ENDPOINT",
        value_name = "ADDRS",
        default_value = "127.0.0.1:4001",
        value_delimiter = ','
    )]
    pub endpoint: Vec<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check unit files: syntax, names and [X-Fleet] rules; prints each problem as FILE:LINE.
    Verify(VerifyArgs),
    /// Run the flotilla daemon on this host (or only check its configuration).
    Daemon(Box<DaemonArgs>),
    /// List, add or remove members of the Raft store.
    #[command(subcommand)]
    Member(MemberCommand),
    /// The cluster as a whole: `flotilla cluster health`.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Read and write the cluster's key-value store directly (for operators and debugging).
    #[command(subcommand)]
    Kv(KvCommand),
    /// Boot and drive a lab of real-systemd hosts on this machine (root, Debian 12).
    #[command(subcommand)]
    Lab(crate::lab::LabCommand),
    /// Store unit files in the cluster (desired state inactive).
    Submit(SubmitArgs),
    /// Place units on machines and start them (submitting FILEs first).
    Start(UnitsArgs),
    /// Stop units but keep them placed and loaded.
    Stop(UnitsArgs),
    /// Place units on machines and load them without starting (submitting FILEs first).
    Load(UnitsArgs),
    /// Stop and unload units; they stay submitted (desired state inactive).
    Unload(UnitsArgs),
    /// Remove units from the cluster entirely (they stop wherever they run).
    Destroy(UnitsArgs),
    /// Print a submitted unit's file, as stored.
    Cat {
        /// The unit.
        unit: String,
    },
    /// Show units that are loaded or launched: where they run and systemd's states.
    ListUnits(ListArgs),
    /// Show every submitted unit, with its desired state and body hash.
    ListUnitFiles(ListArgs),
    /// Show the machines in the cluster.
    ListMachines(ListArgs),
    /// The reboot lock, locksmithctl's verbs: status, acquire, release, set-max, need-reboot.
    Lock(LockArgs),
    /// Move every unit off a machine and keep new ones away (undo with --undo).
    Drain {
        /// The machine's id (or a unique prefix).
        machine: String,
        /// Let the machine take units again.
        #[arg(long)]
        undo: bool,
    },
    /// Print a completion script for a shell, e.g. `flotilla completion bash >
    /// /etc/bash_completion.d/flotilla` (the Debian package installs them).
    Completion {
        /// bash, zsh or fish (also elvish and powershell).
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per verb into a directory.
    #[command(hide = true)]
    Man {
        /// Write flotilla.1 and flotilla-VERB.1 for every verb here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `flotilla lock ...`
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock group (machines take turns within a group; see reboot_group).
    #[arg(long, global = true, value_name = "GROUP", default_value = "default")]
    pub group: String,
    /// What to do.
    #[command(subcommand)]
    pub command: LockCommand,
}

/// The reboot lock's verbs.
#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Show free slots, the limit, the holders (machine id, since when) and
    /// the machines asked to reboot.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take a slot for a machine (default: this one). Holding one already is fine.
    #[command(visible_alias = "lock")]
    Acquire {
        /// The holder's id [default: this machine's id, /etc/machine-id].
        id: Option<String>,
    },
    /// Give a machine's slot back (default: this one's).
    #[command(visible_alias = "unlock")]
    Release {
        /// The holder's id [default: this machine's id, /etc/machine-id].
        id: Option<String>,
    },
    /// Set how many machines may hold the lock at once (0 stops every reboot).
    SetMax {
        /// The new limit.
        max: u32,
    },
    /// Ask a machine (default: this one) to reboot: its coordinator takes the
    /// lock in its window, drains and reboots.
    NeedReboot {
        /// The machine's id [default: this machine's id, /etc/machine-id].
        id: Option<String>,
        /// Reboot even if the drain cannot move every unit within drain_timeout.
        #[arg(long)]
        force: bool,
    },
}

/// `flotilla submit`
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Unit files; each file's base name is the unit's name.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Replace the body of units already submitted (they reload where they run).
    #[arg(long)]
    pub replace: bool,
}

/// Verbs taking units by name (or unit files, for start and load).
#[derive(Debug, Args)]
pub struct UnitsArgs {
    /// Unit names (`web@1.service`; `.service` is added when there is no suffix)
    /// or, for start/load, paths of unit files to submit first.
    #[arg(required = true, value_name = "UNIT")]
    pub units: Vec<String>,
    /// Wait until every unit reaches the state asked for (or a failed state).
    #[arg(long)]
    pub block: bool,
    /// How long --block waits, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub block_timeout: u64,
}

/// Options of the list verbs.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show full machine ids and hashes.
    #[arg(long, short = 'l')]
    pub full: bool,
}

/// `flotilla member ...`
#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Show the members, their addresses and which one leads.
    List,
    /// Add a member (a learner until it catches up); then start it with
    /// --initial-cluster-state existing.
    Add {
        /// The new member's name (its --name).
        name: String,
        /// Its peer address, host:port (its --peer-listen).
        peer_addr: String,
    },
    /// Remove a member (one change at a time).
    Remove {
        /// The member's name.
        name: String,
    },
}

/// `flotilla cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, leader, each member's lag, quorum, store size, machines whose
    /// presence lease expired. Exit status 0 when healthy; 1 when a member does
    /// not answer, no leader is known or quorum is lost (or nothing answers).
    Health {
        /// Print the report as JSON (on stdout, healthy or not).
        #[arg(long)]
        json: bool,
    },
}

/// `flotilla kv ...`
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print a key's value (or every key under a prefix with --prefix).
    Get {
        /// Key or prefix.
        key: String,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
        /// Read this member's state without confirming leadership (faster, may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// Set a key.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Delete a key (or every key under a prefix with --prefix).
    Del {
        /// Key or prefix.
        key: String,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
    },
    /// Print changes under a prefix as they happen.
    Watch {
        /// Key prefix ("" for everything).
        prefix: String,
        /// First revision to show [default: the next change].
        #[arg(long, value_name = "REVISION")]
        from: Option<u64>,
    },
}

/// `flotilla verify FILE...`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Unit files to check; each file's name (without directories) is the unit's name,
    /// with `.service` added when it has no type suffix.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Also print each valid unit's canonical form (what `flotilla cat` shows) and hash.
    #[arg(long)]
    pub print: bool,
}

/// `flotilla daemon [FLAGS]`: every flag overrides the config file and `FLOTILLA_<KEY>`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Config file [default: /etc/flotilla/flotilla.toml, if it exists].
    #[arg(long, env = "FLOTILLA_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long)]
    pub check_config: bool,
    /// This member's name in the cluster [config: name; default: the host name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Directory for the Raft log and the agent's identity [config: data_dir].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// API address for the CLI and agents, host:port [config: client_listen].
    #[arg(long, value_name = "ADDR")]
    pub client_listen: Option<String>,
    /// Raft peer address, host:port [config: peer_listen].
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<String>,
    /// Founding members, name=host:port,... [config: initial_cluster].
    #[arg(long, value_name = "MEMBERS")]
    pub initial_cluster: Option<String>,
    /// `new` founds the cluster in --initial-cluster; `existing` joins after
    /// `flotilla member add` [config: initial_cluster_state].
    #[arg(long, value_name = "new|existing")]
    pub initial_cluster_state: Option<String>,
    /// Raft election timeout in milliseconds [config: election_timeout_ms].
    #[arg(long, value_name = "MS")]
    pub election_timeout_ms: Option<u64>,
    /// Applied entries between snapshots [config: snapshot_entries].
    #[arg(long, value_name = "N")]
    pub snapshot_entries: Option<u64>,
    /// Machine metadata, repeatable, replaces the configured set [config: metadata].
    #[arg(long, value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Log filter in RUST_LOG syntax, e.g. info or flotilla=debug [config: log].
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// Run only the agent, against these Raft members' client addresses,
    /// host:port,... [config: endpoints].
    #[arg(long = "join", value_name = "ADDRS")]
    pub endpoints: Option<String>,
    /// Presence TTL in seconds [config: ttl_secs; default 10].
    #[arg(long, value_name = "SECS")]
    pub ttl_secs: Option<u64>,
    /// Address to publish for this machine [config: public_ip; default: detected].
    #[arg(long, value_name = "IP")]
    pub public_ip: Option<String>,
    /// Do not run the agent: a store-only member [config: agent = false].
    #[arg(long)]
    pub no_agent: bool,
    /// On SIGTERM stop and unload this host's units and leave [config: leave_on_stop].
    #[arg(long)]
    pub leave_on_stop: bool,
}

impl DaemonArgs {
    /// The flags that were given, as configuration overrides `(key, flag, value)`.
    pub fn overrides(&self) -> Result<Vec<(&'static str, &'static str, toml::Value)>, String> {
        let mut overrides = Vec::new();
        let mut string = |key, flag, value: &Option<String>| {
            if let Some(value) = value {
                overrides.push((key, flag, toml::Value::String(value.clone())));
            }
        };
        string("name", "--name", &self.name);
        string("client_listen", "--client-listen", &self.client_listen);
        string("peer_listen", "--peer-listen", &self.peer_listen);
        string(
            "initial_cluster",
            "--initial-cluster",
            &self.initial_cluster,
        );
        string("log", "--log", &self.log);
        string("endpoints", "--join", &self.endpoints);
        string("public_ip", "--public-ip", &self.public_ip);
        string(
            "initial_cluster_state",
            "--initial-cluster-state",
            &self.initial_cluster_state,
        );
        if self.no_agent {
            overrides.push(("agent", "--no-agent", toml::Value::Boolean(false)));
        }
        if self.leave_on_stop {
            overrides.push((
                "leave_on_stop",
                "--leave-on-stop",
                toml::Value::Boolean(true),
            ));
        }
        let numbers = [
            (
                "election_timeout_ms",
                "--election-timeout-ms",
                self.election_timeout_ms,
            ),
            (
                "snapshot_entries",
                "--snapshot-entries",
                self.snapshot_entries,
            ),
            ("ttl_secs", "--ttl-secs", self.ttl_secs),
        ];
        for (key, flag, value) in numbers {
            if let Some(value) = value {
                let value =
                    i64::try_from(value).map_err(|_| format!("{flag} {value} is too large"))?;
                overrides.push((key, flag, toml::Value::Integer(value)));
            }
        }
        if let Some(dir) = &self.data_dir {
            let dir = dir
                .to_str()
                .ok_or_else(|| format!("--data-dir {} is not valid UTF-8", dir.display()))?;
            overrides.push((
                "data_dir",
                "--data-dir",
                toml::Value::String(dir.to_string()),
            ));
        }
        if !self.metadata.is_empty() {
            let mut table = toml::Table::new();
            for pair in &self.metadata {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("--metadata expects KEY=VALUE, got {pair:?}"))?;
                table.insert(key.to_string(), toml::Value::String(value.to_string()));
            }
            overrides.push(("metadata", "--metadata", toml::Value::Table(table)));
        }
        Ok(overrides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn daemon_flags_become_overrides() {
        let cli = Cli::try_parse_from([
            "flotilla",
            "daemon",
            "--name",
            "n1",
            "--data-dir",
            "/d",
            "--metadata",
            "a=b",
            "--metadata",
            "c=d",
        ])
        .unwrap();
        let Command::Daemon(args) = cli.command else {
            panic!()
        };
        let overrides = args.overrides().unwrap();
        let keys: Vec<_> = overrides.iter().map(|o| o.0).collect();
        assert_eq!(keys, ["name", "data_dir", "metadata"]);
        assert_eq!(overrides[2].2.as_table().unwrap().len(), 2);
    }

    #[test]
    fn malformed_metadata_flag_is_refused() {
        let cli = Cli::try_parse_from(["flotilla", "daemon", "--metadata", "novalue"]).unwrap();
        let Command::Daemon(args) = cli.command else {
            panic!()
        };
        assert!(args.overrides().unwrap_err().contains("KEY=VALUE"));
    }

    #[test]
    fn unknown_flags_and_missing_files_are_usage_errors() {
        assert!(Cli::try_parse_from(["flotilla", "verify"]).is_err());
        assert!(Cli::try_parse_from(["flotilla", "verify", "--bogus", "x"]).is_err());
        assert!(Cli::try_parse_from(["flotilla", "daemon", "--bogus"]).is_err());
    }
}
