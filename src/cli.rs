//! The command line, as clap types only; `main.rs` dispatches on them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// flotilla: keep systemd units running across a fleet of hosts.
///
/// The unit verbs talk to the daemon's HTTP API, as fleetctl talked to fleet's:
/// by default its root-only socket on this host, unix:///run/flotilla/api.sock;
/// from elsewhere `--endpoint https://HOST:4003` with the cluster CA and a
/// certificate (--tls-ca, --tls-cert, --tls-key) or `--api-token TOKEN`, or
/// `--tunnel HOST`.
/// `kv`, `member`, `cluster`, `snapshot` and `lock` speak the store's own
/// protocol (`--store-endpoint`).
/// Exit codes: 0 success, 1 failure, 2 bad usage.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, long_about)]
pub struct Cli {
    /// How to reach the API (these may also follow the verb).
    #[command(flatten)]
    pub api: ApiArgs,
    /// The store's members, host:port, comma-separated; tried in order (`kv`,
    /// `member`, `cluster`, `snapshot`, `lock`).
    #[arg(
        long,
        env = "FLOTILLA_STORE_ENDPOINT",
        value_name = "ADDRS",
        default_value = "127.0.0.1:4001",
        value_delimiter = ','
    )]
    pub store_endpoint: Vec<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The identity the CLI presents when the cluster uses TLS, to the store
