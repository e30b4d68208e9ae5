//! Three real `flotilla daemon` processes on loopback: kill -9 the leader while
//! clients write and a watcher listens, then check that every acknowledged
//! write survived, a new leader took over, and the watcher saw every revision
//! exactly once.
//!
//! The members speak mutual TLS, each with its member certificate of one
//! test CA ([`support::pki`]); the test's own clients present an admin's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::consensus::client::{Client, ClientError};
use flotilla::consensus::kv::{Op, Revision};
use flotilla::tls::Role;

mod support;

use support::{Scrape, free_port, parse_metrics};

struct Member {
    name: String,
    client: String,
    peer: String,
    dir: PathBuf,
    process: Option<Child>,
    /// Mount a tmpfs of this many MiB on `dir` first: a disk that fills.
    disk_mib: Option<u32>,
    /// Settings for this member, as `FLOTILLA_<KEY>` variables.
    env: Vec<(String, String)>,
    /// The binary to run (default: this build's).
    bin: Option<String>,
    /// Its `--log` level.
    log: &'static str,
}

struct Cluster {
    members: Vec<Member>,
    initial: String,
    root: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let mut cluster = Cluster::prepare(n);
        for i in 0..n {
            cluster.boot(i);
        }
        cluster
    }

    /// A cluster of `n` founding members, none started yet.
    fn prepare(n: usize) -> Cluster {
        support::pki::shared();
        let root = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n).map(|i| new_member(root.path(), i)).collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            members,
            initial,
            root,
        }
    }

    /// Kills a follower with SIGKILL and connects a client to the members
    /// still running, so the follower falls behind what is written next.
    async fn stop_a_follower(&mut self) -> (usize, Client) {
        let leader = self.leader(None).await;
        let lagging = (0..self.members.len()).find(|i| *i != leader).unwrap();
        self.kill9(lagging);
        let running: Vec<String> = (0..self.members.len())
            .filter(|i| *i != lagging)
            .map(|i| self.members[i].client.clone())
            .collect();
        (lagging, Client::connect(&running).await.unwrap())
    }

    /// Adds a member through `flotilla member add` and starts it joining.
    async fn add_member(&mut self) -> usize {
        let endpoints = self.endpoints();
        self.add_member_via(&endpoints).await
    }

    /// [`Cluster::add_member`], asking the members at `endpoints`.
    async fn add_member_via(&mut self, endpoints: &[String]) -> usize {
        let i = self.members.len();
        let member = new_member(self.root.path(), i);
        let out = member_change(endpoints, &["member", "add", &member.name, &member.peer]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.members.push(member);
        self.initial = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        self.boot_as(i, "existing");
        i
    }

    fn boot(&mut self, i: usize) {
        self.boot_as(i, "new");
    }

    fn boot_as(&mut self, i: usize, state: &str) {
        self.boot_with(i, state, &[]);
    }

    /// Starts member `i` with `extra` daemon flags.
    fn boot_with(&mut self, i: usize, state: &str, extra: &[&str]) {
        let m = &mut self.members[i];
        let log = std::fs::File::create(m.dir.with_extension("log")).unwrap();
        let mut command = match m.disk_mib {
            // In a mount namespace of its own (it vanishes with the process),
            // a tmpfs of that size on the data dir; exec keeps the pid, so
            // the exit status is the daemon's.
            Some(mib) => {
                std::fs::create_dir_all(&m.dir).unwrap();
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(format!(
                        "mount -t tmpfs -o size={mib}m flotilla-test \"$0\" && exec \"$@\""
                    ))
                    .arg(&m.dir)
                    .arg(env!("CARGO_BIN_EXE_flotilla"));
                c
            }
            None => Command::new(m.bin.as_deref().unwrap_or(env!("CARGO_BIN_EXE_flotilla"))),
        };
        let child = command
            .args(["daemon", "--name", &m.name, "--data-dir"])
            .arg(&m.dir)
            .args(["--client-listen", &m.client, "--peer-listen", &m.peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", state, "--snapshot-entries", "50"])
            // A tiny in-memory log: followers that lag are sent entries read
            // back from the leader's disk (a measured older release may not
            // know the flag).
            .args(match m.bin {
                None => &["--log-memory-entries", "4"][..],
                Some(_) => &[][..],
            })
            .args(["--election-timeout-ms", "300", "--log", m.log])
            .env_remove("FLOTILLA_CONFIG")
            // A store-only member: no agent, no API listeners on the outer
            // machine (unless the member's own settings, which come after,
            // ask for them).
            .arg("--no-agent")
            .args(extra)
            .env("FLOTILLA_API_SOCKET", "")
            .env("FLOTILLA_API_LISTEN", "")
            .envs(m.env.iter().map(|(k, v)| (k, v)))
            .envs(support::pki::shared().env(&m.name, Role::Member))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        m.process = Some(child);
    }

    fn kill9(&mut self, i: usize) {
        let mut child = self.members[i].process.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// Waits until some member reports a leader; returns the leader's index.
    async fn leader(&self, not: Option<usize>) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.process.is_none() || Some(i) == not {
                    continue;
                }
                let Ok(client) = Client::connect(std::slice::from_ref(&m.client)).await else {
                    continue;
                };
                if let Ok(status) = client.status().await
                    && let Some(leader) = status.members.get(&status.leader)
                {
                    let index = self.members.iter().position(|x| x.name == leader.name);
                    if let Some(index) = index.filter(|ix| Some(*ix) != not) {
                        return index;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader within 15 s; the members' logs end:\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs the flotilla CLI against `endpoints`.
fn cli(endpoints: &[String], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["--store-endpoint", &endpoints.join(",")])
        .envs(support::pki::shared().env("tester", Role::Admin))
        .args(args)
        .output()
        .unwrap()
}

/// Runs a `flotilla member` verb, asking again while the store refuses it
/// because another membership change is still being applied (one change at
/// a time: a newcomer's promotion to voter may still be on its way).
async fn member_change(endpoints: &[String], args: &[&str]) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cli(endpoints, args);
        let busy = String::from_utf8_lossy(&out.stderr).contains("still being applied");
        if !busy || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn new_member(root: &Path, i: usize) -> Member {
    Member {
        name: format!("m{i}"),
        client: format!("127.0.0.1:{}", free_port()),
        peer: format!("127.0.0.1:{}", free_port()),
        dir: root.join(format!("m{i}")),
        process: None,
        disk_mib: None,
        env: Vec::new(),
        bin: None,
        log: "warn",
    }
}

impl Cluster {
    /// The last lines of every member's log, for a failure message: the
    /// logs live in a temporary dir that goes with the failed test.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(m.dir.with_extension("log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            out.push_str(&format!("--- {}:\n{tail}\n", m.name));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_leader_kill_and_watchers_see_each_revision_once() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader(None).await;
    let endpoints = cluster.endpoints();

    // A watcher connected to a follower first, from the very beginning.
    let follower = (leader + 1) % 3;
    let mut watch_endpoints = vec![cluster.members[follower].client.clone()];
    watch_endpoints.extend(endpoints.iter().cloned());
    let watcher = Client::connect(&watch_endpoints).await.unwrap();
    let seen: Arc<Mutex<Vec<Revision>>> = Arc::default();
    let seen_by_watch = seen.clone();
    let watch_task = tokio::spawn(async move {
        let mut watch = watcher.watch("/w/", 1);
        loop {
            match watch.next().await {
                Ok(events) => seen_by_watch
                    .lock()
                    .unwrap()
                    .extend(events.iter().map(|e| e.revision())),
                Err(e) => panic!("watch failed: {e}"),
            }
        }
    });

    // Writers: each client writes its own keys; acknowledged ones are recorded.
    let acked: Arc<Mutex<BTreeMap<String, (String, Revision)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let acked = acked.clone();
        let stop = stop.clone();
        let mut order = endpoints.clone();
        order.rotate_left(w % 3);
        writers.push(tokio::spawn(async move {
            let client = Client::connect(&order)
                .await
                .unwrap()
                .with_timeout(Duration::from_secs(5));
            let mut n = 0u64;
            let mut unknown = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let key = format!("/w/{w}/{n}");
                let value = format!("value-{w}-{n}");
                match client.put(&key, value.clone().into_bytes()).await {
                    Ok(revision) => {
                        acked.lock().unwrap().insert(key, (value, revision));
                    }
                    Err(ClientError::Unknown(_) | ClientError::NoLeader(_)) => unknown += 1,
                    Err(e) => panic!("write {key} failed: {e}"),
                }
                n += 1;
            }
            unknown
        }));
    }

    tokio::time::sleep(Duration::from_millis(800)).await;
    let before_kill = acked.lock().unwrap().len();
    assert!(
        before_kill > 10,
        "writes are flowing before the kill ({before_kill})"
    );
    cluster.kill9(leader);
    let killed_at = Instant::now();
    let new_leader = cluster.leader(Some(leader)).await;
    let failover = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut unknown = 0;
    for w in writers {
        unknown += w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let after_kill = acked.values().filter(|(_, r)| *r > 0).count() - before_kill;
    assert!(
        after_kill > 10,
        "writes continue under the new leader ({after_kill})"
    );

    // Bring the killed member back on the same disk.
    cluster.boot(leader);

    // Every acknowledged write is readable, linearizably, through the cluster...
    let reader = Client::connect(&endpoints).await.unwrap();
    for (key, (value, _)) in &acked {
        let got = reader.get(key).await.unwrap();
        assert_eq!(
            got.map(|kv| String::from_utf8(kv.value).unwrap())
                .as_deref(),
            Some(value.as_str()),
            "acknowledged write {key} lost"
        );
    }
    // ...and the restarted member catches up to all of them.
    let restarted = connect_when_up(&cluster.members[leader].client).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (kvs, _) = restarted.range("/w/", true, true).await.unwrap();
        let keys: BTreeSet<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        if acked.keys().all(|k| keys.contains(k.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted member did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The watcher saw every revision of /w/ exactly once, in order: compare it
    // with the whole history read afresh after the dust settled.
    // (Other keys share the global revision counter; take the last /w/ change.)
    let (kvs, _) = reader.range("/w/", true, false).await.unwrap();
    let final_revision = kvs.iter().map(|kv| kv.mod_revision).max().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().last().copied().unwrap_or(0) < final_revision {
        assert!(Instant::now() < deadline, "watcher stalled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch_task.abort();
    let mut history = reader.watch("/w/", 1);
    let mut expected = Vec::new();
    while expected.last().copied().unwrap_or(0) < final_revision {
        expected.extend(history.next().await.unwrap().iter().map(|e| e.revision()));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, expected, "watcher missed or repeated a revision");
    for (key, (_, revision)) in &acked {
        assert!(seen.binary_search(revision).is_ok(), "watcher missed {key}");
    }
    eprintln!(
        "acked {} writes ({before_kill} before the kill), {unknown} with unknown outcome; \
         failover took {failover:?}",
        acked.len()
    );
}

/// Connects to one member, waiting for its process to start listening.
async fn connect_when_up(endpoint: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(&[endpoint.to_string()]).await {
            Ok(client) => return client,
            Err(e) => assert!(Instant::now() < deadline, "{endpoint} never came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `/k/0` .. `/k/{n-1}`, each acknowledged; returns their keys.
async fn put_keys(client: &Client, n: usize) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for i in 0..n {
        let key = format!("/k/{i}");
        client.put(&key, b"v".to_vec()).await.unwrap();
        keys.insert(key);
    }
    keys
}

/// Waits until `client`'s member serves every key in `keys` from its own state.
async fn caught_up(client: &Client, keys: &BTreeSet<String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((kvs, _)) = client.range("/", true, true).await {
            let have: BTreeSet<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
            if keys.iter().all(|k| have.contains(k.as_str())) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what} did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The index of the newest snapshot file in a member's data dir (files are
/// `snapshot-<term>-<index>.bin`, both in hex); 0 without one.
fn newest_snapshot_file(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("raft"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let index = name
                .strip_prefix("snapshot-")?
                .strip_suffix(".bin")?
                .split('-')
                .nth(1)?;
            u64::from_str_radix(index, 16).ok()
        })
        .max()
        .unwrap_or(0)
}

/// Snapshots are encoded and written off the Raft thread: those files are
/// what a follower that fell behind the compacted log installs, and what
/// the whole cluster restarts from after a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_written_off_the_raft_thread_catch_up_a_follower_and_restart_the_cluster() {
    let mut cluster = Cluster::start(3);
    let (lagging, client) = cluster.stop_a_follower().await;
    // Far more writes than --snapshot-entries: several snapshots, each
    // compacting the log past where the stopped member's ends.
    let keys = put_keys(&client, 240).await;
    for i in (0..3).filter(|i| *i != lagging) {
        let index = newest_snapshot_file(&cluster.members[i].dir);
        assert!(
            index >= 150,
            "{}: newest snapshot at {index}",
            cluster.members[i].name
        );
    }
    cluster.boot(lagging);
    let follower = connect_when_up(&cluster.members[lagging].client).await;
    caught_up(&follower, &keys, "the member that fell behind").await;
    assert!(newest_snapshot_file(&cluster.members[lagging].dir) >= 150);

    for i in 0..3 {
        cluster.kill9(i);
    }
    for i in 0..3 {
        cluster.boot(i);
    }
    cluster.leader(None).await;
    for i in 0..3 {
        let member = connect_when_up(&cluster.members[i].client).await;
        caught_up(&member, &keys, &cluster.members[i].name).await;
    }
    let client = Client::connect(&cluster.endpoints()).await.unwrap();
    client.put("/after", b"ok".to_vec()).await.unwrap();
}

/// A follower that fell behind by more entries than the members keep in
/// memory (`--log-memory-entries 4`), but not past the last snapshot, is
/// sent the entries it lacks from the leader's disk, and catches up with no
/// snapshot installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_in_memory_log_catches_up_from_the_leaders_disk() {
    let mut cluster = Cluster::start(3);
    let (lagging, client) = cluster.stop_a_follower().await;
    // Fewer writes than --snapshot-entries (50), many more than the 4 kept
    // in memory.
    let keys = put_keys(&client, 30).await;
    for i in 0..3 {
        assert_eq!(
            newest_snapshot_file(&cluster.members[i].dir),
            0,
            "{} took a snapshot: the test needs none",
            cluster.members[i].name
        );
    }
    cluster.boot(lagging);
    let follower = connect_when_up(&cluster.members[lagging].client).await;
    caught_up(&follower, &keys, "the member that fell behind").await;
    assert_eq!(
        newest_snapshot_file(&cluster.members[lagging].dir),
        0,
        "caught up from log entries, not a snapshot"
    );
    client.put("/after", b"ok".to_vec()).await.unwrap();
}

/// A measurement, not a test (run by hand; numbers in BENCHMARKS.md): how
/// long puts wait while a member with a large state snapshots every 50
/// entries. One member is filled with `FLOTILLA_MEASURE_MIB` MiB (default
/// 270) of values of `FLOTILLA_MEASURE_VALUE_KIB` KiB (default 1024), then
/// small puts are made one after another for `FLOTILLA_MEASURE_SECS`
/// seconds (default 30) and timed. `FLOTILLA_MEASURE_BIN` names the binary
/// to measure (default: this build), so a release that snapshots on the Raft
/// thread can be compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand"]
async fn measure_put_latency_while_a_large_state_snapshots() {
    let mut cluster = Cluster::prepare(1);
    let bin = std::env::var("FLOTILLA_MEASURE_BIN").ok();
    cluster.members[0].bin = bin.clone();
    cluster.members[0].log = "info";
    cluster.boot(0);
    let m = &cluster.members[0];
    let bin = bin.unwrap_or_else(|| env!("CARGO_BIN_EXE_flotilla").to_string());
    let mib: usize = std::env::var("FLOTILLA_MEASURE_MIB").map_or(270, |v| v.parse().unwrap());
    let client = connect_when_up(&m.client).await;
    let setting = |name: &str, default: usize| -> usize {
        std::env::var(name).map_or(default, |v| v.parse().unwrap())
    };
    let value_kib = setting("FLOTILLA_MEASURE_VALUE_KIB", 1024);
    let secs = setting("FLOTILLA_MEASURE_SECS", 30) as u64;
    let value: Vec<u8> = (0..value_kib * 1024).map(|i| (i % 251) as u8).collect();
    let (values, per_txn) = (mib * 1024 / value_kib, (1024 / value_kib).max(1));
    for batch in 0..values.div_ceil(per_txn) {
        let ops: Vec<Op> = (batch * per_txn..((batch + 1) * per_txn).min(values))
            .map(|i| Op::put(format!("/big/{i:07}"), value.clone()))
            .collect();
        while let Err(e) = client.txn(Vec::new(), ops.clone(), Vec::new()).await {
            eprintln!("filling: {e}; again");
        }
    }
    let mut waits = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        let put = Instant::now();
        let outcome = client
            .put(&format!("/small/{}", waits.len()), b"x".to_vec())
            .await;
        waits.push((put.elapsed(), outcome.is_ok()));
    }
    let total = started.elapsed();
    let mut times: Vec<Duration> = waits.iter().map(|(d, _)| *d).collect();
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    let failed = waits.iter().filter(|(_, ok)| !ok).count();
    let log = std::fs::read_to_string(m.dir.with_extension("log")).unwrap_or_default();
    let snapshots: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapshot at index"))
        .collect();
    eprintln!(
        "{bin}: {mib} MiB state in {value_kib} KiB values, {} puts in {total:?}: p50 {:?} \
         p99 {:?} max {:?}, {failed} failed",
        waits.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    for line in snapshots {
        eprintln!("  {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_from_a_snapshot_and_removed_at_runtime() {
    let mut cluster = Cluster::start(3);
    cluster.leader(None).await;
    let client = Client::connect(&cluster.endpoints()).await.unwrap();
    // More writes than --snapshot-entries, so the log is compacted.
    let keys = put_keys(&client, 120).await;
    let added = cluster.add_member().await;
    let newcomer = connect_when_up(&cluster.members[added].client).await;
    caught_up(&newcomer, &keys, "the added member").await;
    let status = newcomer.status().await.unwrap();
    assert_eq!(status.members.len(), 4, "{status:?}");

    // Remove a member that is not the leader; the rest keep working.
    let leader = cluster.leader(None).await;
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let name = cluster.members[victim].name.clone();
    let out = member_change(&cluster.endpoints(), &["member", "remove", &name]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.kill9(victim);
    let mut survivors: Vec<String> = cluster.endpoints();
    survivors.remove(victim);
    let client = Client::connect(&survivors).await.unwrap();
    client.put("/after-remove", b"ok".to_vec()).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.members.len(), 3);
    assert!(!status.members.values().any(|m| m.name == name));
    // Removing an unknown member is refused with a clear error.
    let out = cli(&survivors, &["member", "remove", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no member named \"nobody\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Remove the leader itself: it hands leadership to another member (raft-rs
    // alone would keep it leading), and the other two go on without it.
    let leader = cluster.leader(None).await;
    let name = cluster.members[leader].name.clone();
    let out = member_change(&survivors, &["member", "remove", &name]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let next = cluster.leader(Some(leader)).await;
    assert_ne!(next, leader);
    let rest: Vec<String> = survivors
        .iter()
        .filter(|e| **e != cluster.members[leader].client)
        .cloned()
        .collect();
    let client = Client::connect(&rest).await.unwrap();
    client
        .put("/after-leader-remove", b"ok".to_vec())
        .await
        .unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.members.len(), 2, "{status:?}");
    assert!(!status.members.values().any(|m| m.name == name));
    // The removed member, still running, refuses requests.
    let removed = Client::connect(std::slice::from_ref(&cluster.members[leader].client))
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(1));
    let refused = removed.put("/k", b"no".to_vec()).await.unwrap_err();
    assert!(refused.to_string().contains("removed"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_leases_for_their_remaining_time_only() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader(None).await;
    let client = Client::connect(&cluster.endpoints()).await.unwrap();
    let ttl = Duration::from_millis(4000);
    let lease = client.grant(ttl).await.unwrap();
    client
        .put_with_lease("/presence/m1", b"up".to_vec(), Some(lease))
        .await
        .unwrap();
    client.keep_alive(lease).await.unwrap();
    let kept = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill9(leader);
    cluster.leader(Some(leader)).await;
    // How long finding the new leader took, for the failure message: a CI run
    // once took 10.4 s here (cause not found; never reproduced under load).
    let found_leader = kept.elapsed();
    let mut survivors = cluster.endpoints();
    survivors.remove(leader);
    let client = Client::connect(&survivors).await.unwrap();
    // Not expired at once by the new leader...
    assert!(
        client.get("/presence/m1").await.unwrap().is_some(),
        "the new leader expired a live lease at once ({:?} after the keep-alive; \
         the new leader was found {found_leader:?} after it)",
        kept.elapsed()
    );
    // ...and gone within TTL + election timeout (+ slack for ticks and for an
    // election slowed by a busy machine: lab tests run beside this one), well
    // before 2 x TTL (what renewing it in full at takeover would give).
    let deadline = kept + ttl + Duration::from_millis(300 + 2200);
    loop {
        if client.get("/presence/m1").await.unwrap().is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lease outlived its remaining time plus one election timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone_after = kept.elapsed();
    assert!(gone_after >= ttl, "expired early: {gone_after:?}");
    eprintln!(
        "lease with TTL {ttl:?} expired {gone_after:?} after its last keep-alive across a leader kill"
    );
}

/// `flotilla cluster health --json` against `endpoints`: exit status and report.
fn health(endpoints: &[String]) -> (Option<i32>, serde_json::Value) {
    let out = cli(endpoints, &["cluster", "health", "--json"]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_health_sees_every_member_and_fails_when_members_die() {
    use flotilla::registry::{keys, records};
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader(None).await;
    let endpoints = cluster.endpoints();
    // One live machine (presence on a lease) and one the store remembers
    // (its claim generation key) whose lease is gone.
    let client = Client::connect(&endpoints).await.unwrap();
    let lease = client.grant(Duration::from_secs(60)).await.unwrap();
    let record = records::MachineRecord {
        id: "live0001".into(),
        instance: "i1".into(),
        hostname: "live".into(),
        ip: "127.0.0.1".into(),
        metadata: BTreeMap::new(),
        api: None,
    };
    client
        .put_with_lease(
            &keys::machine("live0001"),
            records::encode(&record),
            Some(lease),
        )
        .await
        .unwrap();
    client
        .put(&keys::generation("gone0001"), b"1".to_vec())
        .await
        .unwrap();

    // Healthy once every member follows the leader (a follower may not have
    // heard its first heartbeat yet right after the election).
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let (code, report) = health(&endpoints);
        if code == Some(0) {
            break report;
        }
        assert!(Instant::now() < deadline, "never healthy: {report:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(report["healthy"], true);
    assert_eq!(report["leader"], cluster.members[leader].name.as_str());
    assert_eq!(report["quorum"]["following"], 3);
    let members = report["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        assert!(m["lag"].as_u64().is_some(), "{m}");
        assert!(m["keys"].as_u64().unwrap() >= 2, "{m}");
        assert!(m["store_bytes"].as_u64().unwrap() > 0, "{m}");
    }
    assert_eq!(report["machines"]["live"], serde_json::json!(["live0001"]));
    assert_eq!(report["machines"]["expired"][0]["machine"], "gone0001");

    // The live machine misses renewals (its last one 9 s ago, TTL 10 s):
    // unhealthy, naming it; renewed again, healthy again.
    let renew = |ago_ms: u64| {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let renewal = records::Renewal {
            at_ms: now_ms - ago_ms,
            ttl_ms: 10_000,
        };
        let key = keys::renewal("live0001");
        let client = &client;
        async move {
            let value = records::encode(&renewal);
            client
                .put_with_lease(&key, value, Some(lease))
                .await
                .unwrap();
        }
    };
    renew(9_000).await;
    let (code, report) = health(&endpoints);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["machines"]["overdue"][0]["machine"], "live0001");
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("machine live0001 last renewed its presence 9 s ago"),
        "{problems}"
    );
    let shown = cli(&endpoints, &["cluster", "health"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("(1 overdue: live0001)"), "{shown}");
    renew(1_000).await;
    let (code, report) = health(&endpoints);
    assert_eq!(code, Some(0), "{report:#}");

    // A follower dies: quorum holds, but the cluster is unhealthy, naming it.
    let follower = (leader + 1) % 3;
    cluster.kill9(follower);
    let (code, report) = health(&endpoints);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["quorum"]["ok"], true, "{report:#}");
    let problems = report["problems"].to_string();
    let name = &cluster.members[follower].name;
    assert!(
        problems.contains(&format!("member {name} is unreachable")),
        "{problems}"
    );
    let text = cli(&endpoints, &["cluster", "health"]);
    assert_eq!(text.status.code(), Some(1));
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(shown.starts_with("cluster is UNHEALTHY"), "{shown}");
    assert!(shown.contains("unreachable"), "{shown}");

    // The leader dies too: no quorum, still a report from the survivor.
    cluster.kill9(leader);
    let (code, report) = health(&endpoints);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["quorum"]["ok"], false, "{report:#}");
    assert_eq!(
        report["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "unreachable")
            .count(),
        2,
        "{report:#}"
    );
}

/// Issue 11, item 5: a member that never has a leader (two of its three
/// founders never start) answers every request and every watch, but can
/// change nothing and learns of nothing. A client listing it first must move
/// on to a member with a leader: writes after "no leader", require-leader
/// watches when the member ends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_require_leader_watches_move_off_a_member_without_a_leader() {
    let mut lonely = Cluster::prepare(3);
    lonely.boot(0);
    let healthy = Cluster::start(1);
    healthy.leader(None).await;
    let endpoints = vec![
        lonely.members[0].client.clone(),
        healthy.members[0].client.clone(),
    ];
    let lonely_only = connect_when_up(&lonely.members[0].client).await;
    assert_eq!(lonely_only.status().await.unwrap().leader, 0);

    let client = Client::connect(&endpoints)
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    // Before the fix the client retried the lonely member until its timeout
    // and failed with "no leader".
    let revision = client.put("/w/k", b"1".to_vec()).await.unwrap();
    assert_eq!(client.get("/w/k").await.unwrap().unwrap().value, b"1");

    // The lonely member refuses the require-leader watch; it resumes on the
    // healthy one and sees the next write.
    let watcher = Client::connect(&endpoints).await.unwrap();
    let mut watch = watcher.watch("/w/", revision + 1).require_leader();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.put("/w/k", b"2".to_vec()).await.unwrap()
    });
    let events = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("the watch moved to the member with a leader")
        .unwrap();
    let written = writer.await.unwrap();
    assert_eq!(events.last().unwrap().revision(), written);
    assert_eq!(events.last().unwrap().kv.value, b"2");
}

/// Issue 11, item 4: a member added to a store whose snapshot outgrows the
/// largest frame (64 MiB) receives it in chunks on a connection of its own.
/// Sent as one message, it could never arrive, and the newcomer was sent it
/// again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_a_store_larger_than_one_frame() {
    let mut cluster = Cluster::start(1);
    cluster.leader(None).await;
    let client = Client::connect(&cluster.endpoints())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(60));
    // 40 values of 1 MiB: with the watch history holding each value once
    // more, the snapshot is about 80 MiB. Fewer entries than the test's
    // --snapshot-entries, so the one snapshot is taken for the newcomer.
    let value = vec![0x5a; 1024 * 1024];
    let keys = 40;
    for i in 0..keys {
        if let Err(e) = client.put(&format!("/big/{i}"), value.clone()).await {
            let log = std::fs::read_to_string(cluster.members[0].dir.with_extension("log"));
            panic!("put {i} failed: {e}; member log: {log:?}");
        }
    }
    let added = cluster.add_member().await;
    // A debug build takes seconds to decode and store 80 MiB: be patient.
    let newcomer = connect_when_up(&cluster.members[added].client)
        .await
        .with_timeout(Duration::from_secs(60));
    let last = format!("/big/{}", keys - 1);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok((kvs, _)) = newcomer.range(&last, false, true).await
            && kvs.first().is_some_and(|kv| kv.value == value)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the newcomer never received the snapshot; the members' logs end:\n{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (first, _) = newcomer.range("/big/0", false, true).await.unwrap();
    assert_eq!(first[0].value, value);
    // Caught up, it is promoted: the two members then commit together.
    client.put("/after-join", b"ok".to_vec()).await.unwrap();
    let status = newcomer.status().await.unwrap();
    assert_eq!(status.members.len(), 2, "{status:?}");
}

/// Every key under `prefix` with its value, as a linearizable read sees it.
async fn contents(client: &Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let (kvs, _) = client.range(prefix, true, false).await.unwrap();
    kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

/// Submits `n` units, starts the even ones and loads every third, through
/// the registry as the API does; returns each unit's name and desired state.
async fn submit_units(client: &Client, n: usize) -> BTreeMap<String, String> {
    use flotilla::registry::ops;
    use flotilla::registry::records::DesiredState;
    use flotilla::units::{Unit, UnitName};
    for i in 0..n {
        let name = UnitName::parse(&format!("backup-{i}.service")).unwrap();
        let text = format!("[Service]\nExecStart=/bin/sleep {i}\n");
        let unit = Unit::from_text(&name, &text).unwrap();
        let desired = match i % 3 {
            0 => DesiredState::Launched,
            1 => DesiredState::Loaded,
            _ => DesiredState::Inactive,
        };
        ops::submit_as(client, &unit, desired).await.unwrap();
    }
    ops::unit_records(client)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.name.to_string(), format!("{} {}", r.desired, r.hash)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_live_cluster_restores_into_a_new_cluster() {
    let cluster = Cluster::start(3);
    cluster.leader(None).await;
    let client = Client::connect(&cluster.endpoints()).await.unwrap();
    let units = submit_units(&client, 30).await;
    // More writes than --snapshot-entries: the backup comes from a compacted log.
    for i in 0..80 {
        client.put(&format!("/k/{i}"), vec![b'v'; i]).await.unwrap();
    }
    let before = contents(&client, "/flotilla/units/").await;
    let raw = contents(&client, "/k/").await;
    let kept = tempfile::tempdir().unwrap();
    let file = kept.path().join("store.backup");
    let file_arg = file.to_str().unwrap();
    let out = cli(&cluster.endpoints(), &["snapshot", "save", file_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    // Written after the save: not in the backup.
    client.put("/k/later", b"x".to_vec()).await.unwrap();
    drop(cluster);

    let mut fresh = Cluster::prepare(3);
    // Bad input changes nothing: a damaged file, bad members.
    let damaged = fresh.root.path().join("damaged.backup");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() - 10]).unwrap();
    let dir0 = fresh.members[0].dir.to_str().unwrap().to_string();
    let restore = |file: &str, dir: &str, members: &str| {
        let args = [
            "snapshot",
            "restore",
            file,
            "--data-dir",
            dir,
            "--initial-cluster",
            members,
        ];
        cli(&[], &args)
    };
    let out = restore(damaged.to_str().unwrap(), &dir0, &fresh.initial);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("damaged"), "{err}");
    let out = restore(file_arg, &dir0, "m0");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !fresh.members[0].dir.exists(),
        "a refused restore made the data dir"
    );

    for i in 0..3 {
        let dir = fresh.members[i].dir.to_str().unwrap().to_string();
        let out = restore(file_arg, &dir, &fresh.initial);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = restore(file_arg, &dir0, &fresh.initial);
    assert_eq!(
        out.status.code(),
        Some(1),
        "restoring over a store is refused"
    );
    for i in 0..3 {
        fresh.boot(i);
    }
    fresh.leader(None).await;
    let client = Client::connect(&fresh.endpoints()).await.unwrap();
    assert_eq!(contents(&client, "/flotilla/units/").await, before);
    assert_eq!(
        contents(&client, "/k/").await,
        raw,
        "every key, and not /k/later"
    );
    let restored: BTreeMap<String, String> = flotilla::registry::ops::unit_records(&client)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.name.to_string(), format!("{} {}", r.desired, r.hash)))
        .collect();
    assert_eq!(
        restored, units,
        "every unit with its desired state and body"
    );
    client
        .put("/k/after-restore", b"ok".to_vec())
        .await
        .unwrap();
    assert_eq!(client.status().await.unwrap().members.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_recovers_a_survivor_of_a_lost_quorum() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader(None).await;
    let client = Client::connect(&cluster.endpoints()).await.unwrap();
    let mut acked = put_keys(&client, 120).await;
    drop(client);
    // The leader and another member die for good; a follower survives (its
    // own record of what was committed may lag the leader's).
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    for i in (0..3).filter(|i| *i != survivor) {
        cluster.kill9(i);
    }
    cluster.kill9(survivor);
    cluster.boot_with(survivor, "new", &["--force-new-cluster"]);
    let only = vec![cluster.members[survivor].client.clone()];
    let client = connect_when_up(&only[0]).await;
    caught_up(&client, &acked, "the forced survivor").await;
    let status = client.status().await.unwrap();
    assert_eq!(status.members.len(), 1, "{status:?}");
    client.put("/k/forced", b"ok".to_vec()).await.unwrap();
    acked.insert("/k/forced".to_string());

    // Two new members join the one-member cluster and catch up.
    let dead: Vec<usize> = (0..3).filter(|i| *i != survivor).collect();
    for _ in 0..2 {
        let added = cluster.add_member_via(&only).await;
        let newcomer = connect_when_up(&cluster.members[added].client).await;
        caught_up(&newcomer, &acked, "a member added after the recovery").await;
    }
    let status = client.status().await.unwrap();
    assert_eq!(status.members.len(), 3, "{status:?}");
    // Restarted without the flag, the survivor keeps the new membership.
    cluster.kill9(survivor);
    cluster.boot(survivor);
    let live: Vec<String> = (0..cluster.members.len())
        .filter(|i| !dead.contains(i))
        .map(|i| cluster.members[i].client.clone())
        .collect();
    let client = Client::connect(&live).await.unwrap();
    client.put("/k/after", b"ok".to_vec()).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.members.len(), 3, "{status:?}");
}

/// Issue 10, fail whole: a member whose disk fills up ends with a failure
/// status (so systemd restarts it) instead of staying up with its ports
/// bound, answering every request with an error; clients move on to the
/// members that still serve. (The request in the dying member's hands reads
/// "outcome unknown": `runner`'s unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_fills_exits_with_a_failure_and_clients_move_on() {
    let mut cluster = Cluster::prepare(3);
    cluster.members[0].disk_mib = Some(6);
    for i in 0..3 {
        cluster.boot(i);
    }
    cluster.leader(None).await;
    let client = Client::connect(&cluster.endpoints())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    let value = vec![0x33; 256 * 1024];
    let mut exited = None;
    for i in 0..200 {
        match client.put(&format!("/fill/{i}"), value.clone()).await {
            Ok(_) | Err(ClientError::Unknown(_)) => {}
            Err(e) => panic!("put {i}: {e}"),
        }
        let child = cluster.members[0].process.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
    }
    let log = std::fs::read_to_string(cluster.members[0].dir.with_extension("log")).unwrap();
    let status = exited.unwrap_or_else(|| panic!("the member with a full disk stayed up: {log}"));
    assert!(!status.success(), "it exited with {status}: {log}");
    assert!(
        log.contains("cannot go on") && log.contains("storage failed"),
        "the log says why: {log}"
    );
    cluster.members[0].process = None;
    // The other two go on; a client that lists the dead member first moves on.
    let after = Client::connect(&cluster.endpoints())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    // If the dead member led, the first put may meet the election that
    // follows ("outcome unknown"): the same put again is safe.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match after.put("/after", b"ok".to_vec()).await {
            Ok(_) => break,
            Err(e @ (ClientError::Unknown(_) | ClientError::NoLeader(_))) => {
                assert!(
                    Instant::now() < deadline,
                    "the survivors never took a put: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("put after the member died: {e}"),
        }
    }
    assert_eq!(after.get("/after").await.unwrap().unwrap().value, b"ok");
}

/// The body of `GET PATH` on the API socket `socket`; empty while nothing
/// answers.
async fn api_get(socket: &Path, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::UnixStream::connect(socket).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    if stream.write_all(request.as_bytes()).await.is_err()
        || stream.read_to_string(&mut response).await.is_err()
    {
        return String::new();
    }
    response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string()
}

/// One scrape of `GET /metrics` on the API socket `socket`; empty while
/// nothing answers.
async fn scrape(socket: &Path) -> Scrape {
    parse_metrics(&api_get(socket, "/metrics").await)
}

/// Scrapes `socket` until `check` holds of the scrape (the member publishes
/// its store figures about once a second); returns that scrape.
async fn scrape_until(socket: &Path, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = scrape(socket).await;
        if check(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics never showed {what}: {scrape:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const QUOTA_USED: &str = "flotilla_store_quota_used_bytes";
const ALARM: &str = "flotilla_store_nospace_alarm";

/// Issue 10, quota: 1 MiB puts against a member with a 4 MiB quota are
/// refused once the store is over it (the no-space alarm, shown by its
/// status, by `cluster health` and by `/metrics`), while reads and deletes
/// still work; a delete that brings the store back under the quota clears
/// the alarm. `/metrics` follows the quota's use throughout (issue 15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_over_the_quota_are_refused_until_a_delete_frees_space() {
    let mut cluster = Cluster::prepare(1);
    let socket = cluster.root.path().join("api.sock");
    cluster.members[0].env.extend([
        ("FLOTILLA_QUOTA_BYTES".into(), (4 << 20).to_string()),
        ("FLOTILLA_API_SOCKET".into(), socket.display().to_string()),
    ]);
    cluster.boot(0);
    cluster.leader(None).await;
    let empty = scrape_until(&socket, "the quota, its use and the alarm off", |s| {
        s.get(ALARM) == Some(&0.0) && s.contains_key(QUOTA_USED)
    })
    .await;
    assert_eq!(empty["flotilla_store_quota_bytes"], (4 << 20) as f64);
    assert!(empty[QUOTA_USED] < (1 << 20) as f64, "{empty:?}");
    let client = Client::connect(&cluster.endpoints()).await.unwrap();
    let value = vec![0x44; 1024 * 1024 - 64];
    let mut accepted = 0;
    let refused = loop {
        match client.put(&format!("/q/{accepted}"), value.clone()).await {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 20, "the quota never refused a put");
    };
    assert_eq!(accepted, 5, "puts are taken until the store is over 4 MiB");
    assert!(
        matches!(&refused, ClientError::Refused(m) if m.contains("no space") && m.contains("quota_bytes")),
        "{refused}"
    );
    let status = client.status().await.unwrap();
    assert!(status.no_space, "{status:?}");
    let revision = status.revision;
    // Refused again, and nothing changed; reads still work.
    assert!(client.put("/q/more", b"x".to_vec()).await.is_err());
    assert!(client.grant(Duration::from_secs(5)).await.is_err());
    assert_eq!(client.status().await.unwrap().revision, revision);
    assert_eq!(client.get("/q/0").await.unwrap().unwrap().value, value);
    let (code, report) = health(&cluster.endpoints());
    assert_ne!(code, Some(0), "{report}");
    assert!(report.to_string().contains("NOSPACE"), "{report}");
    let full = scrape_until(&socket, "the alarm on", |s| s.get(ALARM) == Some(&1.0)).await;
    assert!(full[QUOTA_USED] > (4 << 20) as f64, "{full:?}");
    let page = api_get(&socket, "/ui").await;
    assert!(page.contains("alarm: NOSPACE"), "the status page: {page}");
    // Deleting brings the store under its quota: the alarm clears.
    assert_eq!(client.delete("/q/0", false).await.unwrap(), 1);
    assert!(!client.status().await.unwrap().no_space);
    let freed = scrape_until(&socket, "the alarm off again", |s| {
        s.get(ALARM) == Some(&0.0)
    })
    .await;
    assert!(api_get(&socket, "/ui").await.contains("alarms: none"));
    // About: writes refused while the alarm was on (the daemon's own small
    // keys) may land once there is room again.
    assert!(
        freed[QUOTA_USED] <= full[QUOTA_USED] - (1 << 20) as f64 + 16384.0,
        "the delete freed about 1 MiB: {} then {}",
        full[QUOTA_USED],
        freed[QUOTA_USED]
    );
    client.put("/q/again", b"fits".to_vec()).await.unwrap();
}
