//! Whole-prefix reads page by page (`Request::RangePage`,
//! `Client::range_all`) against a real in-process member: pages together
//! equal one range; the member bounds a page by keys (a forged limit is
//! clamped) and by bytes; the member's registry copy (`registry::mirror`)
//! and the scheduler's view (`registry::view`) loaded in many small pages
//! while the registry is being written end equal to the store; and a member
//! that predates paged reads is read in one range. Also named keys read in
//! one request (`Request::GetKeys`, `Client::get_keys`, what a start call
//! reads): equal to reading them one by one, bounded in count and bytes,
//! and read key by key from a member that predates the request (a few;
//! many are refused, for the caller to read their prefix).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use flotilla::consensus::client::{Client, ClientError, KEY_BY_KEY};
use flotilla::consensus::codec;
use flotilla::consensus::kv::{KeyValue, Op};
use flotilla::consensus::protocol::{ErrorKind, GET_KEYS_MAX, PAGE_KEYS, Request, Response};
use flotilla::registry::keys;
use flotilla::registry::mirror::{Mirror, Snapshot};
use flotilla::registry::records::{self, DesiredState, UnitRecord};
use flotilla::registry::view::View;
use flotilla::units::{UnitFile, UnitName};

#[path = "support/lone_member.rs"]
mod lone_member;

const BODY: &str = "[Service]\nExecStart=/bin/true\n";

/// The ops writing unit `i`'s record (desired state by `round`).
fn unit_ops(i: usize, round: usize) -> Vec<Op> {
    let name = UnitName::parse(&format!("u{i:04}.service")).unwrap();
    let record = UnitRecord {
        name: name.clone(),
        hash: UnitFile::parse(BODY).unwrap().hash(),
        desired: [
            DesiredState::Inactive,
            DesiredState::Loaded,
            DesiredState::Launched,
        ][round % 3],
    };
    vec![Op::put(keys::unit(&name), records::encode(&record))]
}

