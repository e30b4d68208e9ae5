//! A real store-only daemon (no agent, so nothing is ever placed) serving its
//! API on a unix socket and on loopback TCP with a token, for tests of the
//! CLI and of the API's listeners that need no systemd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, text};

/// The daemons' `api_token`.
pub const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A running store-only daemon and a directory for unit files.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Child,
    /// The API's unix socket.
    pub socket: PathBuf,
    /// The API's TCP base URL, `http://127.0.0.1:PORT`.
    pub http: String,
    /// The store's client address (`--store-endpoint`), `127.0.0.1:PORT`.
    pub store: String,
}

impl Daemon {
    /// Starts one with the default API limits and waits until it serves.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts one with extra environment (`FLOTILLA_API_MAX_CONNECTIONS`...)
    /// and waits until its API reaches its store.
    pub fn start_with(env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer, api) = (free_port(), free_port(), free_port());
        let socket = dir.path().join("api.sock");
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["daemon", "--name", "n1", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--client-listen", &format!("127.0.0.1:{client}")])
            .args(["--peer-listen", &format!("127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("n1=127.0.0.1:{peer}")])
            .args([
                "--election-timeout-ms",
                "300",
                "--no-agent",
                "--log",
                "warn",
            ])
            .env_remove("FLOTILLA_CONFIG")
            .env("FLOTILLA_API_SOCKET", &socket)
            .env("FLOTILLA_API_LISTEN", format!("127.0.0.1:{api}"))
            .env("FLOTILLA_API_TOKEN", TOKEN)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            dir,
            child,
            socket,
            http: format!("http://127.0.0.1:{api}"),
            store: format!("127.0.0.1:{client}"),
        };
        let started = Instant::now();
        loop {
            if daemon.run(&["list-unit-files"]).status.success() {
                return daemon;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the daemon did not serve its API: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// `host:port` of the TCP API.
    pub fn tcp_addr(&self) -> &str {
        self.http.trim_start_matches("http://")
    }

    /// `flotilla` pointed at the unix socket, with a private cache.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        command
            .env(
                "FLOTILLA_ENDPOINT",
                format!("unix://{}", self.socket.display()),
            )
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env_remove("FLOTILLA_API_TOKEN")
            .env_remove("FLOTILLA_TUNNEL")
            .current_dir(self.dir.path());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Runs a verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "flotilla {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs a verb that must fail with exit 1; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "flotilla {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(err.contains("error: "), "{args:?}: {err}");
        err
    }

    pub fn write(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
