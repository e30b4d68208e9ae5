//! The daemon's configuration: one loader for every setting flotilla has.
//!
//! Precedence, later wins:
//!
//! 1. built-in defaults ([`Config::default`]);
//! 2. the TOML file (`--config PATH`, default `/etc/flotilla/flotilla.toml`;
//!    the default path may be absent, an explicit one must exist);
//! 3. environment variables `FLOTILLA_<KEY>`, the key upper-cased
//!    (`FLOTILLA_DATA_DIR=/srv/flotilla`);
//! 4. command-line flags (`--data-dir /srv/flotilla`).
//!
//! An unknown key in the file is an error naming the key and `file:line`;
//! every value is validated once, here, and an error names where the bad value
//! came from. Later features add fields to [`Config`]; they never add a loader.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::consensus::member::{check_address, check_name};
use crate::lock::settings::RebootSettings;

/// Where the daemon looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/flotilla/flotilla.toml";

/// The prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "FLOTILLA_";

/// Environment variables with the prefix that are not configuration keys.
///
/// `FLOTILLA_CONFIG` picks the file itself; the others belong to the CLI.
const ENV_NOT_KEYS: [&str; 12] = [
    "FLOTILLA_CONFIG",
    "FLOTILLA_ENDPOINT",
    "FLOTILLA_TOKEN",
    "FLOTILLA_STORE_ENDPOINT",
    "FLOTILLA_REQUEST_TIMEOUT",
    "FLOTILLA_TUNNEL",
    "FLOTILLA_SSH_USERNAME",
    "FLOTILLA_SSH_PORT",
    "FLOTILLA_SSH_IDENTITY",
    "FLOTILLA_STRICT_HOST_KEY_CHECKING",
    "FLOTILLA_KNOWN_HOSTS_FILE",
    "FLOTILLA_LAB_DIR",
];

/// Every setting of `flotilla daemon`, after all layers are applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This member's name in the cluster; defaults to the host name.
    pub name: String,
    /// Where the Raft log, snapshots and the agent's identity live.
    pub data_dir: PathBuf,
    /// Address the HTTP API listens on for the CLI and agents (`host:port`).
    pub client_listen: String,
    /// Address Raft peers connect to (`host:port`).
    pub peer_listen: String,
    /// The founding members, `name=host:port,...`; empty means a single member
    /// made of this host alone.
    pub initial_cluster: String,
    /// `new` founds a cluster from `initial_cluster`; `existing` joins one
    /// that already added this member (`flotilla member add`).
    pub initial_cluster_state: String,
    /// Raft election timeout in milliseconds; heartbeats go at a fifth of it.
    pub election_timeout_ms: u64,
    /// Applied log entries between snapshots (and log compactions).
    pub snapshot_entries: u64,
    /// Applied log entries a member keeps in memory; older ones since the
    /// last snapshot stay on disk and are read back for a lagging member.
    pub log_memory_entries: u64,
    /// Bytes of applied log entries that also trigger a snapshot (once they
    /// exceed the keys and values held too), so the log a restart reads back
    /// stays bounded.
    pub snapshot_bytes: u64,
    /// Bytes of change events kept for watches (besides the event count).
    pub watch_history_bytes: u64,
    /// The largest request (one store command, encoded) a member takes.
    pub max_request_bytes: u64,
    /// The largest value one put may carry.
    pub max_value_bytes: u64,
    /// The most compares and operations one transaction may hold.
    pub max_txn_ops: u64,
    /// The shortest lease TTL a member grants, in milliseconds.
    pub min_lease_ttl_ms: u64,
    /// The longest lease TTL a member grants, in milliseconds.
    pub max_lease_ttl_ms: u64,
    /// The most leases the store may hold.
    pub max_leases: u64,
    /// Bytes of keys and values past which the store refuses new writes
    /// (the no-space alarm) until space is freed.
    pub quota_bytes: u64,
    /// This machine's metadata, matched by `MachineMetadata=` in unit files.
    pub metadata: BTreeMap<String, String>,
    /// Log filter, in `RUST_LOG` syntax (`info`, `flotilla=debug,warn`).
    pub log: String,
    /// Client addresses of the Raft members, `host:port,...`. When set, this
    /// host runs only the agent (no Raft seat) and reaches the store there.
    pub endpoints: String,
    /// Run the agent (units on this host's systemd). Off for a store-only member.
    pub agent: bool,
    /// Presence lease TTL in seconds: a host silent this long is dead to the
    /// cluster, and its units run elsewhere about this long after it dies
    /// (see the README on how low it can safely go).
    pub ttl_secs: u64,
    /// The address to publish for this machine; detected when empty.
    pub public_ip: String,
    /// Where the agent writes unit files (a tmpfs, so a reboot starts clean).
    pub units_dir: PathBuf,
    /// On SIGTERM, stop and unload this host's units and leave the cluster
    /// (default: keep them running, as a restart should).
    pub leave_on_stop: bool,
    /// The HTTP API's unix socket (fleet's `/fleet/v1`). It is made mode 0600,
    /// so only root may use it and it needs no token; empty disables it.
    pub api_socket: PathBuf,
    /// The HTTP API's TCP address (`host:port`); empty (the default)
    /// disables it. It needs `api_token` or TLS (`tls_*`), loopback
    /// included: any local user reaches a loopback port, and root has the
    /// unix socket. With TLS it speaks HTTPS only with this host's
    /// certificate, and callers present a certificate of the cluster or the
    /// token (an agent's certificate may only read). With TLS and a
    /// non-loopback address, the host publishes it with its presence, so
    /// other daemons can ask it for the status and journal of its units.
    pub api_listen: String,
    /// A bearer token every TCP request to the API must carry
    /// (`Authorization: Bearer TOKEN`) unless it comes with a client
    /// certificate of the cluster (TLS); empty means none. The unix socket
    /// never asks for it. `--check-config` shows it redacted.
    #[serde(serialize_with = "redacted")]
    pub api_token: String,
    /// How long an API client may take to send a request's headers (a
    /// duration, `10s`): a connection that sends nothing is closed then, so
    /// idle and slow clients cannot hold connections for ever.
    pub api_header_timeout: String,
    /// The largest request body the API accepts, in bytes (413 beyond).
    pub api_max_body_bytes: u64,
    /// Connections each API listener serves at once; one more is answered
    /// 503 and closed, so a flood cannot take all the process's descriptors.
    pub api_max_connections: u64,
    /// The longest pause, in milliseconds, after the API fails to accept a
    /// connection (out of descriptors): it retries after 10 ms, doubling up
    /// to this, instead of spinning.
    pub api_accept_backoff_ms: u64,
    /// What this host does when it needs a reboot (`/run/reboot-required`
    /// exists or `flotilla lock need-reboot` asked): `lock` takes a slot of
    /// its group's reboot lock, drains, reboots and releases the slot once
    /// healthy again; `reboot` does the same without the lock; `off` does nothing.
    pub reboot_strategy: String,
    /// The reboot lock group this host takes turns in; empty: the default group.
    pub reboot_group: String,
    /// When reboots may start: `"Thu 04:00"` (weekly) or `"04:00"` (daily),
    /// UTC unless an offset follows (`"Thu 04:00 +02:00"`); empty: any time.
    pub reboot_window_start: String,
    /// How long a reboot window stays open, e.g. `1h` or `30m`.
    pub reboot_window_length: String,
    /// How long the drain before a reboot may take to move this host's units
    /// elsewhere; then the reboot is postponed (unless `need-reboot --force`).
    pub drain_timeout: String,
    /// The longest a reboot may take, from going down until healthy again; a
    /// coordinator still up this long after asking for a reboot asks again.
    pub reboot_timeout: String,
    /// Release the reboot lock of a holder whose machine has been absent
    /// this long (`0`: never, as locksmith). Must not be shorter than
    /// `reboot_timeout`, or a slow reboot would free the lock while down.
    pub stale_after: String,
    /// The cluster CA certificate (`flotilla tls init`). With `tls_cert` and
    /// `tls_key` it turns on mutual TLS on the store's peer and client ports
    /// and for this host's own store clients; all three empty: TLS off, and
    /// the store's listeners bind to loopback only.
    pub tls_ca: PathBuf,
    /// This host's certificate (`flotilla tls issue`): a member's names it,
    /// an agent-only host's names its machine id.
    pub tls_cert: PathBuf,
    /// The key of `tls_cert`.
    pub tls_key: PathBuf,
    /// Connections each store listener (peer, client) serves at once; more
    /// are closed as they arrive.
    pub max_connections: u64,
    /// The largest frame (request, Raft message) a store listener reads.
    pub max_frame_bytes: u64,
    /// How long one frame may take to arrive once it started, in ms.
    pub frame_read_timeout_ms: u64,
    /// How long a TLS handshake on a store listener may take, in ms.
    pub tls_handshake_timeout_ms: u64,
    /// The file holding the id of the current boot, which tells the reboot
    /// coordinator that a reboot really happened.
    pub boot_id_file: PathBuf,
}

