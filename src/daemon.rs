//! `flotilla daemon`: wires the roles together and shuts them down in order.
//!
//! A Raft member runs the embedded store (node thread, peer and client
//! listeners) and, while it leads, the scheduler. Every host runs the agent
//! unless `agent = false`; a host with `endpoints` set runs only the agent,
//! against those members. systemd hears READY=1 once the listeners are bound
//! and the agent has started (it joins in the background: a member must not
//! wait for a quorum to report ready, or a cluster booting at once deadlocks).
//!
//! With the agent, the reboot coordinator runs too (unless
//! `reboot_strategy = "off"`), and with `stale_after` set every member frees
//! the reboot-lock slots of holders gone that long ([`crate::lock`]; an
//! agent may not release another machine's slot, so agent-only hosts leave
//! it to the members).
//!
//! Shutdown (SIGTERM/SIGINT): the agent stops first (leaving units running
//! unless `leave_on_stop`), then the Raft member.
//!
//! With `tls_ca`/`tls_cert`/`tls_key` set, the store's listeners speak mutual
//! TLS, client requests pass the registry's role policy
//! ([`crate::registry::access`]), and every store client of this process
//! (agent, scheduler, API, reboot coordinator) presents this host's
//! certificate; the API's TCP listener speaks HTTPS with it, the agent
//! publishes that listener's address with its presence, and the API asks
//! other hosts' APIs with it ([`crate::api::forward`]). Without them the
//! store's listeners bind to loopback only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use crate::agent::run::AgentConfig;
use crate::agent::{self, notify};
use crate::config::Loaded;
use crate::consensus::codec::MemberInfo;
use crate::consensus::kv::Command;
use crate::consensus::listener::Listener;
use crate::consensus::node::{Core, NodeConfig, RequestError, member_id};
use crate::consensus::runner::{self, Msg};
use crate::consensus::storage::RedbDisk;
use crate::consensus::{backup, log, server, transport};
use crate::lock::{self, coordinator::CoordinatorConfig};
use crate::registry::BodyCache;
use crate::registry::mirror::Mirror;
use crate::roles::Roles;
use crate::scheduler;
use crate::tls::{Role, Trust};

