//! Fuzz target: the HTTP API's request handling, in process, through the
//! same HTTP/1 server and router the daemon runs (`flotilla::api::serve`).
//!
//! The first input byte picks the listener (its value modulo 4): 0, the TCP
//! router with a bearer token; 1, the unix socket's (root-only, no token);
//! 2, the TCP router over TLS without a token, the caller holding an agent's
//! client certificate (read only); 3, the same with no client certificate.
//! The rest is written as raw bytes to one connection. The store behind the router is
//! unreachable, so anything that passes input checking ends in a 503; the
//! fuzzer is after the checking itself: the parser, the routes, names,
//! query strings, page tokens, JSON bodies and patches.
//!
//! Properties, beyond "no panic, no hang":
//! * on the TCP router, no request without the token (or, over TLS, without
//!   a client certificate) gets anything but 401 (or hyper's own refusal of
//!   bytes that are not HTTP);
//! * every answer is well-formed HTTP/1.1, and every JSON error body is
//!   fleet's `{"error":{"code":N,...}}` with N the response's status.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flotilla::api::serve::Caller;
use flotilla::api::{self, Shared};
use flotilla::tls::{Identity, Role};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "fuzz-token-0123456789abcdef";

/// One runtime for every input.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A store address where nothing listens (port 1 on loopback).
fn shared() -> Arc<Shared> {
    Arc::new(Shared::new(vec!["127.0.0.1:1".to_string()], None))
}

/// The answers in `response` (several on a kept-alive connection), each
/// as status, headers and body text, as far as they can be split. Lengths
/// count bytes, so the split is done on bytes, text made only per part.
fn answers(response: &[u8]) -> Vec<(u16, String, String)> {
    let mut out = Vec::new();
    let mut rest = response;
    while let Some(start) = find(rest, b"HTTP/1.1 ") {
        rest = &rest[start..];
        let Some(end) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let after = &rest[end + 4..];
        // A body without a length (chunked) may hold anything: stop there.
        let Some(Ok(status)) = head.get(9..12).map(str::parse::<u16>) else {
            break;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0)
            .min(after.len());
        // An answer to HEAD announces a length but carries no body.
        let length = if after.starts_with(b"HTTP/1.1 ") {
            0
        } else {
            length
        };
        let body = String::from_utf8_lossy(&after[..length]).into_owned();
        out.push((status, head, body));
        rest = &after[length..];
    }
    out
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, request)) = data.split_first() else {
        return;
    };
    // 0: TCP with the token; 1: the unix socket's router; 2: TCP over TLS
    // without a token, the caller an agent's certificate (read only);
    // 3: the same without a client certificate (nothing passes).
    let mode = which % 4;
    let with_token = mode == 0;
    let stranger = mode == 3;
    let response = runtime().block_on(async {
        let (app, caller) = match mode {
            0 => (api::router_with_token(shared(), TOKEN), Caller::default()),
            1 => (api::router(shared()), Caller::default()),
            _ => {
                let agent = Identity {
                    cluster: "fuzz".to_string(),
                    role: Role::Agent,
                    name: "fuzz-host".to_string(),
                };
                let caller = Caller((mode == 2).then_some(agent));
                (api::router_tcp(shared(), None, true), caller)
            }
        };
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let serving = tokio::spawn(api::serve::connection_as(
            server,
            app,
            Duration::from_secs(1),
            caller,
        ));
        let _ = client.write_all(request).await;
        let _ = client.shutdown().await;
        let mut response = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut response));
        assert!(read.await.is_ok(), "no answer within 20 s");
        serving.abort();
        response
    });
    let authorized = find(request, TOKEN.as_bytes()).is_some();
    for (status, head, body) in answers(&response) {
        assert!((100..600).contains(&status), "status {status}");
        if (with_token && !authorized) || stranger {
            // hyper refuses what it cannot parse before any route runs.
            assert!(
                status == 401
                    || (status >= 400 && !head.to_ascii_lowercase().contains("application/json")),
                "{status} without the token:\n{head}\n{body}"
            );
        }
        // (An empty body: the answer to a HEAD request.)
        if status >= 400
            && !body.is_empty()
            && head
                .to_ascii_lowercase()
                .contains("content-type: application/json")
        {
            let parsed: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
            assert_eq!(parsed["error"]["code"], status, "{body}");
        }
    }
});
