//! `--tunnel HOST[:PORT]`: reach a remote cluster's API through ssh, as
//! fleetctl's `--tunnel` did.
//!
//! The system ssh forwards fresh unix sockets in a private directory here,
//! one per endpoint, to the APIs on the far side (a unix socket, or a
//! `HOST:PORT` as the tunnel host reaches it), so the remote API needs
//! nothing installed for it and every request goes through a local socket;
//! the client tries them in order as it tries endpoints without a tunnel.
//! The ssh process lives as long as the [`Tunnel`].

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::endpoint::Endpoint;
use super::ssh::{SshOptions, split_host_port};

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// `--tunnel` is not `HOST[:PORT]`.
    #[error("invalid --tunnel: {0}")]
    Address(String),
    /// No private directory for the local socket.
    #[error("cannot make a private directory for the tunnel's socket: {0}")]
    Directory(std::io::Error),
    /// ssh could not be started.
    #[error("cannot run ssh for the tunnel (is OpenSSH's client installed?): {0}")]
    Spawn(std::io::Error),
    /// ssh stopped before the forward was up.
    #[error("ssh to {host} for the tunnel failed: {stderr}")]
    Failed {
        /// The tunnel host.
        host: String,
        /// What ssh said.
        stderr: String,
    },
    /// The forward did not come up in time.
    #[error(
        "the tunnel through {host} was not up within {waited:?}; check that \
         `ssh -p PORT {host}` works without a prompt"
    )]
    Timeout {
        /// The tunnel host.
        host: String,
        /// How long we waited.
        waited: Duration,
    },
}

/// A running `ssh -N -L LOCAL:REMOTE... HOST`; dropping it stops ssh and
/// removes the local sockets.
#[derive(Debug)]
pub struct Tunnel {
    child: Child,
    dir: PathBuf,
    sockets: Vec<PathBuf>,
}

impl Tunnel {
    /// Opens a tunnel through `host` (`HOST[:PORT]`) to each of `remotes`,
    /// waiting up to `wait` for ssh to authenticate and set up the forwards.
    pub fn open(
        ssh: &SshOptions,
        host: &str,
        remotes: &[Endpoint],
        wait: Duration,
    ) -> Result<Tunnel, TunnelError> {
        let (host_name, port) = split_host_port(host, 22).map_err(TunnelError::Address)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("flotilla-tunnel-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(TunnelError::Directory)?;
        let sockets: Vec<PathBuf> = (0..remotes.len())
            .map(|i| dir.join(format!("api-{i}.sock")))
            .collect();
        // The tunnel host itself is reached directly, never through itself.
        let direct = SshOptions {
            jump: None,
            forward_agent: false,
            ..ssh.clone()
        };
        let mut command = direct
            .command(&host_name, port)
            .map_err(TunnelError::Address)?;
        command
            .args([
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "BatchMode=yes",
            ])
            .args(["-o", "StreamLocalBindUnlink=yes"]);
        for (socket, remote) in sockets.iter().zip(remotes) {
            let target = match remote {
                Endpoint::Unix(path) => path.display().to_string(),
                Endpoint::Http(_) => remote.host_port().expect("http endpoints have one"),
            };
            command
                .arg("-L")
                .arg(format!("{}:{target}", socket.display()));
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = command.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            TunnelError::Spawn(e)
        })?;
        let mut tunnel = Tunnel {
            child,
            dir,
            sockets,
        };
        tunnel.wait_up(host, wait)?;
        Ok(tunnel)
    }

    /// Waits until ssh has bound every local socket, or says why it did not.
    fn wait_up(&mut self, host: &str, wait: Duration) -> Result<(), TunnelError> {
        let started = Instant::now();
        loop {
            if self.sockets.iter().all(|s| s.exists()) {
                return Ok(());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return Err(TunnelError::Failed {
                    host: host.to_string(),
                    stderr: stderr.trim().to_string(),
                });
            }
            if started.elapsed() >= wait {
                return Err(TunnelError::Timeout {
                    host: host.to_string(),
                    waited: wait,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The local socket that reaches the `index`th of the remote endpoints.
    pub fn socket(&self, index: usize) -> &Path {
        &self.sockets[index]
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
