//! Chaos in the lab (issue 10's proof): units are submitted, started,
//! stopped and destroyed through the CLI while a random host is killed and
//! started again, or cut off and healed, and the Raft leader is killed. One
//! fault at a time, so the cluster keeps a quorum most of the time (a killed
//! leader's member is one of three). Then every host is back, and:
//!
//! * no `Conflicts=` was violated: each `chaos@` instance takes its host's
//!   `flock -n /run/chaos.lock` and, when another instance already holds it,
//!   appends its name to `/var/lib/chaos-violations` (kept across kills)
//!   and fails; no host may have that file;
//! * every acknowledged write is there: each unit the CLI last said it
//!   started, stopped or destroyed is in that state (a CLI call that failed
//!   may or may not have happened: either outcome is accepted);
//! * every acknowledged start is active somewhere (systemd says so on the
//!   host list-units names) and every acknowledged stop runs nowhere;
//! * no unit was stopped on a host while it was cut off: what ran there when
//!   the cut began still runs, never restarted, when it is healed.
//!
//! A seed picks the schedule and is printed; rerun one with
//! `FLOTILLA_CHAOS_SEED=N`. `FLOTILLA_CHAOS_SECS` sets how long the chaos
//! lasts (default 60: the short form CI runs; the long form is run by hand).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod support;

use support::cluster::{Cluster, wait_for};
use support::text;

/// Conflicting instances that prove it themselves (see the module doc).
const CHAOS: &str = "\
[Unit]
Description=chaos %i: holds this host's chaos lock or records a violation
[Service]
ExecStart=/bin/sh -c 'flock -n /run/chaos.lock sleep infinity; s=$$?; \
if [ $$s = 1 ]; then echo %n >> /var/lib/chaos-violations; fi; exit $$s'
[X-Fleet]
Conflicts=chaos@*.service
";

/// Units without rules, free to go anywhere.
const PLAIN: &str = "[Service]\nExecStart=/bin/sleep infinity\n";

/// A small deterministic generator (xorshift64*), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// What the CLI acknowledged for one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Absent,
    Launched,
    Loaded,
}

/// The last acknowledged state, and those failed calls since may have left.
#[derive(Debug, Clone)]
struct Model {
    known: Wanted,
    maybe: Vec<Wanted>,
}

impl Model {
    fn accepts(&self, seen: Wanted) -> bool {
        seen == self.known || self.maybe.contains(&seen)
    }
}

/// The `chaos@` and `plain@` instances systemd runs on `host`.
fn running_on(cluster: &Cluster, host: &str) -> Vec<String> {
    let mut units = cluster.systemd_active(host, "chaos@*.service");
    units.extend(cluster.systemd_active(host, "plain@*.service"));
    units
}

/// The fault in effect, and when it ends.
enum Fault {
    None,
    Down(String, Instant),
    Cut {
        host: String,
        until: Instant,
        running: Vec<(String, String)>,
    },
}

