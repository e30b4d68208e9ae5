//! flotilla as a benchmark target: three `flotilla daemon` processes on
//! loopback (`fleet_sim::Servers`), and a [`KvTarget`] that writes through
//! flotilla's own client.
//!
//! The members run with their default durability (every batch fsynced by redb
//! before it is acknowledged or voted on), with data under the directory the
//! caller chooses, the same disk as etcd's. Like etcd's client, workers are
//! spread over all members; a follower forwards its writes to the leader.

use std::path::{Path, PathBuf};

use anyhow::Result;
use flotilla::consensus::client::Client;

use crate::driver::{BoxFuture, KvTarget, KvWorker};

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
