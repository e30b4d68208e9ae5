//! `flotilla cluster health`: one answer to "is the cluster all right?", for
//! people, scripts and monitoring.
//!
//! Every member is asked directly for its own status (not through the leader,
//! which would only tell its own view): at the addresses members published
//! and at the `--endpoint` addresses given. From those answers come the
//! leader, each member's lag (how many log entries it applied fewer than the
//! leader), whether a quorum follows the leader, and each member's key count
//! and store size on disk. The machines come from the store: live ones, and
//! those it remembers whose presence lease expired.
//!
//! The cluster is unhealthy when no leader is known, when fewer than a
//! majority of members follow it, when any member does not answer, or when
//! a live machine's renewal is overdue (it is about to lose its units); the
//! report names each problem. Machines with expired leases are reported but
//! do not make the cluster unhealthy: a retired host stays remembered.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::consensus::client::{Client, ClientError, member_status};
use crate::consensus::codec::MemberInfo;
use crate::consensus::keys::member_client_addr;
use crate::consensus::node::Status;
use crate::registry::RegistryError;
use crate::registry::liveness::{self, Liveness};

/// How long one member may take to answer its status.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The whole report; `--json` prints it as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// No problem found.
    pub healthy: bool,
    /// What is wrong, one sentence each.
    pub problems: Vec<String>,
    /// The leader's name, if one is known.
    pub leader: Option<String>,
    /// The leader's term (the highest term seen when there is no leader).
    pub term: u64,
    /// Whether a majority follows the leader.
    pub quorum: Quorum,
    /// Every member, by name.
    pub members: Vec<MemberHealth>,
    /// The machines, as their presence leases say.
    pub machines: Liveness,
}

/// Members following the leader against the majority needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quorum {
    /// Members in the cluster.
    pub members: usize,
    /// A majority of them.
    pub needed: usize,
    /// Members that answered and name the leader.
    pub following: usize,
    /// `following >= needed` with a leader known.
    pub ok: bool,
}

/// One member's part of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberHealth {
    /// Its name.
    pub name: String,
    /// Its Raft id, in hex as `member list` shows it.
    pub id: String,
    /// Where its peers reach it.
    pub peer_addr: String,
    /// Where it answered (or was tried), if an address is known.
    pub client_addr: Option<String>,
    /// `leader`, `follower`, `candidate` (answers, knows no leader) or `unreachable`.
    pub role: String,
    /// Why it is unreachable.
    pub error: Option<String>,
    /// Last applied log index.
    pub applied: Option<u64>,
    /// Log entries behind the leader's applied index.
    pub lag: Option<u64>,
    /// Its term.
    pub term: Option<u64>,
    /// Keys in its state machine.
    pub keys: Option<u64>,
    /// Bytes its store takes on disk.
    pub store_bytes: Option<u64>,
}

/// What asking one member gave.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The address asked.
    pub addr: Option<String>,
    /// Its status, or why there is none.
    pub status: Result<Status, String>,
}

/// Why no report could be made at all.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// No endpoint answered.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The machines could not be read.
    #[error("cannot read the machines: {0}")]
    Registry(#[from] RegistryError),
}