/// (`kv`, `member`, `cluster`, `snapshot`, `lock`) and to an `https://` API
/// endpoint: the cluster CA, and a certificate and key from `flotilla tls
/// issue` (an admin's, to change units or members; without one, an https
/// API wants `--api-token`). The environment variables are the daemon's own
/// `tls_*` settings, so on a member host they already point at its
/// certificate.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// The cluster CA certificate (ca.pem), which the store's and an https
    /// API's certificates must be signed by [env: FLOTILLA_TLS_CA]
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This user's or host's certificate [env: FLOTILLA_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert [env: FLOTILLA_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

/// How the unit verbs reach the API (fleetctl's global flags). Each may be
/// given before or after the verb (after wins), or in its environment
/// variable (the flags win).
#[derive(Debug, Clone, Default, Args)]
pub struct ApiArgs {
    /// The API: unix:///PATH, or https://HOST:PORT (daemons with TLS; needs
    /// --tls-ca) or http://HOST:PORT; several comma-separated are tried in
    /// order and the one that answers is remembered
    /// [env: FLOTILLA_ENDPOINT] [default: unix:///run/flotilla/api.sock]
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Bearer token for an http(s) endpoint: the daemons' api_token (over
    /// https a certificate, --tls-cert, may stand in for it)
    /// [env: FLOTILLA_API_TOKEN]
    #[arg(long, value_name = "TOKEN")]
    pub api_token: Option<String>,
    /// Seconds to wait for each answer of the API [env: FLOTILLA_REQUEST_TIMEOUT]
    /// [default: 10]
    #[arg(long, value_name = "SECS")]
    pub request_timeout: Option<f64>,
    /// Reach the API through ssh to this host, HOST[:PORT] (each --endpoint
    /// as that host reaches it, tried in order) [env: FLOTILLA_TUNNEL]
    #[arg(long, value_name = "HOST[:PORT]")]
    pub tunnel: Option<String>,
    /// ssh settings, for --tunnel, ssh, status and journal.
    #[command(flatten)]
    pub ssh: SshArgs,
    /// The cluster CA and this user's certificate, for https endpoints and
    /// the store.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How `ssh`, `status`, `journal` and `--tunnel` log in to cluster hosts.
#[derive(Debug, Clone, Default, Args)]
pub struct SshArgs {
    /// The user to log in as on cluster hosts [env: FLOTILLA_SSH_USERNAME]
    /// [default: core]
    #[arg(long, value_name = "USER")]
    pub ssh_username: Option<String>,
    /// The port of cluster hosts' sshd [env: FLOTILLA_SSH_PORT] [default: 22]
    #[arg(long, value_name = "PORT")]
    pub ssh_port: Option<u16>,
    /// A private key to log in with, instead of the agent's and ssh's defaults
    /// [env: FLOTILLA_SSH_IDENTITY]
    #[arg(long, value_name = "FILE")]
    pub ssh_identity: Option<PathBuf>,
    /// Check hosts' keys against known_hosts; false accepts any key
    /// [env: FLOTILLA_STRICT_HOST_KEY_CHECKING] [default: true]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub strict_host_key_checking: Option<bool>,
    /// The known_hosts file to check host keys against
    /// [env: FLOTILLA_KNOWN_HOSTS_FILE] [default: ssh's own]
    #[arg(long, value_name = "FILE")]
    pub known_hosts_file: Option<PathBuf>,
}

impl ApiArgs {
    /// These settings, with `outer`'s (given before the verb) where these have none.
    pub fn or(self, outer: &ApiArgs) -> ApiArgs {
        ApiArgs {
            endpoint: self.endpoint.or_else(|| outer.endpoint.clone()),
            api_token: self.api_token.or_else(|| outer.api_token.clone()),
            request_timeout: self.request_timeout.or(outer.request_timeout),
            tunnel: self.tunnel.or_else(|| outer.tunnel.clone()),
            ssh: SshArgs {
                ssh_username: self
                    .ssh
                    .ssh_username
                    .or_else(|| outer.ssh.ssh_username.clone()),
                ssh_port: self.ssh.ssh_port.or(outer.ssh.ssh_port),
                ssh_identity: self
                    .ssh
                    .ssh_identity
                    .or_else(|| outer.ssh.ssh_identity.clone()),
                strict_host_key_checking: self
                    .ssh
                    .strict_host_key_checking
                    .or(outer.ssh.strict_host_key_checking),
                known_hosts_file: self
                    .ssh
                    .known_hosts_file
                    .or_else(|| outer.ssh.known_hosts_file.clone()),
            },
            tls: TlsArgs {
                tls_ca: self.tls.tls_ca.or_else(|| outer.tls.tls_ca.clone()),
                tls_cert: self.tls.tls_cert.or_else(|| outer.tls.tls_cert.clone()),
                tls_key: self.tls.tls_key.or_else(|| outer.tls.tls_key.clone()),
            },
        }
    }
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check unit files: syntax, names and [X-Fleet] rules; prints each problem as FILE:LINE.
    Verify(VerifyArgs),
    /// Run the flotilla daemon on this host (or only check its configuration).
    Daemon(Box<DaemonArgs>),
    /// List, add or remove members of the Raft store (over the store's protocol).
    #[command(subcommand)]
    Member(MemberCommand),
    /// The cluster as a whole: `flotilla cluster health`.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Read and write the cluster's key-value store directly (for operators and debugging).
    #[command(subcommand)]
    Kv(KvCommand),
    /// Back up the store to a file, or make a new cluster's data dir from one.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Make the cluster CA and certificates for members, agents and admins.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Boot and drive a lab of real-systemd hosts on this machine (root, Debian 12).
    #[command(subcommand)]
    Lab(crate::lab::LabCommand),
    /// Store units in the cluster (desired state inactive), from their files.
    Submit(SubmitArgs),
    /// Schedule units and start them, submitting their files first; waits
    /// until each is active.
    Start(StartArgs),
    /// Stop units but keep them scheduled and loaded; waits until each stopped.
    Stop(StateArgs),
    /// Schedule units and load them without starting, submitting their files
    /// first; waits until each is loaded.
    Load(StartArgs),
    /// Stop and unload units; they stay submitted (desired state inactive).
    Unload(StateArgs),
    /// Stop and start launched units again, one after another (as fleetctl did: a unit
    /// only loaded is skipped, an inactive one is an error); waits unless --no-block.
    Restart(RestartArgs),
    /// Remove units from the cluster (they stop wherever they run). A unit
    /// that does not exist is not an error.
    Destroy(DestroyArgs),
    /// Print a submitted unit's file, as stored.
    Cat(UnitArg),
    /// Show units and their systemd states, one row per unit and machine.
    ///
    /// Fields: unit, machine, active, sub (the default), load, hash, and
    /// flotilla's desired, reason (why it is not placed), hostname, ip,
    /// overdue (the machine missed two renewals of its presence; MACHINE
    /// then ends in "(overdue)": its states may be stale).
    ListUnits(ListArgs),
    /// Show every submitted unit: its hash, desired and current state, and target.
    ///
    /// Fields: unit, hash, dstate, state, target (the default), global, desc,
    /// and flotilla's desired (same as dstate), reason.
    ListUnitFiles(ListArgs),
    /// Show the machines in the cluster.
    ///
    /// Fields: machine, ip, metadata (the default), and flotilla's hostname,
    /// drained, renewed (when its presence was last renewed).
    ListMachines(ListArgs),
    /// The reboot lock, locksmithctl's verbs: status, acquire, release, set-max, need-reboot.
    Lock(LockArgs),
    /// Move every unit off a machine and keep new ones away (undo with --undo).
    Drain(DrainArgs),
    /// Say where a unit may run and why not elsewhere: each machine and the
    /// rule that excluded it.
    Explain(UnitArg),
    /// Open an ssh session (or run CMD) on the host of a machine or a unit.
    Ssh(SshVerbArgs),
    /// Show `systemctl status -l` of units, run on each unit's host.
    Status(StatusArgs),
    /// Show a unit's journal (journalctl), read on its host.
    Journal(JournalArgs),
    /// Print flotilla's version.
    Version,
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
    /// the machines asked to reboot. There can be more holders than the limit
    /// only after set-max lowered it below them; status then says so.
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
    /// Set how many machines may take the lock at once (0 stops every new
    /// reboot). Lowering it below the current holders keeps them (they may
    /// be rebooting already) and admits nobody until enough of them release.
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

/// How long the state verbs wait (fleetctl's --no-block and --block-attempts).
#[derive(Debug, Clone, Args)]
pub struct BlockArgs {
    /// Do not wait for the units to reach their state.
    #[arg(long, conflicts_with = "block_attempts")]
    pub no_block: bool,
    /// How many times to check (every 500 ms) before giving up; 0 waits for ever.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub block_attempts: u32,
}

/// `flotilla submit`
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Unit files, or unit names with a file of that name here (an instance
    /// may use its template's file, `web@.service` for `web@1.service`).
    #[arg(required = true, value_name = "UNIT|FILE")]
    pub units: Vec<String>,
    /// Replace the body of units already submitted with different contents
    /// (their desired state becomes inactive).
    #[arg(long)]
    pub replace: bool,
    /// Submit files with unknown [X-Fleet] keys (otherwise refused: a typo
    /// there silently drops a placement rule).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `flotilla start` and `flotilla load`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Units (`web@1.service`; `.service` is added when there is no type),
    /// or their files; a unit not yet submitted is submitted from its file,
    /// or made from its template (submitted, or a file beside it).
    #[arg(required = true, value_name = "UNIT|FILE")]
    pub units: Vec<String>,
    /// Replace the body of units already submitted with different contents
    /// (they restart with the new one).
    #[arg(long)]
    pub replace: bool,
    /// Accept files with unknown [X-Fleet] keys.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub block: BlockArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `flotilla stop` and `flotilla unload`: units by name.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// Unit names (`web@1.service`; `.service` is added when there is no type).
    #[arg(required = true, value_name = "UNIT")]
    pub units: Vec<String>,
    #[command(flatten)]
    pub block: BlockArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `flotilla restart`
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// Units (or their files, submitted first as by start).
    #[arg(required = true, value_name = "UNIT|FILE")]
    pub units: Vec<String>,
    /// `--no-block`, or how many times to check each step (every 500 ms).
    #[command(flatten)]
    pub block: BlockArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `flotilla destroy`
#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// Unit names (`web@1.service`; `.service` is added when there is no type).
    #[arg(required = true, value_name = "UNIT")]
    pub units: Vec<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// A verb on one unit.
#[derive(Debug, Args)]
pub struct UnitArg {
    /// The unit's name (`.service` is added when there is no type).
    #[arg(value_name = "UNIT")]
    pub unit: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Options of the list verbs.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Columns to show, comma-separated (see the verb's fields above).
    #[arg(long, value_name = "FIELDS")]
    pub fields: Option<String>,
    /// Show full machine ids and hashes.
    #[arg(long, short = 'l')]
    pub full: bool,
    /// Leave out the header line.
    #[arg(long)]
    pub no_legend: bool,
    /// Print JSON (every field) instead of a table.
    #[arg(long, conflicts_with_all = ["fields", "no_legend"])]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `flotilla drain`
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The machine: its id (or a unique prefix), host name or IP.
    pub machine: String,
    /// Let the machine take units again.
    #[arg(long)]
    pub undo: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `flotilla ssh`
#[derive(Debug, Args)]
pub struct SshVerbArgs {
    /// A machine (id prefix, host name or IP) or a unit (its host).
    #[arg(value_name = "MACHINE|UNIT", required_unless_present_any = ["machine", "unit"])]
    pub target: Option<String>,
    /// The command to run there (an interactive shell without one).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
    /// Take the target as a machine only.
    #[arg(long, value_name = "MACHINE", conflicts_with_all = ["unit"])]
    pub machine: Option<String>,
    /// Take the target as a unit only.
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// Forward the ssh agent (off by default).
    #[arg(short = 'A', long)]
    pub forward_agent: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `flotilla status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Units.
    #[arg(required = true, value_name = "UNIT")]
    pub units: Vec<String>,
    /// Read it through the API instead of ssh (no ssh keys needed): the daemon
    /// reached asks the unit's host, over mutual TLS.
    #[arg(long)]
    pub via_api: bool,
    /// Forward the ssh agent (off by default).
    #[arg(short = 'A', long)]
    pub forward_agent: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `flotilla journal`
#[derive(Debug, Args)]
pub struct JournalArgs {
    /// The unit.
    #[arg(value_name = "UNIT")]
    pub unit: String,
    /// How many of the last lines to show.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 10)]
    pub lines: u32,
    /// Keep printing new lines as they come.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// journalctl's output mode (short, json, cat, verbose, ...).
    #[arg(long, short = 'o', value_name = "MODE", default_value = "short")]
    pub output: String,
    /// Run journalctl with sudo.
    #[arg(long)]
    pub sudo: bool,
    /// Read the journal through the API instead of ssh (no ssh keys needed): the
    /// daemon reached asks the unit's host, over mutual TLS.
    #[arg(long, conflicts_with = "sudo")]
    pub via_api: bool,
    /// Forward the ssh agent (off by default).
    #[arg(short = 'A', long)]
    pub forward_agent: bool,
    #[command(flatten)]
    pub api: ApiArgs,
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

/// `flotilla snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a consistent backup of the store, read from a live member (over
    /// --store-endpoint), to FILE.
    Save {
        /// Where to write it (replaced atomically).
        file: PathBuf,
    },
    /// Make a new cluster's data dir from a backup. Run it on every founding
    /// member with the same --initial-cluster, then start each with
    /// `flotilla daemon --name NAME --data-dir DIR`.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The new member's data dir (its Raft store must not exist yet).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The new cluster's founding members, name=host:port,...
        #[arg(long, value_name = "MEMBERS")]
        initial_cluster: String,
    },
}

/// `flotilla cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, leader, each member's lag, quorum, store size, machines whose
    /// renewal is overdue or whose presence lease expired. Exit status 0 when
    /// healthy; 1 when a member does not answer, no leader is known, quorum is
    /// lost or a machine's renewal is overdue (or nothing answers).
    Health {
        /// Print the report as JSON (on stdout, healthy or not).
        #[arg(long)]
        json: bool,
    },
}

/// `flotilla tls ...`
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a new cluster CA in DIR (ca.pem, ca.key) and print the cluster id.
    /// Keep ca.key off the hosts.
    Init {
        /// Where to write it (created if missing; must not hold a CA yet).
        dir: PathBuf,
    },
    /// Issue a certificate and key for a member, an agent or an admin, signed
    /// by the CA; writes NAME.pem, NAME.key and ca.pem into --out.
    Issue {
        /// A member's name, an agent's machine id (/etc/machine-id), or an
        /// admin's user name.
        name: String,
        /// member (a Raft server), agent (an agent-only host), admin (a person or tool).
        #[arg(long)]
        role: String,
        /// The CA's directory (from `flotilla tls init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Where to write the files [default: the CA's directory]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = crate::tls::ca::DEFAULT_DAYS)]
        days: u32,
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
    /// Applied log entries kept in memory; older ones are read from disk
    /// when a lagging member needs them [config: log_memory_entries].
    #[arg(long, value_name = "N")]
    pub log_memory_entries: Option<u64>,
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
    /// Disaster recovery when a quorum is lost for good: start a one-member
    /// cluster from this member's data dir, keeping every entry its log holds.
    /// Use it once, on one survivor; then add members (flotilla member add).
    #[arg(long)]
    pub force_new_cluster: bool,
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
            (
                "log_memory_entries",
                "--log-memory-entries",
                self.log_memory_entries,
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
