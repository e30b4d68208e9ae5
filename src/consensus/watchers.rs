//! A member's watchers, indexed by prefix, fed on the Raft thread.
//!
//! Every applied event must reach the watchers whose prefix its key starts
//! with. Walking every watcher for every event costs watchers × events on
//! the Raft thread: at 5,000 hosts each member holds one watch per host it
//! serves (an agent watches its own prefix), so a failover's tens of
//! thousands of events meant tens of millions of prefix compares there
//! (BENCHMARKS.md, issue 14). Here the watchers are found by looking each
//! key's own prefixes up in a map, one look-up per distinct prefix length
//! any watcher uses (a handful: every agent's prefix has the same length),
//! so feeding a batch costs its events, not the watchers.
//!
//! A watcher receives exactly what the walk gave it: for each batch, the
//! events under its prefix at or after its next revision, in order, in one
//! message, and nothing when none are; watchers get their messages in the
//! order they were added; a watcher whose sink is gone is dropped when it
//! next has something to receive. Its next revision moves past each batch
//! fed, matched or not, so a snapshot install resumes every watcher from
//! where the batches left it ([`Watchers::resume`]).

use std::collections::{BTreeMap, HashMap};

use super::kv::{Compacted, Event, Revision};
use super::node::{WatchMsg, WatchSink};

/// One watch: its prefix, the first revision it has not been sent, and
/// where its messages go.
struct Watcher {
    prefix: String,
    /// Its own start; the revision it next needs is this or one past the
    /// last batch fed, whichever is later ([`Watchers::next_of`]).
    next: Revision,
    sink: WatchSink,
}

/// Every watcher of one member, by prefix. See the module documentation.
#[derive(Default)]
pub struct Watchers {
    /// By id, in the order they were added (ids only grow).
    all: BTreeMap<u64, Watcher>,
    next_id: u64,
    /// The ids watching each prefix.
    by_prefix: HashMap<String, Vec<u64>>,
    /// Each prefix length some watcher uses, with how many prefixes have it.
    lengths: BTreeMap<usize, usize>,
    /// The revision of the last event fed: every watcher is past it.
    fed: Revision,
}

