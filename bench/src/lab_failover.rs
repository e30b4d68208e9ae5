//! `flotilla-bench lab-failover`: the TTL as users see it. How long after a
//! host dies its units are active on other hosts, in a lab of real systemd
//! hosts at the daemon's default settings (presence TTL 10 s, election
//! timeout 1 s, unless `--ttl-secs`/`--election-timeout-ms` say otherwise).
//!
//! Each round boots a fresh lab (`flotilla lab up`: the first three hosts
//! Raft members, the others agent-only), starts `--units` trivial units with
//! `flotilla start` (spread evenly, so every host runs some), then powers off
//! (`flotilla lab kill`: SIGKILL of its PID 1, the whole namespace gone) the
//! host of a follower member, or of the leader, whose death also costs an
//! election, at a random moment of the victim's renewal cycle. One store
//! watch of everything under `/flotilla/` (through the surviving members)
//! times what follows on one clock:
//!
//! * the victim's last presence renewal before the kill (its stamp under
//!   `/flotilla/renewed/`): the lease runs out a TTL after the renewal, not
//!   after the kill;
//! * for a leader's host, the new leader (asking the surviving members);
//! * the lease expiry (the store deleting the victim's presence record);
//! * per unit the victim ran: the scheduler's proposal to another machine,
//!   and the first report of systemd `active` there.
//!
//! One JSON line per round and one summary per victim kind (p50 and max over
//! the rounds). It is a measurement: it fails only when a lab cannot be set
//! up or a unit is not active elsewhere within three TTLs and a minute.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use flotilla::consensus::client::member_status_as;
use flotilla::consensus::kv::EventKind;
use flotilla::registry::keys::{self, MachineKey};
use flotilla::registry::records::{Renewal, ReportedState, decode};
use flotilla::tls::stream::ClientTls;
use serde::Serialize;
use serde_json::json;

use crate::lab::Lab;
use crate::store_watch::{Recorder, Seen};

/// Options of `flotilla-bench lab-failover`.
#[derive(clap::Args, Debug)]
pub struct LabFailoverArgs {
    /// Rounds per victim kind, each on a freshly booted lab.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Whose host is killed, in order: a follower member's, the leader's.
    #[arg(long, value_delimiter = ',', default_value = "follower,leader")]
    pub victims: Vec<Victim>,
    /// Lab hosts: the first three are Raft members, the others agent-only.
    #[arg(long, default_value_t = 5)]
    pub hosts: u16,
    /// Units started (spread evenly) before the kill.
    #[arg(long, default_value_t = 10)]
    pub units: usize,
    /// Every host's presence TTL in seconds [default: the daemon's, 10].
    #[arg(long)]
    pub ttl_secs: Option<u64>,
    /// The members' Raft election timeout in milliseconds [default: the
    /// daemon's, 1000].
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// The flotilla binary [default: ../target/release/flotilla next to this crate].
    #[arg(long)]
    pub flotilla_bin: Option<PathBuf>,
}

/// Whose host dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Victim {
    /// The host of a member that follows: only its agent's lease is lost.
    Follower,
    /// The leader's host: its lease, and the leader, so an election first.
    Leader,
}

/// One round, as printed.
#[derive(Serialize, Debug)]
struct RoundLine {
    bench: &'static str,
    victim: Victim,
    round: usize,
    hosts: u16,
    ttl_secs: u64,
    election_timeout_ms: u64,
    /// The killed host.
    killed: String,
    /// The host whose member led before the kill.
    leader_before: String,
    /// The host whose member leads after it (the same for a follower's host).
    leader_after: Option<String>,
    /// Units the killed host ran.
    moved_units: usize,
    /// How long before the kill the victim last renewed its presence.
    renewed_before_kill_secs: Option<f64>,
    /// `flotilla lab kill` itself (the kill happens within it).
    kill_cli_secs: f64,
    /// Kill → a surviving member says another member leads (leader's host only).
    kill_to_new_leader_secs: Option<f64>,
    /// Kill → the store deletes the victim's presence record.
    kill_to_expiry_secs: f64,
    /// Last renewal → expiry: the TTL as the lessor counted it.
    renewal_to_expiry_secs: Option<f64>,
    /// Expiry → the last of the moved units proposed to another machine.
    expiry_to_proposed_secs: f64,
    /// Expiry → the last of them reported `active` on another machine.
    expiry_to_all_active_secs: f64,
    /// Kill → the last moved unit reported `active` on another machine.
    kill_to_all_active_secs: f64,
}

