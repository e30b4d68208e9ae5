//! The `flotilla` binary driven as a user drives it: real processes, real files,
//! exit codes and output checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env_remove("FLOTILLA_CONFIG")
        .output()
        .expect("the flotilla binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/units");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_unit_verifies() {
    let files = examples();
    assert!(
        files.len() >= 8,
        "expected the example units, found {files:?}"
    );
    let args: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    let mut argv = vec!["verify"];
    argv.extend(args);
    let out = flotilla(&argv);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).matches(": ok: ").count(), files.len());
    assert!(!stdout(&out).contains("error"), "{}", stdout(&out));
}

#[test]
fn examples_cover_every_x_fleet_option() {
    let mut seen = std::collections::BTreeSet::new();
    for file in examples() {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines() {
            if let Some((key, _)) = line.split_once('=') {
                seen.insert(key.trim().to_string());
            }
        }
    }
    for key in flotilla::units::fleet::KEYS {
        assert!(seen.contains(key), "no example uses {key}");
    }
    let seed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/units/myapp@.service"),
    )
    .unwrap();
    assert!(seed.contains("Conflicts=myapp@*.service"));
}

#[test]
fn errors_are_printed_as_file_and_line_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.service",
        b"[Service]\nExecStart=/bin/true\nthis line has no equals\n[X-Fleet]\n",
    );
    let good = write(
        dir.path(),
        "good.service",
        b"[Service]\nExecStart=/bin/true\n",
    );
    let out = flotilla(&["verify", bad.to_str().unwrap(), good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{}:3: error: missing '='", bad.display())),
        "{text}"
    );
    assert!(text.contains(&format!("{}: ok: unit good.service", good.display())));
    assert!(stderr(&out).contains("1 of 2 unit file(s) have errors"));
}

#[test]
fn x_fleet_rule_violations_are_errors_with_lines() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "combo.service",
        b"[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineID=0123456789abcdef0123456789abcdef\nGlobal=true\nConflicts=x[\n",
    );
    let out = flotilla(&["verify", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(":5: error: MachineID cannot be used with Global"),
        "{text}"
    );
    assert!(
        text.contains(":6: error: Conflicts: invalid glob"),
        "{text}"
    );
}

