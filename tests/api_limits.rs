//! The HTTP API's listeners against hostile clients (issue 10), on a real
//! store-only daemon: a non-root user is refused on TCP (no token) and on
//! the unix socket (its mode), slow headers are cut off, an oversized body is
//! refused, thousands of idle connections stay bounded, and running out of
//! file descriptors makes the accept loop pause rather than spin. After each,
//! the store is unchanged and the API still serves.
//!
//! The `nobody` cases need root (to drop to `nobody` with `setpriv`), as the
//! lab tests do.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod support;

use support::daemon::{Daemon, TOKEN};
use support::text;

/// `flotilla ARGS` run as user `nobody` (no supplementary groups).
fn as_nobody(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            env!("CARGO_BIN_EXE_flotilla"),
        ])
        .args(args)
        .env_remove("FLOTILLA_ENDPOINT")
        .env_remove("FLOTILLA_API_TOKEN")
        .env_remove("FLOTILLA_TUNNEL")
        .env("HOME", "/tmp")
        .env("XDG_CACHE_HOME", "/tmp/flotilla-nobody-cache")
        .current_dir(daemon.path())
        .output()
        .unwrap()
}

/// One raw request over TCP; the whole answer as text (empty if closed).
fn raw(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may answer (and close) before a big body is all written.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    text(&answer)
}

fn get(path: &str, token: Option<&str>) -> Vec<u8> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n").into_bytes()
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// The unit files the store holds, read as root through the socket.
fn stored(daemon: &Daemon) -> String {
    daemon.ok(&["list-unit-files", "--no-legend"])
}