/// What `--check-config` shows instead of a set secret.
const REDACTED: &str = "(set, not shown)";

/// Serialises a secret as [`REDACTED`] unless it is empty, so printing the
/// effective settings never leaks it (the empty default still gives the key
/// its type for environment overrides).
fn redacted<S: serde::Serializer>(secret: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(if secret.is_empty() { "" } else { REDACTED })
}

impl Config {
    /// The `endpoints` setting as a list (empty: this host is a Raft member).
    pub fn endpoint_list(&self) -> Vec<String> {
        self.endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The reboot coordinator's settings, typed; `Err((key, message))` names
    /// the first key whose value is unusable.
    pub fn reboot_settings(&self) -> Result<RebootSettings, (&'static str, String)> {
        use crate::duration::{parse_duration, show_duration};
        use crate::lock::step::Strategy;
        use crate::lock::window::Window;
        let strategy = match self.reboot_strategy.as_str() {
            "lock" => Strategy::Lock,
            "reboot" => Strategy::Reboot,
            "off" => Strategy::Off,
            other => {
                return Err((
                    "reboot_strategy",
                    format!("{other:?} must be lock, reboot or off"),
                ));
            }
        };
        let group = if self.reboot_group.is_empty() {
            crate::registry::lock::DEFAULT_GROUP.to_string()
        } else if crate::registry::lock::is_group_name(&self.reboot_group) {
            self.reboot_group.clone()
        } else {
            return Err((
                "reboot_group",
                format!(
                    "{:?} is not a group name: use 1-63 letters, digits, '-', '_' or '.'",
                    self.reboot_group
                ),
            ));
        };
        let duration = |key: &'static str, text: &str| parse_duration(text).map_err(|m| (key, m));
        let length = duration("reboot_window_length", &self.reboot_window_length)?;
        let window = if self.reboot_window_start.is_empty() {
            None
        } else {
            Some(
                Window::parse(&self.reboot_window_start, length)
                    .map_err(|m| ("reboot_window_start", m))?,
            )
        };
        let drain_timeout = duration("drain_timeout", &self.drain_timeout)?;
        let reboot_timeout = duration("reboot_timeout", &self.reboot_timeout)?;
        let stale_after = duration("stale_after", &self.stale_after)?;
        if drain_timeout.is_zero() {
            return Err((
                "drain_timeout",
                "must be longer than 0s, e.g. 10m".to_string(),
            ));
        }
        if reboot_timeout < std::time::Duration::from_secs(10) {
            return Err((
                "reboot_timeout",
                "must be at least 10s: a reboot takes longer than that".to_string(),
            ));
        }
        if !stale_after.is_zero() && stale_after < reboot_timeout {
            return Err((
                "stale_after",
                format!(
                    "{} is shorter than reboot_timeout ({}): a slow reboot would free the \
                     lock while its host is down; set stale_after to at least {} (or 0 to never \
                     free a stale holder)",
                    show_duration(stale_after),
                    show_duration(reboot_timeout),
                    show_duration(reboot_timeout)
                ),
            ));
        }
        Ok(RebootSettings {
            strategy,
            group,
            window,
            drain_timeout,
            reboot_timeout,
            stale_after: (!stale_after.is_zero()).then_some(stale_after),
            boot_id_file: self.boot_id_file.clone(),
        })
    }
}

impl Config {
    /// The API listeners' limits, typed; `Err((key, message))` names the
    /// first key whose value is unusable.
    pub fn api_limits(&self) -> Result<ApiLimits, (&'static str, String)> {
        let header_timeout = crate::duration::parse_duration(&self.api_header_timeout)
            .map_err(|m| ("api_header_timeout", m))?;
        if !(1..=3600).contains(&header_timeout.as_secs()) {
            return Err((
                "api_header_timeout",
                "must be between 1s and 1h, e.g. 10s".to_string(),
            ));
        }
        let min_body = MIN_BODY_BYTES as u64;
        if !(min_body..=64 << 20).contains(&self.api_max_body_bytes) {
            return Err((
                "api_max_body_bytes",
                format!(
                    "{} must be between {min_body} (a largest unit file, JSON-quoted) and \
                     67108864",
                    self.api_max_body_bytes
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.api_max_connections) {
            return Err((
                "api_max_connections",
                format!("{} must be between 1 and 1000000", self.api_max_connections),
            ));
        }
        if !(10..=60_000).contains(&self.api_accept_backoff_ms) {
            return Err((
                "api_accept_backoff_ms",
                format!(
                    "{} must be between 10 and 60000",
                    self.api_accept_backoff_ms
                ),
            ));
        }
        Ok(ApiLimits {
            header_timeout,
            max_body_bytes: self.api_max_body_bytes as usize,
            max_connections: self.api_max_connections as usize,
            accept_backoff: std::time::Duration::from_millis(self.api_accept_backoff_ms),
        })
    }
}

/// The smallest `api_max_body_bytes` allowed: a unit is at most
/// [`crate::units::MAX_UNIT_BYTES`], and JSON quoting may grow it, not fourfold.
const MIN_BODY_BYTES: usize = 4 * crate::units::MAX_UNIT_BYTES;

/// How much one listener of the API lets its clients take; from the
/// `api_*` settings ([`Config::api_limits`]). The API shows the loaded
/// configuration, so it sits above this module and takes its settings type
/// from here ([`crate::api::serve::serve`] enforces them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiLimits {
    /// How long a connection may take to send a request's headers, the first
    /// and each later one on a kept-alive connection; then it is closed.
    pub header_timeout: std::time::Duration,
    /// The largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Connections one listener serves at once; one more is answered 503
    /// and closed at once.
    pub max_connections: usize,
    /// The longest pause after a failed `accept` (no descriptors left): the
    /// loop waits 10 ms, doubling up to this, instead of spinning, and logs
    /// it at most once a minute.
    pub accept_backoff: std::time::Duration,
}

impl Default for ApiLimits {
    fn default() -> ApiLimits {
        ApiLimits {
            header_timeout: std::time::Duration::from_secs(10),
            max_body_bytes: 1024 * 1024,
            max_connections: 512,
            accept_backoff: std::time::Duration::from_secs(1),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: default_name(),
            data_dir: PathBuf::from("/var/lib/flotilla"),
            client_listen: "127.0.0.1:4001".to_string(),
            peer_listen: "127.0.0.1:4002".to_string(),
            initial_cluster: String::new(),
            initial_cluster_state: "new".to_string(),
            election_timeout_ms: 1000,
            snapshot_entries: 100_000,
            log_memory_entries: crate::consensus::storage::DEFAULT_LOG_MEMORY_ENTRIES,
            snapshot_bytes: 64 * 1024 * 1024,
            watch_history_bytes: 64 * 1024 * 1024,
            max_request_bytes: 1536 * 1024,
            max_value_bytes: 1024 * 1024,
            max_txn_ops: 16_384,
            min_lease_ttl_ms: 1000,
            max_lease_ttl_ms: 86_400_000,
            max_leases: 10_000,
            quota_bytes: 2 * 1024 * 1024 * 1024,
            metadata: BTreeMap::new(),
            log: "info".to_string(),
            endpoints: String::new(),
            agent: true,
            ttl_secs: 10,
            public_ip: String::new(),
            units_dir: PathBuf::from("/run/flotilla/units"),
            leave_on_stop: false,
            api_socket: PathBuf::from("/run/flotilla/api.sock"),
            api_listen: String::new(),
            api_token: String::new(),
            api_header_timeout: "10s".to_string(),
            api_max_body_bytes: 1024 * 1024,
            api_max_connections: 512,
            api_accept_backoff_ms: 1000,
            reboot_strategy: "lock".to_string(),
            reboot_group: String::new(),
            reboot_window_start: String::new(),
            reboot_window_length: "1h".to_string(),
            drain_timeout: "10m".to_string(),
            reboot_timeout: "10m".to_string(),
            stale_after: "0".to_string(),
            boot_id_file: PathBuf::from("/proc/sys/kernel/random/boot_id"),
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            max_connections: 32_768,
            max_frame_bytes: 64 * 1024 * 1024,
            frame_read_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 5_000,
        }
    }
}

/// The host name, or `default` when it cannot be read or is not a valid member name.
fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| check_name(name).is_ok())
        .unwrap_or_else(|| "default".to_string())
}

/// One founding member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's name (`--name` on that host).
    pub name: String,
    /// Its peer address, `host:port`.
    pub peer_addr: String,
}

