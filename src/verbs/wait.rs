//! Waiting for units to reach a state, as fleetctl's blocking verbs did,
//! with progress a person can watch.
//!
//! Each check is one `GET /fleet/v1/units` and one `GET /fleet/v1/state`,
//! whatever the number of units, every 500 ms. A unit counts as:
//! * inactive: when fleet's `currentState` says so and no machine reports it;
//! * loaded: when `currentState` says so and no machine reports it running
//!   (or starting or stopping);
//! * launched: when `currentState` is `launched` (then fleetctl's line `Unit
//!   X launched on <id8>.../<ip>` is printed) and systemd reports it active;
//!   a unit systemd reports `failed` on three checks in a row has failed,
//!   and waiting for it ends at once.
//!
//! Only reports of the unit's current body count for loaded and launched
//! (the state's hash against the unit's): after a `--replace`, the old body
//! still reported until the agent loads the new file does not end the wait.
//!
//! Each unit that gets there prints fleetctl's line on stdout. On a terminal
//! a progress bar on stderr counts them; piped, stderr gets a plain
//! `N/M units launched` line as the count moves. A unit the scheduler cannot
//! place shows why (the API's `reason`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write as _};
use std::time::{Duration, Instant};

use anyhow::Result;

use flotilla::api::machines::MachineJson;
use flotilla::api::units::StateJson;
use flotilla::client::ApiClient;
use flotilla::registry::records::{DesiredState, Target};
use flotilla::units::UnitName;

use super::{machine_legend, outln};

/// Time between two checks (fleetctl's).
pub const POLL: Duration = Duration::from_millis(500);

/// How many checks in a row must see `failed` before a unit has failed: a
/// unit being started again may still show its last run's `failed` once.
const FAILED_CHECKS: u32 = 3;

/// Every machine by id, fetched when a unit first names one not known yet.
#[derive(Debug, Default)]
pub struct Machines {
    by_id: BTreeMap<String, MachineJson>,
}

impl Machines {
    /// `id8.../ip` for `id`, asking the API once more if the id is new.
    pub async fn legend(&mut self, client: &ApiClient, id: &str) -> Result<String> {
        if !self.by_id.contains_key(id) {
            self.by_id = client
                .machines()
                .await?
                .into_iter()
                .map(|m| (m.id.clone(), m))
                .collect();
        }
        let ip = self.by_id.get(id).map(|m| m.primary_ip.as_str());
        Ok(machine_legend(id, ip, false))
    }
}

/// A unit that did not get where it was asked to, and why.
#[derive(Debug, Clone)]
pub struct Stuck {
    /// The unit.
    pub name: UnitName,
    /// Why, in words.
    pub why: String,
}

/// Counts units as they arrive: a bar on a terminal, plain lines otherwise.
pub struct Progress {
    total: usize,
    done: usize,
    word: &'static str,
    bar: bool,
    shown_plain: Option<(usize, Instant)>,
    notes: BTreeSet<String>,
}

impl Progress {
    /// Progress over `total` units going to `word` ("launched", ...).
    pub fn new(total: usize, word: &'static str) -> Progress {
        Progress {
            total,
            done: 0,
            word,
            bar: total > 1 && std::io::stderr().is_terminal(),
            shown_plain: None,
            notes: BTreeSet::new(),
        }
    }

    fn clear(&self) {
        if self.bar {
            eprint!("\r\x1b[K");
        }
    }

    /// Prints one unit's line on stdout, above the bar.
    pub fn line(&mut self, text: &str) -> std::io::Result<()> {
        self.clear();
        outln!("{text}")?;
        self.draw("");
        Ok(())
    }

    /// One unit more has arrived.
    pub fn arrived(&mut self) {
        self.done += 1;
    }

    /// Says once, on stderr, why some units wait (an unplaceable unit's reason).
    pub fn note(&mut self, note: String) {
        if self.notes.insert(note.clone()) {
            self.clear();
            eprintln!("waiting: {note}");
            self.draw("");
        }
    }

    /// Shows the count: redraws the bar, or prints a plain line when it
    /// moved (at most once a second, and always the last).
    pub fn draw(&mut self, pending: &str) {
        if self.total <= 1 {
            return;
        }
        if self.bar {
            const WIDTH: usize = 30;
            let filled = WIDTH * self.done / self.total;
            eprint!(
                "\r\x1b[K[{}{}] {}/{} {} {pending}",
                "#".repeat(filled),
                "-".repeat(WIDTH - filled),
                self.done,
                self.total,
                self.word
            );
            let _ = std::io::stderr().flush();
            return;
        }
        let due = match self.shown_plain {
            None => true,
            Some((shown, at)) => {
                shown != self.done
                    && (self.done == self.total || at.elapsed() >= Duration::from_secs(1))
            }
        };
        if due && self.done > 0 {
            eprintln!("{}/{} units {}", self.done, self.total, self.word);
            self.shown_plain = Some((self.done, Instant::now()));
        }
    }

    /// Removes the bar.
    pub fn finish(&mut self) {
        self.clear();
        if self
            .shown_plain
            .is_some_and(|(shown, _)| shown != self.done)
        {
            eprintln!("{}/{} units {}", self.done, self.total, self.word);
        }
    }
}

