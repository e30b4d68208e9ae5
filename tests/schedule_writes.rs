//! The scheduler's pipelined writes (`registry::schedule::apply`) against a
//! real store: one member run in-process (the real Ready loop, runner and
//! client listener, on an in-memory disk, and no scheduler of its own to
//! write beside the test), driven through the real client over TCP.
//!
//! For random registries and random lists of guarded changes (proposals,
//! moves, updates, withdrawals; their compares holding, naming an absent key,
//! or stale as a deposed leader's would be; several changes per unit), the
//! changes written with several transactions in flight over several
//! connections leave the store exactly as the same changes written one
//! transaction at a time over one connection (the scheduler before
//! pipelining), in parts small enough that many are in flight, failed parts
//! retried without the changes their own reads show stale. A deposed
//! leader's changes all fail; a part with stale changes costs two
//! transactions when nobody else writes.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla::consensus::client::Client;
use flotilla::consensus::kv::Op;
use flotilla::registry::keys;
use flotilla::registry::records::{self, Proposal, Target};
use flotilla::registry::schedule::{self, Change, Writers};
use flotilla::units::{UnitFile, UnitName};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const UNITS: [&str; 4] = ["a.service", "b.service", "c.service", "d.service"];
const MACHINES: [&str; 3] = ["m0", "m1", "m2"];

#[path = "support/lone_member.rs"]
mod lone_member;

/// Starts one member that accepts transactions of up to `txn_ops`
/// compares and operations; its client address.
async fn member(txn_ops: usize) -> String {
    lone_member::start(|config| config.limits.txn_ops = txn_ops)
        .await
        .0
}

fn unit(u: usize) -> UnitName {
    UnitName::parse(UNITS[u]).unwrap()
}

fn proposal(launched: bool) -> Proposal {
    Proposal {
        hash: UnitFile::parse("[Service]\nExecStart=/bin/true\n")
            .unwrap()
            .hash(),
        target: if launched {
            Target::Launched
        } else {
            Target::Loaded
        },
    }
}

/// A key the registry held before the changes.
#[derive(Debug, Clone)]
enum Held {
    Proposal(usize, usize, bool),
    Claim(usize, usize),
    Placed(usize, usize),
}

/// Which revision a change's compare names: the key's as read (0 when
/// absent), 0 (absent), or one the store never had (stale).
#[derive(Debug, Clone, Copy)]
enum Pick {
    Read,
    Absent,
    Stale,
}

/// A change, with its compares still to resolve against the store.
#[derive(Debug, Clone)]
enum Planned {
    Propose {
        unit: usize,
        machine: usize,
        launched: bool,
        from: Option<(usize, Pick)>,
        placed: Option<Pick>,
    },
    Update {
        unit: usize,
        machine: usize,
        launched: bool,
        pick: Pick,
    },
    Withdraw {
        unit: usize,
        machine: usize,
        pick: Pick,
        placed: Option<Pick>,
    },
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        3 => Just(Pick::Read),
        1 => Just(Pick::Absent),
        1 => Just(Pick::Stale),
    ]
}

fn held() -> impl Strategy<Value = Held> {
    let (u, m) = (0..UNITS.len(), 0..MACHINES.len());
    prop_oneof![
        (u.clone(), m.clone(), any::<bool>()).prop_map(|(u, m, l)| Held::Proposal(u, m, l)),
        (u.clone(), m.clone()).prop_map(|(u, m)| Held::Claim(u, m)),
        (u, m).prop_map(|(u, m)| Held::Placed(u, m)),
    ]
}

fn planned() -> impl Strategy<Value = Planned> {
    let (u, m) = (0..UNITS.len(), 0..MACHINES.len());
    prop_oneof![
        (
            u.clone(),
            m.clone(),
            any::<bool>(),
            proptest::option::of((m.clone(), pick())),
            proptest::option::of(pick()),
        )
            .prop_map(|(unit, machine, launched, from, placed)| Planned::Propose {
                unit,
                machine,
                launched,
                from,
                placed,
            }),
        (u.clone(), m.clone(), any::<bool>(), pick()).prop_map(
            |(unit, machine, launched, pick)| {
                Planned::Update {
                    unit,
                    machine,
                    launched,
                    pick,
                }
            }
        ),
        (u, m, pick(), proptest::option::of(pick())).prop_map(|(unit, machine, pick, placed)| {
            Planned::Withdraw {
                unit,
                machine,
                pick,
                placed,
            }
        }),
    ]
}

