//! The client of the Raft store, for the CLI, agents, tests and benchmarks.
//!
//! A client holds one connection to one member and fails over to the next
//! endpoint when that member cannot be reached, or accepts but does not
//! answer (a frozen member's kernel still accepts connections for it); after
//! a member failed it, the client starts its next connection past it.
//! Requests that found no leader (or a member that is stopping) changed
//! nothing: the client moves on to the next member and retries there, round
//! the endpoints, until its timeout, so a client of a member cut off in a
//! minority reaches the majority. A request whose connection broke after it
//! was sent, or whose member stopped with it in hand, has an unknown outcome
//! and is reported as such, never silently retried (reads excepted: they
//! change nothing and are retried).
//!
//! A watch normally stays on its member while that member answers; one made
//! with [`Watch::require_leader`] is also ended by a member that has no leader
//! (cut off from the majority), and resumes on another, as etcd's
//! require-leader watches do.
//!
//! With an identity ([`crate::tls::ClientTls`]: given to
//! [`Client::connect_with`], or the process's own set at start with
//! [`crate::tls::stream::set_default_client`]) every connection is mutual TLS
//! and reaches only members of the same cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::codec::{self, CodecError};
use super::kv::{
    Command, Compare, Event, KeyValue, KvError, LeaseId, Op, OpResult, Outcome, Revision,
};
use super::node::{LeaseRenewal, Status};
use super::protocol::{ErrorKind, GET_KEYS_MAX, PAGE_KEYS, Request, Response, WATCH_SILENCE};
use crate::tls::ClientTls;
use crate::tls::stream::BoxStream;

/// The most keys [`Client::get_keys`] reads one by one when a member
/// refuses to read them at once.
pub const KEY_BY_KEY: usize = 64;

/// The head start each endpoint gets over the next when connecting.
const STAGGER: Duration = Duration::from_millis(150);

/// How long a member that accepted a connection may take to answer its first
/// request (its status) before the client tries the next one. A frozen or
/// wedged member still accepts connections: its kernel does that for it.
const FIRST_ANSWER: Duration = Duration::from_secs(1);

/// How long a request may take, retries included, unless changed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoint answered.
    #[error(
        "cannot reach any flotilla member at {endpoints}: {last}; is `flotilla daemon` running there? (check --endpoint)"
    )]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last connection error.
        last: String,
    },
    /// No leader within the timeout: nothing was changed.
    #[error(
        "no leader was elected within {0:?} (is a majority of members up?); nothing was changed"
    )]
    NoLeader(Duration),
    /// The request may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The member refused the request.
    #[error("{0}")]
    Refused(String),
    /// The caller's certificate does not allow the request; nothing changed.
    #[error("{0}")]
    Denied(String),
    /// The lease named does not exist (expired or revoked).
    #[error("lease {0:x} not found (it expired or was revoked); grant a new lease")]
    LeaseNotFound(LeaseId),
    /// A watch fell behind the history.
    #[error("{0}")]
    Compacted(String),
    /// The member answered something this client cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
}

struct Conn {
    read: BufReader<ReadHalf<BoxStream>>,
    write: BufWriter<WriteHalf<BoxStream>>,
}

/// How long a TLS handshake with a member may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the first endpoint that answers, preferring them in order from
/// `start`: each attempt starts [`STAGGER`] after the previous one rather
/// than after it fails, so a dead member (whose address swallows packets
/// until the connect timeout) costs a fraction of a second, not seconds.
async fn open_first(
    endpoints: &[String],
    start: usize,
    tls: &Option<Arc<ClientTls>>,
) -> Result<(usize, Conn), ClientError> {
    let mut attempts = tokio::task::JoinSet::new();
    for offset in 0..endpoints.len() {
        let i = (start + offset) % endpoints.len();
        let endpoint = endpoints[i].clone();
        let delay = STAGGER * u32::try_from(offset).unwrap_or(u32::MAX);
        let tls = tls.clone();
        attempts.spawn(async move {
            tokio::time::sleep(delay).await;
            (i, open(&endpoint, &tls).await)
        });
    }
    let mut last = String::from("no endpoints given");
    while let Some(done) = attempts.join_next().await {
        match done {
            Ok((i, Ok(conn))) => return Ok((i, conn)),
            Ok((i, Err(e))) => last = format!("{}: {e}", endpoints[i]),
            Err(e) => last = e.to_string(),
        }
    }
    Err(ClientError::Unreachable {
        endpoints: endpoints.join(","),
        last,
    })
}

