//! flotilla as a benchmark target: three `flotilla daemon` processes on
//! loopback, and a [`KvTarget`] that writes through flotilla's own client.
//!
//! The members run with their default durability (every batch fsynced by redb
//! before it is acknowledged or voted on), with data under the directory the
//! caller chooses, the same disk as etcd's. Like etcd's client, workers are
//! spread over all members; a follower forwards its writes to the leader.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla::consensus::client::Client;

use crate::driver::{BoxFuture, KvTarget, KvWorker};
use crate::etcd::free_ports;

const MEMBERS: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Three running members; dropping it kills them.
pub struct FlotillaCluster {
    children: Vec<Child>,
    endpoints: Vec<String>,
}

impl FlotillaCluster {
    /// Starts members m0..m2 of `bin` with data and logs under `dir`; returns
    /// once a write through the cluster succeeds.
    pub async fn start(bin: &Path, dir: &Path) -> Result<FlotillaCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports = free_ports(2 * MEMBERS)?;
        let endpoints: Vec<String> = (0..MEMBERS)
            .map(|i| format!("127.0.0.1:{}", ports[2 * i]))
            .collect();
        let peers: Vec<String> = (0..MEMBERS)
            .map(|i| format!("127.0.0.1:{}", ports[2 * i + 1]))
            .collect();
        let initial = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = FlotillaCluster {
            children: Vec::new(),
            endpoints: endpoints.clone(),
        };
        for i in 0..MEMBERS {
            let log = File::create(dir.join(format!("m{i}.log")))?;
            let child = Command::new(bin)
                .args(["daemon", "--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.join(format!("m{i}")))
                .args(["--client-listen", &endpoints[i], "--peer-listen", &peers[i]])
                .args(["--initial-cluster", &initial, "--log", "warn"])
                .env_remove("FLOTILLA_CONFIG")
                // A store-only member: no agent, no API listeners on the outer machine.
                .arg("--no-agent")
                .env("FLOTILLA_API_SOCKET", "")
                .env("FLOTILLA_API_LISTEN", "")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} (build it: cargo build --release)", bin.display()))?;
            cluster.children.push(child);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(client) = Client::connect(&endpoints).await {
                if client.put("bench/ready", b"1".to_vec()).await.is_ok() {
                    return Ok(cluster);
                }
            }
            for (i, child) in cluster.children.iter_mut().enumerate() {
                if let Some(status) = child.try_wait()? {
                    bail!("flotilla member m{i} exited with {status}; see {}", dir.display());
                }
            }
            if Instant::now() > deadline {
                bail!("flotilla cluster not ready within {READY_TIMEOUT:?}; logs in {}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Client endpoints, `host:port`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }
}

impl Drop for FlotillaCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes through `flotilla::consensus::client::Client`, one connection per
/// worker, workers spread round-robin over the members.
pub struct FlotillaTarget {
    endpoints: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
}

impl FlotillaTarget {
    /// A target for these client endpoints.
    pub fn new(endpoints: Vec<String>) -> Self {
        FlotillaTarget {
            endpoints,
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

struct FlotillaWorker {
    client: Client,
}

impl KvTarget for FlotillaTarget {
    fn name(&self) -> &str {
        "flotilla"
    }

    fn connect(&self) -> BoxFuture<'_, Result<Box<dyn KvWorker>>> {
        Box::pin(async move {
            let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut order = self.endpoints.clone();
            let shift = start % order.len();
            order.rotate_left(shift);
            let client = Client::connect(&order).await?;
            Ok(Box::new(FlotillaWorker { client }) as Box<dyn KvWorker>)
        })
    }
}

impl KvWorker for FlotillaWorker {
    fn put(&mut self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.client.put(&key, value).await?;
            Ok(())
        })
    }
}

/// The flotilla binary next to this benchmark: the workspace's release build.
pub fn default_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/flotilla")
}
