//! The client listener: one task per connection, one request at a time.
//!
//! On a TLS listener every request is first put to the [`Authorize`] policy
//! with the caller's identity; a refused request changes nothing and is
//! answered with a `Denied` error. The policy comes from outside (the daemon
//! injects the registry's): this module knows roles, not keys.
//!
//! An agent's request that names leases (a keep-alive, a revoke, a put
//! attached to a lease) is also put to the policy with each lease as this
//! member knows it, or as the leader does when this member knows none yet;
//! a lease nobody knows is answered "not found" without a proposal. A lease
//! an agent grants is proposed on its behalf, so it records the agent as its
//! owner. Checking before proposing is sound because a lease's owner never
//! changes and a lease id is never used twice: a lease found owned by an
//! agent is that agent's or gone by the time the request applies.

use std::sync::Arc;

use tokio::io::{BufReader, BufWriter};

use super::codec::{self, CodecError, FrameLimits, MemberInfo};
use super::kv::{KvError, Lease, Outcome};
use super::listener::{Accepted, Listener};
use super::node::{RequestError, WatchMsg, member_id};
use super::protocol::{ErrorKind, Request, Response, WATCH_FRAME_BYTES, WATCH_HEARTBEAT, batches};
use super::runner::Handle;
use crate::tls::{Identity, Role};

/// The read and the write buffer of each client connection, in bytes.
///
/// Every host keeps two to four connections to the store (its requests, its
/// watch, the client that found where the watch starts, and its lease
/// keep-alive's spare once its requests' connection was busy), and clients
/// move to the leader: at 5,000 hosts the leader holds 10,000–15,000 of them,
/// so tokio's default 8 KiB per buffer would cost it 160–240 MiB. Most frames (requests, outcomes, keep-alives) fit in 1 KiB; a
/// larger one is read or written past the buffer, straight from or into
/// its own allocation, at the cost of a second system call.
pub const CONNECTION_BUFFER_BYTES: usize = 1024;

/// Decides whether a caller may make a request.
pub trait Authorize: Send + Sync {
    /// `Ok` when `who` may make `request`; otherwise why not, and what to do
    /// instead, for the caller.
    fn check(&self, who: &Identity, request: &Request) -> Result<(), String>;

    /// `Ok` when the agent `who` may keep `lease` alive, revoke it or attach
    /// keys to it. Asked, after [`Authorize::check`] allowed the request, for
    /// each lease an agent's request names.
    fn may_use_lease(&self, who: &Identity, lease: &Lease) -> Result<(), String>;
}

/// Serves clients on `listener` until the process ends; on a TLS listener
/// every request passes `policy` first.
pub async fn serve_clients(listener: Listener, node: Handle, policy: Arc<dyn Authorize>) {
    let frame = listener.limits().frame.clone();
    listener
        .serve(move |accepted: Accepted| {
            let node = node.clone();
            let policy = policy.clone();
            let frame = frame.clone();
            async move {
                let from = accepted.from;
                if let Err(e) = connection(accepted, node, &*policy, &frame).await {
                    tracing::debug!("client {from}: {e}");
                }
            }
        })
        .await;
}

async fn connection(
    accepted: Accepted,
    node: Handle,
    policy: &dyn Authorize,
    frame_limits: &FrameLimits,
) -> Result<(), CodecError> {
    let Accepted {
        stream, who, slot, ..
    } = accepted;
    let _slot = slot;
    let (read, write) = tokio::io::split(stream);
    let mut read = BufReader::with_capacity(CONNECTION_BUFFER_BYTES, read);
    let mut write = BufWriter::with_capacity(CONNECTION_BUFFER_BYTES, write);
    while let Some(frame) = codec::read_frame_within(&mut read, frame_limits).await? {
        let request = match codec::decode::<Request>(&frame) {
            Ok(request) => request,
            Err(e) => {
                let answer = Response::Error {
                    kind: ErrorKind::Invalid,
                    message: format!("undecodable request: {e}"),
                };
                send(&mut write, &answer).await?;
                return Ok(());
            }
        };
        if let Some(who) = &who
            && let Err(why) = policy.check(who, &request)
        {
            tracing::info!("refused a request of {who}: {why}");
            let answer = Response::Error {
                kind: ErrorKind::Denied,
                message: format!("permission denied for {who}: {why}"),
            };
            send(&mut write, &answer).await?;
            continue;
        }
        let agent = who
            .as_ref()
            .filter(|who| who.role == Role::Agent)
            .map(|who| (who, who.name.clone()));
        if let Some((who, _)) = agent
            && let Some(refusal) = lease_refusal(&node, policy, who, &request).await
        {
            send(&mut write, &refusal).await?;
            continue;
        }
        match request {
            Request::Watch { prefix, from } => {
                return stream_watch(&node, prefix, from, false, &mut write).await;
            }
            Request::WatchRequireLeader { prefix, from } => {
                return stream_watch(&node, prefix, from, true, &mut write).await;
            }
            _ => {}
        }
        let answer = answer(&node, request, agent.map(|(_, name)| name)).await;
        send(&mut write, &answer).await?;
    }
    Ok(())
}

