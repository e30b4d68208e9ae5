//! The scheduler's watch-maintained view (`registry::view`) against a real
//! 3-member store: for random sequences of registry changes (units, bodies,
//! machines, drains, metadata, proposals, claims, placement pointers, reasons,
//! states, prefix deletes, garbage records), a view loaded before the changes
//! and fed the store's watch events up to a revision equals a view freshly
//! loaded at that revision, both when it applies the events to its own index
//! and when it is fed as a daemon's scheduler feeds it, adopting the index
//! of a copy of the registry (`registry::mirror`) that applied them.
//!
//! The members run their own scheduler, which reacts to these changes with
//! writes of its own: those are part of the history too, and the comparison
//! is exact at one revision whatever they do.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use flotilla::consensus::client::{Client, Watch};
use flotilla::consensus::kv::{Event, Op};
use flotilla::registry::keys;
use flotilla::registry::mirror::{Snapshot, Update};
use flotilla::registry::records::{
    self, DesiredState, MachineRecord, Proposal, ReportedState, Target, UnitRecord,
};
use flotilla::registry::view::View;
use flotilla::registry::{Revision, UnitState};
use flotilla::units::{UnitFile, UnitHash, UnitName};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[path = "support/fleet_sim.rs"]
mod fleet_sim;

/// Bodies: plain, one with rules that take a unit's instance, a global one,
/// and one whose file parses but whose rules do not.
const BODIES: [&str; 4] = [
    "[Service]\nExecStart=/bin/true\n",
    "[Service]\nExecStart=/bin/true\n[X-Fleet]\nConflicts=web@*.service\nMachineOf=db@%i.service\n",
    "[Service]\nExecStart=/bin/true\n[X-Fleet]\nGlobal=true\n",
    "[Service]\nExecStart=/bin/true\n[X-Fleet]\nGlobal=true\nReplaces=b*\n",
];
const UNITS: [&str; 5] = [
    "web@1.service",
    "web@2.service",
    "db@1.service",
    "web@.service",
    "solo.service",
];
const MACHINES: [&str; 3] = ["m0", "m1", "m2"];

fn hash(body: usize) -> UnitHash {
    UnitFile::parse(BODIES[body]).unwrap().hash()
}

fn unit(i: usize) -> UnitName {
    UnitName::parse(UNITS[i]).unwrap()
}

/// One registry change, as its writer would make it (or a broken one).
#[derive(Debug, Clone)]
enum Change {
    Body(usize, bool),
    Unit(usize, usize, u8),
    UnitGarbage(usize),
    UnitGone(usize),
    Machine(usize, bool),
    MachineGone(usize),
    Drain(usize, bool),
    Metadata(usize, u8, Option<u8>),
    Proposal(usize, usize, usize, bool),
    ProposalGarbage(usize, usize),
    ProposalGone(usize, usize),
    Claim(usize, usize, bool),
    Generation(usize),
    Placed(usize, usize, bool),
    Reason(usize, Option<u8>),
    State(usize, usize, Option<bool>),
    Renewal(usize),
    MachinePrefixGone(usize),
}

fn change() -> impl Strategy<Value = Change> {
    let (b, u, m) = (0..BODIES.len(), 0..UNITS.len(), 0..MACHINES.len());
    prop_oneof![
        (b.clone(), any::<bool>()).prop_map(|(b, put)| Change::Body(b, put)),
        (u.clone(), b.clone(), 0u8..3).prop_map(|(u, b, d)| Change::Unit(u, b, d)),
        (u.clone(), b.clone(), 0u8..3).prop_map(|(u, b, d)| Change::Unit(u, b, d)),
        u.clone().prop_map(Change::UnitGarbage),
        u.clone().prop_map(Change::UnitGone),
        (m.clone(), any::<bool>()).prop_map(|(m, x)| Change::Machine(m, x)),
        m.clone().prop_map(Change::MachineGone),
        (m.clone(), any::<bool>()).prop_map(|(m, on)| Change::Drain(m, on)),
        (m.clone(), 0u8..2, proptest::option::of(0u8..3))
            .prop_map(|(m, k, v)| Change::Metadata(m, k, v)),
        (m.clone(), u.clone(), b.clone(), any::<bool>())
            .prop_map(|(m, u, b, l)| Change::Proposal(m, u, b, l)),
        (m.clone(), u.clone()).prop_map(|(m, u)| Change::ProposalGarbage(m, u)),
        (m.clone(), u.clone()).prop_map(|(m, u)| Change::ProposalGone(m, u)),
        (m.clone(), u.clone(), any::<bool>()).prop_map(|(m, u, on)| Change::Claim(m, u, on)),
        m.clone().prop_map(Change::Generation),
        (u.clone(), m.clone(), any::<bool>()).prop_map(|(u, m, on)| Change::Placed(u, m, on)),
        (u.clone(), proptest::option::of(0u8..3)).prop_map(|(u, r)| Change::Reason(u, r)),
        (u.clone(), m.clone(), proptest::option::of(any::<bool>()))
            .prop_map(|(u, m, s)| Change::State(u, m, s)),
        m.clone().prop_map(Change::Renewal),
        m.prop_map(Change::MachinePrefixGone),
    ]
}

