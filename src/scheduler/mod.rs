//! The scheduler: on the Raft leader only, turns units that should run into
//! proposals under each chosen machine's own prefix.
//!
//! It keeps the world in memory ([`crate::registry::view`]): read once when
//! its member starts leading, then kept current by following the member's
//! one copy of the registry ([`crate::registry::mirror`], which the API
//! reads too), whose decoded index the view shares.
//! A pass runs the pure [`plan`] over that view and has the registry write
//! the changes as guarded transactions. A pass decides only the units whose
//! decision what changed since the last pass may change
//! ([`plan::plan_touched`]: the view notes what its events touch, the
//! scheduler the proposals that went stale or stopped being stale, and what
//! its last pass carried), which is the plan a pass over every unit makes;
//! the backstop pass decides every unit.
//!
//! A pass's changes are written with up to [`schedule::WINDOW`] guarded
//! transactions in flight at once, over as many store connections
//! ([`schedule::Writers`]); transactions in flight together never share a
//! unit, so the store ends as if they had been written one after the other,
//! and each keeps the compares a lone write carries ([`schedule::apply`]).
//! The next pass still starts only once the view shows the pass's writes (the
//! highest revision they reached; or a short bound passes), so it never
//! decides twice from the same facts: a pass planned while writes were still
//! landing would see a world without them and could propose again what is
//! already on its way, or put a conflicting unit beside an in-flight
//! proposal, which no compare stops (a proposal's compares name its own
//! unit's keys only). Passes run only when something the scheduler decides
//! from changed, when an unclaimed proposal reaches the claim bound (which
//! moves it; the bound counts from the machine's last claim too, so a busy
//! host's backlog stays put), and every [`BACKSTOP`] as a safety net: an
//! idle cluster costs it nothing. A copy that loaded again (its watch broke:
//! history compacted) reloads the view. A deposed leader's scheduler stops;
//! any stale write it still makes fails its compares.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use imbl::OrdMap;

use crate::consensus::client::{Client, ClientError};
use crate::consensus::runner::Handle;
use crate::registry::mirror::{Following, Mirror, Update};
use crate::registry::schedule::{self, Touched, Writers};
use crate::registry::view::{Behind, View};
use crate::registry::{BodyCache, Revision};
use crate::units::UnitName;

/// How often a pass runs when nothing asks for one, deciding every unit: a
/// safety net only.
const BACKSTOP: Duration = Duration::from_secs(30);
/// How long a burst of writes may take to land before a pass starts.
const DEBOUNCE: Duration = Duration::from_millis(5);
/// The longest a pass waits for the view to show the previous pass's writes.
const CATCH_UP: Duration = Duration::from_secs(1);
/// How often a scheduler with nothing to do checks that it still leads.
const LEADERSHIP: Duration = Duration::from_millis(200);
/// How long a new leader's scheduler waits for the member's copy of the
/// registry to load before it loads its view (which it then loads anyway).
const COPY_LOAD: Duration = Duration::from_secs(5);