/// Every key under the registry with its value: what the changes left.
async fn contents(client: &Client) -> Vec<(String, Vec<u8>)> {
    let (kvs, _) = client.range(keys::ROOT, true, false).await.unwrap();
    kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

/// Empties the registry, writes `held` one key per transaction, and turns
/// `planned` into changes whose compares name this store's revisions.
async fn prepare(client: &Client, held: &[Held], planned: &[Planned]) -> Vec<Change> {
    client.delete(keys::ROOT, true).await.unwrap();
    for key in held {
        let (key, value) = match *key {
            Held::Proposal(u, m, launched) => (
                keys::proposal(MACHINES[m], &unit(u)),
                records::encode(&proposal(launched)),
            ),
            Held::Claim(u, m) => (keys::claim(MACHINES[m], &unit(u)), b"{}".to_vec()),
            Held::Placed(u, m) => (keys::placed(&unit(u)), MACHINES[m].as_bytes().to_vec()),
        };
        client
            .txn(Vec::new(), vec![Op::put(key, value)], Vec::new())
            .await
            .unwrap();
    }
    let (kvs, _) = client.range(keys::ROOT, true, false).await.unwrap();
    let read: BTreeMap<String, u64> = kvs
        .into_iter()
        .map(|kv| (kv.key, kv.mod_revision))
        .collect();
    let resolve = |key: String, pick: Pick| match pick {
        Pick::Read => read.get(&key).copied().unwrap_or(0),
        Pick::Absent => 0,
        Pick::Stale => 999_999_999,
    };
    planned
        .iter()
        .map(|p| match *p {
            Planned::Propose {
                unit: u,
                machine,
                launched,
                from,
                placed,
            } => Change::Propose {
                unit: unit(u),
                machine: MACHINES[machine].to_string(),
                proposal: proposal(launched),
                from: from.map(|(m, pick)| {
                    (
                        MACHINES[m].to_string(),
                        resolve(keys::proposal(MACHINES[m], &unit(u)), pick),
                    )
                }),
                placed_revision: placed.map(|pick| resolve(keys::placed(&unit(u)), pick)),
            },
            Planned::Update {
                unit: u,
                machine,
                launched,
                pick,
            } => Change::Update {
                unit: unit(u),
                machine: MACHINES[machine].to_string(),
                proposal: proposal(launched),
                mod_revision: resolve(keys::proposal(MACHINES[machine], &unit(u)), pick),
            },
            Planned::Withdraw {
                unit: u,
                machine,
                pick,
                placed,
            } => Change::Withdraw {
                unit: unit(u),
                machine: MACHINES[machine].to_string(),
                mod_revision: resolve(keys::proposal(MACHINES[machine], &unit(u)), pick),
                placed_revision: placed.map(|pick| resolve(keys::placed(&unit(u)), pick)),
            },
        })
        .collect()
}

async fn connect(addr: &str) -> Arc<Client> {
    Arc::new(Client::connect(&[addr.to_string()]).await.unwrap())
}

/// The same registry and changes on two stores: one written a transaction
/// at a time over one connection, the other with four in flight; the two
/// must end equal, and a change list whose compares are all stale (a
/// deposed leader's) must change nothing.
#[test]
fn writes_in_flight_together_end_as_writes_one_at_a_time() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (serial, pipelined) = runtime.block_on(async {
        // The second member accepts the fewest operations a member may be
        // configured to accept (max_txn_ops = 4096).
        let (one, other) = (member(16_384).await, member(4096).await);
        let serial = Writers::over(vec![connect(&one).await]);
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(connect(&other).await);
        }
        (serial, Writers::over(clients))
    });
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    let case = (
        proptest::collection::vec(held(), 0..12),
        proptest::collection::vec(planned(), 1..40),
        1usize..4,
    );
    runner
        .run(&case, |(held, planned, part)| {
            runtime.block_on(async {
                let one = prepare(serial.first(), &held, &planned).await;
                let other = prepare(pipelined.first(), &held, &planned).await;
                let before = contents(serial.first()).await;
                assert_eq!(before, contents(pipelined.first()).await);
                let wrote_one = schedule::apply_in_parts(&serial, &one, part).await.unwrap();
                let wrote_other = schedule::apply_in_parts(&pipelined, &other, part)
                    .await
                    .unwrap();
                // The same changes were found stale, and the same written.
                assert_eq!(wrote_one.stale, wrote_other.stale);
                let (wrote_one, wrote_other) = (wrote_one.revision, wrote_other.revision);
                let after = contents(serial.first()).await;
                assert_eq!(
                    after,
                    contents(pipelined.first()).await,
                    "changes {planned:?} over {held:?} in parts of {part}"
                );
                // Either both wrote something or neither did.
                assert_eq!(wrote_one == 0, wrote_other == 0);
                if wrote_one == 0 {
                    assert_eq!(before, after, "nothing written, yet the store changed");
                }
            });
            Ok(())
        })
        .unwrap();

    // A deposed leader: every change planned from revisions the store has
    // since moved past fails, in flight together or not.
    runtime.block_on(async {
        let held: Vec<Held> = (0..UNITS.len())
            .flat_map(|u| [Held::Proposal(u, u % 3, true), Held::Placed(u, u % 3)])
            .collect();
        let planned: Vec<Planned> = (0..UNITS.len())
            .flat_map(|u| {
                [
                    Planned::Propose {
                        unit: u,
                        machine: (u + 1) % 3,
                        launched: true,
                        from: Some((u % 3, Pick::Read)),
                        placed: Some(Pick::Read),
                    },
                    Planned::Withdraw {
                        unit: u,
                        machine: u % 3,
                        pick: Pick::Read,
                        placed: Some(Pick::Read),
                    },
                ]
            })
            .collect();
        let changes = prepare(pipelined.first(), &held, &planned).await;
        // The new leader moves every placement pointer first.
        for u in 0..UNITS.len() {
            pipelined
                .first()
                .put(&keys::placed(&unit(u)), b"elsewhere".to_vec())
                .await
                .unwrap();
        }
        let before = contents(pipelined.first()).await;
        let wrote = schedule::apply_in_parts(&pipelined, &changes, 2)
            .await
            .unwrap();
        assert_eq!(wrote.revision, 0, "a stale change was written");
        assert_eq!(wrote.stale, changes.len());
        assert_eq!(contents(pipelined.first()).await, before);
    });

    // A proposal that counts on an earlier withdrawal of its unit is not
    // written when the withdrawal was stale: the unit would be proposed on
    // two machines (the pointer it compares is the one the withdrawal
    // would have removed). In one part or in two.
    for part in [1, 2] {
        runtime.block_on(async {
            let held = vec![Held::Proposal(0, 0, true), Held::Placed(0, 0)];
            let planned = vec![
                Planned::Withdraw {
                    unit: 0,
                    machine: 0,
                    pick: Pick::Stale,
                    placed: Some(Pick::Read),
                },
                Planned::Propose {
                    unit: 0,
                    machine: 1,
                    launched: true,
                    from: None,
                    placed: Some(Pick::Read),
                },
            ];
            let changes = prepare(pipelined.first(), &held, &planned).await;
            let wrote = schedule::apply_in_parts(&pipelined, &changes, part)
                .await
                .unwrap();
            assert_eq!(
                (wrote.revision, wrote.stale),
                (0, 2),
                "parts of {part}: {wrote:?}"
            );
            let elsewhere = pipelined
                .first()
                .get(&keys::proposal(MACHINES[1], &unit(0)))
                .await
                .unwrap();
            assert!(
                elsewhere.is_none(),
                "proposed on a second machine: {elsewhere:?}"
            );
        });
    }

    // A failed part learns from its own reads which changes are stale: with
    // nobody else writing, one failed transaction and one that writes the
    // rest, however many of the part are stale.
    runtime.block_on(async {
        let held: Vec<Held> = (0..UNITS.len())
            .flat_map(|u| (0..MACHINES.len()).map(move |m| Held::Proposal(u, m, false)))
            .collect();
        let planned: Vec<Planned> = (0..UNITS.len())
            .flat_map(|u| {
                (0..MACHINES.len()).map(move |m| Planned::Update {
                    unit: u,
                    machine: m,
                    launched: true,
                    pick: if (u + m) % 2 == 0 {
                        Pick::Read
                    } else {
                        Pick::Stale
                    },
                })
            })
            .collect();
        let changes = prepare(pipelined.first(), &held, &planned).await;
        let wrote = schedule::apply_in_parts(&pipelined, &changes, changes.len())
            .await
            .unwrap();
        assert_eq!(wrote.transactions, 2, "{wrote:?}");
        assert_eq!(wrote.stale, changes.len() / 2, "{wrote:?}");
        let launched = records::encode(&proposal(true));
        for (u, m) in (0..UNITS.len()).flat_map(|u| (0..MACHINES.len()).map(move |m| (u, m))) {
            let kv = pipelined
                .first()
                .get(&keys::proposal(MACHINES[m], &unit(u)))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(kv.value == launched, (u + m) % 2 == 0, "{u} on {m}");
        }
    });

    // A pass's worth of moves (nine operations each, with the reads) fits
    // the smallest transaction limit a member may be configured with: the
    // parts are cut by operations too, not only by changes.
    runtime.block_on(async {
        let client = pipelined.first();
        client.delete(keys::ROOT, true).await.unwrap();
        let changes: Vec<Change> = (0..600)
            .map(|i| Change::Propose {
                unit: UnitName::parse(&format!("many@{i}.service")).unwrap(),
                machine: "m0".into(),
                proposal: proposal(true),
                from: Some(("m1".into(), 0)),
                placed_revision: Some(0),
            })
            .collect();
        let wrote = schedule::apply_in_parts(&pipelined, &changes, 1024)
            .await
            .unwrap();
        assert_eq!((wrote.stale, wrote.transactions), (0, 2), "{wrote:?}");
        let (kvs, _) = client
            .range(&keys::machine_prefix("m0"), true, false)
            .await
            .unwrap();
        assert_eq!(kvs.len(), 600);
    });
}