/// The store operations of one change.
fn ops(change: &Change) -> Vec<Op> {
    let put = |key: String, value: Vec<u8>| vec![Op::put(key, value)];
    let delete = |key: String| vec![Op::delete(key)];
    match *change {
        Change::Body(b, true) => put(keys::body(&hash(b)), BODIES[b].as_bytes().to_vec()),
        Change::Body(b, false) => delete(keys::body(&hash(b))),
        Change::Unit(u, b, d) => {
            let desired = [
                DesiredState::Inactive,
                DesiredState::Loaded,
                DesiredState::Launched,
            ][d as usize];
            let record = UnitRecord {
                name: unit(u),
                hash: hash(b),
                desired,
            };
            put(keys::unit(&unit(u)), records::encode(&record))
        }
        Change::UnitGarbage(u) => put(keys::unit(&unit(u)), b"{not json".to_vec()),
        Change::UnitGone(u) => delete(keys::unit(&unit(u))),
        Change::Machine(m, region) => {
            let mut metadata = BTreeMap::new();
            metadata.insert(
                "region".to_string(),
                if region { "eu" } else { "us" }.into(),
            );
            let record = MachineRecord {
                id: MACHINES[m].into(),
                instance: "i".into(),
                hostname: MACHINES[m].into(),
                ip: "10.0.0.1".into(),
                metadata,
                api: None,
            };
            put(keys::machine(MACHINES[m]), records::encode(&record))
        }
        Change::MachineGone(m) => delete(keys::machine(MACHINES[m])),
        Change::Drain(m, true) => put(keys::drain(MACHINES[m]), Vec::new()),
        Change::Drain(m, false) => delete(keys::drain(MACHINES[m])),
        Change::Metadata(m, k, value) => {
            let key = keys::metadata(MACHINES[m], ["region", "disk"][k as usize]);
            match value {
                Some(v) => put(key, ["", "eu", "ssd"][v as usize].as_bytes().to_vec()),
                None => delete(key),
            }
        }
        Change::Proposal(m, u, b, launched) => {
            let proposal = Proposal {
                hash: hash(b),
                target: if launched {
                    Target::Launched
                } else {
                    Target::Loaded
                },
            };
            put(
                keys::proposal(MACHINES[m], &unit(u)),
                records::encode(&proposal),
            )
        }
        Change::ProposalGarbage(m, u) => put(keys::proposal(MACHINES[m], &unit(u)), b"[]".to_vec()),
        Change::ProposalGone(m, u) => delete(keys::proposal(MACHINES[m], &unit(u))),
        Change::Claim(m, u, true) => put(keys::claim(MACHINES[m], &unit(u)), b"{}".to_vec()),
        Change::Claim(m, u, false) => delete(keys::claim(MACHINES[m], &unit(u))),
        Change::Generation(m) => put(keys::generation(MACHINES[m]), b"1".to_vec()),
        Change::Placed(u, m, true) => put(keys::placed(&unit(u)), MACHINES[m].as_bytes().to_vec()),
        Change::Placed(u, _, false) => delete(keys::placed(&unit(u))),
        Change::Reason(u, Some(r)) => put(keys::reason(&unit(u)), vec![b'a' + r]),
        Change::Reason(u, None) => delete(keys::reason(&unit(u))),
        Change::State(u, m, Some(active)) => {
            let state = ReportedState {
                hash: hash(0),
                state: UnitState {
                    load: "loaded".into(),
                    active: if active { "active" } else { "failed" }.into(),
                    sub: "running".into(),
                },
                target: Some(Target::Launched),
                reason: None,
            };
            put(keys::state(&unit(u), MACHINES[m]), records::encode(&state))
        }
        Change::State(u, m, None) => delete(keys::state(&unit(u), MACHINES[m])),
        Change::Renewal(m) => put(keys::renewal(MACHINES[m]), b"{}".to_vec()),
        Change::MachinePrefixGone(m) => vec![Op::Delete {
            key: keys::machine_prefix(MACHINES[m]),
            prefix: true,
        }],
    }
}

