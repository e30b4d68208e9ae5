//! `flotilla lab` end to end, on real systemd as PID 1: every verb does what it
//! says, hosts are distinct machines, and `lab down` leaves nothing behind.
//!
//! These tests need root on Debian 12 (or a machine like it). They never skip:
//! if `lab doctor` fails, they fail with its report. One lab serves every step of
//! `lab_verbs_on_one_lab`, because booting is the expensive part; nextest runs the
//! `lab_*` binaries one test at a time (test group `lab` in .config/nextest.toml).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::{FLOTILLA, lab_in, text};

/// A lab in a temporary directory, torn down when dropped (also on panic).
struct Lab {
    dir: tempfile::TempDir,
    up: Value,
}

impl Lab {
    fn up(hosts: u16, extra: &[&str]) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-lab-test")
            .tempdir()
            .unwrap();
        doctor(dir.path());
        let hosts = hosts.to_string();
        let mut args = vec!["up", "--hosts", &hosts, "--ttl", "3"];
        args.extend(["--election-timeout-ms", "300"]);
        args.extend(extra);
        let started = Instant::now();
        let out = lab_in(dir.path(), &args);
        assert!(out.status.success(), "lab up failed: {}", text(&out.stderr));
        eprintln!("lab up --hosts {hosts}: {:?}", started.elapsed());
        let stdout = text(&out.stdout);
        assert_eq!(stdout.trim().lines().count(), 1, "one JSON line: {stdout}");
        let up: Value = serde_json::from_str(&stdout).expect("lab up prints JSON");
        Lab { dir, up }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `flotilla lab ARGS --dir DIR`.
    fn run(&self, args: &[&str]) -> Output {
        lab_in(self.path(), args)
    }

    /// Runs a `lab` verb that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "flotilla lab {}: {}{}",
            args.join(" "),
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs a command inside a host.
    fn exec(&self, host: &str, command: &[&str]) -> Output {
        let mut args = vec!["exec", host, "--"];
        args.extend(command);
        self.run(&args)
    }

    /// Runs a shell snippet inside a host; must succeed; returns its trimmed stdout.
    fn sh(&self, host: &str, script: &str) -> String {
        let out = self.exec(host, &["sh", "-c", script]);
        assert!(
            out.status.success(),
            "{host}: {script}: {}",
            text(&out.stderr)
        );
        text(&out.stdout).trim().to_string()
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status"])).expect("lab status prints JSON")
    }

    fn host_status(&self, name: &str) -> Value {
        let status = self.status();
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    }

    fn ip(&self, name: &str) -> String {
        self.up_host(name)["ip"].as_str().unwrap().to_string()
    }

    fn up_host(&self, name: &str) -> &Value {
        self.up["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap()
    }

    /// Whether `from` can open a TCP connection to `to`'s sshd within a second.
    /// Inside the lab a connection takes milliseconds, but the first SYN after a
    /// heal may wait for ARP and a one-second retransmission, so positive checks
    /// retry ([`Lab::comes_to_reach`]).
    fn reaches(&self, from: &str, to: &str) -> bool {
        let probe = format!("</dev/tcp/{}/22", self.ip(to));
        self.exec(from, &["timeout", "1", "bash", "-c", &probe])
            .status
            .success()
    }

    /// Whether `from` reaches `to` within a few seconds.
    fn comes_to_reach(&self, from: &str, to: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.reaches(from, to) {
                return true;
            }
        }
        false
    }

    fn boot_id(&self, name: &str) -> String {
        self.sh(name, "cat /run/flotilla/boot_id")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the logs and the hosts' journals of a failed test.
            let _ = self.run(&["down", "--keep-disks"]);
            self.dir.disable_cleanup(true);
            eprintln!(
                "lab kept for inspection: {} (logs/, hosts/*/upper/var/log/journal)",
                self.path().display()
            );
        } else {
            let _ = self.run(&["down"]);
        }
    }
}

