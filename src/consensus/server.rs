//! The client listener: one task per connection, one request at a time.

use tokio::io::{BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

use super::codec::{self, CodecError, MemberInfo};
use super::node::{RequestError, WatchMsg, member_id};
use super::protocol::{ErrorKind, Request, Response, WATCH_FRAME_BYTES, WATCH_HEARTBEAT, batches};
use super::runner::Handle;

/// Serves clients on `listener` until the process ends.
pub async fn serve_clients(listener: TcpListener, node: Handle) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, node).await {
                tracing::debug!("client {from}: {e}");
            }
        });
    }
}

async fn connection(stream: TcpStream, node: Handle) -> Result<(), CodecError> {
    let _ = stream.set_nodelay(true);
    // A client that went away without a reset (its host died) is noticed:
    // on a watch when heartbeats stay unacknowledged, on an idle connection
    // by keepalive probes. Its task and socket end either way.
    super::sockets::limit_unacked(&stream);
    super::sockets::probe_when_idle(&stream);
    let (read, write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut write = BufWriter::new(write);
    while let Some(frame) = codec::read_frame(&mut read).await? {
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
        match request {
            Request::Watch { prefix, from } => {
                return stream_watch(&node, prefix, from, false, &mut write).await;
            }
            Request::WatchRequireLeader { prefix, from } => {
                return stream_watch(&node, prefix, from, true, &mut write).await;
            }
            _ => {}
        }
        let answer = answer(&node, request).await;
        send(&mut write, &answer).await?;
    }
    Ok(())
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

async fn answer(node: &Handle, request: Request) -> Response {
    let result = match request {
        Request::Command(command) => node.propose(command).await.map(Response::Outcome),
        Request::Range {
            key,
            prefix,
            serializable,
        } => node
            .range(key, prefix, !serializable)
            .await
            .map(|(kvs, revision)| Response::Range { kvs, revision }),
        Request::Status => node.status().await.map(Response::Status),
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
async fn leader_known(node: &Handle, require_leader: bool) -> bool {
    !require_leader || node.status().await.is_ok_and(|s| s.leader != 0)
}

async fn stream_watch<W: tokio::io::AsyncWrite + Unpin>(
    node: &Handle,
    prefix: String,
    from: u64,
    require_leader: bool,
    write: &mut W,
) -> Result<(), CodecError> {
    if !leader_known(node, require_leader).await {
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
                if !leader_known(node, require_leader).await {
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