/// A view fed as a daemon's scheduler feeds it: by the updates of a copy of
/// the registry ([`Snapshot`], what the member's `Mirror` keeps), adopting
/// the copy's index.
struct Shared {
    view: View,
    copy: Snapshot,
}

impl Shared {
    fn apply(&mut self, events: &[Event]) {
        let since = self.copy.revision();
        self.copy.apply(events);
        let update = Update {
            since,
            events: vec![events.to_vec().into()],
            copy: self.copy.clone(),
        };
        self.view.apply_copy(&update).expect("no revision skipped");
    }
}

/// Applies the watch's events up to and including `revision` to `view` and
/// `shared`, keeping later ones in `pending` for the next round.
async fn catch_up(
    view: &mut View,
    shared: &mut Shared,
    watch: &mut Watch,
    pending: &mut VecDeque<Event>,
    revision: Revision,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while view.revision() < revision {
        if pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let batch = tokio::time::timeout(left, watch.next())
                .await
                .expect("the watch delivers every revision")
                .expect("the watch keeps going");
            pending.extend(batch);
        }
        let mut upto = Vec::new();
        while pending.front().is_some_and(|e| e.revision() <= revision) {
            upto.push(pending.pop_front().unwrap());
        }
        if upto.is_empty() && !pending.is_empty() {
            // Nothing under the registry at the exact revision read.
            break;
        }
        view.apply(&upto);
        shared.apply(&upto);
    }
}

/// Runs `changes` (in transactions of up to three) and compares the
/// followed view with fresh loads, midway and at the end.
async fn check(client: &Client, changes: &[Change]) {
    client.delete(keys::ROOT, true).await.unwrap();
    let (kvs, revision) = client.range(keys::ROOT, true, false).await.unwrap();
    let mut view = View::from_kvs(&kvs, revision, Default::default());
    let copy = Snapshot::from_kvs(&kvs, revision);
    let mut shared = Shared {
        view: View::from_kvs(&kvs, revision, Default::default()),
        copy: copy.clone(),
    };
    shared.view.apply_copy(&Update::loaded(copy)).unwrap();
    let mut watch = client.watch(keys::ROOT, view.revision() + 1);
    let mut pending = VecDeque::new();
    let mid = changes.len() / 2;
    for (i, group) in changes.chunks(3).enumerate() {
        let batch: Vec<Op> = group.iter().flat_map(ops).collect();
        client.txn(Vec::new(), batch, Vec::new()).await.unwrap();
        if i * 3 >= mid && i * 3 < mid + 3 || (i + 1) * 3 >= changes.len() {
            // A write the view ignores, so the revision read has an event.
            let marker = keys::renewal("view-test");
            client.put(&marker, b"{}".to_vec()).await.unwrap();
            let fresh = View::load(client, Default::default()).await.unwrap();
            catch_up(
                &mut view,
                &mut shared,
                &mut watch,
                &mut pending,
                fresh.revision(),
            )
            .await;
            assert_eq!(
                view.reading(),
                fresh.reading(),
                "after {} changes: {changes:?}",
                (i + 1) * 3
            );
            assert_eq!(
                shared.view.reading(),
                fresh.reading(),
                "fed by the copy, after {} changes: {changes:?}",
                (i + 1) * 3
            );
        }
    }
}

#[test]
fn events_applied_in_order_equal_a_fresh_read() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("flotilla-view")
        .tempdir()
        .unwrap();
    let servers = runtime
        .block_on(fleet_sim::Servers::start(
            env!("CARGO_BIN_EXE_flotilla").as_ref(),
            &dir.path().join("servers"),
            false,
            &["--election-timeout-ms", "300"],
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let client = runtime
        .block_on(Client::connect(&servers.endpoints))
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 128,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(change(), 1..60), |changes| {
            runtime.block_on(check(&client, &changes));
            Ok(())
        })
        .unwrap();
}