/// `lab doctor --install` must pass: a lab test fails, never skips, without it.
fn doctor(dir: &Path) {
    let out = lab_in(dir, &["doctor", "--install"]);
    assert!(
        out.status.success(),
        "lab doctor failed; this machine cannot run lab tests:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `flotilla --store-endpoint E ARGS...`: the store verbs (kv, member), as
/// the lab's admin.
fn flotilla(lab: &Lab, endpoint: &str, args: &[&str]) -> Output {
    let tls = |key: &str| lab.up[key].as_str().unwrap().to_string();
    Command::new(FLOTILLA)
        .env("FLOTILLA_TLS_CA", tls("tls_ca"))
        .env("FLOTILLA_TLS_CERT", tls("tls_cert"))
        .env("FLOTILLA_TLS_KEY", tls("tls_key"))
        .arg("--store-endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .unwrap()
}

/// Retries `check` until it returns `Some`, or panics after `timeout`.
fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// The namespaces a process is in, as "net:[4026532...]" strings.
fn namespaces(pid: u64) -> BTreeSet<String> {
    ["net", "mnt", "pid", "uts", "ipc"]
        .iter()
        .filter_map(|ns| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok())
        .map(|link| link.display().to_string())
        .collect()
}

/// Every namespace any process on the machine is in.
fn all_namespaces() -> BTreeSet<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .flat_map(namespaces)
        .collect()
}

fn ssh(lab: &Lab, host: &str, command: &str) -> Output {
    Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["-o", "ConnectTimeout=5", "-i"])
        .arg(lab.up["ssh_key"].as_str().unwrap())
        .arg(format!("root@{}", lab.ip(host)))
        .arg(command)
        .output()
        .unwrap()
}

/// Host key fingerprints as the network sees them (ssh-keyscan from outside).
fn host_keys(ip: &str) -> BTreeSet<String> {
    let scan = Command::new("ssh-keyscan")
        .args(["-T", "5", ip])
        .output()
        .unwrap();
    let keys: BTreeSet<String> = text(&scan.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    assert!(
        !keys.is_empty(),
        "no host keys from {ip}: {}",
        text(&scan.stderr)
    );
    keys
}

/// The outer machine's own host keys (public halves).
fn outer_host_keys() -> BTreeSet<String> {
    std::fs::read_dir("/etc/ssh")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with("_key.pub"))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            text.split_whitespace().nth(1).map(str::to_string)
        })
        .collect()
}

fn step(name: &str, started: Instant) {
    eprintln!("[{:6.2}s] {name}", started.elapsed().as_secs_f64());
}