/// Where a setting's value came from, so an error can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Nobody set it.
    Default,
    /// The TOML file, at this line.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key.
        line: usize,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the built-in default"),
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("{}:{line}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong (for an unknown key: the key and the keys that exist).
        message: String,
    },
    /// An override (environment variable or flag) has a value of the wrong type.
    #[error("{origin}: {message}")]
    Override {
        /// The variable or flag.
        origin: Origin,
        /// What is wrong.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid {key} (from {origin}): {message}")]
    Invalid {
        /// The configuration key.
        key: &'static str,
        /// Where its value came from.
        origin: Origin,
        /// What is wrong and what to write instead.
        message: String,
    },
}

/// A loaded, validated configuration and where each key's value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The settings.
    pub config: Config,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    /// The origin of every key that was not left at its default.
    pub origins: BTreeMap<String, Origin>,
    /// Things worth telling the operator that did not stop the load.
    pub warnings: Vec<String>,
}

impl Loaded {
    /// Where `key`'s value came from.
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    /// The founding members, from `initial_cluster` or this host alone.
    pub fn members(&self) -> Vec<Member> {
        parse_members(&self.config.initial_cluster).unwrap_or_else(|_| {
            vec![Member {
                name: self.config.name.clone(),
                peer_addr: self.config.peer_listen.clone(),
            }]
        })
    }
}