/// Where one unit is in the wait.
#[derive(Debug, Default)]
struct Watch {
    announced: bool,
    failed_checks: u32,
    last: String,
}

/// Waits until every unit in `names` reaches `goal` (the desired state the
/// verb set: inactive for unload, loaded for load and stop, launched for
/// start and restart), for `attempts` checks (0: for ever). Returns the
/// units that did not, with why.
pub async fn wait(
    client: &ApiClient,
    names: &[UnitName],
    goal: DesiredState,
    attempts: u32,
    machines: &mut Machines,
) -> Result<Vec<Stuck>> {
    let mut watches: BTreeMap<&UnitName, Watch> =
        names.iter().map(|n| (n, Watch::default())).collect();
    let mut progress = Progress::new(names.len(), goal.as_str());
    let mut failed: Vec<Stuck> = Vec::new();
    let mut checks = 0u32;
    loop {
        checks += 1;
        let units: BTreeMap<String, _> = client
            .units()
            .await?
            .into_iter()
            .map(|u| (u.name.clone(), u))
            .collect();
        let states: Vec<StateJson> = client.states(None).await?;
        let mut arrived = Vec::new();
        for (name, watch) in &mut watches {
            let Some(unit) = units.get(name.as_str()) else {
                if goal == DesiredState::Inactive {
                    arrived.push((*name).clone());
                    progress.arrived();
                } else {
                    failed.push(Stuck {
                        name: (*name).clone(),
                        why: "it was destroyed meanwhile".into(),
                    });
                    arrived.push((*name).clone());
                }
                continue;
            };
            let current = unit.current_state;
            let legend = match &unit.machine_id {
                Some(id) => Some(machines.legend(client, id).await?),
                None => None,
            };
            let on = legend
                .as_ref()
                .map(|l| format!(" on {l}"))
                .unwrap_or_default();
            watch.last = format!("its state is {current}");
            if let Some(reason) = &unit.reason {
                watch.last = format!("not placed: {reason}");
                progress.note(format!("{name} is not placed: {reason}"));
            }
            let reported = || states.iter().filter(|s| s.name == name.as_str());
            // Right after a `--replace` its machine still reports the old
            // body until its agent has written and loaded the new file: only
            // rows of the unit's current body count as having got there.
            let current_body =
                |s: &StateJson| unit.hash.is_empty() || s.hash.is_empty() || s.hash == unit.hash;
            let reached = match goal {
                // Unloaded: no machine reports it any more.
                DesiredState::Inactive => current == goal && reported().next().is_none(),
                // Stopped: no machine reports it running (or on its way).
                DesiredState::Loaded => {
                    current == goal
                        && reported().all(|s| current_body(s) && !s.unit_state().is_occupying())
                }
                DesiredState::Launched => {
                    let rows: Vec<&StateJson> = reported()
                        .filter(|s| unit.machine_id.as_ref().is_none_or(|m| &s.machine_id == m))
                        .filter(|s| current_body(s))
                        .collect();
                    if rows.iter().any(|s| s.unit_state().is_failed()) {
                        watch.failed_checks += 1;
                    } else {
                        watch.failed_checks = 0;
                    }
                    if watch.failed_checks >= FAILED_CHECKS {
                        failed.push(Stuck {
                            name: (*name).clone(),
                            why: format!(
                                "systemd reports it failed{on}; see flotilla status {name} \
                                 and flotilla journal {name}"
                            ),
                        });
                        arrived.push((*name).clone());
                        continue;
                    }
                    if current == DesiredState::Launched && !watch.announced {
                        watch.announced = true;
                        progress.line(&format!("Unit {name} launched{on}"))?;
                    }
                    if let Some(row) = rows.first() {
                        watch.last = format!("systemd reports it {} ({})", row.active, row.sub);
                    }
                    watch.announced
                        && rows
                            .iter()
                            .any(|s| s.unit_state().reached(Target::Launched))
                }
            };
            if reached {
                if goal != DesiredState::Launched {
                    progress.line(&format!("Unit {name} {goal}{on}"))?;
                }
                progress.arrived();
                arrived.push((*name).clone());
            }
        }
        for name in &arrived {
            watches.remove(name);
        }
        let waiting = watches
            .keys()
            .take(3)
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        progress.draw(&waiting);
        if watches.is_empty() || (attempts > 0 && checks >= attempts) {
            progress.finish();
            failed.extend(watches.into_iter().map(|(name, watch)| Stuck {
                name: name.clone(),
                why: format!(
                    "did not reach {goal} within {attempts} checks: {}",
                    watch.last
                ),
            }));
            return Ok(failed);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The error for units that did not get there, naming each and why.
pub fn stuck_error(verb: &str, total: usize, stuck: &[Stuck]) -> anyhow::Error {
    let list: Vec<String> = stuck
        .iter()
        .map(|s| format!("{} ({})", s.name, s.why))
        .collect();
    anyhow::anyhow!(
        "{} of {total} unit(s) did not {verb}: {}",
        stuck.len(),
        list.join("; ")
    )
}