const UNIT: &str = "[Unit]\nDescription=flotilla-bench lab-failover unit %i\n\
                    [Service]\nExecStart=/bin/sleep infinity\n";

/// Runs every round of every victim kind and prints their lines, then one
/// summary line per kind.
pub async fn run(args: LabFailoverArgs) -> Result<()> {
    let bin = args
        .flotilla_bin
        .clone()
        .unwrap_or_else(crate::flotilla_target::default_binary);
    for &victim in &args.victims {
        let mut lines = Vec::new();
        for round in 1..=args.rounds {
            let line = one_round(&args, &bin, victim, round)
                .await
                .with_context(|| format!("{victim:?} round {round}"))?;
            println!("{}", serde_json::to_string(&line)?);
            lines.push(line);
        }
        println!("{}", summary(victim, &lines));
    }
    Ok(())
}

/// p50 and max of each time over the rounds of one victim kind.
fn summary(victim: Victim, lines: &[RoundLine]) -> serde_json::Value {
    let stat = |pick: &dyn Fn(&RoundLine) -> Option<f64>| {
        let mut values: Vec<f64> = lines.iter().filter_map(pick).collect();
        values.sort_by(f64::total_cmp);
        if values.is_empty() {
            return json!(null);
        }
        let p50 = values[(values.len() - 1) / 2];
        json!({"p50": round3(p50), "max": round3(values[values.len() - 1])})
    };
    let first = lines.first();
    json!({"bench": "lab_failover_summary", "victim": victim, "rounds": lines.len(),
        "ttl_secs": first.map(|l| l.ttl_secs),
        "election_timeout_ms": first.map(|l| l.election_timeout_ms),
        "moved_units": lines.iter().map(|l| l.moved_units).sum::<usize>(),
        "kill_to_all_active_secs": stat(&|l| Some(l.kill_to_all_active_secs)),
        "kill_to_expiry_secs": stat(&|l| Some(l.kill_to_expiry_secs)),
        "renewal_to_expiry_secs": stat(&|l| l.renewal_to_expiry_secs),
        "kill_to_new_leader_secs": stat(&|l| l.kill_to_new_leader_secs),
        "expiry_to_all_active_secs": stat(&|l| Some(l.expiry_to_all_active_secs))})
}