async fn open(endpoint: &str, tls: &Option<Arc<ClientTls>>) -> Result<Conn, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(endpoint))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let stream: BoxStream = match tls {
        Some(tls) => {
            tls.connect(tcp, HANDSHAKE_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?
                .0
        }
        None => Box::new(tcp),
    };
    let (read, write) = tokio::io::split(stream);
    Ok(Conn {
        read: BufReader::new(read),
        write: BufWriter::new(write),
    })
}

impl Conn {
    async fn call(&mut self, request: &Request) -> Result<Response, CodecError> {
        use tokio::io::AsyncWriteExt;
        codec::write_frame(&mut self.write, &codec::encode(request)).await?;
        self.write.flush().await?;
        self.recv().await
    }

    async fn recv(&mut self) -> Result<Response, CodecError> {
        let frame = codec::read_frame(&mut self.read)
            .await?
            .ok_or_else(|| CodecError::Io(std::io::ErrorKind::UnexpectedEof.into()))?;
        codec::decode(&frame)
    }
}

/// A connection to the cluster.
pub struct Client {
    endpoints: Vec<String>,
    tls: Option<Arc<ClientTls>>,
    timeout: Duration,
    conn: Mutex<Option<(usize, Conn)>>,
    /// Where the next reconnect starts: past a member that just failed us,
    /// so a member that is down or wedged is not tried first every time.
    prefer: AtomicUsize,
}

impl Client {
    /// Connects to the first reachable endpoint (`host:port`), as this
    /// process's identity (plaintext when it has none).
    pub async fn connect(endpoints: &[String]) -> Result<Client, ClientError> {
        Client::connect_with(endpoints, crate::tls::stream::default_client()).await
    }

    /// [`Client::connect`] as `tls`'s identity (`None`: plaintext).
    pub async fn connect_with(
        endpoints: &[String],
        tls: Option<Arc<ClientTls>>,
    ) -> Result<Client, ClientError> {
        let client = Client {
            endpoints: endpoints.to_vec(),
            tls,
            timeout: DEFAULT_TIMEOUT,
            conn: Mutex::new(None),
            prefer: AtomicUsize::new(0),
        };
        {
            let mut slot = client.conn.lock().await;
            *slot = Some(client.reconnect(0).await?);
        }
        Ok(client)
    }

    /// A second client of the same cluster, as the same identity and with
    /// the same timeout, on a connection of its own opened at its first
    /// request. A client sends one request at a time over its one
    /// connection, so a request that must not wait behind this client's
    /// (an agent's lease keep-alive behind its claims and reports on a slow
    /// leader, see [`Client::keep_alive_if_idle`]) goes through a sibling.
    pub fn sibling(&self) -> Client {
        Client {
            endpoints: self.endpoints.clone(),
            tls: self.tls.clone(),
            timeout: self.timeout,
            conn: Mutex::new(None),
            prefer: AtomicUsize::new(self.prefer.load(Ordering::Relaxed)),
        }
    }

