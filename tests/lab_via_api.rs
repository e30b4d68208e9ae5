//! `status` and `journal --via-api` across hosts (issue 12), on a lab of real
//! systemd hosts whose daemons use the lab's TLS: h1 and h2 are Raft members
//! (member certificates), h3 is agent-only (an agent certificate named by its
//! machine id). The CLI asks h1's API (or h3's) about units that run on h2
//! and h3; the daemon asked finds the unit's machine in the registry and
//! asks that machine's API over mutual TLS, with no ssh and no token
//! between the daemons. A followed journal streams until the CLI hangs up,
//! and then the journalctl on the unit's host ends too. A machine whose API
//! is down (its daemon stopped, its units running) is named in the error.
//!
//! Root on Debian 12 is needed; nextest runs the lab binaries one test at a time.

use std::process::{Output, Stdio};
use std::time::Duration;

mod support;

use support::cluster::{Cluster, wait_for};
use support::{read_ticks, succeeded, text};

const HELLO: &str = "[Service]\nExecStart=/bin/sh -c \"echo hello-from-h3; exec sleep infinity\"\n";
const TICKER: &str = "[Service]\nExecStart=/bin/sh -c \"i=0; while true; do i=$$((i+1)); \
                      echo tick $$i; sleep 0.2; done\"\n";

/// The lab's https API endpoint of `host` (the lab lists them in host order).
fn api_of(cluster: &Cluster, host: &str) -> String {
    let index = cluster.hosts.iter().position(|h| h.name == host).unwrap();
    cluster.endpoint.split(',').nth(index).unwrap().to_string()
}

/// `flotilla --endpoint API ARGS` from the outer machine, with the lab's CA,
/// admin certificate and token.
fn via(cluster: &Cluster, api: &str, args: &[&str]) -> Output {
    cluster
        .command()
        .args(["--endpoint", api])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn status_and_journal_via_api_reach_units_on_other_hosts() {
    let cluster = Cluster::up_with(3, 2, 10);
    let (h2, h3) = (
        cluster.id_of("h2").to_string(),
        cluster.id_of("h3").to_string(),
    );
    let dir = cluster.dir().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let hello = dir.join("hello.service");
    std::fs::write(&hello, format!("{HELLO}[X-Fleet]\nMachineID={h3}\n")).unwrap();
    let ticker = dir.join("ticker.service");
    std::fs::write(&ticker, format!("{TICKER}[X-Fleet]\nMachineID={h2}\n")).unwrap();
    cluster.ok(&["start", hello.to_str().unwrap(), ticker.to_str().unwrap()]);
    let h1_api = api_of(&cluster, "h1");
    assert!(h1_api.starts_with("https://"), "{h1_api}");

    // status through h1 of a unit on h3 (an agent-only host).
    let status = succeeded(
        &via(&cluster, &h1_api, &["status", "--via-api", "hello.service"]),
        "status --via-api through h1",
    );
    assert!(status.contains("Active: active (running)"), "{status}");
    assert!(status.contains("hello.service"), "{status}");

    // journal through h1: the unit's own output, read on h3.
    let (journal, took) = wait_for(
        Duration::from_secs(10),
        "hello's output in its journal through h1",
        || {
            let out = via(
                &cluster,
                &h1_api,
                &["journal", "--via-api", "--lines", "20", "hello.service"],
            );
            let stdout = text(&out.stdout);
            (out.status.success() && stdout.contains("hello-from-h3")).then_some(stdout)
        },
    );
    eprintln!("journal --via-api through h1 showed h3's unit after {took:?}");
    assert!(journal.contains("hello-from-h3"), "{journal}");

    // journal -f through h1 of a unit on h2: new ticks arrive while it runs.
    let mut follow = cluster
        .command()
        .args(["--endpoint", &h1_api])
        .args([
            "journal",
            "--via-api",
            "-f",
            "--lines",
            "1",
            "ticker.service",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ticks = read_ticks(follow.stdout.take().unwrap(), 6, Duration::from_secs(20));
    let journalctl_on_h2 = || {
        let out = cluster.exec("h2", &["pgrep", "-f", "journalctl --unit ticker.service"]);
        out.status.success()
    };
    assert!(journalctl_on_h2(), "h2 runs the followed journalctl");
    follow.kill().unwrap();
    let followed = follow.wait_with_output().unwrap();
    assert!(
        ticks.len() >= 6,
        "journal -f through h1 printed {ticks:?}; stderr {}",
        text(&followed.stderr)
    );
    assert!(ticks.windows(2).all(|w| w[1] > w[0]), "{ticks:?}");
    // The CLI hung up: h1 closes its call to h2, and h2's journalctl ends.
    wait_for(
        Duration::from_secs(10),
        "the followed journalctl on h2 to end",
        || (!journalctl_on_h2()).then_some(()),
    );

    // Through the agent-only host h3, of a unit on the member h2.
    let h3_api = api_of(&cluster, "h3");
    let status = succeeded(
        &via(
            &cluster,
            &h3_api,
            &["status", "--via-api", "ticker.service"],
        ),
        "status --via-api through h3",
    );
    assert!(status.contains("Active: active (running)"), "{status}");

    // h3's daemon stops (its units and its presence stay until the TTL):
    // asking h1 about hello names h3's machine and fails.
    let stopped = cluster.exec("h3", &["systemctl", "stop", "flotilla"]);
    assert!(stopped.status.success(), "{}", text(&stopped.stderr));
    let out = via(&cluster, &h1_api, &["status", "--via-api", "hello.service"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}{err}", text(&out.stdout));
    assert!(
        err.contains(&format!("cannot reach the API of machine {h3}")),
        "{err}"
    );
}