/// Runs the scheduler whenever this member leads, until the member stops,
/// reading unit bodies through `bodies` (the daemon's one cache) and
/// following the registry through `mirror` (the member's one copy, which the
/// API reads too).
pub async fn run(
    node: Handle,
    endpoints: Vec<String>,
    mirror: Mirror,
    claim_timeout: Duration,
    bodies: Arc<BodyCache>,
) {
    let mut scheduler = Scheduler {
        claim_timeout,
        bodies,
        first_seen: HashMap::new(),
        next_stale: None,
        claimed: HashMap::new(),
        progress: HashMap::new(),
        unplaceable: BTreeMap::new(),
        carried: Touched::default(),
        index: plan::Index::default(),
    };
    loop {
        match node.status().await {
            Err(_) => return,
            Ok(status) if status.leader == status.id && status.id != 0 => {
                tracing::info!("this member leads: scheduling");
                if let Err(e) = scheduler.lead(&node, &endpoints, &mirror).await {
                    tracing::warn!("scheduler: {e}; retrying");
                }
            }
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Scheduler {
    claim_timeout: Duration,
    /// The daemon's one cache of unit bodies, which the view parses
    /// `[X-Fleet]` rules into.
    bodies: Arc<BodyCache>,
    /// When each unclaimed proposal (unit, machine, revision) was first seen.
    first_seen: HashMap<(UnitName, String, Revision), Instant>,
    /// When the next unclaimed proposal reaches the claim bound.
    next_stale: Option<Instant>,
    /// How many units each machine had claimed at the last pass.
    claimed: HashMap<String, usize>,
    /// When each machine last claimed more units than before: a machine
    /// still claiming is working through its proposals, not wedged.
    progress: HashMap<String, Instant>,
    /// The last reason logged for each unit that cannot be placed, to log
    /// changes only.
    unplaceable: BTreeMap<UnitName, String>,
    /// What the last pass leaves for the next to decide again
    /// ([`plan::Plan::carried`]).
    carried: Touched,
    /// Who is where, kept between passes ([`plan::Index`]).
    index: plan::Index,
}

/// The view and the updates of the member's copy that keep it current.
struct Followed {
    view: View,
    updates: Following,
}

impl Followed {
    /// Follows the member's copy, then loads the view (so no update past
    /// the view's revision is missed) and adopts the copy's index when the
    /// copy is at the view's revision (else its next update does).
    async fn start(
        client: &Client,
        mirror: &Mirror,
        bodies: &Arc<BodyCache>,
    ) -> Result<Followed, ClientError> {
        let updates = mirror.follow();
        // Loading the view after the copy saves loading it twice (a copy
        // loaded past the view's revision would make the view load again).
        mirror.loaded(COPY_LOAD).await;
        let mut view = View::load(client, bodies.clone()).await?;
        if let Some(copy) = mirror.current()
            && copy.revision() == view.revision()
        {
            // At the view's revision: it cannot be behind.
            let _ = view.apply_copy(&Update::loaded(copy));
        }
        Ok(Followed { view, updates })
    }

    /// Takes one update; `Err` when the view must be loaded again.
    fn take(&mut self, update: Update) -> Result<(), Behind> {
        self.view.apply_copy(&update)
    }

    /// Takes the updates already posted; `Err` when the view must be loaded
    /// again.
    fn drain(&mut self) -> Result<(), Behind> {
        match self.updates.try_next() {
            Some(update) => self.take(update),
            None => Ok(()),
        }
    }
}

impl Scheduler {
    /// Schedules until this member no longer leads.
    async fn lead(
        &mut self,
        node: &Handle,
        endpoints: &[String],
        mirror: &Mirror,
    ) -> Result<(), ClientError> {
        let writers = Writers::connect(endpoints).await?;
        let client = writers.first();
        let mut followed = Followed::start(client, mirror, &self.bodies).await?;
        self.first_seen.clear();
        self.next_stale = None;
        self.claimed.clear();
        self.progress.clear();
        self.carried = Touched::default();
        // The revision of the last pass's writes, and since when it is awaited.
        let mut written: Revision = 0;
        let mut written_at = Instant::now();
        let mut backstop = Instant::now() + BACKSTOP;
        let mut checked = Instant::now();
        loop {
            let now = Instant::now();
            if followed.view.revision() < written && now >= written_at + CATCH_UP {
                tracing::debug!("scheduler: the view did not show revision {written} in time");
                written = 0;
            }
            let caught_up = followed.view.revision() >= written;
            let stale = self.next_stale.is_some_and(|at| at <= now);
            let full = backstop <= now;
            // What the last pass carried waits for the next change: units
            // nothing can place stay unplaceable until something changes,
            // and a write that failed did so because the store moved on,
            // which the view will show.
            if caught_up && (followed.view.is_touched() || stale || full) {
                written = self.pass(&writers, &mut followed.view, full).await?;
                written_at = Instant::now();
                backstop = written_at + BACKSTOP;
            }
            if checked.elapsed() >= LEADERSHIP {
                match node.status().await {
                    Ok(status) if status.leader == status.id => checked = Instant::now(),
                    _ => return Ok(()),
                }
            }
            let mut wake = checked + LEADERSHIP;
            if followed.view.revision() < written {
                wake = wake.min(written_at + CATCH_UP);
            } else {
                wake = wake.min(backstop);
                if let Some(at) = self.next_stale {
                    wake = wake.min(at);
                }
            }
            tokio::select! {
                update = followed.updates.next() => {
                    let taken = match followed.take(update) {
                        Ok(()) => {
                            // Let a burst of writes land before the next pass.
                            tokio::time::sleep(DEBOUNCE).await;
                            followed.drain()
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = taken {
                        tracing::info!("scheduler: {e}; reading the registry again");
                        followed = Followed::start(client, mirror, &self.bodies).await?;
                        written = 0;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// One pass over the view, over every unit when `full`, else over those
    /// whose decision may have changed; returns the revision of its last
    /// write (0: none).
    async fn pass(
        &mut self,
        writers: &Writers,
        view: &mut View,
        full: bool,
    ) -> Result<Revision, ClientError> {
        let started = Instant::now();
        let mut touched = view.take_touched();
        touched.all |= full;
        let stale = self.age_proposals(view.unclaimed(), view.claimed_per_machine(), started);
        for (unit, _) in stale.symmetric_difference(&view.world().stale) {
            touched.note_unit(unit);
        }
        view.world_mut().stale = stale;
        touched.merge(std::mem::take(&mut self.carried));
        let plan = plan::plan_touched(view.world(), &touched, &mut self.index);
        self.carried = plan.carried();
        let planned = started.elapsed();
        let unplaceable: BTreeMap<&UnitName, &String> = view
            .unschedulable()
            .chain(plan.unplaceable.iter().map(|(u, r)| (u, r)))
            .collect();
        for (unit, reason) in &unplaceable {
            if self.unplaceable.get(*unit) != Some(*reason) {
                tracing::warn!("cannot place {unit}: {reason}");
                self.unplaceable.insert((*unit).clone(), (*reason).clone());
            }
        }
        self.unplaceable.retain(|u, _| unplaceable.contains_key(u));
        let mut written =
            schedule::record_reasons(writers.first(), view.reasons(), &unplaceable).await?;
        let mut wrote = schedule::Written::default();
        if !plan.changes.is_empty() {
            wrote = schedule::apply(writers, &plan.changes).await?;
            written = written.max(wrote.revision);
        }
        tracing::debug!(
            "scheduler: pass over {} of {} units planned in {planned:?}, {} changes \
             ({} transactions, {} stale), done in {:?}",
            if touched.all {
                "all".to_string()
            } else {
                format!("those touched ({} pairs)", touched.pairs.len())
            },
            view.world().wanted.len(),
            plan.changes.len(),
            wrote.transactions,
            wrote.stale,
            started.elapsed()
        );
        Ok(written)
    }

    /// Returns the proposals nobody claimed within the bound (of `unclaimed`:
    /// unit, machine, revision), counted from when the proposal was first
    /// seen or its machine last claimed something (`claimed`: each machine's
    /// count), whichever is later. A host working through a bulk start
    /// (claims queued behind everyone else's writes) keeps its proposals;
    /// moving them made more writes, which delayed claims more, and a bulk
    /// start of 30,000 units never settled. A wedged host (claiming nothing)
    /// still loses its proposals after the bound. Costs the unclaimed
    /// proposals and the machines, not every proposal.
    fn age_proposals<'v>(
        &mut self,
        unclaimed: impl Iterator<Item = (&'v UnitName, &'v String, Revision)>,
        claimed: &OrdMap<String, usize>,
        now: Instant,
    ) -> BTreeSet<(UnitName, String)> {
        for (machine, count) in claimed {
            match self.claimed.get_mut(machine) {
                Some(before) if *before == *count => {}
                Some(before) => {
                    if count > before {
                        self.progress.insert(machine.clone(), now);
                    }
                    *before = *count;
                }
                None => {
                    self.claimed.insert(machine.clone(), *count);
                }
            }
        }
        self.claimed.retain(|m, _| claimed.contains_key(m));
        self.progress.retain(|m, _| claimed.contains_key(m));
        let mut live = HashMap::new();
        let mut stale = BTreeSet::new();
        self.next_stale = None;
        for (unit, machine, revision) in unclaimed {
            let key = (unit.clone(), machine.clone(), revision);
            let since = self.first_seen.get(&key).copied().unwrap_or(now);
            let active = self.progress.get(machine).copied();
            let bound = since.max(active.unwrap_or(since)) + self.claim_timeout;
            if bound <= now {
                stale.insert((unit.clone(), machine.clone()));
            } else if self.next_stale.is_none_or(|at| bound < at) {
                self.next_stale = Some(bound);
            }
            live.insert(key, since);
        }
        self.first_seen = live;
        stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(unit: &str) -> UnitName {
        UnitName::parse(unit).unwrap()
    }

    /// Proposals (unit, machine) and which of them are claimed, as the view
    /// keeps them for the scheduler.
    #[derive(Default)]
    struct Machines {
        proposed: Vec<(UnitName, String)>,
        claimed: BTreeSet<(UnitName, String)>,
    }

    impl Machines {
        fn propose(&mut self, unit: &str, machine: &str) {
            self.proposed.push((name(unit), machine.to_string()));
        }

        fn claim(&mut self, unit: &str, machine: &str) {
            self.claimed.insert((name(unit), machine.to_string()));
        }

        fn age(&self, scheduler: &mut Scheduler, now: Instant) -> BTreeSet<(UnitName, String)> {
            let unclaimed = self
                .proposed
                .iter()
                .filter(|pair| !self.claimed.contains(*pair))
                .map(|(u, m)| (u, m, 1));
            let mut counts: OrdMap<String, usize> = OrdMap::new();
            for (_, machine) in &self.claimed {
                *counts.entry(machine.clone()).or_default() += 1;
            }
            scheduler.age_proposals(unclaimed, &counts, now)
        }
    }

    /// A proposal goes stale 5 s after it was first seen or its machine last
    /// claimed something, whichever is later: a busy host keeps its backlog,
    /// a wedged one loses it.
    #[test]
    fn the_claim_bound_counts_from_the_machines_last_claim() {
        let mut scheduler = Scheduler {
            claim_timeout: Duration::from_secs(5),
            bodies: Arc::new(BodyCache::new()),
            first_seen: HashMap::new(),
            next_stale: None,
            claimed: HashMap::new(),
            progress: HashMap::new(),
            unplaceable: BTreeMap::new(),
            carried: Touched::default(),
            index: plan::Index::default(),
        };
        let mut world = Machines::default();
        for unit in ["a.service", "b.service", "c.service"] {
            world.propose(unit, "busy");
        }
        world.claim("a.service", "busy");
        world.propose("w.service", "wedged");
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        assert!(world.age(&mut scheduler, at(0)).is_empty());
        world.claim("b.service", "busy");
        assert!(world.age(&mut scheduler, at(4)).is_empty());
        // 6 s since the proposals, 2 s since busy's last claim.
        let stale: Vec<_> = world.age(&mut scheduler, at(6)).into_iter().collect();
        assert_eq!(stale, [(name("w.service"), "wedged".to_string())]);
        let stale = world.age(&mut scheduler, at(9));
        assert!(
            stale.contains(&(name("c.service"), "busy".to_string())),
            "{stale:?}"
        );
    }
}