/// Reads the configuration again (for SIGHUP).
pub type Reload<'a> = &'a (dyn Fn() -> std::result::Result<Loaded, crate::config::Error> + Sync);

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP rereads the configuration
/// and applies what can change at runtime (today: `metadata` and `log`).
/// `force_new_cluster` first turns this member's store into a one-member
/// cluster ([`crate::consensus::backup::force_new_cluster`]).
pub fn run(loaded: &Loaded, reload: Reload<'_>, force_new_cluster: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Freed memory back to the kernel: see `allocator`.
    runtime.spawn(crate::allocator::give_back_freed());
    let result = runtime.block_on(serve(loaded, reload, force_new_cluster));
    // Dropping a runtime waits for its blocking tasks without end; a member
    // that failed must exit now, so systemd restarts it.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// How long an unclaimed proposal waits before the scheduler moves it,
/// beyond what the fleet's recent claims take (the scheduler's `Pace`).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

async fn serve(loaded: &Loaded, reload: Reload<'_>, force_new_cluster: bool) -> Result<()> {
    let config = &loaded.config;
    let (metadata_tx, metadata_rx) = tokio::sync::watch::channel(config.metadata.clone());
    let (stop_roles, stopped) = tokio::sync::watch::channel(false);
    let agent_only = !config.endpoint_list().is_empty();
    if agent_only && force_new_cluster {
        anyhow::bail!(
            "--force-new-cluster needs a Raft member's data dir; this host is agent-only \
             (endpoints is set)"
        );
    }
    let trust = load_trust(config)?;
    if let Some(trust) = &trust {
        crate::tls::stream::set_default_client(trust.client.clone());
    }
    let mut member = if agent_only {
        tracing::info!(
            "agent-only host: the store is at {}",
            config.endpoint_list().join(",")
        );
        None
    } else {
        Some(start_member(loaded, trust.as_ref(), force_new_cluster).await?)
    };
    let endpoints = if agent_only {
        config.endpoint_list()
    } else {
        vec![local_client_addr(&config.client_listen, trust.is_some())]
    };
    // One cache of unit bodies for every role here: a body never changes
    // under its hash, and each role still checks what it uses (the agent
    // loads only a body that hashes to its record's hash).
    let bodies = Arc::new(BodyCache::new());
    let mut roles = Roles::new();
    if config.agent {
        let agent_config = AgentConfig {
            endpoints: endpoints.clone(),
            data_dir: config.data_dir.clone(),
            units_dir: config.units_dir.clone(),
            machine_id_path: PathBuf::from("/etc/machine-id"),
            ttl: Duration::from_secs(config.ttl_secs),
            public_ip: public_ip(config, agent_only),
            metadata: config.metadata.clone(),
            leave_on_stop: config.leave_on_stop,
            metadata_updates: Some(metadata_rx),
            bodies: bodies.clone(),
            // Other daemons forward to this host's API only over HTTPS.
            api_listen: (trust.is_some() && !config.api_listen.is_empty())
                .then(|| config.api_listen.clone()),
        };
        let stopped = stopped.clone();
        roles.spawn("the agent", async move {
            agent::run::run(agent_config, stopped)
                .await
                .map_err(|e| e.to_string())
        });
    }
    let reboot = config
        .reboot_settings()
        .map_err(|(key, message)| anyhow::anyhow!("invalid {key}: {message}"))?;
    match reboot.stale_after {
        Some(after) if !agent_only => {
            let run = lock::stale::run(endpoints.clone(), after, stopped.clone());
            roles.spawn("the stale reboot-lock holder sweeper", async move {
                run.await;
                Ok(())
            });
        }
        Some(_) => tracing::info!(
            "stale_after is ignored on an agent-only host: the members free stale reboot-lock \
             holders (set it in their configuration)"
        ),
        None => {}
    }
    if config.agent && reboot.strategy != lock::step::Strategy::Off {
        let coordinator = CoordinatorConfig {
            endpoints: endpoints.clone(),
            settings: reboot,
            machine_id_path: PathBuf::from("/etc/machine-id"),
            reboot_required: PathBuf::from(lock::coordinator::REBOOT_REQUIRED),
            bodies: bodies.clone(),
        };
        let run = lock::coordinator::run(coordinator, stopped.clone());
        roles.spawn("the reboot coordinator", async move {
            run.await.map_err(|e| e.to_string())
        });
    }
    // Serves until dropped, when serve() returns.
    // The member's one decoded copy of the registry: the API reads it, the
    // scheduler follows it while this member leads.
    let mirror = Mirror::new(endpoints.clone());
    let _api = crate::api::start(
        loaded,
        &endpoints,
        bodies.clone(),
        mirror.clone(),
        trust.as_ref(),
    )
    .await
    .context("cannot start the HTTP API")?;
    if let Some((node, _)) = &member {
        let run = scheduler::run(node.clone(), endpoints, mirror, CLAIM_TIMEOUT, bodies);
        let mut stop = stopped.clone();
        roles.spawn("the scheduler", async move {
            tokio::select! {
                _ = run => {}
                _ = stop.changed() => {}
            }
            Ok(())
        });
    }
    match notify::notify("READY=1\nSTATUS=serving") {
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot tell systemd we are ready: {e}"),
    }

    let shutdown = wait_for_shutdown(|| match reload() {
        Ok(fresh) => {
            tracing::info!(
                "configuration reread; applying metadata and log (other keys need a restart)"
            );
            crate::logging::apply_config_filter(&fresh.config.log);
            metadata_tx.send_replace(fresh.config.metadata);
        }
        Err(e) => tracing::error!("configuration not reloaded: {e}"),
    });
    // Fail whole: a member whose Raft thread ended on its own (a disk error,
    // a panic), or any role that ended before it was asked to (the agent,
    // the scheduler, the reboot coordinator, the stale-holder sweeper), takes
    // the daemon down with a failure status, so systemd restarts it, rather
    // than leaving its ports bound answering errors or a host that no longer
    // runs its units.
    let member_failed = async {
        match member.as_mut() {
            Some((_, exited)) => match exited.await {
                runner::Exit::Failed(why) => why,
                runner::Exit::Stopped => "its Raft thread stopped unasked".into(),
            },
            None => std::future::pending().await,
        }
    };
    let why = tokio::select! {
        signalled = shutdown => {
            signalled?;
            None
        }
        why = member_failed => Some(why),
        why = roles.ended() => Some(why),
    };
    if let Some(why) = why {
        let _ = notify::notify("STOPPING=1");
        anyhow::bail!(
            "this daemon cannot go on: {why}; exiting so systemd restarts it \
             (if this repeats, the lines logged before this one say what failed: \
             a disk under data_dir, the cluster's reachability, /etc/machine-id)"
        );
    }
    tracing::info!("shutting down");
    let _ = notify::notify("STOPPING=1");
    let _ = stop_roles.send(true);
    roles.finish(Duration::from_secs(60)).await;
    if let Some((node, exited)) = member {
        let _ = node.send(Msg::Stop);
        if let runner::Exit::Failed(why) = exited.await {
            anyhow::bail!("the Raft member failed while stopping: {why}");
        }
    }
    Ok(())
}

/// The Raft thread's end, as a future: resolves with why it ended.
type Exited = std::pin::Pin<Box<dyn std::future::Future<Output = runner::Exit> + Send>>;

fn exited(thread: std::thread::JoinHandle<runner::Exit>) -> Exited {
    Box::pin(async move {
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| runner::Exit::Failed("the Raft thread could not be joined".into()))
    })
}

