//! The CLI against a real daemon's API, without systemd: one store-only
//! member (no agent, so nothing is ever placed) serving its API on a unix
//! socket and on TCP with a token (`flotilla lock` speaks to its store
//! directly). What needs real hosts is in the lab tests.

use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::daemon::{Daemon, TOKEN};
use support::text;

const APP: &str = "[Unit]\nDescription=my app\n[Service]\nExecStart=/bin/sleep infinity\n\
                   [X-Fleet]\nConflicts=myapp@*.service\n";

#[test]
fn submit_list_cat_and_destroy_as_fleetctl_shows_them() {
    let daemon = Daemon::start();
    daemon.write("myapp@.service", APP);
    daemon.write("zeta.service", "[Service]\nExecStart=/bin/true\n");
    let out = daemon.ok(&["submit", "zeta", "myapp@.service", "myapp@1.service"]);
    assert_eq!(
        out,
        "Unit zeta.service inactive\nUnit myapp@.service inactive\nUnit myapp@1.service inactive\n"
    );
    // Submitting again changes nothing and says nothing.
    assert_eq!(daemon.ok(&["submit", "zeta.service"]), "");

    let files = daemon.ok(&["list-unit-files"]);
    let lines: Vec<&str> = files.lines().collect();
    assert_eq!(
        lines[0], "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET",
        "{files}"
    );
    let units: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(
        units,
        ["myapp@.service", "myapp@1.service", "zeta.service"],
        "sorted"
    );
    let cells: Vec<&str> = lines[3].split('\t').filter(|c| !c.is_empty()).collect();
    assert_eq!(cells[2..], ["inactive", "inactive", "-"], "{files}");
    assert_eq!(cells[1].len(), 7, "a short hash: {files}");
    let bare = daemon.ok(&[
        "list-unit-files",
        "--no-legend",
        "--fields",
        "unit,desc,global",
        "-l",
    ]);
    assert_eq!(
        bare.lines().next().unwrap(),
        "myapp@.service\tmy app\tfalse"
    );

    // cat prints the stored body; the instance has its template's.
    let cat = daemon.ok(&["cat", "myapp@1"]);
    assert!(cat.starts_with("[Unit]\nDescription=my app\n"), "{cat}");
    assert!(cat.contains("Conflicts=myapp@*.service"), "{cat}");

    // Nothing runs without agents: list-units shows the wish, `-` for the rest.
    daemon.ok(&["start", "--no-block", "myapp@2"]);
    let units = daemon.ok(&["list-units"]);
    assert_eq!(
        units,
        "UNIT\t\tMACHINE\tACTIVE\tSUB\nmyapp@2.service\t-\t-\t-\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["list-units", "--json"])).unwrap();
    assert_eq!(json[0]["desired"], "launched");
    assert_eq!(daemon.ok(&["list-machines"]), "MACHINE\tIP\tMETADATA\n");

    // destroy: a missing unit is a success with a word about it.
    let out = daemon.run(&["destroy", "myapp@1", "nosuch", "myap@2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Destroyed myapp@1.service\n");
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: unit nosuch.service does not exist"),
        "{err}"
    );
    assert!(err.contains("did you mean myapp@2?"), "{err}");
    assert!(!daemon.ok(&["list-unit-files"]).contains("myapp@1.service"));
}

#[test]
fn unknown_units_get_distinct_errors_and_suggestions() {
    let daemon = Daemon::start();
    daemon.write("myapp@.service", APP);
    daemon.ok(&["submit", "myapp@.service", "myapp@3"]);
    let err = daemon.fails(&["start", "--no-block", "myap@3"]);
    assert!(err.contains("did you mean myapp@3?"), "{err}");
    assert!(err.contains("not in the cluster"), "{err}");
    let err = daemon.fails(&["stop", "myapp@4", "myap@3"]);
    assert!(
        err.contains("cannot stop: no unit myapp@4.service"),
        "{err}"
    );
    assert!(
        err.contains("no unit myap@3.service (did you mean myapp@3?)"),
        "{err}"
    );
    assert!(!err.contains("submit"), "{err}");
    let err = daemon.fails(&["unload", "nosuch"]);
    assert!(
        err.contains("cannot unload: no unit nosuch.service"),
        "{err}"
    );
    let err = daemon.fails(&["cat", "myap@3"]);
    assert!(
        err.contains("no unit myap@3.service in the cluster (did you mean myapp@3?)"),
        "{err}"
    );
    // Nothing was changed by the refused calls.
    let files = daemon.ok(&["list-unit-files", "--fields", "unit,dstate", "--no-legend"]);
    assert_eq!(
        files,
        "myapp@.service\tinactive\nmyapp@3.service\tinactive\n"
    );
}

#[test]
fn files_warn_like_verify_and_differences_need_replace() {
    let daemon = Daemon::start();
    let typo = daemon.write(
        "typo.service",
        "[Service]\nExecStart=/bin/true\n[X-Fleet]\nConflict=x.service\n",
    );
    let err = daemon.fails(&["start", "--no-block", typo.to_str().unwrap()]);
    assert!(err.contains("unknown [X-Fleet] keys (Conflict)"), "{err}");
    assert!(err.contains("did you mean Conflicts=?"), "{err}");
    assert!(
        daemon.ok(&["list-unit-files", "--no-legend"]).is_empty(),
        "refused: nothing stored"
    );
    let out = daemon.run(&["submit", "--force", typo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("typo.service:4: warning"),
        "{}",
        text(&out.stderr)
    );

    let plain = daemon.write(
        "plain.service",
        "[Unit]\nDescription=x\n[Servce]\nExecStart=/bin/true\n",
    );
    let out = daemon.run(&["submit", plain.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("no [Service] section"),
        "{}",
        text(&out.stderr)
    );

    // A local file that differs from the cluster's unit is a warning, and
    // the cluster's unit stays, unless --replace (depends on the API's fleet
    // replace semantics for the new body to be stored).
    daemon.write("plain.service", "[Service]\nExecStart=/bin/echo two\n");
    let out = daemon.run(&["submit", "plain.service"]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("differs from the local file"),
        "{}",
        text(&out.stderr)
    );
    assert!(daemon.ok(&["cat", "plain"]).contains("[Servce]"));
    daemon.ok(&["submit", "--replace", "plain.service"]);
    assert_eq!(
        daemon.ok(&["cat", "plain"]),
        "[Service]\nExecStart=/bin/echo two\n"
    );
}

#[test]
fn a_unit_that_cannot_be_placed_fails_after_its_attempts_naming_it() {
    let daemon = Daemon::start();
    daemon.write(
        "lonely.service",
        "[Service]\nExecStart=/bin/sleep infinity\n",
    );
    let started = Instant::now();
    let err = daemon.fails(&["start", "--block-attempts", "3", "lonely.service"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("1 of 1 unit(s) did not start: lonely.service"),
        "{err}"
    );
    assert!(err.contains("within 3 checks"), "{err}");
}

#[test]
fn http_needs_the_token_and_a_dead_endpoint_is_skipped_and_remembered() {
    let daemon = Daemon::start();
    let out = daemon
        .command()
        .args(["list-machines", "--endpoint", &daemon.http])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Bearer"),
        "{}",
        text(&out.stderr)
    );
    let with_token = |endpoint: &str| {
        daemon
            .command()
            .args([
                "--endpoint",
                endpoint,
                "--api-token",
                TOKEN,
                "list-machines",
            ])
            .output()
            .unwrap()
    };
    let out = with_token(&daemon.http);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A first endpoint that answers nothing at all: one that accepts
    // connections and never replies, the worst kind.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let list = format!("http://{},{}", silent.local_addr().unwrap(), daemon.http);
    let started = Instant::now();
    let out = with_token(&list);
    let first = started.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(first < Duration::from_secs(5), "{first:?}");
    let started = Instant::now();
    let out = with_token(&list);
    let second = started.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        second < Duration::from_secs(1),
        "the good endpoint is remembered: {second:?} after {first:?}"
    );
    let memory = std::fs::read_to_string(daemon.path().join("cache/flotilla/endpoints")).unwrap();
    assert_eq!(memory, format!("{list}\t{}\n", daemon.http));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let daemon = Daemon::start();
    let names: Vec<String> = (0..300).map(|i| format!("u{i}.service")).collect();
    for name in &names {
        daemon.write(name, "[Service]\nExecStart=/bin/true\n");
    }
    let mut args = vec!["submit"];
    args.extend(names.iter().map(String::as_str));
    daemon.ok(&args);
    let mut shell = Command::new("bash");
    shell
        .arg("-c")
        .arg("set -o pipefail; \"$0\" list-unit-files | head -1")
        .arg(env!("CARGO_BIN_EXE_flotilla"));
    for (key, value) in daemon.command().get_envs() {
        match value {
            Some(value) => shell.env(key, value),
            None => shell.env_remove(key),
        };
    }
    for _ in 0..4 {
        let out = shell.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let printed = text(&out.stdout);
        assert!(printed.starts_with("UNIT\t"), "{printed}");
        assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    }
}

#[test]
fn bulk_progress_is_a_bar_on_a_terminal_and_lines_when_piped() {
    let daemon = Daemon::start();
    let names: Vec<String> = (1..=5).map(|i| format!("p{i}.service")).collect();
    for name in &names {
        daemon.write(name, "[Service]\nExecStart=/bin/true\n");
    }
    let mut args = vec!["load", "--no-block"];
    args.extend(names.iter().map(String::as_str));
    daemon.ok(&args);
    // Nothing runs them (no agent), so unloading them arrives at once.
    let unload = |on_terminal: bool| -> String {
        let verb = format!(
            "'{}' unload {}",
            env!("CARGO_BIN_EXE_flotilla"),
            names.join(" ")
        );
        let mut shell = Command::new(if on_terminal { "script" } else { "bash" });
        if on_terminal {
            // script(1) gives the verb a pseudo-terminal and copies it out.
            shell.args(["-qec", &verb, "/dev/null"]);
        } else {
            shell.args(["-c", &verb]);
        }
        for (key, value) in daemon.command().get_envs() {
            match value {
                Some(value) => shell.env(key, value),
                None => shell.env_remove(key),
            };
        }
        let out = shell.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    };
    let piped = unload(false);
    assert!(piped.contains("5/5 units inactive\n"), "{piped:?}");
    assert!(
        !piped.contains('\r') && !piped.contains("\x1b["),
        "{piped:?}"
    );

    daemon.ok(&args);
    let terminal = unload(true);
    assert!(
        terminal.contains("\r\x1b[K[##############################] 5/5 inactive"),
        "{terminal:?}"
    );
    assert!(
        terminal.contains("Unit p5.service inactive\r\n"),
        "{terminal:?}"
    );
    assert!(
        terminal.ends_with("\r\x1b[K"),
        "the bar is cleared: {terminal:?}"
    );
}

#[test]
fn restart_follows_fleetctl_v1() {
    let daemon = Daemon::start();
    daemon.write("one.service", "[Service]\nExecStart=/bin/true\n");
    daemon.write(
        "all.service",
        "[Service]\nExecStart=/bin/true\n[X-Fleet]\nGlobal=true\n",
    );
    daemon.ok(&["submit", "one.service", "all.service"]);
    // A global unit: set loaded then launched, never waited for.
    let out = daemon.ok(&["restart", "all.service"]);
    assert_eq!(
        out,
        "Triggered global unit all.service stop\nTriggered global unit all.service start\n"
    );
    // Nothing runs one.service (no agent): fleetctl refused "in state inactive".
    let err = daemon.fails(&["restart", "--no-block", "one.service"]);
    assert!(err.contains("one.service: it is inactive"), "{err}");
    let help = daemon.ok(&["restart", "--help"]);
    assert!(
        help.contains("--no-block") && help.contains("--block-attempts"),
        "{help}"
    );
}

#[test]
fn set_max_below_the_holders_keeps_them_and_status_says_so() {
    let daemon = Daemon::start();
    let lock = |args: &[&str]| {
        let mut all = vec!["--store-endpoint", daemon.store.as_str(), "lock"];
        all.extend_from_slice(args);
        daemon.run(&all)
    };
    let ok = |args: &[&str]| {
        let out = lock(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(ok(&["set-max", "2"]), "Old: 1\nNew: 2\n");
    ok(&["acquire", "a"]);
    ok(&["acquire", "b"]);
    let status = ok(&["status"]);
    assert!(!status.contains("more than Max"), "{status}");

    assert_eq!(ok(&["set-max", "1"]), "Old: 2\nNew: 1\n");
    let status = ok(&["status"]);
    assert!(status.contains("Available: 0\nMax: 1\n"), "{status}");
    assert!(
        status.contains("Held by 2, more than Max")
            && status.contains("a ")
            && status.contains("b "),
        "both holders kept, and said so: {status}"
    );
    let refused = lock(&["acquire", "c"]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("reboot lock is full"));

    // One release still leaves the lock full at the new max; nobody is admitted.
    ok(&["release", "a"]);
    let status = ok(&["status"]);
    assert!(!status.contains("more than Max"), "{status}");
    assert!(!lock(&["acquire", "c"]).status.success());
    ok(&["release", "b"]);
    ok(&["acquire", "c"]);
}
