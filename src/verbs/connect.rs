//! The global flags made real: an API client and the ssh options, with
//! fleetctl's defaults filled in where the user gave nothing.

use std::time::Duration;

use anyhow::{Context, Result};

use flotilla::cli::ApiArgs;
use flotilla::client::endpoint::{self, Endpoint, Memory};
use flotilla::client::ssh::SshOptions;
use flotilla::client::{ApiClient, Settings};

use super::Usage;

/// `--request-timeout`'s default, in seconds.
const REQUEST_TIMEOUT_SECS: f64 = 10.0;

/// The ssh options, from the flags (`forward_agent` from verbs that have `-A`).
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

/// The client settings, checked (a bad endpoint or timeout is a usage error).
pub fn settings(args: &ApiArgs) -> Result<Settings, Usage> {
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
    let token = args.api_token.clone().filter(|t| !t.is_empty());
    Ok(Settings {
        endpoints,
        token,
        timeout,
        tunnel: args
            .tunnel
            .clone()
            .map(|host| (host, ssh_options(args, false))),
        memory: Memory::in_user_cache(),
    })
}

/// A client of the API the flags name (opening `--tunnel` now).
pub fn client(args: &ApiArgs) -> Result<ApiClient> {
    let settings = settings(args)?;
    ApiClient::new(settings).context("cannot reach the API")
}