/// Asks every member and the store; the report.
pub async fn check(endpoints: &[String]) -> Result<Health, HealthError> {
    let client = Client::connect(endpoints)
        .await?
        .with_timeout(Duration::from_secs(5));
    let members = client.status().await?.members;
    let mut published: BTreeMap<u64, String> = BTreeMap::new();
    for (id, member) in &members {
        let key = member_client_addr(&member.name);
        if let Ok((kvs, _)) = client.range(&key, false, true).await
            && let Some(kv) = kvs.first()
        {
            published.insert(*id, String::from_utf8_lossy(&kv.value).into_owned());
        }
    }
    let addrs: BTreeSet<String> = endpoints
        .iter()
        .chain(published.values())
        .cloned()
        .collect();
    let mut probes = tokio::task::JoinSet::new();
    for addr in addrs {
        probes.spawn(async move {
            let status = member_status(&addr, PROBE_TIMEOUT).await;
            (addr, status)
        });
    }
    let mut heard: BTreeMap<u64, (String, Status)> = BTreeMap::new();
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    while let Some(done) = probes.join_next().await {
        let Ok((addr, result)) = done else { continue };
        match result {
            Ok(status) => {
                heard.entry(status.id).or_insert((addr, status));
            }
            Err(ClientError::Unreachable { last, .. }) => {
                failed.insert(addr, last);
            }
            Err(e) => {
                failed.insert(addr, e.to_string());
            }
        }
    }
    let answers = members
        .keys()
        .map(|id| {
            let answer = match (heard.remove(id), published.get(id)) {
                (Some((addr, status)), _) => Answer {
                    addr: Some(addr),
                    status: Ok(status),
                },
                (None, Some(addr)) => Answer {
                    addr: Some(addr.clone()),
                    status: Err(failed
                        .get(addr)
                        .cloned()
                        .unwrap_or_else(|| "no answer".to_string())),
                },
                (None, None) if !failed.is_empty() => Answer {
                    addr: None,
                    status: Err(format!(
                        "it publishes no client address, and these --endpoint addresses did \
                         not answer: {}",
                        failed
                            .iter()
                            .map(|(addr, why)| format!("{addr} ({why})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                },
                (None, None) => Answer {
                    addr: None,
                    status: Err(
                        "no client address known: it publishes none (it listens on a \
                                 wildcard address) and no --endpoint answered as it; add its \
                                 client address to --endpoint"
                            .to_string(),
                    ),
                },
            };
            (*id, answer)
        })
        .collect();
    let machines = liveness::liveness(&client).await?;
    Ok(assess(&members, &answers, machines))
}

/// Judges the members' answers: the leader, lag, quorum and the problems.
pub fn assess(
    members: &BTreeMap<u64, MemberInfo>,
    answers: &BTreeMap<u64, Answer>,
    machines: Liveness,
) -> Health {
    let statuses: Vec<&Status> = answers
        .values()
        .filter_map(|a| a.status.as_ref().ok())
        .collect();
    let term = statuses.iter().map(|s| s.term).max().unwrap_or(0);
    // The leader named in the newest term: an older term's leader is stale.
    let leader = statuses
        .iter()
        .filter(|s| s.leader != 0 && s.term == term)
        .map(|s| s.leader)
        .next()
        .filter(|id| members.contains_key(id));
    let leader_applied = leader
        .and_then(|id| answers.get(&id))
        .and_then(|a| a.status.as_ref().ok())
        .map(|s| s.applied);
    let needed = members.len() / 2 + 1;
    let following = statuses
        .iter()
        .filter(|s| leader.is_some() && Some(s.leader) == leader)
        .count();
    let mut problems = Vec::new();
    match leader {
        None => problems.push(
            "no leader: no member that answered knows one (an election is running, or \
             quorum is lost)"
                .to_string(),
        ),
        Some(id) if leader_applied.is_none() => {
            problems.push(format!("the leader {} does not answer", members[&id].name))
        }
        Some(_) => {}
    }
    if leader.is_some() && following < needed {
        problems.push(format!(
            "quorum lost: {following} of {} members follow the leader, {needed} needed",
            members.len()
        ));
    }
    for m in &machines.overdue {
        problems.push(format!(
            "machine {} last renewed its presence {} s ago (TTL {} s): it loses its units \
             when its lease runs out (flotilla list-machines; check the host and its agent)",
            m.machine, m.renewed_secs_ago, m.ttl_secs
        ));
    }
    let mut rows = Vec::new();
    for (id, info) in members {
        let answer = answers.get(id);
        let status = answer.and_then(|a| a.status.as_ref().ok());
        let error = answer.and_then(|a| a.status.as_ref().err()).cloned();
        if let Some(reason) = &error {
            problems.push(format!("member {} is unreachable: {reason}", info.name));
        }
        let role = match status {
            None => "unreachable",
            Some(_) if Some(*id) == leader => "leader",
            Some(s) if s.leader == 0 => "candidate",
            Some(_) => "follower",
        };
        rows.push(MemberHealth {
            name: info.name.clone(),
            id: format!("{id:x}"),
            peer_addr: info.peer_addr.clone(),
            client_addr: answer.and_then(|a| a.addr.clone()),
            role: role.to_string(),
            error,
            applied: status.map(|s| s.applied),
            lag: status
                .zip(leader_applied)
                .map(|(s, top)| top.saturating_sub(s.applied)),
            term: status.map(|s| s.term),
            keys: status.map(|s| s.keys),
            store_bytes: status.map(|s| s.store_bytes),
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Health {
        healthy: problems.is_empty(),
        problems,
        leader: leader.map(|id| members[&id].name.clone()),
        term,
        quorum: Quorum {
            members: members.len(),
            needed,
            following,
            ok: leader.is_some() && following >= needed,
        },
        members: rows,
        machines,
    }
}

impl Health {
    /// The report as people read it.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if self.healthy {
            out.push_str("cluster is healthy\n");
        } else {
            out.push_str("cluster is UNHEALTHY:\n");
            for problem in &self.problems {
                let _ = writeln!(out, "  - {problem}");
            }
        }
        let _ = writeln!(
            out,
            "leader: {} (term {})",
            self.leader.as_deref().unwrap_or("none"),
            self.term
        );
        let _ = writeln!(
            out,
            "quorum: {} of {} members follow the leader, {} needed{}\n",
            self.quorum.following,
            self.quorum.members,
            self.quorum.needed,
            if self.quorum.ok { "" } else { " (LOST)" }
        );
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:<12} {:>9} {:>6} {:>7} {:>9}",
            "MEMBER", "CLIENT ADDRESS", "ROLE", "APPLIED", "LAG", "KEYS", "STORE"
        );
        let dash = || "-".to_string();
        for m in &self.members {
            let _ = writeln!(
                out,
                "{:<16} {:<22} {:<12} {:>9} {:>6} {:>7} {:>9}",
                m.name,
                m.client_addr.as_deref().unwrap_or("-"),
                m.role,
                m.applied.map_or_else(dash, |v| v.to_string()),
                m.lag.map_or_else(dash, |v| v.to_string()),
                m.keys.map_or_else(dash, |v| v.to_string()),
                m.store_bytes.map_or_else(dash, human_bytes),
            );
        }
        let _ = write!(out, "\nmachines: {} live", self.machines.live.len());
        if !self.machines.overdue.is_empty() {
            let overdue: Vec<&str> = self
                .machines
                .overdue
                .iter()
                .map(|m| m.machine.as_str())
                .collect();
            let _ = write!(out, " ({} overdue: {})", overdue.len(), overdue.join(", "));
        }
        if self.machines.expired.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(
                out,
                "; {} whose presence lease expired:",
                self.machines.expired.len()
            );
            for m in &self.machines.expired {
                let mut notes = Vec::new();
                if m.drained {
                    notes.push("drained".to_string());
                }
                if m.proposals > 0 {
                    notes.push(format!("{} unit(s) still proposed to it", m.proposals));
                }
                let notes = if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join(", "))
                };
                let _ = writeln!(out, "  {}{notes}", m.machine);
            }
        }
        out
    }
}

/// `1536` → `1.5 KiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u64) -> BTreeMap<u64, MemberInfo> {
        (1..=n)
            .map(|id| {
                (
                    id,
                    MemberInfo {
                        name: format!("n{id}"),
                        peer_addr: format!("127.0.0.1:{}", 4000 + id),
                    },
                )
            })
            .collect()
    }

    fn up(id: u64, leader: u64, term: u64, applied: u64) -> (u64, Answer) {
        let status = Status {
            id,
            leader,
            term,
            applied,
            revision: applied,
            members: BTreeMap::new(),
            leader_client_addr: None,
            keys: 7,
            store_bytes: 3 << 20,
        };
        let addr = Some(format!("127.0.0.1:{}", 5000 + id));
        (
            id,
            Answer {
                addr,
                status: Ok(status),
            },
        )
    }

    fn down(id: u64) -> (u64, Answer) {
        (
            id,
            Answer {
                addr: Some(format!("127.0.0.1:{}", 5000 + id)),
                status: Err("connection refused".to_string()),
            },
        )
    }

    fn no_machines() -> Liveness {
        Liveness {
            live: Vec::new(),
            overdue: Vec::new(),
            expired: Vec::new(),
        }
    }

    #[test]
    fn a_machine_overdue_with_its_renewal_is_unhealthy_an_expired_one_is_not() {
        let answers: BTreeMap<u64, Answer> =
            [up(1, 2, 5, 100), up(2, 2, 5, 100), up(3, 2, 5, 100)].into();
        let mut machines = no_machines();
        machines.live = vec!["aaaa".into(), "bbbb".into()];
        machines.expired = vec![crate::registry::liveness::ExpiredMachine {
            machine: "cccc".into(),
            drained: false,
            proposals: 0,
        }];
        let health = assess(&members(3), &answers, machines.clone());
        assert!(health.healthy, "{:?}", health.problems);
        machines.overdue = vec![crate::registry::liveness::OverdueMachine {
            machine: "bbbb".into(),
            renewed_secs_ago: 8,
            ttl_secs: 10,
        }];
        let health = assess(&members(3), &answers, machines);
        assert!(!health.healthy);
        assert_eq!(health.problems.len(), 1, "{:?}", health.problems);
        assert!(
            health.problems[0].contains("machine bbbb last renewed its presence 8 s ago"),
            "{:?}",
            health.problems
        );
        let table = health.table();
        assert!(table.contains("1 overdue"), "{table}");
        assert!(table.contains("cccc"), "{table}");
    }

    #[test]
    fn all_members_following_a_leader_is_healthy_with_lag() {
        let answers = [up(1, 2, 5, 90), up(2, 2, 5, 100), up(3, 2, 5, 100)].into();
        let health = assess(&members(3), &answers, no_machines());
        assert!(health.healthy, "{:?}", health.problems);
        assert_eq!(health.leader.as_deref(), Some("n2"));
        assert_eq!(health.quorum.following, 3);
        let lags: Vec<_> = health.members.iter().map(|m| m.lag).collect();
        assert_eq!(lags, [Some(10), Some(0), Some(0)]);
        let roles: Vec<_> = health.members.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["follower", "leader", "follower"]);
        assert!(health.table().contains("3.0 MiB"), "{}", health.table());
    }

    #[test]
    fn one_member_down_keeps_quorum_but_is_unhealthy() {
        let answers = [up(1, 1, 5, 100), up(2, 1, 5, 100), down(3)].into();
        let health = assess(&members(3), &answers, no_machines());
        assert!(!health.healthy);
        assert!(health.quorum.ok);
        assert_eq!(health.problems.len(), 1, "{:?}", health.problems);
        assert!(health.problems[0].contains("n3 is unreachable: connection refused"));
        assert_eq!(health.members[2].role, "unreachable");
        assert_eq!(health.members[2].lag, None);
    }

    #[test]
    fn two_of_three_down_lose_the_leader_and_the_quorum() {
        // The survivor still remembers a leader from its term...
        let answers = [down(1), up(2, 1, 5, 100), down(3)].into();
        let health = assess(&members(3), &answers, no_machines());
        assert!(!health.healthy);
        assert!(!health.quorum.ok);
        let problems = health.problems.join("\n");
        assert!(problems.contains("leader n1 does not answer"), "{problems}");
        assert!(problems.contains("quorum lost: 1 of 3"), "{problems}");
        // ...or knows none, campaigning in a newer term.
        let answers = [down(1), up(2, 0, 7, 100), down(3)].into();
        let health = assess(&members(3), &answers, no_machines());
        assert_eq!(health.leader, None);
        assert_eq!(health.members[1].role, "candidate");
        assert!(
            health.problems[0].starts_with("no leader"),
            "{:?}",
            health.problems
        );
    }

    #[test]
    fn a_stale_leader_from_an_older_term_is_not_believed() {
        let answers = [up(1, 1, 4, 100), up(2, 0, 5, 100), up(3, 0, 5, 100)].into();
        let health = assess(&members(3), &answers, no_machines());
        assert_eq!(health.leader, None);
        assert_eq!(health.term, 5);
        assert!(!health.healthy);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
