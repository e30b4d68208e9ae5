//! The lab's network: a bridge in a network namespace the lab made (the
//! "switch"), one veth pair per host boot, and an uplink veth to the outer
//! machine's root namespace so `flotilla --endpoint` works from outside.
//!
//! Addresses are 10.X.Y.0/24, X and Y from the hash of the lab's directory,
//! skipping any /24 the outer machine already routes (another lab's, say). Hosts
//! are .1 to .N, the outer machine's end of the uplink .254. Hosts get no default
//! route, so nothing they send can leave the lab. When the switch namespace's
//! holder dies, the kernel destroys the bridge and every veth with it.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::dir::LabDir;
use super::shell;
use super::state::{HostState, LabState};

/// Chooses the lab's subnet (first three octets).
pub fn choose_subnet(dir: &LabDir) -> Result<[u8; 3]> {
    let routes = routed_prefixes()?;
    let hash = dir.hash();
    // 10.100.0.0 to 10.199.255.0: 25,600 candidates, starting at the hash's pick.
    let start = usize::from(hash[0]) % 100 * 256 + usize::from(hash[1]);
    for step in 0..100 * 256 {
        let n = (start + step) % (100 * 256);
        let candidate = [
            10,
            100 + u8::try_from(n / 256).expect("n < 25,600"),
            u8::try_from(n % 256).expect("remainder of 256"),
        ];
        let base = Ipv4Addr::new(candidate[0], candidate[1], candidate[2], 0);
        if !routes
            .iter()
            .any(|(net, len)| overlaps(base, 24, *net, *len))
        {
            return Ok(candidate);
        }
    }
    bail!("every 10.100-199.x.0/24 subnet is already routed on this machine")
}

/// The IPv4 prefixes the outer machine routes (every table), default route excluded.
fn routed_prefixes() -> Result<Vec<(Ipv4Addr, u8)>> {
    let out = shell::run(Command::new("ip").args(["-4", "-o", "route", "show", "table", "all"]))?;
    Ok(out.lines().filter_map(parse_route).collect())
}

/// The destination of one `ip -o route` line: its first word that is an address,
/// after an optional route type such as `local` or `broadcast`.
fn parse_route(line: &str) -> Option<(Ipv4Addr, u8)> {
    let word = line
        .split_whitespace()
        .take(2)
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let (addr, len) = word.split_once('/').unwrap_or((word, "32"));
    Some((addr.parse().ok()?, len.parse().ok()?))
}

fn overlaps(a: Ipv4Addr, a_len: u8, b: Ipv4Addr, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

/// Starts the process whose only job is to hold the switch namespace open.
///
/// Returns once it has exec'd `sleep`: before that, unshare may not have made the
/// new namespace yet, and its /proc/PID/ns/net would still be the outer machine's.
pub fn start_switch() -> Result<Child> {
    let mut child = Command::new("unshare")
        .args(["--net", "sleep", "infinity"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the switch namespace (unshare --net sleep infinity)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let program = shell::cmdline(child.id()).and_then(|c| c.into_iter().next());
        if program.as_deref() == Some("sleep") {
            return Ok(child);
        }
        if Instant::now() >= deadline || !matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the switch namespace's holder (unshare --net sleep infinity) did not start");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Makes the bridge in the switch namespace and the uplink from the root namespace.
pub fn setup_switch(lab: &LabState, dir: &LabDir, switch_pid: u32) -> Result<()> {
    let bridge = dir.bridge();
    let uplink = dir.uplink();
    in_netns(
        switch_pid,
        &format!("link set lo up\nlink add {bridge} type bridge\nlink set {bridge} up\n"),
    )
    .context("cannot create the lab's bridge")?;
    ip_batch(&format!(
        "link add {uplink} type veth peer name uplink netns {switch_pid}\n\
         addr add {}/24 dev {uplink}\n\
         link set {uplink} up\n",
        lab.gateway()
    ))
    .context("cannot create the uplink from the outer machine to the lab")?;
    in_netns(
        switch_pid,
        &format!("link set uplink master {bridge}\nlink set uplink up\n"),
    )
    .context("cannot attach the uplink to the bridge")
}

/// Gives a freshly started host its link: `port` on the bridge, `eth0` in the host,
/// and the host's address. A partitioned host's port is left down.
pub fn attach_host(
    dir: &LabDir,
    switch_pid: u32,
    host_pid: u32,
    host: &HostState,
    port: &str,
) -> Result<()> {
    ip_batch(&format!(
        "link add {port} netns {switch_pid} type veth peer name eth0 netns {host_pid}\n"
    ))
    .with_context(|| format!("cannot create {}'s network link", host.name))?;
    let state = if host.partitioned { "down" } else { "up" };
    in_netns(
        switch_pid,
        &format!(
            "link set {port} master {}\nlink set {port} {state}\n",
            dir.bridge()
        ),
    )
    .with_context(|| format!("cannot attach {}'s link to the bridge", host.name))?;
    in_netns(
        host_pid,
        &format!(
            "link set lo up\naddr add {}/24 dev eth0\nlink set eth0 up\n",
            host.ip
        ),
    )
    .with_context(|| format!("cannot configure {}'s address", host.name))
}

/// Cuts (`up = false`) or restores a host's link by its port on the bridge.
pub fn set_port(switch_pid: u32, port: &str, up: bool) -> Result<()> {
    let state = if up { "up" } else { "down" };
    in_netns(switch_pid, &format!("link set {port} {state}\n"))
}

/// The lab's interfaces that exist in the root namespace: normally the uplink
/// while the lab runs, and nothing after; the bridge never, but `lab down` checks.
pub fn root_interfaces(dir: &LabDir) -> Vec<String> {
    [dir.uplink(), dir.bridge()]
        .into_iter()
        .filter(|name| std::path::Path::new("/sys/class/net").join(name).exists())
        .collect()
}

/// Deletes an interface from the root namespace (a veth's peer goes with it).
pub fn delete_interface(name: &str) -> Result<()> {
    shell::run(Command::new("ip").args(["link", "del", name])).map(|_| ())
}

fn ip_batch(commands: &str) -> Result<()> {
    shell::run_with_input(Command::new("ip").args(["-batch", "-"]), Some(commands)).map(|_| ())
}

fn in_netns(pid: u32, commands: &str) -> Result<()> {
    shell::run_with_input(
        Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["ip", "-batch", "-"]),
        Some(commands),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_lines_give_their_destination() {
        let cases = [
            ("default via 192.0.2.1 dev eth0", None),
            (
                "192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2",
                Some(([192, 0, 2, 0], 24)),
            ),
            (
                "local 10.100.3.254 dev flup1 table local proto kernel scope host",
                Some(([10, 100, 3, 254], 32)),
            ),
            (
                "broadcast 127.255.255.255 dev lo table local",
                Some(([127, 255, 255, 255], 32)),
            ),
        ];
        for (line, want) in cases {
            let got = parse_route(line).map(|(a, l)| (a.octets(), l));
            assert_eq!(got, want, "{line}");
        }
    }

    #[test]
    fn overlap_uses_the_shorter_prefix() {
        let net = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(overlaps(net("10.100.3.0"), 24, net("10.100.3.254"), 32));
        assert!(overlaps(net("10.100.3.0"), 24, net("10.0.0.0"), 8));
        assert!(!overlaps(net("10.100.3.0"), 24, net("10.100.4.0"), 24));
        assert!(overlaps(net("10.100.3.0"), 24, net("0.0.0.0"), 0));
    }
}
