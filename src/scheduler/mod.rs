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
//! host's backlog stays put, and stretches by what the fleet's recent claims
//! took, so a loaded fleet's proposals are not moved for being as slow as
//! everyone's: [`Pace`]), and every [`BACKSTOP`] as a safety net: an
//! idle cluster costs it nothing. A copy that loaded again (its watch broke:
//! history compacted) reloads the view. A deposed leader's scheduler stops;
//! any stale write it still makes fails its compares.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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

/// How long the fleet's claims stretch the claim bound: the time from a
/// proposal (as the scheduler first saw it) to its claim, at the 90th
/// percentile of the claims seen in the last [`Pace::WINDOW`], once there
/// are at least [`Pace::SAMPLES`] of them (zero until then, and again once
/// the fleet is quiet).
///
/// With a fixed bound, a fleet too loaded to claim within it moved its own
/// healthy hosts' proposals: at 5,000 hosts on two cores a failover's claims
/// took ~4 s at the median, and 2,934 of 12,953 proposals were moved on
/// again (one unit seven times), each move more writes and another agent's
/// pass, so the slowest claims came 30 s after their first proposal
/// (BENCHMARKS.md, issue 14). A wedged host still loses its proposals: it
/// claims nothing, so it adds nothing to the pace, and its proposals go
/// once they are the bound older than what the claiming hosts take.
#[derive(Debug, Default)]
struct Pace {
    /// When each recent claim was seen, and how long after its proposal.
    claims: VecDeque<(Instant, Duration)>,
}

impl Pace {
    /// How long a claim stays in the pace.
    const WINDOW: Duration = Duration::from_secs(30);
    /// How many recent claims it takes to set a pace: a handful of slow
    /// ones (a small cluster's) leaves the bound as configured.
    const SAMPLES: usize = 32;
    /// The most claims kept (the newest), so a bulk start's tens of
    /// thousands cost no more per pass than this many.
    const KEPT: usize = 4096;

    /// A claim seen at `now`, `took` after its proposal was first seen.
    fn claimed(&mut self, now: Instant, took: Duration) {
        if self.claims.len() == Self::KEPT {
            self.claims.pop_front();
        }
        self.claims.push_back((now, took));
    }

