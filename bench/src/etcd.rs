//! etcd as a benchmark target: a throw-away 3-member cluster on loopback, and
//! a [`KvTarget`] that writes to it through etcd's v3 gRPC API.
//!
//! The cluster runs the `etcd` binary from Debian's `etcd-server` package with
//! its default durability: every commit is fsynced to the WAL before it is
//! acknowledged (we never pass `--unsafe-no-fsync`). Its data directories live
//! under the directory the caller chooses, so etcd and flotilla can be made to
//! write to the same disk.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{Client, ConnectOptions};

use crate::driver::{BoxFuture, KvTarget, KvWorker};

/// Number of members in the benchmark cluster.
const MEMBERS: usize = 3;

/// How long a fresh cluster gets to elect a leader and answer reads.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running 3-member etcd cluster on 127.0.0.1. Dropping it kills every
/// member, so a failed or interrupted benchmark leaves no etcd behind.
pub struct EtcdCluster {
    /// Member processes, in member order.
    children: Vec<Child>,
    /// Client URLs (`http://127.0.0.1:PORT`), in member order.
    endpoints: Vec<String>,
    /// Where each member's data dir and log file live.
    base_dir: PathBuf,
}

impl EtcdCluster {
    /// Starts members `m0`..`m2` with data dirs and logs under `base_dir` and
    /// returns once every member knows the leader and a quorum read succeeds.
    ///
    /// `etcd_bin` is the binary to run (normally `etcd` from PATH).
    pub async fn start(etcd_bin: &Path, base_dir: &Path) -> Result<EtcdCluster> {
        std::fs::create_dir_all(base_dir)
            .with_context(|| format!("creating {}", base_dir.display()))?;
        let ports =
            crate::fleet_sim::free_ports(2 * MEMBERS).context("reserving loopback ports")?;
        let client_urls: Vec<String> = (0..MEMBERS)
            .map(|i| format!("http://127.0.0.1:{}", ports[2 * i]))
            .collect();
        let peer_urls: Vec<String> = (0..MEMBERS)
            .map(|i| format!("http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect();
        let initial_cluster = peer_urls
            .iter()
            .enumerate()
            .map(|(i, url)| format!("m{i}={url}"))
            .collect::<Vec<_>>()
            .join(",");

        let mut cluster = EtcdCluster {
            children: Vec::with_capacity(MEMBERS),
            endpoints: client_urls.clone(),
            base_dir: base_dir.to_path_buf(),
        };
        for i in 0..MEMBERS {
            let name = format!("m{i}");
            let log_path = base_dir.join(format!("{name}.log"));
            let log = File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let child = Command::new(etcd_bin)
                .arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(base_dir.join(&name))
                .args(["--listen-client-urls", &client_urls[i]])
                .args(["--advertise-client-urls", &client_urls[i]])
                .args(["--listen-peer-urls", &peer_urls[i]])
                .args(["--initial-advertise-peer-urls", &peer_urls[i]])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "flotilla-bench"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| {
                    format!(
                        "starting {}; install it with `apt-get install -y etcd-server` \
                         or pass --etcd-bin",
                        etcd_bin.display()
                    )
                })?;
            cluster.children.push(child);
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Client URLs of all members, for [`EtcdTarget::new`].
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Polls until every member reports a leader and a linearizable read
    /// through the whole cluster succeeds; fails early if a member exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        loop {
            for (i, child) in self.children.iter_mut().enumerate() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "etcd member m{i} exited with {status}; its log is {}",
                        self.base_dir.join(format!("m{i}.log")).display()
                    );
                }
            }
            let mut ready = true;
            for endpoint in &self.endpoints {
                let status = match Client::connect([endpoint], Some(options.clone())).await {
                    Ok(mut client) => client.status().await.ok(),
                    Err(_) => None,
                };
                ready &= status.is_some_and(|s| s.leader() != 0);
            }
            if ready {
                let mut client = Client::connect(&self.endpoints, Some(options.clone())).await?;
                if client.get("flotilla-bench/ready", None).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd cluster not ready after {READY_TIMEOUT:?}; logs are in {}",
                    self.base_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes to an etcd cluster through the `etcd-client` crate (gRPC).
///
/// Built with [`EtcdTarget::new`], each worker gets its own [`Client`], which
/// load-balances its requests over all given endpoints (etcd's usual client
/// behaviour); a follower forwards a put to the leader. Built with
/// [`EtcdTarget::pinned_to_leader`], every worker talks to the leader only:
/// no forwarding hop, etcd's best case.
pub struct EtcdTarget {
    /// Client URLs every worker connects to.
    endpoints: Vec<String>,
    /// `"etcd"` or `"etcd-leader"`.
    name: &'static str,
}

impl EtcdTarget {
    /// A target writing through `endpoints` (client URLs of the members).
    pub fn new(endpoints: &[String]) -> EtcdTarget {
        EtcdTarget {
            endpoints: endpoints.to_vec(),
            name: "etcd",
        }
    }

    /// A target writing through the current leader's client URL alone, found
    /// by asking each member for its status (the member whose own id is the
    /// leader id it reports).
    pub async fn pinned_to_leader(endpoints: &[String]) -> Result<EtcdTarget> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        for endpoint in endpoints {
            let mut client = Client::connect([endpoint], Some(options.clone())).await?;
            let status = client.status().await?;
            let own = status.header().map(|h| h.member_id());
            if own.is_some_and(|id| id == status.leader()) {
                return Ok(EtcdTarget {
                    endpoints: vec![endpoint.clone()],
                    name: "etcd-leader",
                });
            }
        }
        bail!("no etcd member at {endpoints:?} says it leads")
    }
}

impl EtcdTarget {
    /// The client URLs its workers connect to.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }
}

impl KvTarget for EtcdTarget {
    fn name(&self) -> &str {
        self.name
    }

    fn connect(&self) -> BoxFuture<'_, Result<Box<dyn KvWorker>>> {
        Box::pin(async move {
            let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
            let client = Client::connect(&self.endpoints, Some(options))
                .await
                .map_err(|e| anyhow!("connecting to etcd at {:?}: {e}", self.endpoints))?;
            Ok(Box::new(EtcdWorker { client }) as Box<dyn KvWorker>)
        })
    }
}

/// One worker's gRPC connection to etcd.
struct EtcdWorker {
    /// The worker's own client (its own HTTP/2 connections).
    client: Client,
}

impl KvWorker for EtcdWorker {
    fn put(&mut self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.client.put(key, value, None).await?;
            Ok(())
        })
    }
}
