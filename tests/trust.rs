//! The attacks of the trust issue, replayed against a real `flotilla daemon`
//! member with mutual TLS: forged Raft messages on the peer port from
//! callers that are not members, writes on the client port from callers
//! without a certificate or with an agent's, oversized partial frames,
//! thousands of idle connections and handshakes that never finish. Each is
//! refused or bounded, the store is unchanged and the member goes on serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::consensus::announce::{self, Announcement};
use flotilla::consensus::client::{Client, ClientError};
use flotilla::consensus::codec::{self, MemberInfo, SnapshotData};
use flotilla::consensus::kv::{Command as KvCommand, Compare, KvStore, Op};
use flotilla::consensus::node::member_id;
use flotilla::tls::Role;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

use support::pki::{Pki, shared};
use support::{FLOTILLA, free_port, text};

/// One member, `m1`, alone in its cluster, with TLS and the limits given.
struct Member {
    process: Child,
    client: String,
    peer: String,
    dir: tempfile::TempDir,
}

impl Member {
    async fn start(limits: &[(&str, &str)]) -> Member {
        Member::start_with(limits, None).await
    }

    /// [`Member::start`], with at most `files` file descriptors if given.
    async fn start_with(limits: &[(&str, &str)], files: Option<u32>) -> Member {
        let dir = tempfile::tempdir().unwrap();
        let client = format!("127.0.0.1:{}", free_port());
        let peer = format!("127.0.0.1:{}", free_port());
        let process = spawn_member(dir.path(), &client, &peer, limits, files);
        let member = Member {
            process,
            client,
            peer,
            dir,
        };
        member.until_it_leads().await;
        member
    }