/// Waits until `GET path` with the token answers 200 on TCP; how long it took.
fn serves_again(addr: &str, path: &str) -> Duration {
    let started = Instant::now();
    loop {
        let answer = raw(addr, &get(path, Some(TOKEN)));
        if answer.starts_with("HTTP/1.1 200") {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the API did not serve again: {answer}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How many descriptors the daemon has open now.
fn open_fds(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
        .unwrap()
        .count()
}

#[test]
fn nobody_is_refused_on_tcp_and_on_the_socket() {
    let daemon = Daemon::start();
    // Let `nobody` reach the socket's directory: only the socket's own mode
    // may stop it.
    std::fs::set_permissions(
        daemon.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "the socket is root-only");
    assert_eq!(meta.uid(), 0, "owned by root");
    let unit = daemon.write("evil.service", "[Service]\nExecStart=/bin/id\n");
    std::fs::set_permissions(&unit, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

    let socket = format!("unix://{}", daemon.socket.display());
    for endpoint in [socket.as_str(), daemon.http.as_str()] {
        for verb in [
            vec!["start", "--no-block", "evil.service"],
            vec!["submit", "evil.service"],
            vec!["list-units"],
        ] {
            let mut args = vec!["--endpoint", endpoint];
            args.extend(&verb);
            let out = as_nobody(&daemon, &args);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            if endpoint == daemon.http {
                assert!(
                    err.contains("401") || err.contains("token"),
                    "{args:?}: {err}"
                );
            } else {
                assert!(err.to_lowercase().contains("permission"), "{args:?}: {err}");
            }
        }
    }
    // A wrong token is no better, loopback or not.
    let out = as_nobody(
        &daemon,
        &[
            "--endpoint",
            &daemon.http,
            "--api-token",
            "not-the-token-but-long-enough",
            "start",
            "--no-block",
            "evil.service",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(stored(&daemon), "", "nothing was written");

    // With the token, nobody is a client like any other (the token is the
    // credential), and root on the socket needs none.
    let out = as_nobody(
        &daemon,
        &[
            "--endpoint",
            &daemon.http,
            "--api-token",
            TOKEN,
            "submit",
            "evil.service",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stored(&daemon).starts_with("evil.service"));
}

#[test]
fn slow_headers_are_cut_off_and_big_bodies_refused() {
    let daemon = Daemon::start_with(&[("FLOTILLA_API_HEADER_TIMEOUT", "1s")]);
    let addr = daemon.tcp_addr().to_string();

    // Headers that never end, one byte every 200 ms: closed after about a
    // second (the default would be 10s; without a timeout, never).
    let mut slow = TcpStream::connect(&addr).unwrap();
    let started = Instant::now();
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    slow.write_all(head).unwrap();
    let cut = loop {
        std::thread::sleep(Duration::from_millis(200));
        if slow.write_all(b"a").is_err() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a client trickling its headers was not cut off"
        );
    };
    assert!(cut >= Duration::from_secs(1), "cut after {cut:?}");

    // A connection that sends nothing at all is closed too.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    let read = idle.read(&mut buf);
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "an idle connection got {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(29),
        "idle not closed"
    );

    // A body one byte over the limit: 413, nothing stored, on TCP and the socket.
    let limit = 1024 * 1024;
    let body = format!(
        r#"{{"desiredState":"launched","options":[{{"section":"Service","name":"ExecStart","value":"/bin/true {}"}}]}}"#,
        "x".repeat(limit)
    );
    let put = format!(
        "PUT /fleet/v1/units/big.service HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = raw(&addr, put.as_bytes());
    assert_eq!(status(&answer), 413, "{}", &answer[..answer.len().min(300)]);
    assert!(answer.contains("\"code\":413"), "{answer}");
    assert_eq!(stored(&daemon), "");

    // The API still serves.
    let answer = raw(&addr, &get("/fleet/v1/units", Some(TOKEN)));
    assert_eq!(status(&answer), 200, "{answer}");
}

#[test]
fn thousands_of_idle_connections_stay_bounded() {
    let cap = 64;
    let daemon = Daemon::start_with(&[
        ("FLOTILLA_API_MAX_CONNECTIONS", "64"),
        ("FLOTILLA_API_HEADER_TIMEOUT", "3s"),
    ]);
    let addr = daemon.tcp_addr().to_string();
    let before = open_fds(&daemon);

    let flood: Vec<TcpStream> = (0..3000)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    // Let the daemon accept what it will.
    std::thread::sleep(Duration::from_millis(500));
    let during = open_fds(&daemon);
    assert!(
        during <= before + cap + 16,
        "{during} descriptors open with the flood, {before} before, cap {cap}"
    );
    // Those over the cap were told so and closed.
    let mut busy = 0;
    for stream in flood.iter().rev().take(100) {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        let _ = (&*stream).read_to_string(&mut answer);
        if answer.starts_with("HTTP/1.1 503") {
            assert!(answer.contains("api_max_connections"), "{answer}");
            busy += 1;
        }
    }
    assert!(busy > 0, "no connection over the cap was answered 503");

    // root's unix socket is its own listener: it serves through the flood.
    assert_eq!(stored(&daemon), "");

    // The idle ones are closed after the header timeout; then TCP serves again.
    serves_again(&addr, "/fleet/v1/units");
    drop(flood);
    assert!(
        daemon.log().contains("api_max_connections"),
        "{}",
        daemon.log()
    );
}

#[test]
fn out_of_descriptors_the_accept_loop_pauses_instead_of_spinning() {
    let daemon = Daemon::start_with(&[("FLOTILLA_API_HEADER_TIMEOUT", "4s")]);
    let addr = daemon.tcp_addr().to_string();
    // Lower the daemon's descriptor limit below what it needs for the flood
    // (the cap, 512, would allow more).
    let pid = daemon.child.id().to_string();
    let limit = open_fds(&daemon) + 40;
    let status = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={limit}:{limit}")])
        .status()
        .unwrap();
    assert!(status.success());

    let cpu = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let started = Instant::now();
    let flood: Vec<TcpStream> = (0..120)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    eprintln!("120 connections in {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let (ticks, started) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu() - ticks;
    let elapsed = started.elapsed();
    // Clock ticks are 1/100 s: spinning would use about 200 in 2 s.
    assert!(
        used < 60,
        "the daemon used {used} ticks of CPU in {elapsed:?} out of descriptors"
    );
    let log = daemon.log();
    assert!(log.contains("cannot accept connections"), "{log}");
    assert_eq!(
        log.matches("cannot accept connections").count(),
        1,
        "logged once a minute, not per attempt: {log}"
    );

    drop(flood);
    let took = serves_again(&addr, "/health");
    eprintln!("serving again {took:?} after the flood ended");
}
