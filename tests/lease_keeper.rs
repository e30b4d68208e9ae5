//! A machine's lease keep-alive does not queue behind its other store calls.
//!
//! A client sends one request at a time over its one connection. On a
//! loaded leader an agent's claim or report can take up to the client's
//! timeout; a keep-alive queued behind it would let a live host's lease
//! run out and its units start elsewhere while they still run. Here the
//! machine's own connection is frozen mid-request (a relay in front of a
//! real member stops passing its bytes, as a member too busy to answer
//! would), and the keeper must keep the lease alive through it.

#[path = "support/lone_member.rs"]
mod lone_member;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use flotilla::consensus::client::Client;
use flotilla::registry::BodyCache;
use flotilla::registry::machine::{MachineStore, Renewed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Relays every connection to `target`; the first connection it accepted
/// stops passing bytes (both ways, kept open) once `freeze` is set.
async fn relay(target: String, freeze: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let first = accepted.fetch_add(1, Ordering::SeqCst) == 0;
            let outbound = TcpStream::connect(&target).await.unwrap();
            let freeze = first.then(|| freeze.clone());
            tokio::spawn(pass(inbound, outbound, freeze));
        }
    });
    addr
}

/// Copies both ways until either side closes; a frozen connection holds
/// what it reads from then on.
async fn pass(a: TcpStream, b: TcpStream, freeze: Option<Arc<AtomicBool>>) {
    let (a_read, a_write) = a.into_split();
    let (b_read, b_write) = b.into_split();
    tokio::select! {
        _ = copy(a_read, b_write, freeze.clone()) => {}
        _ = copy(b_read, a_write, freeze) => {}
    }
}

/// One direction of [`pass`].
async fn copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, freeze: Option<Arc<AtomicBool>>) {
    let frozen = || freeze.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_does_not_wait_behind_the_machines_stuck_request() {
    let (member, _node) = lone_member::start(|_| {}).await;
    let freeze = Arc::new(AtomicBool::new(false));
    let through = relay(member, freeze.clone()).await;
    // The machine's requests may take far longer than its lease lives.
    let ttl = Duration::from_secs(2);
    let client = Client::connect(std::slice::from_ref(&through))
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(20));
    let mut store = MachineStore::new(client, "m1", "i1", ttl, Arc::new(BodyCache::new()));
    let lease = store.take_lease().await.unwrap();
    let keeper = store.keeper().expect("a keeper once the lease is taken");

    // The machine's connection stops answering in the middle of a read.
    freeze.store(true, Ordering::SeqCst);
    let store = Arc::new(store);
    let stuck = {
        let store = store.clone();
        tokio::spawn(async move { store.presence().await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stuck.is_finished(),
        "the frozen read must still be waiting"
    );

    // Renew at a third of the TTL for three TTLs, as the agent's task does.
    for _ in 0..9 {
        tokio::time::sleep(ttl / 3).await;
        match tokio::time::timeout(ttl, keeper.renew()).await {
            Ok(Ok(Renewed::Renewed)) => {}
            Ok(Ok(Renewed::Expired)) => panic!("lease {lease} ended while its keeper renewed it"),
            Ok(Err(e)) => panic!("renewing lease {lease} failed: {e}"),
            Err(_) => panic!(
                "renewing lease {lease} waited over {ttl:?}: it queued behind the machine's frozen read"
            ),
        }
    }
    assert!(!stuck.is_finished(), "the read stayed stuck throughout");
    stuck.abort();
}