#[test]
fn warnings_do_not_fail_verification() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "warn.service",
        b"[Service]\nExecStart=/bin/true\n[X-Fleet]\nConflict=typo.service\n",
    );
    let out = flotilla(&["verify", file.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(stdout(&out).contains(":4: warning: unknown [X-Fleet] key"));
}

#[test]
fn hostile_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "a..service",
        "evil$(id).service",
        "x.bogus",
        "-rf.service",
        "a@b@c.service",
    ] {
        let file = write(dir.path(), name, b"[Service]\nExecStart=/bin/true\n");
        let out = flotilla(&["verify", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(
            stdout(&out).contains("invalid unit name"),
            "{name}: {}",
            stdout(&out)
        );
    }
    // A file name with no suffix gets .service, as fleetctl does.
    let file = write(dir.path(), "plain", b"[Service]\nExecStart=/bin/true\n");
    let out = flotilla(&["verify", file.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("ok: unit plain.service"));
}

#[test]
fn oversized_unreadable_and_binary_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = b"[Service]\nEnvironment=".to_vec();
    big.extend(std::iter::repeat_n(b'a', 300 * 1024));
    let big = write(dir.path(), "big.service", &big);
    let binary = write(
        dir.path(),
        "bin.service",
        b"[Service]\nExecStart=\xff\xfe\n",
    );
    let missing = dir.path().join("missing.service");
    for (file, expected) in [
        (&big, "larger than"),
        (&binary, ":2: error: the file is not valid UTF-8"),
        (&missing, "cannot read the file"),
    ] {
        let out = flotilla(&["verify", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", file.display());
        assert!(stdout(&out).contains(expected), "{}", stdout(&out));
    }
}

#[test]
fn print_shows_the_canonical_form() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.service",
        b"# comment\n[Service]\n  ExecStart = /bin/echo \\\n   hi\n",
    );
    let out = flotilla(&["verify", "--print", file.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        stdout(&out).ends_with("[Service]\nExecStart=/bin/echo     hi\n"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn unknown_flags_are_usage_errors_with_exit_2() {
    for args in [
        &["verify", "--bogus", "x"][..],
        &["nope"],
        &["daemon", "--what"],
        &["verify"],
    ] {
        let out = flotilla(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stdout(&out).is_empty());
        assert!(!stderr(&out).is_empty());
    }
}

#[test]
fn check_config_validates_and_shows_effective_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "flotilla.toml",
        b"name = \"n1\"\ndata_dir = \"/var/lib/x\"\n[metadata]\ndisk = \"ssd\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["daemon", "--check-config", "--config"])
        .arg(&config)
        .args(["--data-dir", "/from/flag"])
        .env("FLOTILLA_DATA_DIR", "/from/env")
        .env("FLOTILLA_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("name = \"n1\""), "{text}");
    assert!(
        text.contains("data_dir = \"/from/flag\""),
        "flag beats env: {text}"
    );
    assert!(
        text.contains("log = \"debug\""),
        "env beats default: {text}"
    );
    assert!(text.contains("disk = \"ssd\""), "{text}");
}

#[test]
fn bad_config_names_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "flotilla.toml",
        b"name = \"n1\"\nbogus_key = 1\n",
    );
    let out = flotilla(&[
        "daemon",
        "--check-config",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:2", config.display())), "{err}");
    assert!(err.contains("bogus_key"), "{err}");

    let out = flotilla(&[
        "daemon",
        "--check-config",
        "--config",
        "/nonexistent/f.toml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot read config file"));

    let out = flotilla(&[
        "daemon",
        "--check-config",
        "--config",
        config.to_str().unwrap(),
        "--client-listen",
        "nonsense",
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn daemon_refuses_a_busy_port_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = flotilla(&[
        "daemon",
        "--name",
        "n1",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--peer-listen",
        &addr,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot listen for peers"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("raft").exists(), "nothing was created");
}

#[test]
fn client_verbs_report_an_unreachable_cluster() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = unused.local_addr().unwrap().to_string();
    drop(unused);
    let out = flotilla(&["--store-endpoint", &addr, "kv", "get", "/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach any flotilla member"),
        "{}",
        stderr(&out)
    );
    let url = format!("http://{addr}");
    let out = flotilla(&["--endpoint", &url, "list-units"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains(&format!("cannot reach the flotilla API at {url}")),
        "{err}"
    );
    let out = flotilla(&["list-units", "--endpoint", "unix:///nonexistent/api.sock"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is the daemon running on this host"),
        "{}",
        stderr(&out)
    );
}

/// The unit verbs against an endpoint where nothing listens: bad input must be
/// refused on its own merits (exit 1, a message about the input; exit 2 for a
/// bad flag), before any attempt to reach the cluster; good input gets a clear
/// "cannot reach".
#[test]
fn unit_verbs_refuse_bad_input_before_reaching_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = "http://127.0.0.1:9";
    let run = |args: &[&str]| {
        let mut all = vec!["--endpoint", nowhere];
        all.extend(args);
        flotilla(&all)
    };
    let big = write(
        dir.path(),
        "big.service",
        format!(
            "[Service]\nExecStart=/bin/true\n# {}\n",
            "x".repeat(300 * 1024)
        )
        .as_bytes(),
    );
    let broken = write(dir.path(), "broken.service", b"[Service]\nno equals sign\n");
    let typo = write(
        dir.path(),
        "typo.service",
        b"[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachinOf=db.service\n",
    );
    let good = write(
        dir.path(),
        "good.service",
        b"[Service]\nExecStart=/bin/true\n",
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["start", "../../etc/x"], "etc/x: no such file"),
        (vec!["stop", "../../etc/x"], "looks like a file"),
        (vec!["destroy", "web@1.bogus"], "invalid unit name"),
        (vec!["cat", "a b.service"], "invalid unit name"),
        (
            vec!["start", "myapp@3.serivce"],
            "did you mean myapp@3.service?",
        ),
        (vec!["submit", big.to_str().unwrap()], "big.service"),
        (vec!["submit", broken.to_str().unwrap()], "broken.service:2"),
        (vec!["start", broken.to_str().unwrap()], "broken.service:2"),
        (
            vec!["submit", typo.to_str().unwrap()],
            "unknown [X-Fleet] keys (MachinOf)",
        ),
    ];
    for (args, expect) in cases {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.starts_with("error: ") || err.contains("\nerror: "),
            "{args:?}: {err}"
        );
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(
            !err.contains("cannot reach"),
            "{args:?} was checked first: {err}"
        );
    }
    // The typo's warning is printed as verify prints it, with the fix.
    let out = run(&["submit", typo.to_str().unwrap()]);
    assert!(
        stderr(&out).contains(
            ":4: warning: unknown [X-Fleet] key \"MachinOf\" is ignored; did you mean MachineOf=?"
        ),
        "{}",
        stderr(&out)
    );
    for good_input in [
        vec!["submit", good.to_str().unwrap()],
        vec!["submit", "--force", typo.to_str().unwrap()],
    ] {
        let out = run(&good_input);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("cannot reach the flotilla API"),
            "{}",
            stderr(&out)
        );
    }
    let usage: Vec<Vec<&str>> = vec![
        vec!["list-units", "--bogus"],
        vec!["list-units", "--fields", "unit,bogus"],
        vec!["--endpoint", "127.0.0.1:4001", "list-units"],
        vec!["start", "--no-block", "--block-attempts", "3", "a"],
        vec!["journal", "--output", "json;id", "a"],
    ];
    for args in usage {
        let out = flotilla(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("cannot reach"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// The help a newcomer reads: no flag shown as required that is not, no
/// flag offered where it means nothing, no talk of files where none are taken.
#[test]
fn help_texts_say_what_each_verb_takes() {
    let help = |args: &[&str]| {
        let out = flotilla(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let top = help(&["--help"]);
    assert!(top.contains("Usage: flotilla [OPTIONS] <COMMAND>"), "{top}");
    for verb in [
        "list-units",
        "restart",
        "ssh",
        "status",
        "journal",
        "explain",
        "version",
    ] {
        assert!(top.contains(&format!("  {verb} ")), "{verb} missing: {top}");
    }
    let kill = help(&["lab", "kill", "--help"]);
    assert!(!kill.contains("--endpoint"), "{kill}");
    assert!(!kill.contains("--api-token"), "{kill}");
    let stop = help(&["stop", "--help"]);
    let (what, _) = stop.split_once("Options:").unwrap();
    assert!(!what.to_lowercase().contains("file"), "{stop}");
    assert!(
        stop.contains("--no-block") && stop.contains("--block-attempts"),
        "{stop}"
    );
    assert!(
        stop.contains("Usage: flotilla stop [OPTIONS] <UNIT>..."),
        "{stop}"
    );
    let start = help(&["start", "--help"]);
    for flag in [
        "--replace",
        "--force",
        "--endpoint",
        "--tunnel",
        "--request-timeout",
    ] {
        assert!(start.contains(flag), "{flag}: {start}");
    }
    let list = help(&["list-units", "--help"]);
    for flag in ["--fields", "--full", "-l", "--no-legend"] {
        assert!(list.contains(flag), "{flag}: {list}");
    }
    let ssh = help(&["ssh", "--help"]);
    for flag in [
        "--forward-agent",
        "--ssh-username",
        "--ssh-port",
        "--strict-host-key-checking",
        "--known-hosts-file",
    ] {
        assert!(ssh.contains(flag), "{flag}: {ssh}");
    }
    let version = help(&["version"]);
    assert_eq!(
        version,
        format!("flotilla version {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// Any verb whose reader leaves early (`| head -1`) exits quietly.
#[test]
fn a_closed_pipe_ends_a_verb_quietly() {
    let files: Vec<PathBuf> = examples();
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .arg("verify")
            .args(&files)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    }
}

#[test]
fn lock_verbs_check_their_arguments_before_the_cluster() {
    // An endpoint nobody listens on: a check that needed the cluster would
    // report it unreachable instead of naming the bad argument.
    let none = ["--endpoint", "127.0.0.1:9"];
    for (args, says) in [
        (&["lock", "acquire", "a/b"][..], "is not a machine id"),
        (&["lock", "need-reboot", "x y"], "is not a machine id"),
        (
            &["lock", "status", "--group", "no/such"],
            "is not a lock group name",
        ),
        (
            &["lock", "release", "--group", ""],
            "is not a lock group name",
        ),
    ] {
        let mut argv = none.to_vec();
        argv.extend(args);
        let out = flotilla(&argv);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    let out = flotilla(&["lock", "set-max", "-1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error: {}",
        stderr(&out)
    );
    let out = flotilla(&[&none[..], &["lock", "status"]].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));
    // locksmithctl's names work too.
    let help = stdout(&flotilla(&["lock", "--help"]));
    for verb in ["status", "acquire", "release", "set-max", "need-reboot"] {
        assert!(help.contains(verb), "{help}");
    }
    let out = flotilla(&[&none[..], &["lock", "unlock", "a/b"]].concat());
    assert!(
        stderr(&out).contains("is not a machine id"),
        "{}",
        stderr(&out)
    );
}

/// What bash offers after `flotilla WORD<TAB>`, with the script
/// `flotilla completion bash` prints loaded.
fn bash_completes(script: &Path, word: &str) -> Vec<String> {
    let program = format!(
        "source {script}; COMP_WORDS=(flotilla '{word}'); COMP_CWORD=1; \
         COMP_LINE='flotilla {word}'; COMP_POINT=${{#COMP_LINE}}; \
         _flotilla flotilla '{word}' flotilla; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script = script.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &program])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().map(str::to_string).collect()
}

#[test]
fn bash_completion_offers_the_real_verbs() {
    let out = flotilla(&["completion", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "flotilla.bash", &out.stdout);
    assert_eq!(bash_completes(&script, "list-m"), ["list-machines"]);
    let all = bash_completes(&script, "");
    for verb in [
        "submit",
        "start",
        "list-units",
        "daemon",
        "member",
        "completion",
    ] {
        assert!(all.iter().any(|w| w == verb), "{verb} not offered: {all:?}");
    }
    let out = flotilla(&["completion", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn tls_init_and_issue_make_private_files_and_refuse_bad_requests() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_arg = ca.to_str().unwrap();
    let out = flotilla(&["tls", "init", ca_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("flotilla tls issue"),
        "{}",
        stdout(&out)
    );
    let again = flotilla(&["tls", "init", ca_arg]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("already holds a CA"),
        "{}",
        stderr(&again)
    );

    let out_dir = dir.path().join("h1");
    let out_arg = out_dir.to_str().unwrap();
    let out = flotilla(&[
        "tls", "issue", "h1", "--role", "member", "--ca", ca_arg, "--out", out_arg,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("member \"h1\""), "{}", stdout(&out));
    for file in ["h1.pem", "h1.key", "ca.pem"] {
        let mode = std::fs::metadata(out_dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    let role = flotilla(&["tls", "issue", "h2", "--role", "root", "--ca", ca_arg]);
    assert_eq!(role.status.code(), Some(2));
    assert!(
        stderr(&role).contains("member, agent or admin"),
        "{}",
        stderr(&role)
    );
    let name = flotilla(&["tls", "issue", "H/2", "--role", "agent", "--ca", ca_arg]);
    assert_eq!(name.status.code(), Some(1));
    assert!(stderr(&name).contains("invalid name"), "{}", stderr(&name));
    let missing = dir.path().join("nowhere");
    let no_ca = flotilla(&[
        "tls",
        "issue",
        "h2",
        "--role",
        "agent",
        "--ca",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(no_ca.status.code(), Some(1));
    assert!(stderr(&no_ca).contains("ca.pem"), "{}", stderr(&no_ca));
    assert!(!ca.join("h2.pem").exists(), "nothing was issued");
}