/// Which file to read.
#[derive(Debug, Clone)]
pub enum Source {
    /// `/etc/flotilla/flotilla.toml` if it exists.
    DefaultPath,
    /// This file, which must exist.
    Explicit(PathBuf),
}

/// Loads the configuration from all layers and validates it.
///
/// `env` is the process environment (passed in so tests need not mutate it);
/// `flags` are the overrides from the command line as `(key, flag, value)`.
pub fn load(
    source: &Source,
    env: &[(String, String)],
    flags: &[(&'static str, &'static str, toml::Value)],
) -> Result<Loaded, Error> {
    let mut warnings = Vec::new();
    let mut origins = BTreeMap::new();
    let mut table = toml::Table::new();

    let file = match source {
        Source::DefaultPath if !Path::new(DEFAULT_PATH).exists() => None,
        Source::DefaultPath => Some(PathBuf::from(DEFAULT_PATH)),
        Source::Explicit(path) => Some(path.clone()),
    };
    if let Some(path) = &file {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let (file_table, lines) = parse_file(path, &text)?;
        for (key, value) in file_table {
            let line = lines.get(&key).copied().unwrap_or(1);
            origins.insert(
                key.clone(),
                Origin::File {
                    path: path.clone(),
                    line,
                },
            );
            table.insert(key, value);
        }
    }

    let defaults = toml::Table::try_from(Config::default()).expect("the default config serialises");
    for (var, raw) in env {
        let Some(suffix) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if ENV_NOT_KEYS.contains(&var.as_str()) {
            continue;
        }
        let key = suffix.to_ascii_lowercase();
        let Some(default) = defaults.get(&key) else {
            warnings.push(format!(
                "environment variable {var} is not a configuration key and is ignored (keys: {})",
                key_list(&defaults)
            ));
            continue;
        };
        let origin = Origin::Env(var.clone());
        let value = env_value(default, raw).map_err(|message| Error::Override {
            origin: origin.clone(),
            message,
        })?;
        check_override(&key, &value, &origin)?;
        table.insert(key.clone(), value);
        origins.insert(key, origin);
    }

    for (key, flag, value) in flags {
        let origin = Origin::Flag((*flag).to_string());
        check_override(key, value, &origin)?;
        table.insert((*key).to_string(), value.clone());
        origins.insert((*key).to_string(), origin);
    }

    let config: Config = toml::Value::Table(table)
        .try_into()
        .expect("every layer was checked against Config on its own");
    let loaded = Loaded {
        config,
        file,
        origins,
        warnings,
    };
    validate(&loaded)?;
    Ok(loaded)
}

