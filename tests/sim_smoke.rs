//! The scale simulator's smoke run, in CI: 100 simulated hosts and 1,000
//! units (fleet's documented limit) on a real 3-member cluster of `flotilla
//! daemon` processes, every host running the production agent over a
//! modelled systemd (`tests/support/fleet_sim.rs`). Then 10% of the hosts are
//! killed and their units must come back elsewhere.
//!
//! It asserts correctness only, never timing: every unit runs on exactly one
//! live host and `list-units` says so, no two conflicting units ever shared a
//! host and no unit ever ran on two hosts at once (checked at the moment of
//! every start). Speed is `flotilla-bench sim`'s job (BENCHMARKS.md).

use std::time::Duration;

use flotilla::consensus::client::Client;

#[path = "support/fleet_sim.rs"]
mod fleet_sim;

use fleet_sim::{Fleet, Model, Servers};

const HOSTS: usize = 100;
const UNITS: usize = 1000;
/// Short, so the failover half takes seconds; the store's election timeout
/// stays well below it.
const TTL: Duration = Duration::from_secs(3);
/// Generous bounds for a debug build on two loaded cores: a hang fails, a
/// slow run does not.
const SETTLE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_hosts_thousand_units_then_ten_die() {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-sim-smoke")
        .tempdir()
        .unwrap();
    let servers = Servers::start(
        env!("CARGO_BIN_EXE_flotilla").as_ref(),
        &dir.path().join("servers"),
        false,
        &["--election-timeout-ms", "300"],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let client = Client::connect(&servers.endpoints).await.unwrap();
    let mut fleet = Fleet::start(
        HOSTS,
        &servers.endpoints,
        TTL,
        Model::default(),
        &dir.path().join("hosts"),
    );
    let names = fleet_sim::unit_names(UNITS, HOSTS);
    fleet_sim::submit_all(&client, &names, 250)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    settle(&client, &fleet, &names, &servers).await;

    // A tenth of the hosts die at once: their units must run elsewhere.
    for i in (0..HOSTS).step_by(10) {
        fleet.kill(i).await;
    }
    settle(&client, &fleet, &names, &servers).await;
    fleet.stop_all().await;
}

/// Waits until every unit runs and the store says so, then checks everything.
async fn settle(
    client: &Client,
    fleet: &Fleet,
    names: &[flotilla::units::UnitName],
    servers: &Servers,
) {
    let every = Duration::from_millis(250);
    if let Err(last) = fleet_sim::settled(client, names, fleet, SETTLE, every).await {
        panic!(
            "not settled within {SETTLE:?}: {last}\nm0 log: {}",
            servers.log(0)
        );
    }
}

/// The checks above can fail: the journal flags a unit started on a second
/// host and two conflicting units on one host, and a killed host's units stop.
#[tokio::test]
async fn the_journal_sees_double_runs_and_conflicts() {
    use std::path::PathBuf;
    use std::sync::Arc;

    use fleet_sim::{FakeBackend, FakeSystemd, Journal};
    use flotilla::agent::backend::Backend;

    let journal = Arc::new(Journal::default());
    let model = Model {
        start_failure: 0.0,
        ..Model::default()
    };
    let hosts: Vec<FakeBackend> = (0..2)
        .map(|i| FakeBackend(FakeSystemd::new(i, model, journal.clone())))
        .collect();
    let files: Vec<PathBuf> = ["sim@1.service", "excl@1.service", "excl@2.service"]
        .iter()
        .map(|n| PathBuf::from("/run/flotilla/units").join(n))
        .collect();
    for host in &hosts {
        host.link_runtime_all(&files).await.unwrap();
    }
    let mut changes = hosts[1].watch_changes().await.unwrap();
    hosts[0].start("sim@1.service").await.unwrap();
    hosts[0].start("excl@1.service").await.unwrap();
    hosts[1].start("sim@1.service").await.unwrap();
    hosts[1].start("excl@2.service").await.unwrap();
    hosts[1].start("excl@1.service").await.unwrap();
    assert!(fleet_sim::wait_running(&journal, 3, Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(changes.try_recv().is_ok(), "a start is signalled");
    let violations = journal.violations();
    assert_eq!(violations.len(), 3, "{violations:#?}");
    let state = hosts[1].states(&["excl@2.service"]).await.unwrap();
    assert_eq!(state[0].1.active, "active");
    hosts[1].0.die();
    assert_eq!(
        journal.placement().len(),
        2,
        "host 1's units stopped with it"
    );
    assert!(
        hosts[1].start("sim@1.service").await.is_err(),
        "a dead host refuses"
    );
}
