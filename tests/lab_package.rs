//! The Debian package end to end: `scripts/deb.sh` packages the binary under
//! test; the package is installed with dpkg inside an agent-only lab host
//! whose hand-installed flotilla was removed first; configured to join the
//! lab's cluster, its daemon (the packaged unit, the packaged binary) shows in
//! `list-machines` and runs a unit. The same daemon proves the log format
//! under systemd: journald files each line under its level's priority with no
//! timestamp of ours, and a SIGHUP (`systemctl reload`) changes the filter.
//! Removing the package stops the daemon and leaves its unit running.
//!
//! Root on Debian 12 is needed; nextest runs the lab binaries one test at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

mod support;

use support::cluster::{Cluster, wait_for};
use support::{FLOTILLA, text};

const HOST: &str = "h2";

/// Builds the package of the binary under test; returns its path.
fn build_package(out: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deb.sh");
    let built = Command::new("bash")
        .arg(script)
        .args(["--binary", FLOTILLA, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/deb.sh failed: {}",
        text(&built.stderr)
    );
    let path = text(&built.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    PathBuf::from(path)
}

/// The journal entries of the daemon's current run, as JSON objects.
fn journal(cluster: &Cluster) -> Vec<Value> {
    let invocation = cluster.sh(HOST, "systemctl show -P InvocationID flotilla");
    let out = cluster.sh(
        HOST,
        &format!(
            "journalctl --no-pager -o json _SYSTEMD_INVOCATION_ID={}",
            invocation.trim()
        ),
    );
    out.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The journal entry whose MESSAGE contains `needle`, if any.
fn entry<'a>(entries: &'a [Value], needle: &str) -> Option<&'a Value> {
    entries
        .iter()
        .find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains(needle)))
}

fn priority(entry: &Value) -> &str {
    entry["PRIORITY"].as_str().unwrap_or("none")
}

