//! Freeing the reboot lock of holders that are gone (`stale_after`).
//!
//! locksmith left the lock of a host that died while holding it taken
//! forever, and no other host ever rebooted again until a person noticed.
//! With `stale_after` set, every daemon watches the holders of every group:
//! a holder whose machine has no presence for that long, continuously, as
//! this daemon saw it, is released with a compare-and-swap that only frees
//! exactly that holding. Absence is timed from this daemon's own
//! observations, so a daemon that just started waits the whole period again:
//! it can free a slot late, never early. Off by default, as in locksmith:
//! a holder may be a person's manual hold, and freeing it is a choice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::consensus::client::Client;
use crate::registry::lock as store;
use crate::registry::semaphore::Holder;

/// Since when each absent holder has been seen absent, by (group, holder id).
#[derive(Debug, Default)]
pub struct Absence {
    since: BTreeMap<(String, String), Instant>,
}

impl Absence {
    /// Notes which holders of `group` are absent at `now` (their id has no
    /// presence) and returns those absent for at least `after`. A holder seen
    /// present, or no longer holding, starts over.
    pub fn observe(
        &mut self,
        group: &str,
        holders: &[Holder],
        present: &BTreeSet<String>,
        now: Instant,
        after: Duration,
    ) -> Vec<Holder> {
        self.since
            .retain(|(g, id), _| g != group || holders.iter().any(|h| &h.id == id));
        let mut stale = Vec::new();
        for holder in holders {
            let key = (group.to_string(), holder.id.clone());
            if present.contains(&holder.id) {
                self.since.remove(&key);
                continue;
            }
            let since = *self.since.entry(key).or_insert(now);
            if now.duration_since(since) >= after {
                stale.push(holder.clone());
            }
        }
        stale
    }
}

/// Releases stale holders of every group until `stop` turns true.
pub async fn run(endpoints: Vec<String>, after: Duration, mut stop: watch::Receiver<bool>) {
    let every = (after / 10).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut absence = Absence::default();
    let mut client = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if client.is_none() {
            client = Client::connect(&endpoints).await.ok();
        }
        let Some(c) = &client else { continue };
        if let Err(e) = pass(c, &mut absence, after).await {
            tracing::debug!("stale lock holders: {e}");
            client = None;
        }
    }
}

async fn pass(
    client: &Client,
    absence: &mut Absence,
    after: Duration,
) -> Result<(), store::LockOpError> {
    let groups = store::semaphores(client).await?;
    let present = store::present_machines(client).await?;
    let now = Instant::now();
    for (group, semaphore) in groups {
        for holder in absence.observe(&group, &semaphore.holders, &present, now, after) {
            if store::release_stale(client, &group, &holder).await? {
                tracing::warn!(
                    "reboot lock {group}: released {}, absent for more than {} (stale_after)",
                    holder.id,
                    crate::duration::show_duration(after)
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(id: &str, since: u64) -> Holder {
        Holder {
            id: id.into(),
            since,
            boot_id: None,
        }
    }

    #[test]
    fn only_continuous_absence_counts() {
        let mut absence = Absence::default();
        let t0 = Instant::now();
        let after = Duration::from_secs(60);
        let holders = [holder("a", 1), holder("b", 2)];
        let present: BTreeSet<String> = ["b".to_string()].into();
        let mut seen = |present: &BTreeSet<String>, secs| {
            absence.observe(
                "g",
                &holders,
                present,
                t0 + Duration::from_secs(secs),
                after,
            )
        };
        assert!(seen(&present, 0).is_empty());
        assert!(seen(&present, 59).is_empty());
        assert_eq!(seen(&present, 60), vec![holder("a", 1)]);
        // Back for a moment: the clock starts over.
        let all: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        seen(&all, 61);
        assert!(seen(&present, 100).is_empty());
        assert_eq!(seen(&present, 161).len(), 1);
        // Another group is timed on its own.
        let at = |s| t0 + Duration::from_secs(s);
        assert!(
            absence
                .observe("h", &holders, &present, at(161), after)
                .is_empty()
        );
    }

    #[test]
    fn a_holder_that_let_go_starts_over() {
        let mut absence = Absence::default();
        let t0 = Instant::now();
        let after = Duration::from_secs(10);
        let none = BTreeSet::new();
        absence.observe("g", &[holder("a", 1)], &none, t0, after);
        absence.observe("g", &[], &none, t0 + after, after);
        let again = absence.observe("g", &[holder("a", 5)], &none, t0 + after * 2, after);
        assert!(again.is_empty(), "a new holding is timed from now");
    }
}