/// The host whose member leads, if the store answers.
fn leader(cluster: &Cluster) -> Option<String> {
    let out = cluster.flotilla(&["member", "list"]);
    text(&out.stdout)
        .lines()
        .find(|l| l.trim_end().ends_with("yes"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
}

#[test]
fn chaos_keeps_conflicts_acknowledged_writes_and_cut_off_units() {
    let seed: u64 = std::env::var("FLOTILLA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let secs: u64 = std::env::var("FLOTILLA_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    eprintln!("chaos seed {seed} for {secs}s (rerun: FLOTILLA_CHAOS_SEED={seed})");
    let mut rng = Rng(seed);

    let cluster = Cluster::up_with(4, 3, 3);
    let hosts: Vec<String> = cluster.hosts.iter().map(|h| h.name.clone()).collect();
    let dir = cluster.dir().join("chaos-units");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("chaos@.service"), CHAOS).unwrap();
    std::fs::write(dir.join("plain@.service"), PLAIN).unwrap();
    let units: Vec<String> = (1..=4)
        .map(|i| format!("chaos@{i}.service"))
        .chain((1..=4).map(|i| format!("plain@{i}.service")))
        .collect();
    let mut model: BTreeMap<String, Model> = units
        .iter()
        .map(|u| {
            let m = Model {
                known: Wanted::Absent,
                maybe: Vec::new(),
            };
            (u.clone(), m)
        })
        .collect();
    let cli = |args: &[&str]| {
        let mut all = vec!["--request-timeout", "5"];
        all.extend(args);
        cluster.flotilla(&all)
    };

    // The detector works: a copy of chaos@1's own file, started beside it
    // outside flotilla, cannot take the lock and records a violation.
    let first = dir.join("chaos@1.service");
    std::fs::write(&first, CHAOS).unwrap();
    cluster.ok(&["start", first.to_str().unwrap()]);
    let (host, _) = wait_for(Duration::from_secs(20), "chaos@1 active", || {
        cluster.active().remove("chaos@1.service")?.pop()
    });
    let probe = "cp /run/flotilla/units/chaos@1.service /run/systemd/system/probe@1.service \
                 && systemctl daemon-reload && systemctl start probe@1.service; sleep 1; \
                 cat /var/lib/chaos-violations; rm -f /var/lib/chaos-violations \
                 /run/systemd/system/probe@1.service; systemctl reset-failed probe@1.service; \
                 systemctl daemon-reload";
    let out = cluster.exec(&host, &["sh", "-c", probe]);
    assert_eq!(
        text(&out.stdout),
        "probe@1.service\n",
        "the detector did not fire: {}",
        text(&out.stderr)
    );
    model.get_mut("chaos@1.service").unwrap().known = Wanted::Launched;

    let (mut acked, mut failed, mut faults) = (0u32, 0u32, BTreeMap::<&str, u32>::new());
    let mut fault = Fault::None;
    let mut next_fault = Instant::now() + rng.millis(2000, 5000);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        // Faults: one at a time.
        let now = Instant::now();
        fault = match fault {
            Fault::Down(host, until) if now >= until => {
                cluster.lab(&["start", &host]);
                next_fault = now + rng.millis(2000, 6000);
                Fault::None
            }
            Fault::Cut {
                host,
                until,
                running,
            } if now >= until => {
                for (unit, entered) in &running {
                    assert_eq!(
                        &cluster.entered(&host, unit),
                        entered,
                        "{unit} was stopped or restarted on {host} while it was cut off \
                         (seed {seed})"
                    );
                }
                cluster.lab(&["heal", &host]);
                next_fault = now + rng.millis(2000, 6000);
                Fault::None
            }
            Fault::None if now >= next_fault => {
                let host = hosts[rng.below(hosts.len() as u64) as usize].clone();
                match rng.below(3) {
                    0 => {
                        cluster.lab(&["kill", &host]);
                        *faults.entry("host killed").or_default() += 1;
                        Fault::Down(host, now + rng.millis(2000, 8000))
                    }
                    1 => {
                        let running: Vec<(String, String)> = running_on(&cluster, &host)
                            .into_iter()
                            .map(|u| {
                                let entered = cluster.entered(&host, &u);
                                (u, entered)
                            })
                            .collect();
                        cluster.lab(&["partition", &host]);
                        *faults.entry("host partitioned").or_default() += 1;
                        Fault::Cut {
                            host,
                            until: now + rng.millis(3000, 10000),
                            running,
                        }
                    }
                    _ => {
                        let host = leader(&cluster).unwrap_or(host);
                        cluster.lab(&["kill", &host]);
                        *faults.entry("leader killed").or_default() += 1;
                        Fault::Down(host, now + rng.millis(2000, 6000))
                    }
                }
            }
            other => other,
        };

        // One operation on a random unit.
        let unit = units[rng.below(units.len() as u64) as usize].clone();
        let known = model[&unit].known;
        let file = {
            let template = unit.split('@').next().unwrap();
            dir.join(format!("{template}@.service"))
        };
        let (args, goal): (Vec<String>, Wanted) = match (rng.below(3), known) {
            (0, _) | (_, Wanted::Absent) => {
                let instance = dir.join(&unit);
                if !instance.exists() {
                    std::fs::copy(&file, &instance).unwrap();
                }
                let path = instance.display().to_string();
                (
                    vec!["start".into(), "--no-block".into(), path],
                    Wanted::Launched,
                )
            }
            (1, _) => (
                vec!["stop".into(), "--no-block".into(), unit.clone()],
                Wanted::Loaded,
            ),
            _ => (vec!["destroy".into(), unit.clone()], Wanted::Absent),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cli(&args);
        let slot = model.get_mut(&unit).unwrap();
        if out.status.success() {
            acked += 1;
            *slot = Model {
                known: goal,
                maybe: Vec::new(),
            };
        } else {
            failed += 1;
            slot.maybe.push(goal);
        }
        std::thread::sleep(rng.millis(100, 600));
    }

    // Chaos stops: every host up and connected.
    match fault {
        Fault::Down(host, _) => cluster.lab(&["start", &host]),
        Fault::Cut { host, .. } => cluster.lab(&["heal", &host]),
        Fault::None => {}
    }
    eprintln!(
        "chaos done after {:?}: faults {faults:?}, {acked} operations acknowledged, \
         {failed} failed (outcome unknown)",
        started.elapsed()
    );

    // Converged: what was acknowledged is what is stored and what runs.
    let wanted_of = |dstate: &str| match dstate {
        "launched" => Wanted::Launched,
        "loaded" => Wanted::Loaded,
        _ => Wanted::Absent,
    };
    let (_, took) = wait_for(Duration::from_secs(120), "convergence", || {
        let out = cli(&["list-unit-files", "--no-legend", "--fields", "unit,dstate"]);
        if !out.status.success() {
            return None;
        }
        let stored: BTreeMap<String, Wanted> = text(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut cells = l.split_whitespace();
                Some((cells.next()?.to_string(), wanted_of(cells.next()?)))
            })
            .filter(|(u, _)| model.contains_key(u))
            .collect();
        for (unit, m) in &model {
            let seen = stored.get(unit).copied().unwrap_or(Wanted::Absent);
            if !m.accepts(seen) {
                eprintln!("{unit}: stored {seen:?}, acknowledged {m:?}");
                return None;
            }
        }
        let active = cluster.active();
        for (unit, wanted) in &stored {
            let runs = active.get(unit).map_or(0, Vec::len);
            let ok = match wanted {
                Wanted::Launched => runs == 1,
                _ => runs == 0,
            };
            if !ok {
                eprintln!(
                    "{unit}: stored {wanted:?}, active on {:?}",
                    active.get(unit)
                );
                return None;
            }
        }
        // systemd agrees with list-units, host by host.
        let mut copies: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for host in &hosts {
            for unit in running_on(&cluster, host) {
                copies.entry(unit).or_default().push(host.clone());
            }
        }
        (copies == active).then_some(())
    });
    eprintln!("converged {took:?} after the chaos stopped");

    for host in &hosts {
        let out = cluster.exec(host, &["cat", "/var/lib/chaos-violations"]);
        assert!(
            !out.status.success(),
            "Conflicts violated on {host} (seed {seed}): {}",
            text(&out.stdout)
        );
    }
}