#[test]
fn the_package_installs_joins_the_cluster_and_runs_a_unit() {
    let out = tempfile::tempdir().unwrap();
    let deb = build_package(out.path());
    // h1 is the store; h2 is an agent-only host.
    let cluster = Cluster::up_with(2, 1, 3);
    let machine = cluster.id_of(HOST).to_string();

    // Take the lab's own flotilla off h2 (its unit, binary and config); the
    // data directory, this machine's identity, stays, as on an upgrade.
    cluster.sh(
        HOST,
        "systemctl stop flotilla && rm /etc/systemd/system/flotilla.service \
         /usr/bin/flotilla /etc/flotilla/flotilla.toml && systemctl daemon-reload",
    );
    cluster.copy_in(HOST, &deb, "/root/flotilla.deb", "");
    let installed = cluster.sh(HOST, "dpkg -i /root/flotilla.deb 2>&1");
    assert!(
        installed.contains("systemctl enable --now flotilla"),
        "{installed}"
    );

    // Everything is where the package says, and nothing started by itself.
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/flotilla.toml"))
            .unwrap();
    assert_eq!(cluster.sh(HOST, "cat /etc/flotilla/flotilla.toml"), shipped);
    let version = cluster.sh(HOST, "/usr/bin/flotilla --version");
    assert!(version.starts_with("flotilla "), "{version}");
    cluster.sh(
        HOST,
        "grep -q list-machines /usr/share/bash-completion/completions/flotilla && \
         test -s /usr/share/zsh/vendor-completions/_flotilla && \
         test -s /usr/share/fish/vendor_completions.d/flotilla.fish && \
         zcat /usr/share/man/man1/flotilla.1.gz | grep -q '^.TH flotilla 1' && \
         test -s /usr/share/man/man1/flotilla-start.1.gz && \
         test \"$(stat -c %a /var/lib/flotilla)\" = 700",
    );
    let state = cluster.sh(
        HOST,
        "systemctl is-enabled flotilla; systemctl is-active flotilla; true",
    );
    assert_eq!(
        state.split_whitespace().collect::<Vec<_>>(),
        ["disabled", "inactive"]
    );

    // Configure it as an agent of the lab's store, with the agent
    // certificate the lab issued it, and start it.
    let h1 = cluster.store_endpoint.split(',').next().unwrap();
    let tls = format!(
        "tls_ca = \"/etc/flotilla/tls/ca.pem\"\\ntls_cert = \"/etc/flotilla/tls/{machine}.pem\"\\n\
         tls_key = \"/etc/flotilla/tls/{machine}.key\"\\n"
    );
    cluster.sh(HOST,
        &format!(
            "printf 'endpoints = \"{h1}\"\\nttl_secs = 3\\n{tls}[metadata]\\ninstalled = \"deb\"\\n' \
             > /etc/flotilla/flotilla.toml && systemctl enable --now flotilla"
        ),
    );
    let unit = cluster.sh(
        HOST,
        "systemctl show -P FragmentPath flotilla; \
         readlink /proc/$(systemctl show -P MainPID flotilla)/exe",
    );
    let lines: Vec<&str> = unit.lines().collect();
    assert!(
        lines[0].ends_with("lib/systemd/system/flotilla.service"),
        "the packaged unit runs: {unit}"
    );
    assert_eq!(lines[1], "/usr/bin/flotilla", "the packaged binary runs");

    // Listed by list-machines, with the metadata only the new config has.
    wait_for(
        Duration::from_secs(15),
        "h2 listed with installed=deb",
        || {
            let out = cluster.flotilla(&["list-machines", "--json", "--full"]);
            let rows: Value = serde_json::from_slice(&out.stdout).ok()?;
            rows.as_array()?
                .iter()
                .any(|r| r["machine"] == machine.as_str() && r["metadata"]["installed"] == "deb")
                .then_some(())
        },
    );

    // Logs under systemd: an info line is priority 6, without a timestamp
    // or a level word of ours; at the info filter no debug line shows.
    let entries = journal(&cluster);
    let serving = entry(&entries, "agent-only host").expect("the daemon's start-up line");
    assert_eq!(priority(serving), "6", "{serving}");
    let message = serving["MESSAGE"].as_str().unwrap();
    assert!(
        message.starts_with("flotilla::daemon: agent-only host"),
        "no timestamp, level or priority left in the message: {message:?}"
    );
    assert!(
        !entries.iter().any(|e| priority(e) == "7"),
        "debug lines at the info filter"
    );

    // SIGHUP applies a new filter: the unit's start is then logged at debug.
    cluster.sh(
        HOST,
        "sed -i '1i log = \"flotilla=debug\"' /etc/flotilla/flotilla.toml && \
         systemctl reload flotilla",
    );
    wait_for(Duration::from_secs(10), "the new filter applied", || {
        entry(&journal(&cluster), "log filter is now").map(|_| ())
    });
    cluster.submit(&[(
        "packaged.service",
        "[Service]\nExecStart=/bin/sleep infinity\n[X-Fleet]\nMachineMetadata=installed=deb\n",
    )]);
    cluster.ok(&["start", "packaged.service"]);
    assert_eq!(
        cluster.systemd_active(HOST, "packaged.service"),
        ["packaged.service"]
    );
    let entries = journal(&cluster);
    let debug = entries
        .iter()
        .find(|e| priority(e) == "7")
        .expect("a debug line after the reload");
    assert!(
        debug["MESSAGE"].as_str().unwrap().starts_with("flotilla::"),
        "{debug}"
    );

    // Removing the package stops the daemon; the unit it started runs on.
    cluster.sh(HOST, "dpkg -r flotilla");
    let after = cluster.sh(
        HOST,
        "systemctl is-active flotilla; test -e /usr/bin/flotilla && echo binary-left; \
         test -e /etc/flotilla/flotilla.toml && echo config-kept; true",
    );
    assert_eq!(
        after.split_whitespace().collect::<Vec<_>>(),
        ["inactive", "config-kept"]
    );
    assert_eq!(
        cluster.systemd_active(HOST, "packaged.service"),
        ["packaged.service"]
    );
}