#[test]
fn lab_verbs_on_one_lab() {
    let started = Instant::now();
    let lab = Lab::up(4, &[]);
    step("up", started);

    // up: the JSON interface, and a cluster usable from the outer machine.
    let hosts = lab.up["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 4);
    for host in hosts {
        for key in ["name", "machine_id", "ip", "pid"] {
            assert!(!host[key].is_null(), "{key} missing in {host}");
        }
        assert!(alive(host["pid"].as_u64().unwrap()));
    }
    assert!(Path::new(lab.up["ssh_key"].as_str().unwrap()).exists());
    let endpoint = lab.up["store_endpoint"].as_str().unwrap().to_string();
    assert_eq!(
        endpoint.split(',').count(),
        3,
        "the first 3 hosts serve Raft"
    );
    let members = flotilla(&lab, &endpoint, &["member", "list"]);
    let members = text(&members.stdout);
    assert_eq!(
        members.lines().filter(|l| l.contains(" h")).count(),
        3,
        "{members}"
    );
    assert!(members.contains("yes"), "a leader: {members}");
    let put = flotilla(&lab, &endpoint, &["kv", "put", "lab/key", "value"]);
    assert!(put.status.success(), "{}", text(&put.stderr));
    // h4 holds no Raft seat but runs flotilla all the same: its agent.
    assert_eq!(
        lab.sh("h4", "systemctl is-active flotilla || true"),
        "active"
    );
    let config = lab.sh("h4", "cat /etc/flotilla/flotilla.toml");
    assert!(
        config.contains("endpoints = "),
        "an agent-only host: {config}"
    );
    assert!(!config.contains("initial_cluster"), "{config}");

    // exec: runs inside the host, as PID 1's namespaces and root, exit code passed through.
    let out = lab.exec("h1", &["sh", "-c", "echo inside; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stdout), "inside\n");
    assert_eq!(lab.sh("h2", "hostname"), "h2");
    assert_eq!(lab.sh("h2", "cat /proc/1/comm"), "systemd");
    assert_eq!(
        lab.sh("h2", "systemd-detect-virt --container || true"),
        "container-other"
    );
    assert!(!lab.run(&["exec", "h9", "--", "true"]).status.success());
    step("exec", started);

    // Each host is its own machine: machine-id, ssh host keys, root accepts the lab's key.
    let outer_keys = outer_host_keys();
    let mut all_keys = BTreeSet::new();
    let mut machine_ids = BTreeSet::new();
    for host in hosts {
        let name = host["name"].as_str().unwrap();
        let machine_id = host["machine_id"].as_str().unwrap();
        assert_eq!(lab.sh(name, "cat /etc/machine-id"), machine_id);
        machine_ids.insert(machine_id.to_string());
        let keys = host_keys(&lab.ip(name));
        assert!(
            keys.is_disjoint(&outer_keys),
            "{name} uses the outer machine's host key"
        );
        assert!(keys.is_disjoint(&all_keys), "{name} shares a host key");
        all_keys.extend(keys);
        assert_eq!(
            lab.sh(name, "ls /etc/ssh | grep -c '^ssh_host_.*_key$' || true"),
            "2",
            "{name}: only its own ed25519 and ecdsa keys are visible"
        );
    }
    assert_eq!(machine_ids.len(), 4);
    let login = ssh(&lab, "h3", "cat /etc/machine-id");
    assert!(login.status.success(), "ssh: {}", text(&login.stderr));
    assert_eq!(text(&login.stdout).trim(), lab.up_host("h3")["machine_id"]);
    step("identities and ssh", started);

    // partition / heal: the link is cut both ways, the host keeps running.
    assert!(lab.comes_to_reach("h1", "h2"));
    lab.ok(&["partition", "h1"]);
    assert!(!lab.reaches("h1", "h2"), "h1 still reaches h2");
    assert!(!lab.reaches("h2", "h1"), "h2 still reaches h1");
    assert_eq!(lab.host_status("h1")["up"], true);
    assert_eq!(lab.host_status("h1")["partitioned"], true);
    lab.ok(&["heal", "h1"]);
    assert!(
        lab.comes_to_reach("h1", "h2"),
        "h1 does not reach h2 after heal"
    );
    assert!(
        lab.comes_to_reach("h2", "h1"),
        "h2 does not reach h1 after heal"
    );
    step("partition and heal", started);

    // kill / start: a hard power-off; the disk and machine-id survive, /run does not.
    lab.sh(
        "h3",
        "echo disk > /var/lib/flotilla/marker; echo ram > /run/marker",
    );
    let before = lab.host_status("h3");
    let old_pid = before["pid"].as_u64().unwrap();
    lab.ok(&["kill", "h3"]);
    let killed = lab.host_status("h3");
    assert_eq!(killed["up"], false);
    assert_eq!(killed["last_exit"], "killed");
    assert!(!alive(old_pid), "h3's old PID 1 still runs");
    assert!(
        !lab.exec("h3", &["true"]).status.success(),
        "exec into a dead host"
    );
    lab.ok(&["start", "h3"]);
    let started_again = lab.host_status("h3");
    assert_eq!(started_again["up"], true);
    assert_ne!(started_again["pid"], before["pid"]);
    assert_ne!(started_again["boot_id"], before["boot_id"]);
    assert_eq!(started_again["machine_id"], before["machine_id"]);
    assert_eq!(lab.sh("h3", "cat /var/lib/flotilla/marker"), "disk");
    assert_eq!(
        lab.sh("h3", "cat /run/marker 2>/dev/null || echo gone"),
        "gone"
    );
    let h3 = format!("{}:4001", lab.ip("h3"));
    eventually("h3 to serve the key again", Duration::from_secs(20), || {
        let out = flotilla(&lab, &h3, &["kv", "get", "--serializable", "lab/key"]);
        (text(&out.stdout).trim() == "value").then_some(())
    });
    step("kill and start", started);

    // reboot by the lab: systemd shuts down, the lab boots it again.
    let before = lab.boot_id("h2");
    lab.ok(&["reboot", "h2"]);
    let after = lab.boot_id("h2");
    assert_ne!(before, after, "lab reboot did not give a new boot id");
    let status = lab.host_status("h2");
    assert_eq!(status["boot_id"], after);
    assert_eq!(status["up"], true);
    step("lab reboot", started);

    // reboot from inside the host: the lab honours it.
    let before = lab.host_status("h4");
    let _ = lab.exec("h4", &["systemctl", "reboot"]);
    let after = eventually("h4 to come back", Duration::from_secs(30), || {
        let now = lab.host_status("h4");
        (now["up"] == true && now["boot_id"] != before["boot_id"]).then_some(now)
    });
    assert_eq!(
        after["boots"].as_u64(),
        before["boots"].as_u64().map(|b| b + 1)
    );
    eventually("h4 to accept commands", Duration::from_secs(20), || {
        let out = lab.exec("h4", &["cat", "/run/flotilla/boot_id"]);
        (text(&out.stdout).trim() == after["boot_id"]).then_some(())
    });
    step("host-initiated reboot", started);

    // down: nothing left behind.
    let status = lab.status();
    let lab_pids: Vec<u64> = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["pid"].as_u64())
        .collect();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.path().join("lab.json")).unwrap())
            .unwrap();
    let supervisor = state["supervisor_pid"].as_u64().unwrap();
    let switch = state["switch_pid"].as_u64().unwrap();
    let mut lab_namespaces = BTreeSet::new();
    for pid in lab_pids.iter().chain([&switch]) {
        lab_namespaces.extend(namespaces(*pid));
    }
    lab_namespaces = &lab_namespaces - &namespaces(u64::from(std::process::id()));
    assert!(lab_namespaces.len() >= 4 * 5, "{lab_namespaces:?}");
    let id = uplink_of(lab.path());
    lab.ok(&["down"]);
    for pid in lab_pids.iter().chain([&supervisor, &switch]) {
        assert!(!alive(*pid), "process {pid} survived lab down");
    }
    let left = &lab_namespaces & &all_namespaces();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert_no_traces(lab.path(), &id);
    // down is idempotent.
    lab.ok(&["down"]);
    step("down", started);
}