fn round3(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// The host whose member leads, and the leader's Raft id, asking each member
/// in `endpoints` in turn.
async fn leader(
    endpoints: &[String],
    tls: &Arc<ClientTls>,
    timeout: Duration,
) -> Option<(String, u64)> {
    for endpoint in endpoints {
        let Ok(status) = member_status_as(endpoint, Some(tls.clone()), timeout).await else {
            continue;
        };
        if status.leader != 0
            && let Some(member) = status.members.get(&status.leader)
        {
            return Some((member.name.clone(), status.leader));
        }
    }
    None
}

async fn one_round(
    args: &LabFailoverArgs,
    bin: &Path,
    victim: Victim,
    round: usize,
) -> Result<RoundLine> {
    let hosts = args.hosts.to_string();
    let mut up = vec!["--hosts".to_string(), hosts];
    if let Some(ttl) = args.ttl_secs {
        up.extend(["--ttl".to_string(), ttl.to_string()]);
    }
    if let Some(ms) = args.election_timeout_ms {
        up.extend(["--election-timeout-ms".to_string(), ms.to_string()]);
    }
    let up: Vec<&str> = up.iter().map(String::as_str).collect();
    let lab = tokio::task::block_in_place(|| Lab::up(bin, &up))?;
    let ttl = Duration::from_secs(lab.state.ttl_secs);
    let tls = lab.admin_tls()?;
    let endpoints = lab.store_endpoints();

    // Start the units and see where they run.
    let file = lab.dir().join("lab@.service");
    std::fs::write(&file, UNIT)?;
    let names: Vec<String> = (1..=args.units)
        .map(|i| format!("lab@{i}.service"))
        .collect();
    let placed = tokio::task::block_in_place(|| -> Result<Vec<(String, String)>> {
        lab.cli(&["submit", file.to_str().context("a UTF-8 path")?])?;
        let mut start = vec!["start"];
        start.extend(names.iter().map(String::as_str));
        lab.cli(&start)?;
        lab.active()
    })?;

    let (leader_before, leader_id) = leader(&endpoints, &tls, Duration::from_secs(2))
        .await
        .context("no member names a leader")?;
    let servers: Vec<&str> = lab
        .state
        .hosts
        .iter()
        .filter(|h| h.server)
        .map(|h| h.name.as_str())
        .collect();
    let runs = |host: &str| placed.iter().filter(|(_, h)| h == host).count();
    let killed = match victim {
        Victim::Leader => leader_before.clone(),
        Victim::Follower => servers
            .iter()
            .find(|h| **h != leader_before && runs(h) > 0)
            .map(|h| h.to_string())
            .context("no follower member's host runs a unit")?,
    };
    let moving: Vec<String> = placed
        .iter()
        .filter(|(_, h)| *h == killed)
        .map(|(u, _)| u.clone())
        .collect();
    if moving.is_empty() {
        bail!("{killed} runs none of the units ({placed:?})");
    }
    let victim_id = lab
        .id_of(&killed)
        .context("the victim's machine id")?
        .to_string();

    // Watch everything through the members that survive first.
    let (survivors, dying): (Vec<String>, Vec<String>) = endpoints
        .iter()
        .cloned()
        .partition(|e| lab.host_at(e) != Some(killed.as_str()));
    let mut ordered = survivors.clone();
    ordered.extend(dying);
    let recorder = Recorder::start(ordered, Some(tls.clone()), keys::ROOT).await?;

    // The kill, at a phase of the victim's renewal cycle (a third of the
    // TTL) drawn from the clock's nanoseconds: hosts die at any moment, and
    // the time to expiry is the TTL minus how long ago the host renewed.
    let phase = f64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    ) / 1e9;
    tokio::time::sleep((ttl / 3).mul_f64(phase)).await;
    let kill_at = Instant::now();
    let kill_wall_ms = unix_ms();
    tokio::task::block_in_place(|| lab.lab(&["kill", &killed]))?;
    let kill_cli = kill_at.elapsed();
    let mut new_leader = None;
    let limit = ttl * 3 + Duration::from_secs(60);
    let done = loop {
        if victim == Victim::Leader
            && new_leader.is_none()
            && let Some((name, id)) = leader(&survivors, &tls, Duration::from_millis(300)).await
            && id != leader_id
        {
            new_leader = Some((name, kill_at.elapsed()));
        }
        let seen = recorder.seen();
        let active = first_active_elsewhere(&seen, &moving, &victim_id, kill_at);
        if active.len() == moving.len() && (victim == Victim::Follower || new_leader.is_some()) {
            break (seen, active);
        }
        if kill_at.elapsed() > limit {
            bail!(
                "after {limit:?} only {:?} of {moving:?} are active elsewhere",
                active.keys().collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (seen, active) = done;
    drop(recorder);

    // What list-units shows now must agree.
    let shown = tokio::task::block_in_place(|| lab.active())?;
    for unit in &moving {
        if !shown.iter().any(|(u, h)| u == unit && *h != killed) {
            bail!("list-units does not show {unit} active elsewhere: {shown:?}");
        }
    }

    // The hosts share this machine's clock, so the victim's own stamp of
    // its last renewal compares with the wall-clock time of the kill.
    let renewal = keys::renewal(&victim_id);
    let renewed_before_kill = seen
        .iter()
        .rfind(|s| s.event.kind == EventKind::Put && s.event.kv.key == renewal && s.at < kill_at)
        .and_then(|s| decode::<Renewal>(&s.event.kv.key, &s.event.kv.value).ok())
        .map(|r| Duration::from_millis(kill_wall_ms.saturating_sub(r.at_ms)));
    let expiry = seen
        .iter()
        .find(|s| s.event.kind == EventKind::Delete && s.event.kv.key == keys::machine(&victim_id))
        .map(|s| s.at)
        .context("the victim's presence was not deleted")?;
    let proposed = seen
        .iter()
        .filter(|s| s.at >= kill_at && s.event.kind == EventKind::Put)
        .filter_map(|s| match keys::parse_machine_key(&s.event.kv.key) {
            Some(MachineKey::Proposal(id, unit))
                if id != victim_id && moving.contains(&unit.to_string()) =>
            {
                Some((unit.to_string(), s.at))
            }
            _ => None,
        })
        .fold(BTreeMap::new(), |mut first, (unit, at)| {
            first.entry(unit).or_insert(at);
            first
        });
    let last_proposed = proposed.values().max().copied().unwrap_or(expiry);
    let last_active = active.values().max().copied().unwrap_or(expiry);
    let secs = |d: Duration| round3(d.as_secs_f64());
    let line = RoundLine {
        bench: "lab_failover",
        victim,
        round,
        hosts: args.hosts,
        ttl_secs: lab.state.ttl_secs,
        election_timeout_ms: lab.state.election_timeout_ms,
        killed: killed.clone(),
        leader_before: leader_before.clone(),
        leader_after: match victim {
            Victim::Follower => Some(leader_before),
            Victim::Leader => new_leader.as_ref().map(|(n, _)| n.clone()),
        },
        moved_units: moving.len(),
        renewed_before_kill_secs: renewed_before_kill.map(secs),
        kill_cli_secs: secs(kill_cli),
        kill_to_new_leader_secs: new_leader.map(|(_, d)| secs(d)),
        kill_to_expiry_secs: secs(expiry.saturating_duration_since(kill_at)),
        renewal_to_expiry_secs: renewed_before_kill
            .map(|r| secs(r + expiry.saturating_duration_since(kill_at))),
        expiry_to_proposed_secs: secs(last_proposed.saturating_duration_since(expiry)),
        expiry_to_all_active_secs: secs(last_active.saturating_duration_since(expiry)),
        kill_to_all_active_secs: secs(last_active.saturating_duration_since(kill_at)),
    };
    tokio::task::block_in_place(|| drop(lab));
    Ok(line)
}

/// Milliseconds since the Unix epoch, as renewal stamps count.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Each of `units` first reported systemd `active` by a machine other than
/// `victim` after `since`, with when the report arrived.
fn first_active_elsewhere(
    seen: &[Seen],
    units: &[String],
    victim: &str,
    since: Instant,
) -> BTreeMap<String, Instant> {
    let mut first = BTreeMap::new();
    for s in seen {
        if s.at < since || s.event.kind != EventKind::Put {
            continue;
        }
        let Some((unit, machine)) = keys::parse_state_key(&s.event.kv.key) else {
            continue;
        };
        let unit = unit.to_string();
        if machine == victim || !units.contains(&unit) || first.contains_key(&unit) {
            continue;
        }
        if decode::<ReportedState>(&s.event.kv.key, &s.event.kv.value)
            .is_ok_and(|r| r.state.is_active())
        {
            first.insert(unit, s.at);
        }
    }
    first
}