/// A registry of `units` unit records (with their body), and keys outside it.
async fn fill(client: &Client, units: usize) {
    let hash = UnitFile::parse(BODY).unwrap().hash();
    let mut ops = vec![
        Op::put(keys::body(&hash), BODY.as_bytes().to_vec()),
        Op::put("/elsewhere/a".to_string(), b"x".to_vec()),
    ];
    ops.extend((0..units).flat_map(|i| unit_ops(i, 0)));
    client.txn(Vec::new(), ops, Vec::new()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_read_in_many_pages_equals_one_range() {
    let (addr, _node) = lone_member::start(|_| {}).await;
    let client = Client::connect(&[addr]).await.unwrap();
    fill(&client, 300).await;
    let (one, revision) = client.range(keys::ROOT, true, false).await.unwrap();
    assert_eq!(one.len(), 301);
    for serializable in [false, true] {
        let paged = client
            .range_all_with(keys::ROOT, serializable, 7)
            .await
            .unwrap();
        assert_eq!(paged.pages, 301_usize.div_ceil(7), "pages of 7 keys");
        assert_eq!(paged.kvs, one);
        // Nothing was written meanwhile: the pages are one snapshot.
        assert_eq!((paged.revision, paged.last_revision), (revision, revision));
    }
    let whole = client.range_all(keys::ROOT, false).await.unwrap();
    assert_eq!((whole.pages, whole.kvs), (1, one));
    // An empty prefix is one empty page.
    let none = client.range_all("/nothing/", false).await.unwrap();
    assert_eq!((none.pages, none.kvs.len()), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_is_bounded_by_keys_and_bytes_whatever_the_limit_asked() {
    let (addr, _node) = lone_member::start(|_| {}).await;
    let client = Client::connect(&[addr]).await.unwrap();
    let keys_over = usize::try_from(PAGE_KEYS).unwrap() + 50;
    for chunk in (0..keys_over).collect::<Vec<_>>().chunks(5_000) {
        let ops = chunk
            .iter()
            .map(|i| Op::put(format!("/many/{i:06}"), b"v".to_vec()))
            .collect();
        client.txn(Vec::new(), ops, Vec::new()).await.unwrap();
    }
    // A forged limit is clamped to the member's page size.
    let paged = client
        .range_all_with("/many/", false, u32::MAX)
        .await
        .unwrap();
    assert_eq!((paged.pages, paged.kvs.len()), (2, keys_over));
    // A limit of 0 counts as 1: the read still moves on.
    for i in 0..3 {
        client
            .put(&format!("/few/{i}"), b"v".to_vec())
            .await
            .unwrap();
    }
    let paged = client.range_all_with("/few/", false, 0).await.unwrap();
    assert_eq!((paged.pages, paged.kvs.len()), (3, 3));
    // Values of 1 MiB: a page closes near 8 MiB, far below the frame limit.
    for i in 0..20 {
        client
            .put(&format!("/big/{i:02}"), vec![7; 1024 * 1024])
            .await
            .unwrap();
    }
    let paged = client.range_all("/big/", false).await.unwrap();
    assert_eq!(paged.kvs.len(), 20);
    assert!(paged.pages >= 3, "{} pages of 1 MiB values", paged.pages);
    let keys: Vec<String> = paged.kvs.iter().map(|kv| kv.key.clone()).collect();
    let want: Vec<String> = (0..20).map(|i| format!("/big/{i:02}")).collect();
    assert_eq!(keys, want, "every key once, in order");
}

/// Rewrites and deletes unit records in a loop until `stop` (at most
/// [`MAX_WRITES`] times, so the watch history a load replays is never
/// compacted under it), counting its writes.
const MAX_WRITES: usize = 200;

fn writer(
    client: Client,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut round = 1;
        while !stop.load(Ordering::SeqCst) && round <= MAX_WRITES {
            let i = (round * 37) % 300;
            let mut ops = unit_ops(i, round);
            let gone = UnitName::parse(&format!("u{:04}.service", (round * 11) % 300)).unwrap();
            ops.push(Op::delete(keys::unit(&gone)));
            ops.extend(unit_ops(300 + round, round));
            client.txn(Vec::new(), ops, Vec::new()).await.unwrap();
            writes.fetch_add(1, Ordering::SeqCst);
            round += 1;
        }
    })
}

/// Starts [`writer`] on a sibling of `client` and waits for its first
/// write: its stop flag, its count of writes and its task.
async fn writing_beside(
    client: &Client,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicUsize::new(0));
    let writing = writer(client.sibling(), stop.clone(), writes.clone());
    while writes.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    (stop, writes, writing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_loaded_in_pages_while_written_equals_the_store() {
    let (addr, _node) = lone_member::start(|_| {}).await;
    let endpoints = vec![addr];
    let client = Client::connect(&endpoints).await.unwrap();
    fill(&client, 300).await;
    let (stop, writes, writing) = writing_beside(&client).await;
    // Pages of one key: about 300 round trips with the writer beside them.
    let mirror = Mirror::with_page_keys(endpoints.clone(), 1);
    let _following = mirror.follow();
    mirror.loaded(Duration::from_secs(60)).await;
    let loaded = mirror.current().expect("the copy loads");
    let during = writes.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writing.await.unwrap();
    assert!(during > 1, "the registry was written while the copy loaded");
    // Nothing is published half loaded: the copy as first shown is the
    // store at its revision, whatever was written between its pages.
    let (kvs, revision) = client.range(keys::ROOT, true, false).await.unwrap();
    let at = loaded.revision();
    assert!(at <= revision);
    let replay = store_at(&client, at).await;
    assert_eq!(loaded.index(), &replay.index(), "the copy at revision {at}");
    // And it follows the store from there.
    let marker = client
        .put("/elsewhere/marker", b"x".to_vec())
        .await
        .unwrap();
    let mut copy = mirror.current().unwrap();
    while copy.revision() < marker {
        tokio::time::sleep(Duration::from_millis(10)).await;
        copy = mirror.current().unwrap();
    }
    assert_eq!(copy.index(), Snapshot::from_kvs(&kvs, revision).index());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_loaded_in_pages_while_written_equals_the_store() {
    let (addr, _node) = lone_member::start(|_| {}).await;
    let client = Client::connect(&[addr]).await.unwrap();
    fill(&client, 300).await;
    let (stop, writes, writing) = writing_beside(&client).await;
    let view = View::load_in_pages(&client, Default::default(), 1)
        .await
        .unwrap();
    let during = writes.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writing.await.unwrap();
    assert!(during > 1, "the registry was written while the view loaded");
    let at = view.revision();
    let replay = store_at(&client, at).await;
    let fresh = View::from_kvs(&replay.kvs, at, Default::default());
    assert_eq!(view.reading(), fresh.reading(), "the view at revision {at}");
}

/// The registry as it was at `revision`: read now in one range, then the
/// changes after `revision` undone from the watch history.
struct Past {
    kvs: Vec<KeyValue>,
}

impl Past {
    fn index(&self) -> flotilla::registry::index::Index {
        Snapshot::from_kvs(&self.kvs, 0).index().clone()
    }
}

async fn store_at(client: &Client, revision: u64) -> Past {
    // Rebuild from an empty registry: every event from the start up to
    // `revision` (the lone member's history is never compacted here).
    let mut watch = client.watch(keys::ROOT, 1);
    let mut state = std::collections::BTreeMap::<String, KeyValue>::new();
    let (_, now) = client.range(keys::ROOT, false, false).await.unwrap();
    let mut seen = 0;
    while seen < now.min(revision) {
        let events = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .expect("the watch delivers the history")
            .unwrap();
        for event in events {
            seen = event.revision();
            if seen > revision {
                break;
            }
            match event.kind {
                flotilla::consensus::kv::EventKind::Put => {
                    state.insert(event.kv.key.clone(), event.kv.clone());
                }
                flotilla::consensus::kv::EventKind::Delete => {
                    state.remove(&event.kv.key);
                }
            }
        }
        if seen >= revision {
            break;
        }
    }
    Past {
        kvs: state.into_values().collect(),
    }
}

/// A member of an older release: it cannot decode `RangePage` or `GetKeys`,
/// so it answers `Invalid` and hangs up, as such a member does; it serves
/// `Range`.
async fn old_member(kvs: Vec<KeyValue>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let kvs = kvs.clone();
            tokio::spawn(async move {
                while let Ok(Some(frame)) = codec::read_frame(&mut stream).await {
                    let (answer, hang_up) = match codec::decode::<Request>(&frame).unwrap() {
                        Request::RangePage { .. } | Request::GetKeys { .. } => (
                            Response::Error {
                                kind: ErrorKind::Invalid,
                                message: "undecodable request: unknown variant".into(),
                            },
                            true,
                        ),
                        Request::Range { key, prefix, .. } => (
                            Response::Range {
                                kvs: kvs
                                    .iter()
                                    .filter(|kv| {
                                        kv.key == key || (prefix && kv.key.starts_with(&key))
                                    })
                                    .cloned()
                                    .map(std::sync::Arc::new)
                                    .collect(),
                                revision: 9,
                            },
                            false,
                        ),
                        _ => (
                            Response::Error {
                                kind: ErrorKind::Invalid,
                                message: "not served here".into(),
                            },
                            false,
                        ),
                    };
                    codec::write_frame(&mut stream, &codec::encode(&answer))
                        .await
                        .unwrap();
                    if hang_up {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An [`old_member`] holding `/flotilla/x/0..3`, its keys and a client of it.
async fn old_member_of_three_keys() -> (Vec<KeyValue>, Client) {
    let kvs: Vec<KeyValue> = (0..3)
        .map(|i| KeyValue {
            key: format!("/flotilla/x/{i}"),
            value: b"v".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            lease: None,
        })
        .collect();
    let addr = old_member(kvs.clone()).await;
    (kvs, Client::connect(&[addr]).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_paged_reads_is_read_in_one_range() {
    let (kvs, client) = old_member_of_three_keys().await;
    let paged = client.range_all_with(keys::ROOT, false, 1).await.unwrap();
    assert_eq!(paged.pages, 1, "one range");
    assert_eq!((paged.revision, paged.last_revision), (9, 9));
    assert_eq!(paged.kvs, kvs);
    // The connection it hung up was replaced: the client goes on.
    assert_eq!(client.range(keys::ROOT, true, false).await.unwrap().0, kvs);
}

/// Sends `request` on a connection of its own and returns the answer.
async fn ask(addr: &str, request: &Request) -> Response {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    codec::write_frame(&mut stream, &codec::encode(request))
        .await
        .unwrap();
    let frame = codec::read_frame(&mut stream).await.unwrap().unwrap();
    codec::decode(&frame).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_keys_read_in_one_request_equal_reading_them_one_by_one() {
    let (addr, _node) = lone_member::start(|_| {}).await;
    let client = Client::connect(std::slice::from_ref(&addr)).await.unwrap();
    fill(&client, GET_KEYS_MAX + 100).await;
    let name = |i: usize| keys::unit(&UnitName::parse(&format!("u{i:04}.service")).unwrap());
    // Present, missing and repeated keys, in no order; more than one
    // request's worth, so the client asks in groups.
    let mut asked: Vec<String> = (0..GET_KEYS_MAX + 100).rev().map(name).collect();
    asked.push("/flotilla/units/missing.service".into());
    asked.push(name(0));
    asked.extend((0..GET_KEYS_MAX).step_by(2).map(name));
    let mut one_by_one = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for key in &asked {
        if seen.insert(key.clone()) {
            one_by_one.extend(client.get(key).await.unwrap());
        }
    }
    assert!(one_by_one.len() > GET_KEYS_MAX, "{} keys", one_by_one.len());
    assert_eq!(client.get_keys(&asked).await.unwrap(), one_by_one);
    // One request: a repeated key answers once, a missing one not at all.
    let request = Request::GetKeys {
        keys: vec![name(5), "/nope".into(), name(5), name(2)],
        serializable: true,
    };
    match ask(&addr, &request).await {
        Response::Range { kvs, .. } => {
            let got: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
            assert_eq!(got, [name(5), name(2)]);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_keys_are_bounded_in_count_and_bytes() {
    let (addr, _node) = lone_member::start(|_| {}).await;
    let client = Client::connect(std::slice::from_ref(&addr)).await.unwrap();
    let too_many = Request::GetKeys {
        keys: (0..=GET_KEYS_MAX).map(|i| format!("/k/{i}")).collect(),
        serializable: false,
    };
    match ask(&addr, &too_many).await {
        Response::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::Invalid);
            assert!(message.contains("at most 1024"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Twelve values of 1 MiB: more than one answer may carry.
    let big: Vec<String> = (0..12).map(|i| format!("/big/{i:02}")).collect();
    for key in &big {
        client.put(key, vec![7; 1024 * 1024]).await.unwrap();
    }
    let request = Request::GetKeys {
        keys: big.clone(),
        serializable: false,
    };
    match ask(&addr, &request).await {
        Response::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::Invalid);
            assert!(message.contains("smaller groups"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The client then reads them key by key, and still gets every one.
    let kvs = client.get_keys(&big).await.unwrap();
    let got: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(got, big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_named_reads_is_read_key_by_key() {
    let (kvs, client) = old_member_of_three_keys().await;
    let asked = ["/flotilla/x/2", "/flotilla/x/9", "/flotilla/x/0"].map(String::from);
    let got = client.get_keys(&asked).await.unwrap();
    assert_eq!(got, [kvs[2].clone(), kvs[0].clone()]);
    // More keys than are worth a round each: refused, for the caller to
    // read their prefix instead; the client goes on over a fresh connection.
    let many: Vec<String> = (0..=KEY_BY_KEY)
        .map(|i| format!("/flotilla/x/{i}"))
        .collect();
    match client.get_keys(&many).await {
        Err(ClientError::Refused(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(client.range(keys::ROOT, true, false).await.unwrap().0, kvs);
}