    /// Kills the member and starts it again on its data dir with `limits`.
    async fn restart(&mut self, limits: &[(&str, &str)]) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        self.process = spawn_member(self.dir.path(), &self.client, &self.peer, limits, None);
        self.until_it_leads().await;
    }

    async fn until_it_leads(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(client) = self.admin().await
                && client.status().await.is_ok_and(|s| s.leader != 0)
            {
                return;
            }
            assert!(Instant::now() < deadline, "m1 did not elect itself");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn admin(&self) -> Result<Client, ClientError> {
        Client::connect_with(
            std::slice::from_ref(&self.client),
            Some(shared().client("tester", Role::Admin)),
        )
        .await
    }

    async fn as_role(&self, name: &str, role: Role) -> Client {
        Client::connect_with(
            std::slice::from_ref(&self.client),
            Some(shared().client(name, role)),
        )
        .await
        .unwrap()
    }

    /// Every key and value in the store but the member's own bookkeeping.
    async fn contents(&self) -> Vec<(String, Vec<u8>)> {
        let client = self.admin().await.unwrap();
        let (kvs, _) = client.range("/", true, false).await.unwrap();
        kvs.into_iter()
            .filter(|kv| !kv.key.starts_with("/flotilla/raft/"))
            .map(|kv| (kv.key, kv.value))
            .collect()
    }

    /// The member answers, still leads, and takes a write.
    async fn still_serving(&self, term: u64) {
        let client = self.admin().await.unwrap();
        let status = client.status().await.unwrap();
        assert_eq!(status.leader, member_id("m1"));
        assert_eq!(status.term, term, "no forged term was taken");
        assert_eq!(status.members.len(), 1);
        client.put("/after", b"ok".to_vec()).await.unwrap();
        client.delete("/after", false).await.unwrap();
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("m1.log")).unwrap()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Starts `flotilla daemon` as m1 on `dir`, logging to `dir/m1.log`.
fn spawn_member(
    dir: &std::path::Path,
    client: &str,
    peer: &str,
    limits: &[(&str, &str)],
    files: Option<u32>,
) -> Child {
    let pki = shared();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("m1.log"))
        .unwrap();
    let mut command = match files {
        Some(n) => {
            let mut prlimit = Command::new("prlimit");
            prlimit
                .arg(format!("--nofile={n}:{n}"))
                .arg("--")
                .arg(FLOTILLA);
            prlimit
        }
        None => Command::new(FLOTILLA),
    };
    command
        .args(["daemon", "--name", "m1", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--client-listen", client, "--peer-listen", peer])
        .args(["--initial-cluster", &format!("m1={peer}")])
        .args([
            "--election-timeout-ms",
            "300",
            "--log",
            "info",
            "--no-agent",
        ])
        .env_remove("FLOTILLA_CONFIG")
        .env("FLOTILLA_API_SOCKET", "")
        .env("FLOTILLA_API_LISTEN", "")
        .envs(pki.env("m1", Role::Member))
        .envs(limits.iter().map(|(k, v)| (format!("FLOTILLA_{k}"), *v)))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// A TLS connection to `addr` that trusts the cluster's CA and presents
/// `cert`/`key` (of any CA), or no certificate at all.
async fn tls_as(
    addr: &str,
    client_cert: Option<(PathBuf, PathBuf)>,
) -> std::io::Result<impl AsyncRead + AsyncWrite + Unpin> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let pki = shared();
    let ca_pem = std::fs::read(pki.ca()).unwrap();
    let ca = CertificateDer::pem_slice_iter(&ca_pem)
        .next()
        .unwrap()
        .unwrap();
    let cluster = flotilla::tls::identity::cluster_id_of_ca(&ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(&cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(flotilla::tls::identity::server_name(&cluster)).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Whether the other end closes `stream` within `limit` (whatever it says
/// first, such as a TLS alert).
async fn hung_up<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    let drain = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, drain).await.is_ok()
}

fn raft_frame(message: &Message) -> Vec<u8> {
    let mut frame = vec![codec::FORMAT_VERSION];
    message.write_to_vec(&mut frame).unwrap();
    frame
}

/// The heartbeat of the issue: a huge term and commit index.
fn forged_heartbeat(from: u64) -> Message {
    let mut message = Message {
        from,
        to: member_id("m1"),
        term: 1_000_000,
        commit: u64::MAX / 2,
        ..Message::default()
    };
    message.set_msg_type(MessageType::MsgHeartbeat);
    message
}

/// The snapshot of the issue: a store holding only the attacker's unit.
fn forged_snapshot(from: u64) -> Message {
    let mut kv = KvStore::default();
    kv.apply(&KvCommand::put(
        "/flotilla/units/evil.service",
        "launched",
        None,
    ));
    let data = codec::encode(&SnapshotData {
        kv,
        members: Default::default(),
    });
    let mut message = Message {
        from,
        to: member_id("m1"),
        term: 1_000_000,
        ..Message::default()
    };
    message.set_msg_type(MessageType::MsgSnapshot);
    let snapshot = message.mut_snapshot();
    snapshot.data = data.into();
    snapshot.mut_metadata().index = 1_000_000;
    snapshot.mut_metadata().term = 1_000_000;
    snapshot.mut_metadata().mut_conf_state().voters = vec![from];
    message
}

/// Sends the forged heartbeat on one connection and the forged snapshot on
/// another, as the transport would; both must go unheard.
async fn attack_peer_port<S, F, Fut>(connect: F, from: u64, who: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    if let Ok(mut stream) = connect().await {
        for _ in 0..5 {
            let sent = codec::write_frame(&mut stream, &raft_frame(&forged_heartbeat(from))).await;
            if sent.is_err() || stream.flush().await.is_err() {
                break;
            }
        }
        // The member hangs up on it (after a TLS alert, perhaps).
        assert!(
            hung_up(&mut stream, Duration::from_secs(5)).await,
            "{who}: the peer port kept a connection that sent forged heartbeats"
        );
    }
    if let Ok(mut stream) = connect().await {
        let forged = forged_snapshot(from);
        let data = forged.get_snapshot().get_data();
        let sent = flotilla::consensus::transport::send_snapshot(
            &mut stream,
            &forged,
            data,
            data.len() as u64,
        )
        .await;
        assert!(sent.is_err(), "{who}: a forged snapshot was confirmed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_hears_only_current_members_speaking_as_themselves() {
    let member = Member::start(&[]).await;
    let admin = member.admin().await.unwrap();
    admin.put("/acked", b"kept".to_vec()).await.unwrap();
    let before = member.contents().await;
    let term = admin.status().await.unwrap().term;
    let pki = shared();
    let peer = member.peer.clone();
    let m1 = member_id("m1");

    // No certificate: plain TCP, and TLS without a client certificate.
    attack_peer_port(|| TcpStream::connect(peer.clone()), m1, "plain TCP").await;
    attack_peer_port(|| tls_as(&peer, None), m1, "TLS without a certificate").await;
    // A member certificate named m1, from another cluster's CA.
    let other = Pki::new();
    let foreign = other.issue("m1", Role::Member);
    attack_peer_port(
        || tls_as(&peer, Some(foreign.clone())),
        m1,
        "another CA's m1",
    )
    .await;
    // Valid certificates of this CA that are not a member's, claiming to be m1.
    for role in [Role::Agent, Role::Admin] {
        let cert = pki.issue("m1", role);
        attack_peer_port(|| tls_as(&peer, Some(cert.clone())), m1, role.as_str()).await;
    }
    // A member certificate of a name that is no member: as itself, and as m1.
    let stranger = pki.issue("m9", Role::Member);
    for from in [member_id("m9"), m1] {
        attack_peer_port(|| tls_as(&peer, Some(stranger.clone())), from, "member m9").await;
    }

    assert_eq!(member.contents().await, before, "the store changed");
    member.still_serving(term).await;
}

/// A membership announcement from `name` (as `from`) claiming that
/// `members` are the cluster as of a far-off log index.
fn forged_announcement(from: u64, name: &str, members: &[(&str, &str)]) -> Vec<u8> {
    let members = members
        .iter()
        .map(|(name, addr)| {
            (
                member_id(name),
                MemberInfo {
                    name: name.to_string(),
                    peer_addr: addr.to_string(),
                },
            )
        })
        .collect();
    announce::encode(&Announcement {
        from,
        name: name.into(),
        index: 1_000_000,
        members,
    })
    .expect("a forged announcement within the limits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_from_a_member_certificate_that_is_no_member_vouch_for_nobody() {
    let member = Member::start(&[]).await;
    let admin = member.admin().await.unwrap();
    admin.put("/acked", b"kept".to_vec()).await.unwrap();
    let before = member.contents().await;
    let term = admin.status().await.unwrap().term;
    let peer = member.peer.clone();
    let stranger = shared().issue("m9", Role::Member);
    // Where m8, one of the vouched-for strangers, would be dialed.
    let m8 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let m8_addr = m8.local_addr().unwrap().to_string();
    let m9_addr = format!("127.0.0.1:{}", free_port());
    let strangers = [("m1", peer.as_str()), ("m8", &m8_addr), ("m9", &m9_addr)];

    // m9 as itself, and m9 claiming to be m1: each connection is offered
    // announcements (the offer carries nothing), its announcement is
    // refused and the connection ends.
    for (from, name) in [(member_id("m9"), "m9"), (member_id("m1"), "m1")] {
        let mut stream = tls_as(&peer, Some(stranger.clone())).await.unwrap();
        let offer = tokio::time::timeout(Duration::from_secs(5), codec::read_frame(&mut stream))
            .await
            .expect("an idle peer connection is offered announcements")
            .unwrap()
            .unwrap();
        assert!(announce::is_capability(&offer), "offer {offer:?}");
        let frame = forged_announcement(from, name, &strangers);
        let sent = codec::write_frame(&mut stream, &frame).await.is_ok();
        if sent && stream.flush().await.is_ok() {
            assert!(
                hung_up(&mut stream, Duration::from_secs(5)).await,
                "m9 announcing as {name}: the peer port kept the connection"
            );
        }
    }
    // m1 vouched for nobody: it dials no stranger, and m9 is still refused.
    let dialed = tokio::time::timeout(Duration::from_secs(2), m8.accept()).await;
    assert!(dialed.is_err(), "m1 dialed a stranger it was told of");
    attack_peer_port(
        || tls_as(&peer, Some(stranger.clone())),
        member_id("m9"),
        "member m9 after announcing itself",
    )
    .await;
    let log = member.log();
    assert!(
        !log.contains("announced members"),
        "an announcement was recorded:\n{log}"
    );
    assert!(
        log.contains("sent an announcement as m1")
            && log.contains("ignoring an announcement and dropping the connection")
            && log.contains("\"m9\" is not a current member"),
        "the refusals are not logged:\n{log}"
    );
    assert_eq!(member.contents().await, before, "the store changed");
    member.still_serving(term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_port_refuses_strangers_and_keeps_agents_to_their_machine() {
    let member = Member::start(&[]).await;
    let endpoints = vec![member.client.clone()];
    let admin = member.admin().await.unwrap();
    admin.put("/acked", b"kept".to_vec()).await.unwrap();
    let term = admin.status().await.unwrap().term;

    // No certificate at all: the member does not even answer.
    let plain = Client::connect_with(&endpoints, None).await;
    assert!(plain.is_err(), "a plaintext client was served");

    // An agent (machine aaaa) writes its own machine's keys, nothing else.
    let agent = member.as_role("aaaa", Role::Agent).await;
    agent
        .put("/flotilla/machines/aaaa", b"{}".to_vec())
        .await
        .unwrap();
    let before = member.contents().await;
    let denied = |result: Result<_, ClientError>, what: &str| match result {
        Err(ClientError::Denied(message)) => {
            assert!(message.contains("permission denied"), "{what}: {message}")
        }
        other => panic!("{what}: not denied: {other:?}"),
    };
    for (key, what) in [
        ("/flotilla/units/evil.service", "a unit write"),
        ("/flotilla/bodies/0000", "a body write"),
        ("/flotilla/machines/bbbb", "another machine's record"),
    ] {
        denied(agent.put(key, b"{}".to_vec()).await.map(drop), what);
    }
    denied(
        agent.delete("/flotilla/m/bbbb/", true).await.map(drop),
        "another machine's claims",
    );
    denied(agent.member_add("evil", "127.0.0.1:9").await, "member add");
    // The CLI says so, and exits non-zero.
    let out = Command::new(FLOTILLA)
        .args(["--store-endpoint", &member.client, "member", "add", "evil"])
        .arg("127.0.0.1:9")
        .envs(shared().env("aaaa", Role::Agent))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("permission denied"),
        "{}",
        text(&out.stderr)
    );

    assert_eq!(member.contents().await, before, "the store changed");
    member.still_serving(term).await;
    // An admin may do what the agent may not.
    admin
        .put("/flotilla/units/ok.service", b"{}".to_vec())
        .await
        .unwrap();
}

/// Whether `result` is a refusal by the role policy.
fn is_denied<T: std::fmt::Debug>(result: &Result<T, impl std::fmt::Debug>) -> bool {
    format!("{result:?}").contains("permission denied")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_uses_only_its_own_leases_and_reboot_lock_slot_across_restarts() {
    use flotilla::registry::lock as locks;
    // Snapshots every few entries: the owners must live through one.
    let limits = [("SNAPSHOT_ENTRIES", "10")];
    let mut member = Member::start(&limits).await;
    let (mut a, mut b) = (
        member.as_role("aaaa", Role::Agent).await,
        member.as_role("bbbb", Role::Agent).await,
    );
    let ttl = Duration::from_secs(120);
    let la = a.grant(ttl).await.unwrap();
    let presence = Op::put_on_lease("/flotilla/machines/aaaa".into(), b"{}".to_vec(), la);
    a.txn(Vec::new(), vec![presence], Vec::new()).await.unwrap();
    let lb = b.grant(ttl).await.unwrap();

    // b may not keep a's lease alive, revoke it or hang its keys on it.
    let on_las = |key: &str| Op::put_on_lease(key.into(), b"{}".to_vec(), la);
    for _ in 0..2 {
        let attempts = [
            format!("{:?}", b.keep_alive(la).await),
            format!("{:?}", b.revoke(la).await),
            format!(
                "{:?}",
                b.txn(
                    Vec::new(),
                    vec![on_las("/flotilla/machines/bbbb")],
                    Vec::new()
                )
                .await
            ),
            format!("{:?}", a.revoke(lb).await),
        ];
        for attempt in &attempts {
            assert!(attempt.contains("permission denied"), "{attempt}");
            assert!(attempt.contains("granted by agent"), "{attempt}");
        }
        // Its own leases work; the lease it was refused lives.
        a.keep_alive(la).await.unwrap();
        b.keep_alive(lb).await.unwrap();
        let admin = member.admin().await.unwrap();
        let lease = admin.get("/flotilla/machines/aaaa").await.unwrap().unwrap();
        assert_eq!(lease.lease, Some(la));
        // A lease nobody granted is not found, not someone's.
        assert!(matches!(
            b.keep_alive(la + 1000).await,
            Err(ClientError::LeaseNotFound(_))
        ));
        // Enough entries for a snapshot and a compaction, then a restart
        // from them: the owners are still known.
        for _ in 0..12 {
            a.keep_alive(la).await.unwrap();
        }
        member.restart(&limits).await;
        a = member.as_role("aaaa", Role::Agent).await;
        b = member.as_role("bbbb", Role::Agent).await;
    }

    // A lease without an owner (an admin's; one granted before owners were
    // recorded): an agent's only while it holds that agent's presence.
    let admin = member.admin().await.unwrap();
    let old = admin.grant(ttl).await.unwrap();
    assert!(is_denied(&b.keep_alive(old).await));
    let presence = Op::put_on_lease("/flotilla/machines/bbbb".into(), b"{}".to_vec(), old);
    assert!(is_denied(
        &b.txn(Vec::new(), vec![presence.clone()], Vec::new()).await
    ));
    admin
        .txn(Vec::new(), vec![presence], Vec::new())
        .await
        .unwrap();
    b.keep_alive(old).await.unwrap();
    assert!(is_denied(&a.keep_alive(old).await));
    b.revoke(old).await.unwrap();

    // The reboot lock: each agent takes and gives back its own slot only.
    let now = 1_700_000_000;
    let group = locks::DEFAULT_GROUP;
    locks::acquire(&a, group, "aaaa", now, Some("boot-a"))
        .await
        .unwrap();
    let full = locks::acquire(&b, group, "bbbb", now, None).await;
    assert!(format!("{full:?}").contains("Full"), "{full:?}");
    assert!(is_denied(&locks::set_max(&b, group, 5).await));
    assert!(is_denied(&locks::release(&b, group, "aaaa").await));
    assert!(is_denied(
        &locks::acquire(&b, "other", "cccc", now, None).await
    ));
    let holder = locks::read(&admin, group).await.unwrap().semaphore.holders[0].clone();
    assert!(is_denied(&locks::release_stale(&b, group, &holder).await));
    // A write that compares nothing, or only the revision, is refused.
    let key = "/flotilla/lock/default";
    let read = admin.get(key).await.unwrap().unwrap();
    let free = br#"{"max":1,"holders":[]}"#.to_vec();
    for compare in [
        Vec::new(),
        vec![Compare::revision_is(key, read.mod_revision)],
    ] {
        let txn = b
            .txn(compare, vec![Op::put(key.into(), free.clone())], Vec::new())
            .await;
        assert!(is_denied(&txn), "{txn:?}");
    }
    let stored = locks::read(&admin, group).await.unwrap().semaphore;
    assert_eq!(stored.max, 1);
    assert_eq!(stored.holders, vec![holder]);
    // What an admin may do, and what b may do once a slot is free.
    locks::set_max(&admin, group, 2).await.unwrap();
    locks::acquire(&b, group, "bbbb", now, None).await.unwrap();
    locks::release(&b, group, "bbbb").await.unwrap();
    locks::release(&a, group, "aaaa").await.unwrap();
    let stored = locks::read(&admin, group).await.unwrap().semaphore;
    assert!(stored.holders.is_empty());
    // An agent's own reboot mark is its own to set.
    let mark = locks::RebootMark {
        since: now,
        force: false,
        from_boot: None,
    };
    locks::mark_reboot(&a, "aaaa", &mark).await.unwrap();
    assert!(is_denied(&locks::mark_reboot(&a, "bbbb", &mark).await));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_bound_connections_frames_and_handshakes() {
    let member = Member::start(&[
        ("MAX_CONNECTIONS", "64"),
        ("FRAME_READ_TIMEOUT_MS", "1000"),
        ("TLS_HANDSHAKE_TIMEOUT_MS", "1000"),
    ])
    .await;
    let pid = member.pid();
    let admin = member.admin().await.unwrap();
    admin.put("/acked", b"kept".to_vec()).await.unwrap();
    let term = admin.status().await.unwrap().term;
    let before = member.contents().await;

    // 20 authenticated connections each announce a 64 MiB frame and send 1 KiB.
    let rss_before = rss_kib(pid);
    let agent = shared().issue("aaaa", Role::Agent);
    let mut partial = Vec::new();
    for _ in 0..20 {
        let mut stream = tls_as(&member.client, Some(agent.clone())).await.unwrap();
        stream
            .write_all(&(codec::MAX_FRAME as u32).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&[7u8; 1024]).await.unwrap();
        stream.flush().await.unwrap();
        partial.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grown_mib = rss_kib(pid).saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 64,
        "20 partial 64 MiB frames cost {grown_mib} MiB"
    );
    // Each is dropped at the frame deadline.
    for stream in &mut partial {
        assert!(
            hung_up(stream, Duration::from_secs(5)).await,
            "a partial frame was kept"
        );
    }
    drop(partial);

    // 3000 idle connections that never start their handshake.
    let baseline = open_fds(pid);
    let addr: SocketAddr = member.client.parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..3000 {
        if let Ok(stream) = TcpStream::connect(addr).await {
            idle.push(stream);
        }
    }
    assert!(idle.len() > 2500, "only {} connections opened", idle.len());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = open_fds(pid).saturating_sub(baseline);
    assert!(
        held <= 64 + 8,
        "the member holds {held} connections beyond its baseline"
    );
    // The slow handshakes end at the handshake timeout, so the member serves
    // again while all 3000 are still open on this side.
    let started = Instant::now();
    loop {
        let ok = match member.admin().await {
            Ok(client) => client.get("/acked").await.is_ok(),
            Err(_) => false,
        };
        if ok {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the member did not serve again after the idle connections' handshake timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut closed = 0;
    for stream in idle.iter_mut().take(200) {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(50), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 200, "idle connections were kept open");
    drop(idle);

    assert_eq!(member.contents().await, before, "the store changed");
    member.still_serving(term).await;
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat; the name (field 2) and state (3) come first.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_member_pauses_instead_of_spinning() {
    let member = Member::start_with(
        &[
            ("MAX_CONNECTIONS", "100000"),
            ("TLS_HANDSHAKE_TIMEOUT_MS", "1000"),
        ],
        Some(96),
    )
    .await;
    let pid = member.pid();
    let admin = member.admin().await.unwrap();
    admin.put("/acked", b"kept".to_vec()).await.unwrap();
    let term = admin.status().await.unwrap().term;
    drop(admin);

    let addr: SocketAddr = member.client.parse().unwrap();
    let mut flood = Vec::new();
    for _ in 0..400 {
        if let Ok(stream) = TcpStream::connect(addr).await {
            flood.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop burns a whole core: 200 ticks in 2 s.
    assert!(
        used < 60,
        "the member used {used} ticks in 2 s while out of files"
    );
    let log = member.log();
    assert_eq!(
        log.matches("out of file descriptors").count(),
        1,
        "said once: {log}"
    );
    drop(flood);
    member.still_serving(term).await;
}