/// Why an agent's request may not use the leases it names, as the answer
/// to send (`None`: it may). See the module docs.
async fn lease_refusal(
    node: &Handle,
    policy: &dyn Authorize,
    who: &Identity,
    request: &Request,
) -> Option<Response> {
    let Request::Command(command) = request else {
        return None;
    };
    for id in command.leases() {
        let lease = match node.lease(id).await {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                return Some(Response::Outcome(Outcome::Failed(KvError::LeaseNotFound(
                    id,
                ))));
            }
            Err(e) => return Some(Response::from(e)),
        };
        if let Err(why) = policy.may_use_lease(who, &lease) {
            tracing::info!("refused a request of {who}: {why}");
            return Some(Response::Error {
                kind: ErrorKind::Denied,
                message: format!("permission denied for {who}: {why}"),
            });
        }
    }
    None
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    response: &Response,
) -> Result<(), CodecError> {
    use tokio::io::AsyncWriteExt;
    codec::write_frame(write, &codec::encode(response)).await?;
    write.flush().await?;
    Ok(())
}

/// Serves a request the caller may make; `agent` is the caller's machine id
/// when an agent makes it (its grants become its leases).
async fn answer(node: &Handle, request: Request, agent: Option<String>) -> Response {
    let result = match request {
        Request::Command(command) => node
            .propose_for(command, agent)
            .await
            .map(Response::Outcome),
        Request::Range {
            key,
            prefix,
            serializable,
        } => node
            .range(key, prefix, !serializable)
            .await
            .map(|(kvs, revision)| Response::Range { kvs, revision }),
        Request::RangePage {
            key,
            prefix,
            serializable,
            after,
            limit,
        } => node
            .range_page(key, prefix, after, limit, !serializable)
            .await
            .map(|(kvs, revision, more)| Response::RangePage {
                kvs,
                revision,
                more,
            }),
        Request::GetKeys { keys, serializable } => node
            .get_keys(keys, !serializable)
            .await
            .map(|(kvs, revision)| Response::Range { kvs, revision }),
        Request::Status => node.status().await.map(Response::Status),
        Request::LeaseRenewals => node.lease_renewals().await.map(Response::LeaseRenewals),
        Request::Snapshot => node.backup().await.map(Response::Snapshot),
        Request::MemberAdd { name, peer_addr } => {
            if let Err(message) = super::member::check(&name, &peer_addr) {
                return Response::Error {
                    kind: ErrorKind::Invalid,
                    message,
                };
            }
            let info = MemberInfo {
                name: name.clone(),
                peer_addr,
            };
            node.member_change(member_id(&name), Some(info))
                .await
                .map(Response::Outcome)
        }
        Request::MemberRemove { name } => match node.member_change(member_id(&name), None).await {
            Err(RequestError::NoSuchMember(_)) => Err(RequestError::Invalid(format!(
                "no member named {name:?}; see flotilla member list"
            ))),
            other => other.map(Response::Outcome),
        },
        Request::Watch { .. } | Request::WatchRequireLeader { .. } => {
            unreachable!("watches are streamed by the caller")
        }
    };
    result.unwrap_or_else(Response::from)
}

/// Whether the member has a leader; with `require_leader` unset, always.
/// Asked at every watch heartbeat: read without waking the Raft thread.
fn leader_known(node: &Handle, require_leader: bool) -> bool {
    !require_leader || node.leader() != 0
}

async fn stream_watch<W: tokio::io::AsyncWrite + Unpin>(
    node: &Handle,
    prefix: String,
    from: u64,
    require_leader: bool,
    write: &mut W,
) -> Result<(), CodecError> {
    if !leader_known(node, require_leader) {
        return send(write, &Response::from(RequestError::NoLeader)).await;
    }
    let mut events = match node.watch(prefix, from) {
        Ok(events) => events,
        Err(e) => return send(write, &Response::from(e)).await,
    };
    // An empty batch first: the client knows the watch is registered. Then
    // one whenever the watch has been idle for a heartbeat.
    send(write, &Response::Events(Vec::new())).await?;
    loop {
        let message = tokio::select! {
            message = events.recv() => match message {
                Some(message) => message,
                None => return Ok(()),
            },
            () = tokio::time::sleep(WATCH_HEARTBEAT) => {
                if !leader_known(node, require_leader) {
                    return send(write, &Response::from(RequestError::NoLeader)).await;
                }
                send(write, &Response::Events(Vec::new())).await?;
                continue;
            }
        };
        match message {
            WatchMsg::Events(events) => {
                for batch in batches(events, WATCH_FRAME_BYTES) {
                    send(write, &Response::Events(batch)).await?;
                }
            }
            WatchMsg::Compacted(c) => {
                let error = Response::Error {
                    kind: ErrorKind::Compacted,
                    message: c.to_string(),
                };
                send(write, &error).await?;
            }
        }
    }
}
