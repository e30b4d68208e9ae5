//! The global flags made real: an API client and the ssh options, with
//! fleetctl's defaults filled in where the user gave nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use flotilla::cli::{ApiArgs, TlsArgs};
use flotilla::client::endpoint::{self, Endpoint, Memory};
use flotilla::client::ssh::SshOptions;
use flotilla::client::{ApiClient, Settings};

use super::Usage;

/// `--request-timeout`'s default, in seconds.
const REQUEST_TIMEOUT_SECS: f64 = 10.0;

/// A variable of the environment, when set and not empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A variable of the environment read as `T`, or a usage error naming it.
fn env_parsed<T: std::str::FromStr>(name: &str) -> Result<Option<T>, Usage> {
    env(name)
        .map(|raw| {
            raw.parse()
                .map_err(|_| Usage(format!("{name}={raw:?} is not a valid value")))
        })
        .transpose()
}

/// The flags with the environment filled in where no flag was given (a flag
/// always wins, before or after the verb).
pub fn resolve(args: &ApiArgs) -> Result<ApiArgs, Usage> {
    let mut args = args.clone();
    let ssh = &mut args.ssh;
    args.endpoint = args.endpoint.or_else(|| env("FLOTILLA_ENDPOINT"));
    args.api_token = args.api_token.or_else(|| env("FLOTILLA_API_TOKEN"));
    args.tunnel = args.tunnel.or_else(|| env("FLOTILLA_TUNNEL"));
    if args.request_timeout.is_none() {
        args.request_timeout = env_parsed("FLOTILLA_REQUEST_TIMEOUT")?;
    }
    ssh.ssh_username = ssh
        .ssh_username
        .take()
        .or_else(|| env("FLOTILLA_SSH_USERNAME"));
    if ssh.ssh_port.is_none() {
        ssh.ssh_port = env_parsed("FLOTILLA_SSH_PORT")?;
    }
    ssh.ssh_identity = ssh
        .ssh_identity
        .take()
        .or_else(|| env("FLOTILLA_SSH_IDENTITY").map(Into::into));
    if ssh.strict_host_key_checking.is_none() {
        ssh.strict_host_key_checking = env_parsed("FLOTILLA_STRICT_HOST_KEY_CHECKING")?;
    }
    ssh.known_hosts_file = ssh
        .known_hosts_file
        .take()
        .or_else(|| env("FLOTILLA_KNOWN_HOSTS_FILE").map(Into::into));
    args.tls = resolve_tls(&args.tls);
    Ok(args)
}

/// `--tls-ca`, `--tls-cert` and `--tls-key`, with `FLOTILLA_TLS_*` where a
/// flag was not given.
pub fn resolve_tls(tls: &TlsArgs) -> TlsArgs {
    let or_env = |given: &Option<std::path::PathBuf>, name: &str| {
        given.clone().or_else(|| env(name).map(Into::into))
    };
    TlsArgs {
        tls_ca: or_env(&tls.tls_ca, "FLOTILLA_TLS_CA"),
        tls_cert: or_env(&tls.tls_cert, "FLOTILLA_TLS_CERT"),
        tls_key: or_env(&tls.tls_key, "FLOTILLA_TLS_KEY"),
    }
}

/// The certificate and its key of (resolved) `tls`: both or neither.
fn identity(tls: &TlsArgs) -> Result<Option<(&Path, &Path)>, Usage> {
    match (&tls.tls_cert, &tls.tls_key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        _ => Err(Usage(
            "give both --tls-cert and --tls-key (or FLOTILLA_TLS_CERT and FLOTILLA_TLS_KEY), \
             or neither"
                .into(),
        )),
    }
}

/// The TLS of https endpoints, from (resolved) `tls`: the cluster CA is
/// required (a daemon's certificate is signed by nothing else), the
/// certificate optional (without it the token must do).
fn https(tls: &TlsArgs) -> Result<Arc<rustls::ClientConfig>> {
    let ca = tls.tls_ca.as_deref().ok_or_else(|| {
        Usage(
            "an https:// endpoint needs the cluster CA to check the daemon's certificate: \
             --tls-ca FILE (ca.pem of `flotilla tls init`) or FLOTILLA_TLS_CA"
                .into(),
        )
    })?;
    let config = flotilla::tls::https::api_client_config(ca, identity(tls)?).context(
        "cannot load the certificates for the https API (--tls-ca, --tls-cert, --tls-key)",
    )?;
    Ok(Arc::new(config))
}

/// The ssh options, from resolved flags (`forward_agent` from verbs with `-A`).
pub fn ssh_options(args: &ApiArgs, forward_agent: bool) -> SshOptions {
    SshOptions {
        username: args
            .ssh
            .ssh_username
            .clone()
            .unwrap_or_else(|| "core".to_string()),
        port: args.ssh.ssh_port.unwrap_or(22),
        identity: args.ssh.ssh_identity.clone(),
        strict_host_key_checking: args.ssh.strict_host_key_checking.unwrap_or(true),
        known_hosts: args.ssh.known_hosts_file.clone(),
        forward_agent,
        jump: args.tunnel.clone(),
    }
}

/// The client settings from resolved flags, checked (a bad endpoint or
/// timeout is a usage error, so is an https endpoint without --tls-ca).
pub fn settings(args: &ApiArgs) -> Result<Settings> {
    let given = args.endpoint.as_deref().unwrap_or(endpoint::DEFAULT);
    let endpoints = Endpoint::parse_list(given).map_err(|e| Usage(e.to_string()))?;
    let secs = args.request_timeout.unwrap_or(REQUEST_TIMEOUT_SECS);
    let timeout = Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| {
            Usage(format!(
                "--request-timeout {secs} must be a positive number of seconds"
            ))
        })?;
    let tls = if endpoints.iter().any(Endpoint::is_https) {
        Some(https(&args.tls)?)
    } else {
        None
    };
    Ok(Settings {
        endpoints,
        tls,
        token: args.api_token.clone(),
        timeout,
        tunnel: args
            .tunnel
            .clone()
            .map(|host| (host, ssh_options(args, false))),
        memory: Memory::in_user_cache(),
    })
}

/// The flags given before (`outer`) and after the verb, with the environment.
pub fn api_args(verb: ApiArgs, outer: &ApiArgs) -> Result<ApiArgs, Usage> {
    resolve(&verb.or(outer))
}

/// A client of the API the (resolved) flags name, opening `--tunnel` now.
pub fn client(args: &ApiArgs) -> Result<ApiClient> {
    let settings = settings(args)?;
    ApiClient::new(settings).context("cannot reach the API")
}