impl Watchers {
    /// How many watchers there are (what the tests check dropping by).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.all.len()
    }

    /// Adds a watcher of `prefix` that needs events from revision `next` on.
    pub fn add(&mut self, prefix: String, next: Revision, sink: WatchSink) {
        let id = self.next_id;
        self.next_id += 1;
        let ids = self.by_prefix.entry(prefix.clone()).or_default();
        if ids.is_empty() {
            *self.lengths.entry(prefix.len()).or_default() += 1;
        }
        ids.push(id);
        self.all.insert(id, Watcher { prefix, next, sink });
    }

    /// The first revision watcher `w` still needs.
    fn next_of(&self, w: &Watcher) -> Revision {
        w.next.max(self.fed + 1)
    }

    /// Feeds one batch of applied events (in revision order) to the
    /// watchers whose prefix each key starts with.
    pub fn feed(&mut self, events: &[Event]) {
        let Some(last) = events.last() else {
            return;
        };
        let mut batches: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
        for event in events {
            let key = &event.kv.key;
            for &length in self.lengths.range(..=key.len()).map(|(l, _)| l) {
                let Some(ids) = key.get(..length).and_then(|p| self.by_prefix.get(p)) else {
                    continue;
                };
                for id in ids {
                    let w = &self.all[id];
                    if event.revision() >= self.next_of(w) {
                        batches.entry(*id).or_default().push(event.clone());
                    }
                }
            }
        }
        self.fed = self.fed.max(last.revision());
        for (id, mine) in batches {
            let delivered = self
                .all
                .get_mut(&id)
                .is_some_and(|w| (w.sink)(WatchMsg::Events(mine)));
            if !delivered {
                self.remove(id);
            }
        }
    }

    /// After a snapshot replaced the state: sends each watcher what
    /// `events_since` finds under its prefix from the revision it needs on
    /// (a watcher whose revision left the history is told and dropped), then
    /// moves every watcher past `revision`, the snapshot's.
    pub fn resume(
        &mut self,
        revision: Revision,
        events_since: impl Fn(&str, Revision) -> Result<Vec<Event>, Compacted>,
    ) {
        let ids: Vec<u64> = self.all.keys().copied().collect();
        for id in ids {
            let w = &self.all[&id];
            let keep = match events_since(&w.prefix, self.next_of(w)) {
                Ok(events) => {
                    events.is_empty()
                        || self
                            .all
                            .get_mut(&id)
                            .is_some_and(|w| (w.sink)(WatchMsg::Events(events)))
                }
                Err(compacted) => {
                    if let Some(w) = self.all.get_mut(&id) {
                        (w.sink)(WatchMsg::Compacted(compacted));
                    }
                    false
                }
            };
            if keep {
                if let Some(w) = self.all.get_mut(&id) {
                    w.next = revision + 1;
                }
            } else {
                self.remove(id);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(w) = self.all.remove(&id) else {
            return;
        };
        let Some(ids) = self.by_prefix.get_mut(&w.prefix) else {
            return;
        };
        ids.retain(|i| *i != id);
        if ids.is_empty() {
            self.by_prefix.remove(&w.prefix);
            if let Some(n) = self.lengths.get_mut(&w.prefix.len()) {
                *n -= 1;
                if *n == 0 {
                    self.lengths.remove(&w.prefix.len());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;

    use super::*;
    use crate::consensus::kv::{EventKind, KeyValue};

    /// What one watcher received, and whether its receiver is still there.
    type Inbox = Arc<Mutex<Vec<WatchMsg>>>;

    fn sink(inbox: &Inbox, gone_after: Option<usize>) -> WatchSink {
        let inbox = inbox.clone();
        Box::new(move |msg| {
            let mut got = inbox.lock().unwrap();
            if gone_after.is_some_and(|n| got.len() >= n) {
                return false;
            }
            got.push(msg);
            true
        })
    }

    fn event(key: &str, revision: Revision) -> Event {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.to_string(),
                value: Vec::new(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: None,
            },
        }
    }

    /// The walk the index replaces: every watcher for every event.
    #[derive(Default)]
    struct Walk(Vec<Watcher>);

    impl Walk {
        fn feed(&mut self, events: &[Event]) {
            self.0.retain_mut(|w| {
                let mine: Vec<Event> = events
                    .iter()
                    .filter(|e| e.revision() >= w.next && e.kv.key.starts_with(&w.prefix))
                    .cloned()
                    .collect();
                if let Some(last) = events.last() {
                    w.next = w.next.max(last.revision() + 1);
                }
                mine.is_empty() || (w.sink)(WatchMsg::Events(mine))
            });
        }
    }

    /// Keys and prefixes over a small alphabet, multi-byte letters
    /// included, so prefixes of every length match, nest and cut a letter.
    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![Just("a"), Just("b"), Just("/"), Just("é")],
            0..5,
        )
        .prop_map(|parts| parts.concat())
    }

    /// A step: add a watcher (prefix, start past the current revision by,
    /// receiver gone after so many messages) or apply a batch of keys.
    #[derive(Debug, Clone)]
    enum Step {
        Watch(String, u64, Option<usize>),
        Batch(Vec<String>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (text(), 0u64..4, proptest::option::of(0usize..3))
                .prop_map(|(p, ahead, gone)| Step::Watch(p, ahead, gone)),
            proptest::collection::vec(text(), 0..6).prop_map(Step::Batch),
        ]
    }

    proptest! {
        /// Every watcher receives exactly the messages the walk over every
        /// watcher gives it, whatever the prefixes, keys, starts and gone
        /// receivers.
        #[test]
        fn the_index_delivers_what_walking_every_watcher_does(
            steps in proptest::collection::vec(step(), 1..40)
        ) {
            let mut index = Watchers::default();
            let mut walk = Walk::default();
            let mut inboxes: Vec<(Inbox, Inbox)> = Vec::new();
            let mut revision: Revision = 0;
            for step in steps {
                match step {
                    Step::Watch(prefix, ahead, gone) => {
                        let (a, b) = (Inbox::default(), Inbox::default());
                        let next = revision + 1 + ahead;
                        index.add(prefix.clone(), next, sink(&a, gone));
                        walk.0.push(Watcher { prefix, next, sink: sink(&b, gone) });
                        inboxes.push((a, b));
                    }
                    Step::Batch(keys) => {
                        let events: Vec<Event> = keys
                            .iter()
                            .map(|k| {
                                revision += 1;
                                event(k, revision)
                            })
                            .collect();
                        index.feed(&events);
                        walk.feed(&events);
                    }
                }
                prop_assert_eq!(index.len(), walk.0.len());
            }
            for (a, b) in &inboxes {
                prop_assert_eq!(&*a.lock().unwrap(), &*b.lock().unwrap());
            }
        }
    }

    /// The example the property generalises: an agent's prefix, a longer
    /// and a shorter one, and a key under none of them.
    #[test]
    fn each_event_reaches_the_watchers_of_its_prefixes_only() {
        let mut index = Watchers::default();
        let (mine, all, other) = (Inbox::default(), Inbox::default(), Inbox::default());
        index.add("/m/1/".into(), 1, sink(&mine, None));
        index.add("/m/".into(), 1, sink(&all, None));
        index.add("/m/12/".into(), 1, sink(&other, None));
        index.feed(&[event("/m/1/p/a", 1), event("/u/a", 2), event("/m/12/c", 3)]);
        assert_eq!(
            *mine.lock().unwrap(),
            [WatchMsg::Events(vec![event("/m/1/p/a", 1)])]
        );
        assert_eq!(
            *all.lock().unwrap(),
            [WatchMsg::Events(vec![
                event("/m/1/p/a", 1),
                event("/m/12/c", 3)
            ])]
        );
        assert_eq!(
            *other.lock().unwrap(),
            [WatchMsg::Events(vec![event("/m/12/c", 3)])]
        );
    }

    /// After a snapshot, a watcher resumes from the revision after the last
    /// batch fed, even if no event of that batch was its own; one whose
    /// revision left the history is told and dropped.
    #[test]
    fn a_snapshot_resumes_every_watcher_after_the_last_batch() {
        let mut index = Watchers::default();
        let (quiet, late) = (Inbox::default(), Inbox::default());
        index.add("/q/".into(), 1, sink(&quiet, None));
        index.add("/l/".into(), 1, sink(&late, None));
        index.feed(&[event("/x", 1), event("/x", 2)]);
        let asked = Mutex::new(Vec::new());
        index.resume(10, |prefix, from| {
            asked.lock().unwrap().push((prefix.to_string(), from));
            if prefix == "/l/" {
                Err(Compacted {
                    requested: from,
                    compacted: 5,
                })
            } else {
                Ok(vec![event("/q/a", 7)])
            }
        });
        assert_eq!(
            *asked.lock().unwrap(),
            [("/q/".to_string(), 3), ("/l/".to_string(), 3)]
        );
        assert_eq!(
            *quiet.lock().unwrap(),
            [WatchMsg::Events(vec![event("/q/a", 7)])]
        );
        assert!(matches!(late.lock().unwrap()[..], [WatchMsg::Compacted(_)]));
        assert_eq!(index.len(), 1);
        index.feed(&[event("/q/b", 10), event("/q/c", 11)]);
        assert_eq!(
            quiet.lock().unwrap()[1],
            WatchMsg::Events(vec![event("/q/c", 11)])
        );
    }
}