    /// How much the claim bound stretches at `now` (see [`Pace`]).
    fn stretch(&mut self, now: Instant) -> Duration {
        while self
            .claims
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > Self::WINDOW)
        {
            self.claims.pop_front();
        }
        if self.claims.len() < Self::SAMPLES {
            return Duration::ZERO;
        }
        let mut took: Vec<Duration> = self.claims.iter().map(|(_, took)| *took).collect();
        let at = took.len() * 9 / 10;
        *took.select_nth_unstable(at).1
    }
}

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
        pace: Pace::default(),
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
    /// What the fleet's recent claims took, which stretches the bound.
    pace: Pace,
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
        self.pace = Pace::default();
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
        let world = view.world();
        let stale = self.age_proposals(
            view.unclaimed(),
            view.claimed_per_machine(),
            |unit, machine| world.is_claimed(unit, machine),
            started,
        );
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
    /// count), whichever is later, and stretched by the fleet's [`Pace`]. A
    /// host working through a bulk start (claims queued behind everyone
    /// else's writes) keeps its proposals; moving them made more writes,
    /// which delayed claims more, and a bulk start of 30,000 units never
    /// settled. A wedged host (claiming nothing) still loses its proposals
    /// after the bound. `is_claimed` says whether a proposal that left
    /// `unclaimed` did so by its claim (unit, machine): those set the pace.
    /// Costs the unclaimed proposals and the machines, not every proposal.
    fn age_proposals<'v>(
        &mut self,
        unclaimed: impl Iterator<Item = (&'v UnitName, &'v String, Revision)>,
        claimed: &OrdMap<String, usize>,
        is_claimed: impl Fn(&UnitName, &str) -> bool,
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
        let timeout = self.claim_timeout + self.pace.stretch(now);
        for (unit, machine, revision) in unclaimed {
            let key = (unit.clone(), machine.clone(), revision);
            let since = self.first_seen.get(&key).copied().unwrap_or(now);
            let active = self.progress.get(machine).copied();
            let bound = since.max(active.unwrap_or(since)) + timeout;
            if bound <= now {
                stale.insert((unit.clone(), machine.clone()));
            } else if self.next_stale.is_none_or(|at| bound < at) {
                self.next_stale = Some(bound);
            }
            live.insert(key, since);
        }
        // What left `unclaimed` since the last pass by being claimed sets
        // the pace of the next passes' bound.
        for (key, since) in &self.first_seen {
            let (unit, machine, _) = key;
            if !live.contains_key(key) && is_claimed(unit, machine) {
                self.pace
                    .claimed(now, now.saturating_duration_since(*since));
            }
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
            let is_claimed = |unit: &UnitName, machine: &str| {
                self.claimed.contains(&(unit.clone(), machine.to_string()))
            };
            scheduler.age_proposals(unclaimed, &counts, is_claimed, now)
        }
    }

    /// A proposal goes stale 5 s after it was first seen or its machine last
    /// claimed something, whichever is later: a busy host keeps its backlog,
    /// a wedged one loses it.
    fn scheduler() -> Scheduler {
        Scheduler {
            claim_timeout: Duration::from_secs(5),
            bodies: Arc::new(BodyCache::new()),
            first_seen: HashMap::new(),
            next_stale: None,
            claimed: HashMap::new(),
            progress: HashMap::new(),
            pace: Pace::default(),
            unplaceable: BTreeMap::new(),
            carried: Touched::default(),
            index: plan::Index::default(),
        }
    }

    #[test]
    fn the_claim_bound_counts_from_the_machines_last_claim() {
        let mut scheduler = scheduler();
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

    /// A fleet whose claims take 4 s (40 hosts, each claiming its proposal
    /// 4 s after it was made) stretches the bound by that: a wedged host's
    /// proposal is not moved 6 s after it was made, as with the bound alone,
    /// but once it is 5 s older than what the fleet takes; once the fleet's
    /// claims are older than the pace's window, the bound is 5 s again.
    #[test]
    fn a_slow_fleet_stretches_the_bound_and_a_wedged_host_still_loses_its_proposal() {
        let mut scheduler = scheduler();
        let mut world = Machines::default();
        for i in 0..40 {
            world.propose(&format!("u{i}.service"), &format!("h{i}"));
        }
        world.propose("w.service", "wedged");
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        assert!(world.age(&mut scheduler, at(0)).is_empty());
        for i in 0..40 {
            world.claim(&format!("u{i}.service"), &format!("h{i}"));
        }
        assert!(world.age(&mut scheduler, at(4)).is_empty());
        assert!(
            world.age(&mut scheduler, at(6)).is_empty(),
            "5 s + the fleet's 4 s"
        );
        let stale: Vec<_> = world.age(&mut scheduler, at(10)).into_iter().collect();
        assert_eq!(stale, [(name("w.service"), "wedged".to_string())]);

        // 35 s after the fleet's claims: no pace, the bound alone.
        world.propose("x.service", "wedged");
        let x = (name("x.service"), "wedged".to_string());
        assert!(!world.age(&mut scheduler, at(39)).contains(&x));
        let stale = world.age(&mut scheduler, at(45));
        assert!(stale.contains(&x), "{stale:?}");
    }

    /// A handful of slow claims (fewer than a pace needs) leaves the bound
    /// as configured.
    #[test]
    fn a_few_slow_claims_do_not_stretch_the_bound() {
        let mut scheduler = scheduler();
        let mut world = Machines::default();
        for i in 0..5 {
            world.propose(&format!("u{i}.service"), &format!("h{i}"));
        }
        world.propose("w.service", "wedged");
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        assert!(world.age(&mut scheduler, at(0)).is_empty());
        for i in 0..5 {
            world.claim(&format!("u{i}.service"), &format!("h{i}"));
        }
        assert!(world.age(&mut scheduler, at(4)).is_empty());
        let stale: Vec<_> = world.age(&mut scheduler, at(6)).into_iter().collect();
        assert_eq!(stale, [(name("w.service"), "wedged".to_string())]);
    }
}
