//! A rolling upgrade (issue 15): a 3-host lab booted on the previous tagged
//! release, v0.1.0, is upgraded to the binary under test one host at a time
//! while units run (some with `Conflicts=`). On each host the binary is
//! replaced and flotilla restarted, as a package upgrade does; the host must
//! rejoin and the cluster be healthy before the next. After every step no
//! unit was stopped or restarted (systemd's ActiveEnterTimestamp unchanged,
//! each unit active on exactly one host, the same one), the cluster has a
//! leader, and it took writes all along (a writer keeps putting through every
//! restart); after the last host a new unit starts.
//!
//! The old release is built from git: the tag `v0.1.0`, or its commit
//! [`RELEASE_COMMIT`] when a clone lacks the tag, extracted with `git archive`
//! and built (the binary only, dev profile, not incremental) into the target
//! dir of the build under test, reusing the dependencies built there (see
//! [`previous_release`]); later runs find it built. Without git or that commit
//! the test fails saying so: it never passes without upgrading anything.
//!
//! Root on Debian 12 is needed; nextest runs the lab binaries one test at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod support;

use support::cluster::{Cluster, wait_for, wait_for_state};
use support::{FLOTILLA, HELLO, text};

/// The release upgraded from.
const RELEASE: &str = "v0.1.0";
/// The commit `v0.1.0` tags, an ancestor of main, so any full clone has it.
const RELEASE_COMMIT: &str = "ddb483f";

const PLAIN: &str = "[Service]\nExecStart=/bin/sleep infinity\n";

/// Runs git in the repository; its stdout, or why it failed.
fn git(repo: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git ({e}); install git"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "git {}: {}",
            args.join(" "),
            text(&out.stderr).trim()
        ))
    }
}

/// The full hash of the release's commit: the tag's, else [`RELEASE_COMMIT`]'s.
fn release_commit(repo: &Path) -> String {
    let resolve = |name: &str| {
        git(
            repo,
            &["rev-parse", "--verify", &format!("{name}^{{commit}}")],
        )
        .map(|out| text(&out).trim().to_string())
    };
    resolve(RELEASE)
        .or_else(|tag| resolve(RELEASE_COMMIT).map_err(|commit| format!("{tag}; {commit}")))
        .unwrap_or_else(|why| {
            panic!(
                "the rolling-upgrade test needs flotilla {RELEASE} (tag {RELEASE} or commit \
                 {RELEASE_COMMIT}) from the git repository at {}, and found neither: {why}. \
                 Run it in a full clone (git fetch --unshallow --tags)",
                repo.display()
            )
        })
}

/// The name the release's binary is built under: its own, so that building
/// it in the target dir of the build under test never overwrites that one's
/// `flotilla` (other tests run it meanwhile).
const RELEASE_BIN: &str = "flotilla-previous-release";

/// Builds the release's `flotilla` binary (once; later runs find it built)
/// and returns its path.
///
/// The release's source goes to `TARGET/previous-release/src-COMMIT/` (from
/// `git archive`), its `[[bin]]` renamed [`RELEASE_BIN`], and is built with
/// `cargo build --bin` (dev profile) into the target dir of the build under
/// test: the dependencies both share (same versions, features and profile)
/// are already built there, so only flotilla itself and the few dependencies
/// whose features differ compile. Its library's artifacts never mix with the
/// build under test's (a package from another path hashes apart).
fn previous_release() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let commit = release_commit(repo);
    // FLOTILLA is TARGET/PROFILE/flotilla.
    let target = Path::new(FLOTILLA)
        .parent()
        .and_then(Path::parent)
        .expect("the binary under test lives in TARGET/PROFILE/");
    let source = target
        .join("previous-release")
        .join(format!("src-{}", &commit[..12]));
    let done = source.join(".extracted");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&source);
        std::fs::create_dir_all(&source).unwrap();
        let archive = git(repo, &["archive", "--format=tar", &commit])
            .unwrap_or_else(|why| panic!("cannot extract {RELEASE}: {why}"));
        let mut tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&source)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("tar runs");
        std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &archive).unwrap();
        drop(tar.stdin.take());
        assert!(
            tar.wait().unwrap().success(),
            "tar could not extract {RELEASE}"
        );
        let manifest = source.join("Cargo.toml");
        let toml = std::fs::read_to_string(&manifest).unwrap();
        let bin = "[[bin]]\nname = \"flotilla\"\n";
        assert!(
            toml.contains(bin),
            "{RELEASE}'s Cargo.toml names its binary as expected"
        );
        let renamed = toml.replace(bin, &format!("[[bin]]\nname = \"{RELEASE_BIN}\"\n"));
        std::fs::write(&manifest, renamed).unwrap();
        std::fs::write(&done, &commit).unwrap();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let started = Instant::now();
    // At a lower priority: the tests outside the lab group run meanwhile,
    // and their Raft timers should not starve behind a compiler.
    let mut build = Command::new("nice");
    build.args(["-n", "10"]).arg(cargo);
    // The variables cargo and nextest set for this test (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, OUT_DIR, ...) go: build scripts rerun when they change
    // (ring's does), which would rebuild the shared dependencies here and
    // again in the next build of the checkout.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let per_test = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CFG_",
            "CARGO_FEATURE_",
            "NEXTEST",
            "__NEXTEST",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref());
        if per_test {
            build.env_remove(name.as_ref());
        }
    }
    let built = build
        .args(["build", "--locked", "--bin", RELEASE_BIN, "--manifest-path"])
        .arg(source.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target)
        .env_remove("CARGO_BUILD_TARGET_DIR")
        // Built once: incremental state would only cost time and disk.
        .env("CARGO_INCREMENTAL", "0")
        .output()
        .expect("nice and cargo run");
    assert!(
        built.status.success(),
        "building flotilla {RELEASE} ({commit}) failed: {}",
        text(&built.stderr)
    );
    let compiled = text(&built.stderr)
        .lines()
        .filter(|l| l.trim_start().starts_with("Compiling "))
        .count();
    eprintln!(
        "flotilla {RELEASE} ({}) built in {:.1} s ({compiled} crates compiled)",
        &commit[..12],
        started.elapsed().as_secs_f64()
    );
    target.join("debug").join(RELEASE_BIN)
}