/// Parses the file, checking it against [`Config`], and returns its keys with their lines.
fn parse_file(path: &Path, text: &str) -> Result<(toml::Table, BTreeMap<String, usize>), Error> {
    let file_error = |err: toml::de::Error| Error::File {
        path: path.to_path_buf(),
        line: err.span().map_or(1, |span| line_of(text, span.start)),
        message: err.message().trim().to_string(),
    };
    toml::from_str::<Config>(text).map_err(file_error)?;
    let spanned: BTreeMap<toml::Spanned<String>, toml::Value> =
        toml::from_str(text).map_err(file_error)?;
    let mut table = toml::Table::new();
    let mut lines = BTreeMap::new();
    for (key, value) in spanned {
        lines.insert(key.get_ref().clone(), line_of(text, key.span().start));
        table.insert(key.into_inner(), value);
    }
    Ok((table, lines))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn key_list(defaults: &toml::Table) -> String {
    defaults
        .keys()
        .map(|k| format!("{ENV_PREFIX}{}", k.to_ascii_uppercase()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads an environment value with the type the key has by default.
///
/// Strings are taken as they are; a table accepts `k=v,k2=v2` or an inline
/// TOML table; anything else is parsed as a TOML value (`10`, `true`, `[1, 2]`).
fn env_value(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    match default {
        toml::Value::String(_) => Ok(toml::Value::String(raw.to_string())),
        toml::Value::Table(_) if !raw.trim_start().starts_with('{') => {
            let mut table = toml::Table::new();
            for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    format!("expected key=value pairs separated by ',', got {pair:?}")
                })?;
                table.insert(
                    k.trim().to_string(),
                    toml::Value::String(v.trim().to_string()),
                );
            }
            Ok(toml::Value::Table(table))
        }
        _ => toml::from_str::<toml::Table>(&format!("value = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("value"))
            .ok_or_else(|| format!("{raw:?} is not a valid value")),
    }
}

/// Checks that one override has the right type, so the error names its origin.
fn check_override(key: &str, value: &toml::Value, origin: &Origin) -> Result<(), Error> {
    let mut single = toml::Table::new();
    single.insert(key.to_string(), value.clone());
    toml::Value::Table(single)
        .try_into::<Config>()
        .map(|_| ())
        .map_err(|err| Error::Override {
            origin: origin.clone(),
            message: err.message().trim().to_string(),
        })
}

/// Checks the store's limits: each within a range a member can work with.
fn check_store_limits(config: &Config) -> Result<(), (&'static str, String)> {
    const MIB: u64 = 1024 * 1024;
    let ranges: [(&'static str, u64, u64, u64); 9] = [
        ("snapshot_bytes", config.snapshot_bytes, MIB, u64::MAX),
        (
            "watch_history_bytes",
            config.watch_history_bytes,
            MIB,
            u64::MAX,
        ),
        (
            "max_request_bytes",
            config.max_request_bytes,
            64 * 1024,
            32 * MIB,
        ),
        ("max_value_bytes", config.max_value_bytes, 1024, 32 * MIB),
        ("max_txn_ops", config.max_txn_ops, 4096, 100_000),
        ("min_lease_ttl_ms", config.min_lease_ttl_ms, 1, u64::MAX),
        ("max_lease_ttl_ms", config.max_lease_ttl_ms, 1000, u64::MAX),
        ("max_leases", config.max_leases, 1, u64::MAX),
        ("quota_bytes", config.quota_bytes, MIB, u64::MAX),
    ];
    for (key, value, low, high) in ranges {
        if !(low..=high).contains(&value) {
            return Err((key, format!("{value} must be between {low} and {high}")));
        }
    }
    if config.max_value_bytes > config.max_request_bytes {
        return Err((
            "max_value_bytes",
            format!(
                "{} exceeds max_request_bytes ({}): no request could carry such a value",
                config.max_value_bytes, config.max_request_bytes
            ),
        ));
    }
    let ttl_ms = config.ttl_secs.saturating_mul(1000);
    if !(config.min_lease_ttl_ms..=config.max_lease_ttl_ms).contains(&ttl_ms) {
        return Err((
            "min_lease_ttl_ms",
            format!(
                "the presence lease (ttl_secs = {}) must be within min_lease_ttl_ms..=max_lease_ttl_ms ({}..={})",
                config.ttl_secs, config.min_lease_ttl_ms, config.max_lease_ttl_ms
            ),
        ));
    }
    Ok(())
}

impl Config {
    /// The store's request limits and quota, as this member enforces them.
    pub fn store_limits(&self) -> crate::consensus::limits::Limits {
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        crate::consensus::limits::Limits {
            request_bytes: size(self.max_request_bytes),
            value_bytes: size(self.max_value_bytes),
            txn_ops: size(self.max_txn_ops),
            min_lease_ttl_ms: self.min_lease_ttl_ms,
            max_lease_ttl_ms: self.max_lease_ttl_ms,
            leases: size(self.max_leases),
            quota_bytes: self.quota_bytes,
        }
    }
}

/// Checks the values that parse but could still be wrong.
fn validate(loaded: &Loaded) -> Result<(), Error> {
    let config = &loaded.config;
    let invalid = |key: &'static str, message: String| Error::Invalid {
        key,
        origin: loaded.origin(key),
        message,
    };
    check_name(&config.name).map_err(|m| invalid("name", m))?;
    if config.data_dir.as_os_str().is_empty() {
        return Err(invalid(
            "data_dir",
            "the data directory is empty".to_string(),
        ));
    }
    check_address(&config.client_listen).map_err(|m| invalid("client_listen", m))?;
    check_address(&config.peer_listen).map_err(|m| invalid("peer_listen", m))?;
    if !config.initial_cluster.is_empty() {
        let members =
            parse_members(&config.initial_cluster).map_err(|m| invalid("initial_cluster", m))?;
        if !members.iter().any(|m| m.name == config.name) {
            return Err(invalid(
                "initial_cluster",
                format!(
                    "this member's name {:?} is not in it; add {}={} or set name to one of its members",
                    config.name, config.name, config.peer_listen
                ),
            ));
        }
    }
    if !matches!(config.initial_cluster_state.as_str(), "new" | "existing") {
        return Err(invalid(
            "initial_cluster_state",
            format!("{:?} must be new or existing", config.initial_cluster_state),
        ));
    }
    if config.initial_cluster_state == "existing" && config.initial_cluster.is_empty() {
        return Err(invalid(
            "initial_cluster",
            "joining an existing cluster needs initial_cluster to list its members' peer \
             addresses (and this one's)"
                .to_string(),
        ));
    }
    if !(50..=60_000).contains(&config.election_timeout_ms) {
        return Err(invalid(
            "election_timeout_ms",
            format!(
                "{} must be between 50 and 60000",
                config.election_timeout_ms
            ),
        ));
    }
    if config.snapshot_entries < 10 {
        return Err(invalid(
            "snapshot_entries",
            format!("{} is too small; use at least 10", config.snapshot_entries),
        ));
    }
    if config.log_memory_entries < 1 {
        return Err(invalid(
            "log_memory_entries",
            "0 is too small; use at least 1".to_string(),
        ));
    }
    check_store_limits(config).map_err(|(key, m)| invalid(key, m))?;
    for (key, value) in &config.metadata {
        if !crate::units::fleet::is_metadata_key(key) {
            return Err(invalid(
                "metadata",
                format!("key {key:?} must use only letters, digits, '-', '_' and '.'"),
            ));
        }
        if value.is_empty() || value.contains('=') || value.chars().any(char::is_control) {
            return Err(invalid(
                "metadata",
                format!(
                    "value {value:?} of {key} must be non-empty, without '=' or control characters"
                ),
            ));
        }
    }
    for endpoint in config.endpoint_list() {
        check_address(&endpoint).map_err(|m| invalid("endpoints", m))?;
    }
    if !(1..=3600).contains(&config.ttl_secs) {
        return Err(invalid(
            "ttl_secs",
            format!("{} must be between 1 and 3600", config.ttl_secs),
        ));
    }
    if !config.public_ip.is_empty() && config.public_ip.parse::<std::net::IpAddr>().is_err() {
        return Err(invalid(
            "public_ip",
            format!("{:?} is not an IP address", config.public_ip),
        ));
    }
    if !config.units_dir.is_absolute() {
        return Err(invalid(
            "units_dir",
            format!("{} must be an absolute path", config.units_dir.display()),
        ));
    }
    if !config.api_socket.as_os_str().is_empty() && !config.api_socket.is_absolute() {
        return Err(invalid(
            "api_socket",
            format!(
                "{} must be an absolute path (or empty to disable the socket)",
                config.api_socket.display()
            ),
        ));
    }
    if !config.api_token.is_empty() {
        check_token(&config.api_token).map_err(|m| invalid("api_token", m))?;
    }
    if !config.api_listen.is_empty() {
        check_address(&config.api_listen).map_err(|m| invalid("api_listen", m))?;
        if config.api_token.is_empty() && !config.tls_enabled() {
            return Err(invalid(
                "api_listen",
                format!(
                    "serving the API on {:?} needs a token or TLS, loopback included (any \
                     local user reaches it): set api_token (e.g. to the output of `openssl \
                     rand -hex 32`), or tls_ca, tls_cert and tls_key (callers then present \
                     a certificate of the cluster), or api_listen to \"\" and use the unix \
                     socket",
                    config.api_listen
                ),
            ));
        }
    }
    config
        .api_limits()
        .map_err(|(key, message)| invalid(key, message))?;
    config
        .reboot_settings()
        .map_err(|(key, message)| invalid(key, message))?;
    if !config.boot_id_file.is_absolute() {
        return Err(invalid(
            "boot_id_file",
            format!("{} must be an absolute path", config.boot_id_file.display()),
        ));
    }
    validate_store_security(config).map_err(|(key, message)| invalid(key, message))?;
    tracing_subscriber::EnvFilter::try_new(&config.log).map_err(|e| {
        invalid(
            "log",
            format!("{e}; write e.g. info or flotilla=debug,warn"),
        )
    })?;
    Ok(())
}

/// Checks the TLS files (all three or none) and the listener limits.
fn validate_store_security(config: &Config) -> Result<(), (&'static str, String)> {
    let files = [
        ("tls_ca", &config.tls_ca),
        ("tls_cert", &config.tls_cert),
        ("tls_key", &config.tls_key),
    ];
    let set = files
        .iter()
        .filter(|(_, p)| !p.as_os_str().is_empty())
        .count();
    if set != 0 && set != files.len() {
        let (key, _) = files
            .iter()
            .find(|(_, p)| p.as_os_str().is_empty())
            .expect("one is empty");
        return Err((
            key,
            "TLS needs all of tls_ca, tls_cert and tls_key (make them with `flotilla tls init` \
             and `flotilla tls issue`), or none"
                .to_string(),
        ));
    }
    for (key, path) in files {
        if !path.as_os_str().is_empty() && !path.is_absolute() {
            return Err((key, format!("{} must be an absolute path", path.display())));
        }
    }
    let ranges: [(&'static str, u64, u64, u64); 4] = [
        ("max_connections", config.max_connections, 1, 1_000_000),
        (
            "max_frame_bytes",
            config.max_frame_bytes,
            64 * 1024,
            crate::consensus::codec::MAX_FRAME as u64,
        ),
        (
            "frame_read_timeout_ms",
            config.frame_read_timeout_ms,
            100,
            3_600_000,
        ),
        (
            "tls_handshake_timeout_ms",
            config.tls_handshake_timeout_ms,
            100,
            600_000,
        ),
    ];
    for (key, value, low, high) in ranges {
        if !(low..=high).contains(&value) {
            return Err((key, format!("{value} must be between {low} and {high}")));
        }
    }
    // A log entry travels to the other members in one peer frame, whatever
    // its size: one the frame limit refuses would stall replication to them.
    let entry_room = config.max_request_bytes.saturating_add(64 * 1024);
    if config.max_frame_bytes < entry_room {
        return Err((
            "max_frame_bytes",
            format!(
                "{} is below max_request_bytes ({}) + 64 KiB: the largest request's log entry \
                 could not reach the other members; raise max_frame_bytes to at least {entry_room}",
                config.max_frame_bytes, config.max_request_bytes
            ),
        ));
    }
    Ok(())
}

impl Config {
    /// Whether mutual TLS is configured (see `tls_ca`).
    pub fn tls_enabled(&self) -> bool {
        !self.tls_ca.as_os_str().is_empty()
    }

    /// The store listeners' limits.
    pub fn listener_limits(&self) -> crate::consensus::listener::ListenerLimits {
        use std::time::Duration;
        crate::consensus::listener::ListenerLimits {
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            handshake_timeout: Duration::from_millis(self.tls_handshake_timeout_ms),
            frame: crate::consensus::codec::FrameLimits {
                max_bytes: usize::try_from(self.max_frame_bytes).unwrap_or(usize::MAX),
                deadline: Duration::from_millis(self.frame_read_timeout_ms),
            },
        }
    }
}

/// Whether `host:port` (already checked) only listens on this machine.
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The shortest API token accepted: guessing one must be hopeless.
const MIN_TOKEN_LEN: usize = 16;

/// A token travels in an HTTP header: visible ASCII only, and long enough.
fn check_token(token: &str) -> Result<(), String> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token may only use visible ASCII characters (no spaces)".to_string());
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token has {} characters; use at least {MIN_TOKEN_LEN} \
             (e.g. the output of `openssl rand -hex 32`)",
            token.len()
        ));
    }
    Ok(())
}