    /// Changes how long requests may take, retries included.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects to the first endpoint from `start` on that answers, then
    /// moves to the leader when the member names a reachable one: writes then
    /// skip the follower-to-leader hop. Any member still works if that fails.
    /// A member that accepts but does not answer within [`FIRST_ANSWER`] is
    /// passed over for the next.
    async fn reconnect(&self, start: usize) -> Result<(usize, Conn), ClientError> {
        let mut from = start;
        let mut last = String::new();
        for _ in 0..self.endpoints.len().max(1) {
            let (i, mut conn) = self.open_first(from).await?;
            // If this member hangs and the caller gives up, start past it.
            self.prefer.store(i + 1, Ordering::Relaxed);
            let status = match tokio::time::timeout(FIRST_ANSWER, conn.call(&Request::Status)).await
            {
                // A member that says it is stopping (its Raft thread ended,
                // or it was removed) serves nothing: skip it.
                Ok(Ok(Response::Error {
                    kind: ErrorKind::Stopped,
                    message,
                })) => {
                    last = format!("{}: {message}", self.endpoints[i]);
                    from = i + 1;
                    continue;
                }
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    let hint = if self.tls.is_none() {
                        " (if the cluster uses TLS, give --tls-ca, --tls-cert and --tls-key)"
                    } else {
                        ""
                    };
                    last = format!("{}: {e}{hint}", self.endpoints[i]);
                    from = i + 1;
                    continue;
                }
                Err(_) => {
                    last = format!("{}: no answer within {FIRST_ANSWER:?}", self.endpoints[i]);
                    from = i + 1;
                    continue;
                }
            };
            self.prefer.store(i, Ordering::Relaxed);
            if let Response::Status(status) = status
                && let Some(leader) = status.leader_client_addr
                && leader != self.endpoints[i]
                && let Ok(to_leader) = open(&leader, &self.tls).await
            {
                conn = to_leader;
            }
            return Ok((i, conn));
        }
        Err(ClientError::Unreachable {
            endpoints: self.endpoints.join(","),
            last,
        })
    }

    /// [`Client::reconnect`], given up at `deadline`.
    async fn reconnect_by(
        &self,
        start: usize,
        deadline: tokio::time::Instant,
    ) -> Result<(usize, Conn), ClientError> {
        tokio::time::timeout_at(deadline, self.reconnect(start))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Unreachable {
                    endpoints: self.endpoints.join(","),
                    last: format!("no member answered within {:?}", self.timeout),
                })
            })
    }

    async fn open_first(&self, start: usize) -> Result<(usize, Conn), ClientError> {
        open_first(&self.endpoints, start, &self.tls).await
    }

    /// Sends one request; retries while no leader is known or before the request left.
    async fn call(&self, request: Request) -> Result<Response, ClientError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut slot = self.conn.lock().await;
        self.call_on(&mut slot, request, deadline).await
    }

    /// [`Client::call`] over the connection in `slot`, which the caller holds.
    async fn call_on(
        &self,
        slot: &mut Option<(usize, Conn)>,
        request: Request,
        deadline: tokio::time::Instant,
    ) -> Result<Response, ClientError> {
        let mut pause = Duration::from_millis(20);
        loop {
            let (index, conn) = match slot.as_mut() {
                Some((i, conn)) => (*i, conn),
                None => {
                    let start = self.prefer.load(Ordering::Relaxed);
                    *slot = Some(self.reconnect_by(start, deadline).await?);
                    continue;
                }
            };
            let response = tokio::time::timeout_at(deadline, conn.call(&request)).await;
            match response {
                Err(_) => {
                    *slot = None;
                    // Start past this member next time: it may be wedged.
                    self.prefer.store(index + 1, Ordering::Relaxed);
                    return Err(ClientError::Unknown(format!(
                        "no answer within {:?}",
                        self.timeout
                    )));
                }
                Ok(Err(e)) => {
                    // The member went away mid-request; the next call starts on another.
                    *slot = Some(self.reconnect_by(index + 1, deadline).await?);
                    if is_read(&request) {
                        continue;
                    }
                    return Err(ClientError::Unknown(format!(
                        "connection lost after the request was sent ({e})"
                    )));
                }
                // Nothing happened here: try the next member, so a client of
                // a member without a leader (or a stopping one) moves on.
                Ok(Ok(Response::Error {
                    kind: ErrorKind::NoLeader | ErrorKind::Stopped,
                    ..
                })) if tokio::time::Instant::now() + pause < deadline => {
                    *slot = None;
                    self.prefer.store(index + 1, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Ok(Ok(Response::Error {
                    kind: ErrorKind::Unknown,
                    ..
                })) if is_read(&request) && tokio::time::Instant::now() + pause < deadline => {
                    *slot = None;
                    self.prefer.store(index + 1, Ordering::Relaxed);
                }
                Ok(Ok(Response::Error { kind, message })) => {
                    return Err(match kind {
                        ErrorKind::NoLeader => ClientError::NoLeader(self.timeout),
                        ErrorKind::Unknown => ClientError::Unknown(message),
                        ErrorKind::Compacted => ClientError::Compacted(message),
                        ErrorKind::Stopped | ErrorKind::Invalid | ErrorKind::NoSpace => {
                            ClientError::Refused(message)
                        }
                        ErrorKind::Denied => ClientError::Denied(message),
                    });
                }
                Ok(Ok(response)) => return Ok(response),
            }
        }
    }

    async fn command(&self, command: Command) -> Result<Outcome, ClientError> {
        outcome(self.call(Request::Command(command)).await?)
    }

    /// [`Client::keep_alive`] over this client's connection if none of its
    /// requests is in flight; `None`, sending nothing, when one is. A lease
    /// keeper renews here first, so an idle connection to a member gone
    /// silent is found out (and replaced) before the next real request, and
    /// goes through a [`Client::sibling`] when this client is busy, instead of
    /// queueing behind it.
    pub async fn keep_alive_if_idle(&self, id: LeaseId) -> Option<Result<(), ClientError>> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut slot = self.conn.try_lock().ok()?;
        let request = Request::Command(Command::LeaseKeepAlive { id });
        let response = self.call_on(&mut slot, request, deadline).await;
        Some(response.and_then(outcome).map(|_| ()))
    }

    /// Runs a transaction; returns whether the compares held, the results and the revision.
    pub async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<(bool, Vec<OpResult>, Revision), ClientError> {
        match self
            .command(Command::Txn {
                compare,
                success,
                failure,
            })
            .await?
        {
            Outcome::Txn {
                succeeded,
                results,
                revision,
            } => Ok((succeeded, results, revision)),
            other => Err(ClientError::Protocol(format!(
                "unexpected outcome {other:?}"
            ))),
        }
    }

    /// Sets a key; returns the revision of the write.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, ClientError> {
        self.put_with_lease(key, value, None).await
    }

    /// Sets a key attached to a lease.
    pub async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, ClientError> {
        let op = Op::Put {
            key: key.to_string(),
            value,
            lease,
        };
        Ok(self.txn(Vec::new(), vec![op], Vec::new()).await?.2)
    }

    /// Deletes a key, or every key under a prefix; returns how many went.
    pub async fn delete(&self, key: &str, prefix: bool) -> Result<usize, ClientError> {
        let op = Op::Delete {
            key: key.to_string(),
            prefix,
        };
        let (_, results, _) = self.txn(Vec::new(), vec![op], Vec::new()).await?;
        Ok(match results.first() {
            Some(OpResult::Delete { deleted }) => deleted.len(),
            _ => 0,
        })
    }

    /// Reads keys: linearizable unless `serializable`.
    pub async fn range(
        &self,
        key: &str,
        prefix: bool,
        serializable: bool,
    ) -> Result<(Vec<KeyValue>, Revision), ClientError> {
        let request = Request::Range {
            key: key.to_string(),
            prefix,
            serializable,
        };
        match self.call(request).await? {
            Response::Range { kvs, revision } => Ok((
                kvs.into_iter().map(Arc::unwrap_or_clone).collect(),
                revision,
            )),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads every key under `prefix`, page by page (`Request::RangePage`,
    /// [`PAGE_KEYS`] keys or about [`super::protocol::PAGE_BYTES`] a page),
    /// so a prefix too large for one answer frame (a whole registry of
    /// 100,000 units) can still be read; linearizable unless `serializable`.
    ///
    /// The pages are read one after the other, each at the store's revision
    /// of the moment, so together they are NOT one snapshot: a key changed
    /// while the pages were read shows as it was when its page was read.
    /// Nothing is lost, though, as long as the caller that keeps a copy
    /// replays a watch from [`Paged::revision`] + 1 (the lowest page's
    /// revision) up to at least [`Paged::last_revision`] (the highest)
    /// before it trusts the copy: every change a page may have missed or
    /// caught halfway has its event in that span, and applied in order a
    /// key's last event wins, while keys unchanged since the first page are
    /// as read. With `last_revision == revision` the pages are one snapshot.
    ///
    /// A member that predates paged reads answers `Invalid` and hangs up:
    /// the prefix is then read in one `Range` (one snapshot, as before,
    /// bounded by the frame limit).
    pub async fn range_all(&self, prefix: &str, serializable: bool) -> Result<Paged, ClientError> {
        self.range_all_with(prefix, serializable, PAGE_KEYS).await
    }

    /// [`Client::range_all`] asking for at most `limit` keys a page (the
    /// member bounds it too): small pages make a store of a few keys read in
    /// many pages, as a large one would be.
    pub async fn range_all_with(
        &self,
        prefix: &str,
        serializable: bool,
        limit: u32,
    ) -> Result<Paged, ClientError> {
        let mut paged = Paged {
            kvs: Vec::new(),
            revision: 0,
            last_revision: 0,
            pages: 0,
        };
        let mut after: Option<String> = None;
        loop {
            let request = Request::RangePage {
                key: prefix.to_string(),
                prefix: true,
                serializable,
                after: after.clone(),
                limit,
            };
            let (kvs, revision, more) = match self.call(request).await {
                Ok(Response::RangePage {
                    kvs,
                    revision,
                    more,
                }) => (kvs, revision, more),
                Ok(other) => return Err(unexpected(&other)),
                Err(ClientError::Refused(why)) => {
                    // A member of an older release hung up after the request
                    // it could not decode: start again on a fresh connection.
                    tracing::debug!("paged read refused ({why}); reading {prefix:?} in one range");
                    *self.conn.lock().await = None;
                    let (kvs, revision) = self.range(prefix, true, serializable).await?;
                    return Ok(Paged {
                        kvs,
                        revision,
                        last_revision: revision,
                        pages: 1,
                    });
                }
                Err(e) => return Err(e),
            };
            paged.revision = if paged.pages == 0 {
                revision
            } else {
                paged.revision.min(revision)
            };
            paged.last_revision = paged.last_revision.max(revision);
            paged.pages += 1;
            let last = kvs.last().map(|kv| kv.key.clone());
            paged.kvs.extend(kvs.into_iter().map(Arc::unwrap_or_clone));
            match last {
                Some(last) if more => after = Some(last),
                _ => return Ok(paged),
            }
        }
    }

    /// Reads the records of `keys` that exist, all at one linearizable
    /// point per group of [`GET_KEYS_MAX`] keys (`Request::GetKeys`): one
    /// round each, where [`Client::get`] costs a round per key. Keys read
    /// once each, in the order asked. A group a member refuses (one that
    /// predates the request, or an answer past its byte bound) is read key
    /// by key instead when it holds at most [`KEY_BY_KEY`] keys; a larger
    /// one is [`ClientError::Refused`]: that many rounds one after the other
    /// cost more than the caller's other way (a range of their prefix).
    pub async fn get_keys(&self, keys: &[String]) -> Result<Vec<KeyValue>, ClientError> {
        let mut seen = std::collections::HashSet::new();
        let keys: Vec<String> = keys
            .iter()
            .filter(|key| seen.insert(key.as_str()))
            .cloned()
            .collect();
        let mut kvs = Vec::new();
        for group in keys.chunks(GET_KEYS_MAX) {
            let request = Request::GetKeys {
                keys: group.to_vec(),
                serializable: false,
            };
            match self.call(request).await {
                Ok(Response::Range { kvs: found, .. }) => {
                    kvs.extend(found.into_iter().map(Arc::unwrap_or_clone));
                }
                Ok(other) => return Err(unexpected(&other)),
                Err(ClientError::Refused(why)) => {
                    // A member of an older release hung up after the
                    // request it could not decode: go on over a fresh one.
                    *self.conn.lock().await = None;
                    if group.len() > KEY_BY_KEY {
                        return Err(ClientError::Refused(why));
                    }
                    tracing::debug!(
                        "reading {} keys at once refused ({why}); reading them one by one",
                        group.len()
                    );
                    for key in group {
                        kvs.extend(self.get(key).await?);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(kvs)
    }

    /// Reads one key (linearizable).
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, ClientError> {
        Ok(self.range(key, false, false).await?.0.into_iter().next())
    }

    /// Grants a lease; returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, ClientError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        match self.command(Command::LeaseGrant { ttl_ms }).await? {
            Outcome::LeaseGranted { id, .. } => Ok(id),
            other => Err(ClientError::Protocol(format!(
                "unexpected outcome {other:?}"
            ))),
        }
    }

    /// Renews a lease for its full TTL.
    pub async fn keep_alive(&self, id: LeaseId) -> Result<(), ClientError> {
        self.command(Command::LeaseKeepAlive { id })
            .await
            .map(|_| ())
    }

    /// Ends a lease now, deleting its keys.
    pub async fn revoke(&self, id: LeaseId) -> Result<(), ClientError> {
        self.command(Command::LeaseRevoke { id }).await.map(|_| ())
    }

    /// The connected member's status.
    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.call(Request::Status).await? {
            Response::Status(status) => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// When each lease was last renewed, as the member this client talks to
    /// saw it ([`super::node::Core::lease_renewals`]). A member of the first
    /// release cannot tell: [`ClientError::Refused`].
    pub async fn lease_renewals(&self) -> Result<Vec<LeaseRenewal>, ClientError> {
        match self.call(Request::LeaseRenewals).await {
            Ok(Response::LeaseRenewals(renewals)) => Ok(renewals),
            Ok(other) => Err(unexpected(&other)),
            Err(refused @ ClientError::Refused(_)) => {
                // Such a member hangs up after an undecodable request: the
                // next request starts on a fresh connection, not a dead one.
                *self.conn.lock().await = None;
                Err(refused)
            }
            Err(e) => Err(e),
        }
    }

    /// A backup file of the store, read at a linearizable point by the
    /// member this client talks to ([`super::backup`]).
    pub async fn snapshot(&self) -> Result<Vec<u8>, ClientError> {
        match self.call(Request::Snapshot).await? {
            Response::Snapshot(file) => Ok(file),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds a member as a learner (promoted to a voter once caught up); start
    /// it afterwards with `--initial-cluster-state existing`.
    pub async fn member_add(&self, name: &str, peer_addr: &str) -> Result<(), ClientError> {
        let request = Request::MemberAdd {
            name: name.to_string(),
            peer_addr: peer_addr.to_string(),
        };
        self.expect_outcome(request).await
    }

    /// Removes a member.
    pub async fn member_remove(&self, name: &str) -> Result<(), ClientError> {
        let request = Request::MemberRemove {
            name: name.to_string(),
        };
        self.expect_outcome(request).await
    }

    async fn expect_outcome(&self, request: Request) -> Result<(), ClientError> {
        match self.call(request).await? {
            Response::Outcome(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Watches keys under `prefix` from revision `from` (the list's revision + 1).
    pub fn watch(&self, prefix: &str, from: Revision) -> Watch {
        Watch {
            endpoints: self.endpoints.clone(),
            tls: self.tls.clone(),
            prefix: prefix.to_string(),
            next: from.max(1),
            conn: None,
            endpoint: 0,
            require_leader: false,
        }
    }
}

/// Asks the member at `endpoint` itself for its status, where a [`Client`]
/// would move on to the leader: a health check must hear every member.
pub async fn member_status(endpoint: &str, timeout: Duration) -> Result<Status, ClientError> {
    member_status_as(endpoint, crate::tls::stream::default_client(), timeout).await
}

/// [`member_status`] as `tls`'s identity (`None`: plaintext) rather than
/// this process's: for a process that talks to several clusters in turn,
/// each with its own CA (the benchmark booting lab after lab).
pub async fn member_status_as(
    endpoint: &str,
    tls: Option<Arc<ClientTls>>,
    timeout: Duration,
) -> Result<Status, ClientError> {
    let unreachable = |last: String| ClientError::Unreachable {
        endpoints: endpoint.to_string(),
        last,
    };
    let ask = async {
        let mut conn = open(endpoint, &tls).await.map_err(unreachable)?;
        match conn.call(&Request::Status).await {
            Ok(Response::Status(status)) => Ok(status),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(unreachable(e.to_string())),
        }
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| Err(unreachable(format!("no answer within {timeout:?}"))))
}

/// What a command's answer says: its outcome, or the error a failed one is.
fn outcome(response: Response) -> Result<Outcome, ClientError> {
    match response {
        Response::Outcome(Outcome::Failed(KvError::LeaseNotFound(id))) => {
            Err(ClientError::LeaseNotFound(id))
        }
        Response::Outcome(Outcome::Failed(e)) => Err(ClientError::Refused(e.to_string())),
        Response::Outcome(outcome) => Ok(outcome),
        other => Err(unexpected(&other)),
    }
}

/// Requests that change nothing, so retrying them is always safe.
fn is_read(request: &Request) -> bool {
    matches!(
        request,
        Request::Range { .. }
            | Request::RangePage { .. }
            | Request::GetKeys { .. }
            | Request::Status
            | Request::LeaseRenewals
    )
}

/// Every key under a prefix read page by page ([`Client::range_all`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paged {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The lowest revision a page was read at (the first page's, unless a
    /// later one was served by a member further behind): replay a watch
    /// from here + 1.
    pub revision: Revision,
    /// The highest revision a page was read at: the replay must reach it
    /// before the keys, with the events applied, are a snapshot.
    pub last_revision: Revision,
    /// How many answers it took (1 for a member that reads in one range).
    pub pages: usize,
}

fn unexpected(response: &Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {response:?}"))
}

/// A stream of changes that survives member failures: when its connection
/// breaks it reconnects to the next endpoint and resumes from the first
/// revision it has not delivered, so no event is missed or repeated.
pub struct Watch {
    endpoints: Vec<String>,
    tls: Option<Arc<ClientTls>>,
    prefix: String,
    next: Revision,
    conn: Option<Conn>,
    endpoint: usize,
    require_leader: bool,
}

impl Watch {
    /// Asks members to end this watch when they have no leader, and resumes
    /// it on another member then. A member cut off from the majority still
    /// answers (heartbeats included) but learns of no change: without this,
    /// a watch on it waits for events that never come.
    pub fn require_leader(mut self) -> Self {
        self.require_leader = true;
        self
    }

    /// Starts this watch on member `seed` (modulo the endpoints) instead of
    /// the first: many clients with the same endpoint list (every agent)
    /// then spread their watches, and the heartbeats those cost, over the
    /// members rather than all holding the first one. It moves on from
    /// there as any watch does.
    pub fn starting_at(mut self, seed: usize) -> Self {
        self.endpoint = seed % self.endpoints.len().max(1);
        self
    }

    /// The first revision not yet delivered.
    pub fn next_revision(&self) -> Revision {
        self.next
    }

    /// The next batch of events (whole revisions, in order).
    pub async fn next(&mut self) -> Result<Vec<Event>, ClientError> {
        let mut failures = 0;
        loop {
            if self.conn.is_none() {
                match self.subscribe().await {
                    Ok(conn) => self.conn = Some(conn),
                    Err(e @ (ClientError::Compacted(_) | ClientError::Denied(_))) => return Err(e),
                    Err(e) => {
                        failures += 1;
                        if failures > 3 * self.endpoints.len().max(1) {
                            return Err(e);
                        }
                        self.endpoint += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let conn = self.conn.as_mut().expect("connected above");
            // Members send a heartbeat on idle watches: silence this long
            // means the member is gone without a word (cut off, powered off).
            let Ok(received) = tokio::time::timeout(WATCH_SILENCE, conn.recv()).await else {
                tracing::debug!(
                    "watch on {}: silent for {WATCH_SILENCE:?}; moving to another member",
                    self.endpoints[self.endpoint % self.endpoints.len().max(1)]
                );
                self.conn = None;
                self.endpoint += 1;
                continue;
            };
            match received {
                Ok(Response::Events(events)) => {
                    let fresh: Vec<Event> = events
                        .into_iter()
                        .filter(|e| e.revision() >= self.next)
                        .collect();
                    if let Some(last) = fresh.last() {
                        self.next = last.revision() + 1;
                        return Ok(fresh);
                    }
                }
                Ok(Response::Error {
                    kind: ErrorKind::Compacted,
                    message,
                }) => return Err(ClientError::Compacted(message)),
                Ok(Response::Error {
                    kind: ErrorKind::NoLeader,
                    message,
                }) => {
                    tracing::debug!(
                        "watch on {}: {message}; moving to another member",
                        self.endpoints[self.endpoint % self.endpoints.len().max(1)]
                    );
                    self.conn = None;
                    self.endpoint += 1;
                }
                Ok(other) => return Err(unexpected(&other)),
                Err(_) => {
                    self.conn = None;
                    self.endpoint += 1;
                }
            }
        }
    }

    async fn subscribe(&mut self) -> Result<Conn, ClientError> {
        let start = self.endpoint % self.endpoints.len().max(1);
        let (at, mut conn) = open_first(&self.endpoints, start, &self.tls).await?;
        self.endpoint = at;
        let endpoint = &self.endpoints[at];
        let (prefix, from) = (self.prefix.clone(), self.next);
        let request = if self.require_leader {
            Request::WatchRequireLeader { prefix, from }
        } else {
            Request::Watch { prefix, from }
        };
        let answer = tokio::time::timeout(WATCH_SILENCE, conn.call(&request))
            .await
            .unwrap_or_else(|_| Err(CodecError::Io(std::io::ErrorKind::TimedOut.into())));
        match answer {
            Ok(Response::Events(first)) if first.is_empty() => Ok(conn),
            Ok(Response::Error {
                message,
                kind: ErrorKind::Compacted,
            }) => Err(ClientError::Compacted(message)),
            Ok(Response::Error {
                message,
                kind: ErrorKind::Denied,
            }) => Err(ClientError::Denied(message)),
            Ok(Response::Error {
                message,
                kind: ErrorKind::NoLeader,
            }) => Err(ClientError::Unreachable {
                endpoints: endpoint.clone(),
                last: message,
            }),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(ClientError::Unreachable {
                endpoints: endpoint.clone(),
                last: e.to_string(),
            }),
        }
    }
}