/// The address to publish: configured, else a member's specific peer address
/// (what its peers already reach it at), else detected by the agent.
fn public_ip(config: &crate::config::Config, agent_only: bool) -> Option<String> {
    if !config.public_ip.is_empty() {
        return Some(config.public_ip.clone());
    }
    if agent_only {
        return None;
    }
    let (host, _) = config.peer_listen.rsplit_once(':')?;
    let ip: std::net::IpAddr = host.trim_matches(['[', ']']).parse().ok()?;
    (!ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
}

/// The address this host's own clients reach the member at (without TLS
/// the member listens on loopback only).
fn local_client_addr(listen: &str, tls: bool) -> String {
    match listen.rsplit_once(':') {
        Some((_, port)) if !tls && !crate::config::is_loopback(listen) => {
            format!("127.0.0.1:{port}")
        }
        Some(("0.0.0.0" | "[::]", port)) => format!("127.0.0.1:{port}"),
        _ => listen.to_string(),
    }
}

/// Loads this host's certificate when TLS is configured, and checks that it
/// fits the host: a member's names the member, an agent's the machine id.
fn load_trust(config: &crate::config::Config) -> Result<Option<Trust>> {
    if !config.tls_enabled() {
        return Ok(None);
    }
    let trust = Trust::load(&config.tls_ca, &config.tls_cert, &config.tls_key)
        .context("cannot load this host's TLS identity (tls_ca, tls_cert, tls_key)")?;
    let agent_only = !config.endpoint_list().is_empty();
    let me = &trust.me;
    if !agent_only && (me.role != Role::Member || me.name != config.name) {
        anyhow::bail!(
            "{} names {me}, but this host is member {:?}: issue it one with \
             `flotilla tls issue {} --role member`",
            config.tls_cert.display(),
            config.name,
            config.name
        );
    }
    if agent_only && me.role == Role::Agent && config.agent {
        let id = agent::identity::machine_id(Path::new(MACHINE_ID))?;
        if me.name != id {
            anyhow::bail!(
                "{} names {me}, but this machine's id is {id}: an agent's certificate is \
                 named by its machine id (`flotilla tls issue {id} --role agent`)",
                config.tls_cert.display()
            );
        }
    }
    tracing::info!("TLS on: this host is {me} of cluster {}", me.cluster);
    Ok(Some(trust))
}

/// Where this machine's id is read.
const MACHINE_ID: &str = "/etc/machine-id";

/// The address a store listener binds: `listen`, or without TLS its port on
/// 127.0.0.1 (and a loud warning when that is not what was configured).
fn store_bind_addr(key: &str, listen: &str, tls: bool) -> String {
    if tls || crate::config::is_loopback(listen) {
        return listen.to_string();
    }
    let port = listen.rsplit_once(':').map_or("", |(_, port)| port);
    let bound = format!("127.0.0.1:{port}");
    tracing::error!(
        "TLS IS OFF: the store accepts anyone who reaches it, so {key} {listen} is bound to \
         {bound} only; other hosts cannot reach this member. Set tls_ca, tls_cert and \
         tls_key (see SECURITY.md) to serve other hosts."
    );
    bound
}

/// Starts this host's Raft member; returns its handle and thread.
async fn start_member(
    loaded: &Loaded,
    trust: Option<&Trust>,
    force_new_cluster: bool,
) -> Result<(runner::Handle, Exited)> {
    let config = &loaded.config;
    let peer_listen = store_bind_addr("peer_listen", &config.peer_listen, trust.is_some());
    let client_listen = store_bind_addr("client_listen", &config.client_listen, trust.is_some());
    let id = member_id(&config.name);
    let founding: BTreeMap<u64, MemberInfo> = loaded
        .members()
        .into_iter()
        .map(|m| {
            (
                member_id(&m.name),
                MemberInfo {
                    name: m.name,
                    peer_addr: m.peer_addr,
                },
            )
        })
        .collect();
    let joining = config.initial_cluster_state == "existing";
    let bootstrap = if joining {
        BTreeMap::new()
    } else {
        founding.clone()
    };

    let peers = TcpListener::bind(&peer_listen).await.with_context(|| {
        format!(
            "cannot listen for peers on {peer_listen} (peer_listen); is another daemon using it?"
        )
    })?;
    let clients = TcpListener::bind(&client_listen).await.with_context(|| {
        format!(
            "cannot listen for clients on {client_listen} (client_listen); is another daemon using it?"
        )
    })?;
    let limits = config.listener_limits();
    let server_tls = trust.map(|t| t.server.clone());
    let peers = Listener::new(peers, server_tls.clone(), limits.clone(), "peer");
    let clients = Listener::new(clients, server_tls, limits, "client");

    let raft_dir = config.data_dir.join("raft");
    let mut disk = RedbDisk::open(&raft_dir).with_context(|| {
        format!(
            "cannot open the Raft store in {}; is another flotilla daemon using this data_dir?",
            raft_dir.display()
        )
    })?;
    if force_new_cluster {
        let me = MemberInfo {
            name: config.name.clone(),
            peer_addr: config.peer_listen.clone(),
        };
        let forced = backup::force_new_cluster(&mut disk, id, me)
            .context("cannot force a new cluster from this data dir")?;
        tracing::warn!(
            "forced a new one-member cluster from this data dir at log index {} (revision {}, \
             {} log entries kept beyond the last snapshot); left behind: {}. Start without \
             --force-new-cluster from now on, and add members with flotilla member add",
            forced.index,
            forced.revision,
            forced.entries,
            if forced.dropped.is_empty() {
                "nobody".to_string()
            } else {
                forced.dropped.join(", ")
            }
        );
    }
    let tick_ms = (config.election_timeout_ms / 10).max(5);
    let mut node_config = NodeConfig::new(id, tick_ms, config.election_timeout_ms);
    node_config.snapshot_entries = config.snapshot_entries;
    node_config.log_memory_entries = config.log_memory_entries;
    node_config.snapshot_bytes = config.snapshot_bytes;
    node_config.history_bytes = usize::try_from(config.watch_history_bytes).unwrap_or(usize::MAX);
    node_config.limits = config.store_limits();
    let mut core = Core::new(node_config, disk, &bootstrap, &log::raft_logger())
        .context("cannot start the Raft member from its stored state")?;
    if joining {
        core.set_address_book(founding);
    }
    if joining && core.status().applied == 0 {
        tracing::warn!(
            "this member knows no cluster yet; it waits until an existing member adds it \
             (flotilla member add {} {})",
            config.name,
            config.peer_listen
        );
    }
    let runtime = tokio::runtime::Handle::current();
    let table = transport::Peers::new(trust.map(|t| t.client.clone()));
    let writers = table.clone();
    let (node, thread) = runner::spawn(core, Duration::from_millis(tick_ms), |handle| {
        transport::TcpTransport::new(id, runtime, handle, writers, Some(raft_dir))
    });
    let wildcard = client_listen.starts_with("0.0.0.0") || client_listen.starts_with("[::]");
    tokio::spawn(publish_member(
        node.clone(),
        config.name.clone(),
        (!wildcard).then(|| client_listen.clone()),
    ));
    tokio::spawn(transport::serve_peers(peers, node.clone(), table, id));
    tokio::spawn(server::serve_clients(
        clients,
        node.clone(),
        std::sync::Arc::new(crate::registry::access::RolePolicy),
    ));
    tracing::info!(
        "flotilla member {} (raft id {id:x}) serving clients on {client_listen} and peers on \
         {peer_listen}{}",
        config.name,
        if trust.is_some() {
            " (mutual TLS)"
        } else {
            " (no TLS: loopback only)"
        }
    );
    Ok((node, exited(thread)))
}

/// Records where clients reach this member (when it listens on one
/// address), so they can write to the leader directly, and which entries it
/// reads that the first release did not
/// ([`crate::consensus::node::KeepAliveBatches`]); retried until a leader
/// accepts it.
async fn publish_member(node: runner::Handle, name: String, addr: Option<String>) {
    use crate::consensus::kv::Op;
    use crate::consensus::node::FEATURE_KEEP_ALIVE_BATCHES;
    let features = crate::consensus::keys::member_features(&name);
    let mut success = vec![Op::put(
        features,
        FEATURE_KEEP_ALIVE_BATCHES.as_bytes().to_vec(),
    )];
    if let Some(addr) = addr {
        let key = crate::consensus::keys::member_client_addr(&name);
        success.push(Op::put(key, addr.into_bytes()));
    }
    let publish = Command::Txn {
        compare: Vec::new(),
        success,
        failure: Vec::new(),
    };
    loop {
        match node.propose(publish.clone()).await {
            Ok(_) => return,
            Err(RequestError::Stopped(_)) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Returns on SIGTERM or SIGINT; calls `on_hangup` for every SIGHUP.
async fn wait_for_shutdown(on_hangup: impl Fn()) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => on_hangup(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::store_bind_addr;

    /// Without TLS a store port never listens beyond loopback, whatever
    /// the configuration says; with TLS it binds what was configured.
    #[test]
    fn without_tls_the_store_binds_loopback_only() {
        assert_eq!(
            store_bind_addr("client_listen", "0.0.0.0:4001", false),
            "127.0.0.1:4001"
        );
        assert_eq!(
            store_bind_addr("peer_listen", "10.1.2.3:4002", false),
            "127.0.0.1:4002"
        );
        assert_eq!(
            store_bind_addr("peer_listen", "[::]:4002", false),
            "127.0.0.1:4002"
        );
        assert_eq!(
            store_bind_addr("client_listen", "127.0.0.1:4001", false),
            "127.0.0.1:4001"
        );
        assert_eq!(
            store_bind_addr("client_listen", "0.0.0.0:4001", true),
            "0.0.0.0:4001"
        );
    }
}