/// Parses `name=host:port,name=host:port` (`initial_cluster`; also
/// `flotilla snapshot restore --initial-cluster`).
pub fn parse_members(spec: &str) -> Result<Vec<Member>, String> {
    let mut members: Vec<Member> = Vec::new();
    for entry in spec.split(',').map(str::trim) {
        let (name, addr) = entry
            .split_once('=')
            .ok_or_else(|| format!("entry {entry:?} is not name=host:port"))?;
        check_name(name)?;
        check_address(addr)?;
        if members.iter().any(|m| m.name == name) {
            return Err(format!("member {name:?} appears twice"));
        }
        members.push(Member {
            name: name.to_string(),
            peer_addr: addr.to_string(),
        });
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn explicit(f: &tempfile::NamedTempFile) -> Source {
        Source::Explicit(f.path().to_path_buf())
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_no_file() {
        let missing = Source::Explicit(PathBuf::from("/nonexistent/flotilla.toml"));
        assert!(matches!(load(&missing, &[], &[]), Err(Error::Read { .. })));
        let f = file("");
        let loaded = load(&explicit(&f), &[], &[]).unwrap();
        let expected = Config::default();
        assert_eq!(loaded.config, expected);
        assert_eq!(loaded.members().len(), 1);
        assert_eq!(loaded.members()[0].peer_addr, "127.0.0.1:4002");
    }

    #[test]
    fn file_then_env_then_flags() {
        let f = file(
            "name = \"n1\"\ndata_dir = \"/from/file\"\nlog = \"debug\"\n[metadata]\nregion = \"eu\"\n",
        );
        let vars = env(&[
            ("FLOTILLA_DATA_DIR", "/from/env"),
            ("FLOTILLA_LOG", "warn"),
            ("FLOTILLA_METADATA", "region=us,disk=ssd"),
            ("PATH", "/bin"),
        ]);
        let flags = [("log", "--log", toml::Value::String("error".into()))];
        let loaded = load(&explicit(&f), &vars, &flags).unwrap();
        assert_eq!(loaded.config.name, "n1");
        assert_eq!(loaded.config.data_dir, PathBuf::from("/from/env"));
        assert_eq!(loaded.config.log, "error");
        assert_eq!(loaded.config.metadata["region"], "us");
        assert_eq!(loaded.config.metadata["disk"], "ssd");
        assert_eq!(
            loaded.origin("name"),
            Origin::File {
                path: f.path().to_path_buf(),
                line: 1
            }
        );
        assert_eq!(
            loaded.origin("data_dir"),
            Origin::Env("FLOTILLA_DATA_DIR".into())
        );
        assert_eq!(loaded.origin("log"), Origin::Flag("--log".into()));
        assert_eq!(loaded.origin("peer_listen"), Origin::Default);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let f = file("name = \"n1\"\n\ndata_dri = \"/x\"\n");
        let err = load(&explicit(&f), &[], &[]).unwrap_err();
        let shown = err.to_string();
        assert!(matches!(err, Error::File { line: 3, .. }), "{shown}");
        assert!(shown.contains("data_dri"), "{shown}");
        assert!(
            shown.contains(&format!("{}:3", f.path().display())),
            "{shown}"
        );
    }

    #[test]
    fn wrong_types_and_syntax_errors_have_lines() {
        let f = file("name = \"n1\"\nlog = 3\n");
        assert!(matches!(
            load(&explicit(&f), &[], &[]),
            Err(Error::File { line: 2, .. })
        ));
        let f = file("name = \n");
        assert!(matches!(
            load(&explicit(&f), &[], &[]),
            Err(Error::File { line: 1, .. })
        ));
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let f = file("");
        let err = load(
            &explicit(&f),
            &env(&[("FLOTILLA_METADATA", "novalue")]),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("FLOTILLA_METADATA"), "{err}");
        let loaded = load(&explicit(&f), &env(&[("FLOTILLA_NOPE", "1")]), &[]).unwrap();
        assert!(loaded.warnings[0].contains("FLOTILLA_NOPE"));
        // The CLI's own variables are not config keys and are not warned about.
        let loaded = load(&explicit(&f), &env(&[("FLOTILLA_ENDPOINT", "x")]), &[]).unwrap();
        assert!(loaded.warnings.is_empty());
    }

    #[test]
    fn reboot_keys_are_typed_and_checked_together() {
        let f = file(
            "name = \"n1\"\nreboot_window_start = \"Thu 04:00\"\nreboot_window_length = \"90m\"\n\
             stale_after = \"30m\"\nreboot_timeout = \"15m\"\nreboot_group = \"db\"\n",
        );
        let loaded = load(&explicit(&f), &[], &[]).unwrap();
        let settings = loaded.config.reboot_settings().unwrap();
        assert_eq!(settings.strategy, crate::lock::step::Strategy::Lock);
        assert_eq!(settings.group, "db");
        assert_eq!(
            settings.window.unwrap().to_string(),
            "Thu 04:00 UTC for 1h30m"
        );
        assert_eq!(
            settings.stale_after,
            Some(std::time::Duration::from_secs(1800))
        );
        let defaults = Config::default().reboot_settings().unwrap();
        assert_eq!(defaults.group, "default");
        assert_eq!(defaults.stale_after, None, "off by default, as locksmith");
        assert_eq!(defaults.window, None);

        let flag = |key: &'static str, value: &str| (key, "--flag", toml::Value::from(value));
        for (key, value, says) in [
            ("reboot_strategy", "sometimes", "lock, reboot or off"),
            ("reboot_group", "a/b", "group name"),
            ("reboot_window_start", "Thx 04:00", "Thu 04:00"),
            ("reboot_window_length", "forever", "duration"),
            ("drain_timeout", "0", "longer than 0s"),
            ("reboot_timeout", "5s", "at least 10s"),
            ("stale_after", "5m", "shorter than reboot_timeout"),
            ("boot_id_file", "relative", "absolute"),
        ] {
            let err = load(
                &explicit(&file("name = \"n1\"\n")),
                &[],
                &[flag(key, value)],
            )
            .unwrap_err();
            assert!(
                matches!(&err, Error::Invalid { key: k, .. } if *k == key),
                "{key}={value}: {err}"
            );
            assert!(err.to_string().contains(says), "{key}={value}: {err}");
        }
    }

    #[test]
    fn semantic_errors_name_key_and_origin() {
        let f = file("name = \"n1\"\ninitial_cluster = \"n2=127.0.0.1:1,n3=127.0.0.1:2\"\n");
        let err = load(&explicit(&f), &[], &[]).unwrap_err().to_string();
        assert!(err.contains("initial_cluster"), "{err}");
        assert!(err.contains(":2"), "{err}");

        let cases: [(&'static str, toml::Value); 6] = [
            ("name", "bad name".into()),
            ("client_listen", "nonsense".into()),
            ("peer_listen", "127.0.0.1:0".into()),
            ("initial_cluster", "n1=127.0.0.1:1,n1=127.0.0.1:2".into()),
            ("log", "[[[".into()),
            ("metadata", toml::Value::Table(toml::toml! { "a b" = "c" })),
        ];
        for (key, value) in cases {
            let flags = [(key, "--flag", value)];
            let err = load(&explicit(&file("name = \"n1\"\n")), &[], &flags).unwrap_err();
            assert!(
                matches!(&err, Error::Invalid { key: k, origin: Origin::Flag(_), .. } if *k == key),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn a_peer_frame_must_carry_the_largest_request() {
        let f = file("name = \"n1\"\n");
        let small = [("max_frame_bytes", "--flag", toml::Value::from(1024 * 1024))];
        let err = load(&explicit(&f), &[], &small).unwrap_err().to_string();
        assert!(err.contains("max_request_bytes"), "{err}");
        let fits = [
            ("max_frame_bytes", "--flag", toml::Value::from(1024 * 1024)),
            ("max_request_bytes", "--flag", toml::Value::from(512 * 1024)),
            ("max_value_bytes", "--flag", toml::Value::from(256 * 1024)),
        ];
        assert!(load(&explicit(&f), &[], &fits).is_ok());
    }

    #[test]
    fn api_keys_need_a_token_and_never_show_it() {
        let flag = |key: &'static str, value: &str| (key, "--flag", toml::Value::from(value));
        let f = file("name = \"n1\"\n");
        let defaults = load(&explicit(&f), &[], &[]).unwrap();
        assert!(defaults.config.api_listen.is_empty(), "no TCP by default");
        assert_eq!(defaults.config.api_limits(), Ok(ApiLimits::default()));
        for listen in [
            "0.0.0.0:4003",
            "127.0.0.1:4003",
            "[::1]:4003",
            "localhost:4003",
        ] {
            let open = [flag("api_listen", listen)];
            let err = load(&explicit(&f), &[], &open).unwrap_err();
            assert!(err.to_string().contains("api_token"), "{listen}: {err}");
        }
        let open = [flag("api_listen", "0.0.0.0:4003")];
        let err = load(&explicit(&f), &[], &open).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Invalid {
                    key: "api_listen",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("api_token"), "{err}");

        // With TLS, a client certificate may stand in for the token.
        let tls = env(&[
            ("FLOTILLA_TLS_CA", "/etc/flotilla/tls/ca.pem"),
            ("FLOTILLA_TLS_CERT", "/etc/flotilla/tls/n1.pem"),
            ("FLOTILLA_TLS_KEY", "/etc/flotilla/tls/n1.key"),
        ]);
        let loaded = load(&explicit(&f), &tls, &open).unwrap();
        assert!(loaded.config.api_token.is_empty() && loaded.config.tls_enabled());

        let token = "0123456789abcdef0123";
        let vars = env(&[("FLOTILLA_API_TOKEN", token)]);
        let loaded = load(&explicit(&f), &vars, &open).unwrap();
        assert_eq!(loaded.config.api_token, token);
        let shown = toml::to_string(&loaded.config).unwrap();
        assert!(!shown.contains(token), "{shown}");
        assert!(shown.contains(REDACTED), "{shown}");

        for (key, value) in [
            ("api_token", "short"),
            ("api_token", "has a space in it, long enough"),
            ("api_socket", "relative/api.sock"),
            ("api_listen", "nonsense"),
            ("api_header_timeout", "0s"),
            ("api_header_timeout", "soon"),
        ] {
            let err = load(&explicit(&f), &[], &[flag(key, value)]).unwrap_err();
            assert!(
                matches!(&err, Error::Invalid { key: k, .. } if *k == key),
                "{key}={value}: {err}"
            );
        }

        let off = [flag("api_listen", ""), flag("api_socket", "")];
        let loaded = load(&explicit(&f), &[], &off).unwrap();
        assert!(loaded.config.api_listen.is_empty());
        assert!(loaded.config.api_socket.as_os_str().is_empty());

        let number = |key: &'static str, value: i64| (key, "--flag", toml::Value::from(value));
        for (key, value) in [
            ("api_max_body_bytes", 1000),
            ("api_max_connections", 0),
            ("api_accept_backoff_ms", 0),
        ] {
            let err = load(&explicit(&f), &[], &[number(key, value)]).unwrap_err();
            assert!(
                matches!(&err, Error::Invalid { key: k, .. } if *k == key),
                "{key}={value}: {err}"
            );
        }
    }

    #[test]
    fn initial_cluster_with_this_member() {
        let f = file(
            "name = \"n2\"\ninitial_cluster = \"n1=10.0.0.1:4002, n2=host-b:4002,n3=[::1]:4002\"\n",
        );
        let loaded = load(&explicit(&f), &[], &[]).unwrap();
        let names: Vec<_> = loaded.members().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["n1", "n2", "n3"]);
    }
}
