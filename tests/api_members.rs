//! The HTTP API of every member of a real 3-member cluster (`flotilla
//! daemon` processes on loopback, their APIs on TCP with the bearer token):
//! what a follower's API reads.
//!
//! A follower's API answers from its member's copy of the registry
//! (`registry::mirror`) after a linearizable barrier through the leader. Its
//! first read starts the copy; it waits for that load instead of reading
//! the registry from the store beside it. And whichever member is asked, a
//! read sees every write acknowledged before it: the barrier's ReadIndex is
//! answered before the leader applies what it just committed, and heartbeats
//! leave the leader before its fsync (`consensus::node`), neither of which
//! may let a read miss an acknowledged write.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use flotilla::consensus::client::Client;
use flotilla::registry::ops;
use flotilla::registry::records::DesiredState;
use flotilla::units::{Unit, UnitName};

#[path = "support/fleet_sim.rs"]
mod fleet_sim;
mod support;

use fleet_sim::Servers;
use support::{Answer, Scrape, parse_metrics};

/// One GET of `api` with the cluster's token.
async fn get(servers: &Servers, api: &str, path: &str) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(api).await.unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\n\r\n",
        servers.api_token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    Answer {
        status,
        body: body.to_string(),
    }
}

async fn metrics(servers: &Servers, api: &str) -> Scrape {
    let answer = get(servers, api, "/metrics").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    parse_metrics(&answer.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_read_their_copy_once_loaded_and_see_every_acknowledged_write() {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-api-members")
        .tempdir()
        .unwrap();
    let servers = Servers::start(
        env!("CARGO_BIN_EXE_flotilla").as_ref(),
        dir.path(),
        true,
        &["--election-timeout-ms", "300"],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let client = Client::connect(&servers.endpoints).await.unwrap();
    let template = UnitName::parse("web@.service").unwrap();
    let unit = Unit::from_text(&template, "[Service]\nExecStart=/bin/true\n").unwrap();
    ops::submit(&client, &unit, false).await.unwrap();

    // The members that do not lead: no scheduler follows their copy, so
    // nothing has started it before their API's first read.
    let mut followers = Vec::new();
    for api in &servers.apis {
        if metrics(&servers, api).await.get("flotilla_raft_is_leader") == Some(&0.0) {
            followers.push(api.clone());
        }
    }
    assert_eq!(followers.len(), 2, "one leader among three members");
    for api in &followers {
        let first = get(&servers, api, "/fleet/v1/units").await;
        assert_eq!(first.status, 200, "{first:?}");
        assert!(first.body.contains("web@.service"), "{first:?}");
        let scrape = metrics(&servers, api).await;
        let count = |name: &str| scrape.get(name).copied().unwrap_or(-1.0);
        assert_eq!(
            (
                count("flotilla_api_mirror_reads_total"),
                count("flotilla_api_store_reads_total")
            ),
            (1.0, 0.0),
            "{api}'s first read waits for its copy's load, not the store"
        );
    }

    // Written through the store, then read at once through every member's
    // API, the followers' included: each read sees the write.
    for i in 0..10 {
        let name = UnitName::parse(&format!("web@{i}.service")).unwrap();
        let desired = if i % 2 == 0 {
            DesiredState::Launched
        } else {
            DesiredState::Loaded
        };
        ops::set_desired(&client, std::slice::from_ref(&name), desired)
            .await
            .unwrap();
        for api in &servers.apis {
            let answer = get(&servers, api, &format!("/fleet/v1/units/{name}")).await;
            assert_eq!(answer.status, 200, "{name} through {api}: {answer:?}");
            assert_eq!(
                answer.json()["desiredState"],
                desired.to_string(),
                "{name} through {api}"
            );
            let listed = get(&servers, api, "/fleet/v1/units").await;
            assert!(
                listed.body.contains(&format!("\"{name}\"")),
                "{name} not listed by {api}: {listed:?}"
            );
        }
        ops::destroy(&client, &name).await.unwrap();
        for api in &servers.apis {
            let answer = get(&servers, api, &format!("/fleet/v1/units/{name}")).await;
            assert_eq!(answer.status, 404, "{name} destroyed, through {api}");
        }
    }
    // Every read of the copies answered from them (none found one behind
    // for half a second on a loopback cluster at rest; allow a few).
    for api in &servers.apis {
        let scrape = metrics(&servers, api).await;
        let direct = scrape
            .get("flotilla_api_store_reads_total")
            .copied()
            .unwrap_or(-1.0);
        assert!(
            (0.0..=3.0).contains(&direct),
            "{api}: {direct} reads went to the store"
        );
    }
}
