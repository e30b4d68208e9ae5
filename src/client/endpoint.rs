//! Where the API is: `unix:///run/flotilla/api.sock` (the default, root on any
//! cluster host needs nothing else) or `http(s)://HOST:PORT[/PREFIX]`, as
//! fleetctl's `--endpoint` took them, and which of several answered last.
//!
//! `--endpoint` may list several, comma-separated; they are tried in order
//! and the one that answered is remembered (in the user's cache directory),
//! so a dead first host costs its connect timeout once, not on every call.

use std::path::{Path, PathBuf};

/// The default endpoint: the daemon's root-only socket on this host.
pub const DEFAULT: &str = "unix:///run/flotilla/api.sock";

/// One place the API answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket on this machine.
    Unix(PathBuf),
    /// An HTTP(S) base URL without a trailing slash, e.g. `http://10.0.0.1:4003`.
    Http(String),
}

/// Why an `--endpoint` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid endpoint {given:?}: {reason}; give unix:///PATH or http(s)://HOST:PORT \
     (several comma-separated)"
)]
pub struct EndpointError {
    /// The value as given.
    pub given: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Endpoint {
    /// Parses one endpoint.
    pub fn parse(given: &str) -> Result<Endpoint, EndpointError> {
        let fail = |reason: &str| EndpointError {
            given: given.to_string(),
            reason: reason.to_string(),
        };
        let given = given.trim();
        if let Some(path) = given
            .strip_prefix("unix://")
            .or_else(|| given.strip_prefix("file://"))
        {
            if !path.starts_with('/') {
                return Err(fail("a unix socket path must be absolute (unix:///PATH)"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let rest = given
            .strip_prefix("http://")
            .or_else(|| given.strip_prefix("https://"))
            .ok_or_else(|| {
                if given.contains("://") {
                    fail("unknown scheme")
                } else {
                    fail("no scheme (the store's host:port goes to --store-endpoint)")
                }
            })?;
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() {
            return Err(fail("no host"));
        }
        if host.contains('@') || rest.contains(['?', '#']) {
            return Err(fail(
                "credentials, queries and fragments are not allowed (use --api-token)",
            ));
        }
        Ok(Endpoint::Http(given.trim_end_matches('/').to_string()))
    }

    /// Whether this is an `https://` endpoint (it needs the cluster CA).
    pub fn is_https(&self) -> bool {
        matches!(self, Endpoint::Http(url) if url.starts_with("https://"))
    }

    /// Parses a comma-separated list; at least one.
    pub fn parse_list(given: &str) -> Result<Vec<Endpoint>, EndpointError> {
        let list: Vec<Endpoint> = given
            .split(',')
            .filter(|part| !part.trim().is_empty())
            .map(Endpoint::parse)
            .collect::<Result<_, _>>()?;
        if list.is_empty() {
            return Err(EndpointError {
                given: given.to_string(),
                reason: "it names no endpoint".to_string(),
            });
        }
        Ok(list)
    }

    /// The `HOST:PORT` an ssh tunnel forwards to for an HTTP endpoint (the
    /// URL's port, else 80 or 443), or `None` for a unix socket.
    pub fn host_port(&self) -> Option<String> {
        let Endpoint::Http(url) = self else {
            return None;
        };
        let (scheme, rest) = url.split_once("://").expect("parsed URLs have a scheme");
        let authority = rest.split('/').next().unwrap_or_default();
        let has_port = match authority.rfind(']') {
            Some(bracket) => authority[bracket..].contains(':'),
            None => authority.contains(':'),
        };
        Some(if has_port {
            authority.to_string()
        } else if scheme == "https" {
            format!("{authority}:443")
        } else {
            format!("{authority}:80")
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Http(url) => f.write_str(url),
        }
    }
}

/// The remembered last good endpoint of each endpoint list, one
/// `LIST<TAB>GOOD` line per list in a small file of the user's cache.
#[derive(Debug, Clone)]
pub struct Memory {
    file: PathBuf,
}

/// How many endpoint lists the memory keeps (the most recent).
const REMEMBERED_LISTS: usize = 32;

impl Memory {
    /// The memory in `$XDG_CACHE_HOME/flotilla` or `~/.cache/flotilla`, if
    /// either can be named.
    pub fn in_user_cache() -> Option<Memory> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|dir| !dir.is_empty())
                    .map(|home| Path::new(&home).join(".cache"))
            })?;
        Some(Memory::at(base.join("flotilla").join("endpoints")))
    }

    /// A memory kept in `file`.
    pub fn at(file: PathBuf) -> Memory {
        Memory { file }
    }

    fn lines(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.file)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .map(|(list, good)| (list.to_string(), good.to_string()))
            .collect()
    }

    /// The endpoint that last answered for `list`, if remembered.
    pub fn recall(&self, list: &str) -> Option<String> {
        self.lines()
            .into_iter()
            .find(|(known, _)| known == list)
            .map(|(_, good)| good)
    }

    /// Remembers that `good` answered for `list`. Best effort: a cache that
    /// cannot be written only costs the next call its slow first try.
    pub fn remember(&self, list: &str, good: &str) {
        if self.recall(list).as_deref() == Some(good) {
            return;
        }
        let mut lines: Vec<(String, String)> = self
            .lines()
            .into_iter()
            .filter(|(known, _)| known != list)
            .collect();
        lines.push((list.to_string(), good.to_string()));
        let keep = lines.len().saturating_sub(REMEMBERED_LISTS);
        let text: String = lines[keep..]
            .iter()
            .map(|(list, good)| format!("{list}\t{good}\n"))
            .collect();
        let Some(dir) = self.file.parent() else {
            return;
        };
        let tmp = self
            .file
            .with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(err) = written {
            tracing::debug!(
                "cannot remember the endpoint in {}: {err}",
                self.file.display()
            );
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// `endpoints` in the order to try them: the remembered good one first.
pub fn ordered(endpoints: &[Endpoint], remembered: Option<&str>) -> Vec<Endpoint> {
    let mut order = endpoints.to_vec();
    if let Some(good) = remembered
        && let Some(at) = order.iter().position(|e| e.to_string() == good)
    {
        let first = order.remove(at);
        order.insert(0, first);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_say_why_not() {
        assert_eq!(
            Endpoint::parse(DEFAULT).unwrap(),
            Endpoint::Unix(PathBuf::from("/run/flotilla/api.sock"))
        );
        assert_eq!(
            Endpoint::parse("http://10.0.0.1:4003/").unwrap(),
            Endpoint::Http("http://10.0.0.1:4003".into())
        );
        let list = Endpoint::parse_list("http://a:1, https://b/pfx").unwrap();
        assert_eq!(list[1], Endpoint::Http("https://b/pfx".into()));
        assert_eq!(list[1].host_port().as_deref(), Some("b:443"));
        assert_eq!(list[0].host_port().as_deref(), Some("a:1"));
        let refused = [
            ("127.0.0.1:4001", "store-endpoint"),
            ("unix://relative.sock", "absolute"),
            ("ftp://x", "unknown scheme"),
            ("http://", "no host"),
            ("http://user:pw@x", "credentials"),
            (",", "no endpoint"),
        ];
        for (given, why) in refused {
            let err = Endpoint::parse_list(given).unwrap_err().to_string();
            assert!(err.contains(why), "{given}: {err}");
        }
    }

    #[test]
    fn the_last_good_endpoint_is_tried_first() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Memory::at(dir.path().join("sub/endpoints"));
        let list = "http://a:1,http://b:1";
        assert_eq!(memory.recall(list), None);
        memory.remember(list, "http://b:1");
        memory.remember("unix:///x", "unix:///x");
        assert_eq!(memory.recall(list).as_deref(), Some("http://b:1"));
        let endpoints = Endpoint::parse_list(list).unwrap();
        let order = ordered(&endpoints, memory.recall(list).as_deref());
        assert_eq!(order[0].to_string(), "http://b:1");
        assert_eq!(order[1].to_string(), "http://a:1");
        assert_eq!(ordered(&endpoints, Some("http://gone:1")), endpoints);
    }
}