/// The lab's id, from the name of its uplink interface.
fn uplink_of(dir: &Path) -> String {
    let links = Command::new("ip")
        .args(["-o", "-4", "addr"])
        .output()
        .unwrap();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap()).unwrap();
    let subnet = state["subnet"].as_array().unwrap();
    let prefix = format!("{}.{}.{}.254/24", subnet[0], subnet[1], subnet[2]);
    let line = text(&links.stdout)
        .lines()
        .find(|l| l.contains(&prefix))
        .unwrap_or_else(|| panic!("no uplink with {prefix}"))
        .to_string();
    let name = line.split_whitespace().nth(1).unwrap();
    name.strip_prefix("flup")
        .expect("uplinks are named flup<id>")
        .to_string()
}

/// No mount, cgroup or interface of the lab `id` in `dir` exists.
fn assert_no_traces(dir: &Path, id: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir_text = dir.to_string_lossy();
    let stray: Vec<&str> = mounts.lines().filter(|l| l.contains(&*dir_text)).collect();
    assert!(stray.is_empty(), "mounts left behind: {stray:?}");
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = text(&links.stdout);
    assert!(!links.contains(id), "interfaces left behind: {links}");
    let mut cgroups: Vec<PathBuf> = Vec::new();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let candidate = hierarchy.path().join(format!("flotilla-lab-{id}"));
        if candidate.exists() {
            cgroups.push(candidate);
        }
    }
    let top = Path::new("/sys/fs/cgroup").join(format!("flotilla-lab-{id}"));
    if top.exists() {
        cgroups.push(top);
    }
    assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
}

#[test]
fn lab_two_labs_side_by_side() {
    let a = Lab::up(1, &[]);
    let b = Lab::up(1, &[]);
    let ip_a = a.ip("h1");
    let ip_b = b.ip("h1");
    let subnet = |ip: &str| ip.rsplit_once('.').unwrap().0.to_string();
    assert_ne!(subnet(&ip_a), subnet(&ip_b), "two labs share a subnet");
    let (id_a, id_b) = (uplink_of(a.path()), uplink_of(b.path()));
    assert_ne!(id_a, id_b, "two labs share interface names");
    // Each lab's cluster works from outside; neither lab reaches the other.
    for lab in [&a, &b] {
        let out = flotilla(
            lab,
            lab.up["store_endpoint"].as_str().unwrap(),
            &["member", "list"],
        );
        assert!(text(&out.stdout).contains("yes"), "{}", text(&out.stderr));
    }
    let probe = format!("</dev/tcp/{ip_b}/22");
    let crossed = a.exec("h1", &["timeout", "2", "bash", "-c", &probe]);
    assert!(!crossed.status.success(), "lab a reached lab b");
    // Tearing one down leaves the other running.
    a.ok(&["down"]);
    assert_no_traces(a.path(), &id_a);
    assert_eq!(b.host_status("h1")["up"], true);
    b.ok(&["down"]);
    assert_no_traces(b.path(), &id_b);
}
