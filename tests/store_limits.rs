//! What one client may make a member hold (issue 10): a single member run
//! in-process (the real Ready loop, runner and client listener, on an
//! in-memory disk), driven through the real client over TCP. Each refusal
//! must be clear and change nothing; a watch backlog larger than one frame
//! must still get through.

use std::time::Duration;

use flotilla::consensus::client::{Client, ClientError};
use flotilla::consensus::codec::MAX_FRAME;
use flotilla::consensus::kv::{Command, Compare, Op};
use flotilla::consensus::limits::Limits;
use flotilla::consensus::node::NodeConfig;
use flotilla::consensus::runner::Handle;

#[path = "support/lone_member.rs"]
mod lone_member;

/// Starts one member with `config` changed by `adjust`; its client address.
async fn member(adjust: impl FnOnce(&mut NodeConfig)) -> (String, Handle) {
    lone_member::start(adjust).await
}

async fn client(addr: &str) -> Client {
    Client::connect(&[addr.to_string()])
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(30))
}

fn refused(result: Result<impl std::fmt::Debug, ClientError>, words: &[&str]) {
    match result {
        Err(ClientError::Refused(message)) => {
            for word in words {
                assert!(message.contains(word), "{word:?} not in {message:?}");
            }
        }
        other => panic!("expected a refusal naming {words:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_a_limit_are_refused_clearly_and_change_nothing() {
    let (addr, _node) = member(|config| {
        config.limits = Limits {
            request_bytes: 64 * 1024,
            value_bytes: 16 * 1024,
            txn_ops: 8,
            min_lease_ttl_ms: 500,
            max_lease_ttl_ms: 60_000,
            leases: 2,
            ..Limits::default()
        }
    })
    .await;
    let client = client(&addr).await;
    client.put("/k", b"v".to_vec()).await.unwrap();
    let before = client.status().await.unwrap().revision;

    refused(
        client.put("/big", vec![1; 16 * 1024 + 1]).await,
        &["max_value_bytes", "nothing was changed"],
    );
    let many: Vec<Op> = (0..9)
        .map(|i| Op::put(format!("/t/{i}"), b"x".to_vec()))
        .collect();
    refused(
        client.txn(Vec::new(), many, Vec::new()).await,
        &["9 operations", "max_txn_ops"],
    );
    // Many values each under the value limit, together over the request's.
    let wide: Vec<Op> = (0..6)
        .map(|i| Op::put(format!("/w/{i}"), vec![2; 15 * 1024]))
        .collect();
    refused(
        client
            .txn(vec![Compare::exists("/k")], wide, Vec::new())
            .await,
        &["max_request_bytes"],
    );
    refused(
        client.grant(Duration::from_millis(100)).await,
        &["min_lease_ttl_ms"],
    );
    refused(
        client.grant(Duration::from_secs(3600)).await,
        &["max_lease_ttl_ms"],
    );
    client.grant(Duration::from_secs(5)).await.unwrap();
    client.grant(Duration::from_secs(5)).await.unwrap();
    refused(client.grant(Duration::from_secs(5)).await, &["max_leases"]);

    let status = client.status().await.unwrap();
    assert_eq!(status.revision, before, "no refused request changed a key");
    assert!(client.get("/big").await.unwrap().is_none());
    assert!(client.range("/t/", true, true).await.unwrap().0.is_empty());
    // Within the limits, the member goes on serving.
    client.put("/k", vec![3; 16 * 1024]).await.unwrap();
}

/// A watch whose backlog is larger than the largest frame: sent as one
/// `Events` frame, it could never be written, and the client reconnected
/// forever, each time re-encoding the whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_backlog_larger_than_a_frame_arrives_whole_in_order() {
    let (addr, node) = member(|config| {
        config.history_bytes = 2 * MAX_FRAME;
        // No snapshot on the way: this test is about the watch alone.
        config.snapshot_bytes = u64::MAX;
        config.limits.request_bytes = 4 * 1024 * 1024;
        config.limits.value_bytes = 4 * 1024 * 1024;
    })
    .await;
    let value = vec![0x77; 4 * 1024 * 1024 - 1024];
    let puts = MAX_FRAME / value.len() + 2;
    for i in 0..puts {
        // Straight to the node: the client would copy each value twice more.
        node.propose(Command::put(format!("/b/{i:03}"), value.clone(), None))
            .await
            .unwrap();
    }
    let client = client(&addr).await;
    let mut watch = client.watch("/b/", 1);
    let mut seen = Vec::new();
    while seen.len() < puts {
        let events = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("the backlog arrives")
            .unwrap();
        assert!(
            events.iter().map(|e| e.kv.value.len()).sum::<usize>() < MAX_FRAME,
            "each batch is below the frame limit"
        );
        seen.extend(events.into_iter().map(|e| (e.revision(), e.kv.key)));
    }
    let expected: Vec<(u64, String)> = (0..puts)
        .map(|i| (i as u64 + 1, format!("/b/{i:03}")))
        .collect();
    assert_eq!(seen, expected, "every event once, in order");
}
