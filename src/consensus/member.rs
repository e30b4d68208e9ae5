//! What makes a valid member of the Raft group: its name and its address.
//!
//! The store checks every `member add` it is asked for against these rules
//! before proposing it, and the daemon's configuration checks its own name,
//! listen addresses and founding members with the same functions, so a name
//! the configuration accepts is one the store accepts and the other way round.

/// Checks a member name: 1-63 letters, digits, '-', '_' or '.'.
///
/// The name becomes the member's Raft id (see [`super::node::member_id`]) and
/// part of store keys, so it must be short and plain.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a member name: use 1-63 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Checks an address as members and clients use them: `host:port` or
/// `[v6]:port`, with a port above zero.
pub fn check_address(addr: &str) -> Result<(), String> {
    let bad = || format!("{addr:?} is not host:port (for example 127.0.0.1:4001 or [::1]:4001)");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// Checks a member name and its peer address, as `flotilla member add` sends them.
pub fn check(name: &str, peer_addr: &str) -> Result<(), String> {
    check_name(name)?;
    check_address(peer_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        for good in ["n1", "host-2.example", "a_b", &"x".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(64)] {
            let err = check_name(bad).unwrap_err();
            assert!(err.contains("1-63 letters"), "{bad}: {err}");
        }
    }

    #[test]
    fn addresses_are_host_and_port() {
        for good in ["127.0.0.1:4001", "[::1]:4001", "h1.lab:2380"] {
            assert!(check_address(good).is_ok(), "{good}");
        }
        for bad in ["127.0.0.1", ":4001", "h:0", "h:99999", "[zz]:1", "a b:1"] {
            let err = check_address(bad).unwrap_err();
            assert!(err.contains("is not host:port"), "{bad}: {err}");
        }
        assert!(check("n1", "10.0.0.1:2380").is_ok());
        assert!(check("bad name", "10.0.0.1:2380").is_err());
        assert!(check("n1", "nowhere").is_err());
    }
}
