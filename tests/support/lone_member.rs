//! One Raft member run in-process for tests that need a real store without a
//! cluster: the real Ready loop, runner and client listener over TCP, on an
//! in-memory disk, with no scheduler or agent of its own writing beside the
//! test. Included by path (`#[path = "support/lone_member.rs"]`).

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla::consensus::codec::MemberInfo;
use flotilla::consensus::listener::Listener;
use flotilla::consensus::node::{Core, NodeConfig};
use flotilla::consensus::runner::{self, Handle, Transport};
use flotilla::consensus::server;
use flotilla::consensus::storage::MemDisk;
use flotilla::registry::access::RolePolicy;
use raft::eraftpb::Message;

/// A single member sends nothing.
struct Nowhere;

impl Transport for Nowhere {
    fn send(&self, _: Vec<Message>) {}
    fn set_peers(&self, _: &BTreeMap<u64, MemberInfo>, _: u64) {}
}

/// Starts one member with its config changed by `adjust`, and waits until it
/// leads; its client address and its node's handle. Its client listener is
/// plaintext, as a member without TLS serves loopback: no identities, so the
/// role policy is never asked.
pub async fn start(adjust: impl FnOnce(&mut NodeConfig)) -> (String, Handle) {
    let members = BTreeMap::from([(
        1,
        MemberInfo {
            name: "n1".into(),
            peer_addr: "127.0.0.1:1".into(),
        },
    )]);
    let mut config = NodeConfig::new(1, 10, 100);
    adjust(&mut config);
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let core = Core::new(config, MemDisk::new(), &members, &logger).unwrap();
    let (node, _thread) = runner::spawn(core, Duration::from_millis(10), |_| Nowhere);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let listener = Listener::new(
        listener,
        None,
        flotilla::config::Config::default().listener_limits(),
        "client",
    );
    tokio::spawn(server::serve_clients(
        listener,
        node.clone(),
        Arc::new(RolePolicy),
    ));
    while node.status().await.unwrap().leader == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (addr, node)
}