/// Where each running unit is, and when systemd last entered `active` for
/// it, read from systemd on every host; a unit active on two hosts fails.
fn running(cluster: &Cluster) -> BTreeMap<String, (String, String)> {
    let mut units = BTreeMap::new();
    for host in &cluster.hosts {
        let mut here = cluster.systemd_active(&host.name, "hello@*");
        here.extend(cluster.systemd_active(&host.name, "plain@*"));
        for unit in here {
            let entered = cluster.entered(&host.name, &unit);
            if let Some((other, _)) = units.insert(unit.clone(), (host.name.clone(), entered)) {
                panic!("{unit} is active on both {other} and {}", host.name);
            }
        }
    }
    units
}

/// The sha-256 of a file, in hex, as `sha256sum` prints it.
fn sha256(path: &Path) -> String {
    let digest = Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha-256 of the binary flotilla.service runs on `host` now.
fn running_binary(cluster: &Cluster, host: &str) -> String {
    let out = cluster.sh(
        host,
        "sha256sum < /proc/$(systemctl show -P MainPID flotilla)/exe",
    );
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Every host runs the binary whose sha-256 is `sha`.
fn assert_every_host_runs(cluster: &Cluster, sha: &str) {
    for host in &cluster.hosts {
        let running = running_binary(cluster, &host.name);
        assert_eq!(running, sha, "the binary {} runs", host.name);
    }
}

/// Puts a key through the store every 100 ms until `stop`, each put retried
/// until it is taken; returns how many were taken and the longest time one
/// needed. A put not taken within 20 s fails the test.
fn writer(cluster: &Cluster, stop: &AtomicBool) -> (u32, Duration) {
    let (mut taken, mut longest) = (0, Duration::ZERO);
    while !stop.load(Ordering::Relaxed) {
        let key = format!("/upgrade/writes/{taken}");
        let started = Instant::now();
        loop {
            let out = cluster.flotilla(&["kv", "put", &key, "x"]);
            if out.status.success() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the cluster took no write for 20 s during the upgrade: {}",
                text(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        taken += 1;
        longest = longest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    (taken, longest)
}

/// The lab's endpoint list (one API per host, in host order) with host
/// number `index`'s API asked over HTTPS.
fn https_for_host(endpoints: &str, index: usize) -> String {
    endpoints
        .split(',')
        .enumerate()
        .map(|(i, e)| match e.strip_prefix("http://") {
            Some(rest) if i == index => format!("https://{rest}"),
            _ => e.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Sets its flag when dropped: stops the writer however the step ends.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_rolling_upgrade_from_the_previous_release_moves_and_restarts_nothing() {
    let old = previous_release();
    let new_sha = sha256(Path::new(FLOTILLA));
    let old_sha = sha256(&old);
    let version = Command::new(&old).arg("--version").output().unwrap();
    eprintln!(
        "upgrading from {} ({}) to the binary under test ({})",
        text(&version.stdout).trim(),
        &old_sha[..12],
        &new_sha[..12]
    );

    // Three hosts, all Raft servers, on the old release; a presence TTL of
    // 10 s, which a restart stays well within (the agent adopts its lease).
    let mut cluster = Cluster::up_on(&old, 3, 3, 10);
    assert_every_host_runs(&cluster, &old_sha);
    cluster.submit(&[("hello@.service", HELLO), ("plain@.service", PLAIN)]);
    cluster.ok(&[
        "start", "hello@1", "hello@2", "hello@3", "plain@1", "plain@2", "plain@3",
    ]);
    let (before, _) = wait_for(Duration::from_secs(30), "6 units active", || {
        let units = running(&cluster);
        (units.len() == 6).then_some(units)
    });
    let hello_hosts: Vec<&String> = before
        .iter()
        .filter(|(unit, _)| unit.starts_with("hello@"))
        .map(|(_, (host, _))| host)
        .collect();
    assert_eq!(hello_hosts.len(), 3, "{before:?}");
    assert!(
        hello_hosts
            .iter()
            .all(|h| hello_hosts.iter().filter(|o| o == &h).count() == 1),
        "the conflicting units are spread, one per host: {before:?}"
    );

    for (step, host) in cluster.hosts.iter().map(|h| h.name.clone()).enumerate() {
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let (taken, longest) = std::thread::scope(|scope| {
            let writes = scope.spawn(|| writer(&cluster, &stop));
            // A failed check below must stop the writer too, or the scope
            // waits for it forever instead of failing the test.
            let _stop_on_panic = StopOnDrop(&stop);
            // Let the writer take a few writes before the restart.
            std::thread::sleep(Duration::from_millis(500));
            // As a package upgrade does: the new binary beside the old one,
            // renamed over it (the running daemon keeps its old inode; the
            // other hosts' hard links to the lab's copy are untouched), and
            // the daemon restarted.
            cluster.copy_in(
                &host,
                Path::new(FLOTILLA),
                "/usr/bin/flotilla.new",
                "chmod 755 /usr/bin/flotilla.new && mv -f /usr/bin/flotilla.new /usr/bin/flotilla \
                 && systemctl restart flotilla",
            );
            let machine = cluster.id_of(&host).to_string();
            let rejoined = format!("{host} to rejoin");
            wait_for_state(Duration::from_secs(30), &rejoined, || {
                let binary = running_binary(&cluster, &host) == new_sha;
                // Asked of the store: this host's API changes protocol.
                let health = cluster.flotilla(&["cluster", "health", "--json"]);
                let report: serde_json::Value =
                    serde_json::from_slice(&health.stdout).unwrap_or_default();
                let present = report["machines"]["live"]
                    .as_array()
                    .is_some_and(|live| live.iter().any(|m| m == machine.as_str()));
                if binary && present && health.status.success() {
                    return Ok(());
                }
                Err(format!(
                    "runs the new binary: {binary}; present: {present}; cluster health: {}{}",
                    text(&health.stdout),
                    text(&health.stderr)
                ))
            });
            // Keep writing a little past the rejoin, then stop the writer.
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::Relaxed);
            writes.join().expect("the writer failed")
        });
        eprintln!(
            "step {}: {host} upgraded and healthy in {:.1} s; {taken} writes taken meanwhile, \
             the slowest in {longest:?}",
            step + 1,
            started.elapsed().as_secs_f64()
        );
        assert!(taken >= 2, "the writer got writes through: {taken}");
        // With TLS on, this release serves the API's TCP port over HTTPS
        // where v0.1.0 spoke HTTP with a token: a client switches the
        // upgraded host's endpoint to https:// (docs/operations.md).
        cluster.endpoint = https_for_host(&cluster.endpoint, step);

        // Nothing stopped, restarted or moved; the store agrees they run.
        assert_eq!(running(&cluster), before, "after upgrading {host}");
        wait_for(
            Duration::from_secs(15),
            "list-units to show 6 active",
            || {
                let rows = cluster.try_rows()?;
                (rows
                    .iter()
                    .filter(|r| r.active.as_deref() == Some("active"))
                    .count()
                    == 6)
                    .then_some(())
            },
        );
        // A leader, and an API write goes through.
        let leader = cluster.leader();
        let unit = format!("after-step-{}.service", step + 1);
        cluster.submit(&[(&unit, PLAIN)]);
        eprintln!("step {}: leader {leader}; {unit} submitted", step + 1);
    }
    assert_every_host_runs(&cluster, &new_sha);

    // Upgraded everywhere: a new unit starts, and the conflicting ones
    // still keep to one per host.
    cluster.ok(&["start", "plain@4"]);
    let (after, _) = wait_for(Duration::from_secs(30), "plain@4 active", || {
        let units = running(&cluster);
        units.contains_key("plain@4.service").then_some(units)
    });
    let mut expected = before.clone();
    expected.insert("plain@4.service".into(), after["plain@4.service"].clone());
    assert_eq!(after, expected);
}
