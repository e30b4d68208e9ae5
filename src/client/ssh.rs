//! The system `ssh`, with fleetctl's ssh flags turned into its options.
//!
//! flotilla never speaks ssh itself: the user's `ssh` already knows their
//! keys, agent and config, and OpenSSH checks host keys better than anything
//! we would write. Both `--tunnel` and `ssh`/`status`/`journal` build their
//! command here, so host-key checking is one rule: verified against
//! known_hosts unless the user turns it off, and the agent is forwarded only
//! when asked for.

use std::path::PathBuf;
use std::process::Command;

/// How to reach hosts over ssh (fleetctl's `--ssh-*` flags and friends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshOptions {
    /// The remote user (`--ssh-username`).
    pub username: String,
    /// The port of cluster hosts' sshd (`--ssh-port`).
    pub port: u16,
    /// A private key to use instead of the agent's and ssh's defaults.
    pub identity: Option<PathBuf>,
    /// Refuse unknown or changed host keys (`--strict-host-key-checking`).
    pub strict_host_key_checking: bool,
    /// The known_hosts file to check against [default: ssh's own].
    pub known_hosts: Option<PathBuf>,
    /// Forward the ssh agent (`-A`); off unless asked for.
    pub forward_agent: bool,
    /// Reach hosts through this one, `HOST[:PORT]` (`--tunnel`).
    pub jump: Option<String>,
}

/// Splits `HOST[:PORT]` (`[V6]:PORT` for IPv6) into host and port.
pub fn split_host_port(given: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = given.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{given:?}: missing ']'"))?;
        (host, after.strip_prefix(':'))
    } else {
        match given.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            _ => (given, None),
        }
    };
    if host.is_empty() || host.starts_with('-') {
        return Err(format!("{given:?} is not a host name or address"));
    }
    let port = match port {
        Some(port) => port
            .parse()
            .map_err(|_| format!("{given:?}: the port must be a number from 1 to 65535"))?,
        None => default_port,
    };
    Ok((host.to_string(), port))
}

/// Quotes a word for the shell that runs ssh's `ProxyCommand`.
fn shell_quote(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:@%=+,".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

impl SshOptions {
    /// The options every connection gets: user, host-key policy, identity, agent.
    fn common(&self) -> Vec<String> {
        let mut args = vec!["-l".to_string(), self.username.clone()];
        if self.strict_host_key_checking {
            args.extend(["-o".into(), "StrictHostKeyChecking=ask".into()]);
            if let Some(file) = &self.known_hosts {
                args.extend([
                    "-o".into(),
                    format!("UserKnownHostsFile={}", file.display()),
                ]);
            }
        } else {
            args.extend([
                "-o".into(),
                "StrictHostKeyChecking=no".into(),
                "-o".into(),
                "UserKnownHostsFile=/dev/null".into(),
                "-o".into(),
                "LogLevel=ERROR".into(),
            ]);
        }
        if let Some(identity) = &self.identity {
            args.extend([
                "-i".into(),
                identity.display().to_string(),
                "-o".into(),
                "IdentitiesOnly=yes".into(),
            ]);
        }
        args
    }

    /// `ssh [options] -p PORT HOST`, ready for `-- COMMAND...`; through the
    /// `--tunnel` host when there is one (its own port from `HOST:PORT`).
    pub fn command(&self, host: &str, port: u16) -> Result<Command, String> {
        let mut command = Command::new("ssh");
        command.args(self.common());
        command.arg(if self.forward_agent { "-A" } else { "-a" });
        if let Some(jump) = &self.jump {
            let (jump_host, jump_port) = split_host_port(jump, 22)?;
            // ProxyCommand, not ProxyJump: options given on the command line
            // (known_hosts, identity) then apply to the jump host too.
            let mut proxy = vec!["ssh".to_string()];
            proxy.extend(self.common());
            proxy.extend([
                "-a".into(),
                "-p".into(),
                jump_port.to_string(),
                "-W".into(),
                "%h:%p".into(),
                jump_host,
            ]);
            let proxy: Vec<String> = proxy.iter().map(|w| shell_quote(w)).collect();
            command
                .arg("-o")
                .arg(format!("ProxyCommand={}", proxy.join(" ")));
        }
        command.arg("-p").arg(port.to_string()).arg(host);
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> SshOptions {
        SshOptions {
            username: "core".into(),
            port: 22,
            identity: None,
            strict_host_key_checking: true,
            known_hosts: Some(PathBuf::from("/lab/known hosts")),
            forward_agent: false,
            jump: None,
        }
    }

    fn args(command: &Command) -> Vec<String> {
        command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn host_keys_are_checked_and_the_agent_stays_home_by_default() {
        let command = options().command("10.0.0.5", 2222).unwrap();
        let args = args(&command);
        assert_eq!(command.get_program(), "ssh");
        assert!(
            args.contains(&"StrictHostKeyChecking=ask".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"UserKnownHostsFile=/lab/known hosts".to_string()));
        assert!(args.contains(&"-a".to_string()) && !args.contains(&"-A".to_string()));
        assert_eq!(args[args.len() - 3..], ["-p", "2222", "10.0.0.5"]);
        let loose = SshOptions {
            strict_host_key_checking: false,
            forward_agent: true,
            ..options()
        };
        let args = self::args(&loose.command("h", 22).unwrap());
        assert!(args.contains(&"StrictHostKeyChecking=no".to_string()));
        assert!(args.contains(&"UserKnownHostsFile=/dev/null".to_string()));
        assert!(args.contains(&"-A".to_string()));
    }

    #[test]
    fn a_tunnel_host_gets_the_same_checks() {
        let tunneled = SshOptions {
            jump: Some("bastion:2200".into()),
            ..options()
        };
        let args = args(&tunneled.command("10.0.0.5", 22).unwrap());
        let proxy = args
            .iter()
            .find(|a| a.starts_with("ProxyCommand="))
            .unwrap();
        assert!(
            proxy.contains("'UserKnownHostsFile=/lab/known hosts'"),
            "{proxy}"
        );
        assert!(proxy.ends_with("-p 2200 -W %h:%p bastion"), "{proxy}");
    }

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("h", 22).unwrap(), ("h".into(), 22));
        assert_eq!(split_host_port("h:2200", 22).unwrap(), ("h".into(), 2200));
        assert_eq!(split_host_port("[::1]:7", 22).unwrap(), ("::1".into(), 7));
        assert_eq!(split_host_port("::1", 22).unwrap(), ("::1".into(), 22));
        for bad in ["", ":22", "-oProxyCommand=x", "h:x", "h:99999", "[::1"] {
            assert!(split_host_port(bad, 22).is_err(), "{bad}");
        }
    }
}
