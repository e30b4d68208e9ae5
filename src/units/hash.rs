//! The unit hash: SHA-256 of the canonical unit-file text.
//!
//! Bodies are stored content-addressed under this hash, so two submissions that
//! differ only in comments or layout share one body and count as "no change".

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A unit body's content address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitHash([u8; 32]);

impl UnitHash {
    /// Hashes canonical unit-file text (see [`super::UnitFile::to_text`]).
    pub(crate) fn of_text(canonical: &str) -> UnitHash {
        UnitHash(Sha256::digest(canonical.as_bytes()).into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 7 hex digits, as `list-unit-files` shows (fleetctl's habit).
    pub fn short(&self) -> String {
        self.to_string()[..7].to_string()
    }
}

impl fmt::Display for UnitHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for UnitHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnitHash({self})")
    }
}

/// Why a string is not a unit hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a unit hash is 64 lowercase hex digits")]
pub struct ParseHashError;

impl FromStr for UnitHash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ParseHashError);
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ParseHashError)?;
        }
        Ok(UnitHash(bytes))
    }
}

impl serde::Serialize for UnitHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for UnitHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_hex_round_trip() {
        // SHA-256 of the empty string.
        let empty = UnitHash::of_text("");
        assert_eq!(
            empty.to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(empty.short(), "e3b0c44");
        assert_eq!(empty.to_string().parse::<UnitHash>(), Ok(empty));
    }

    #[test]
    fn malformed_hashes_are_refused() {
        for bad in ["", "abc", &"A".repeat(64), &"g".repeat(64), &"0".repeat(63)] {
            assert!(bad.parse::<UnitHash>().is_err(), "{bad}");
        }
    }
}
