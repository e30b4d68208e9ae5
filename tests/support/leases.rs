//! Checks what lease holders were told against when their leases ended.
//!
//! The store promises (see `consensus::lessor`): a lease never ends before its
//! TTL has passed since its holder sent the last keep-alive (or the grant)
//! that was acknowledged. The simulation records, per lease, the sending time
//! of every acknowledged grant and keep-alive, when its holder sent a revoke,
//! and the first moment any member's state lost the lease; [`check`] holds
//! each lease to that promise.
//!
//! This also covers "no lease ends while keep-alives are being acknowledged":
//! a keep-alive acknowledged as kept pins its lease until TTL after it was
//! sent, so an expiry applied in the pass that acknowledged it (while the
//! keep-alive took less than the TTL) breaks the same rule.

use std::fmt;

/// One lease's life, as its holder and the members saw it. Times are the
/// simulation's milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseLife {
    /// The lease.
    pub id: u64,
    /// Its TTL.
    pub ttl_ms: u64,
    /// When the grant and each keep-alive acknowledged as kept were sent.
    pub kept: Vec<u64>,
    /// When its holder first sent a revoke, if it did.
    pub revoked: Option<u64>,
    /// The first moment a member's state no longer held it, if that happened.
    pub ended: Option<u64>,
}

/// A lease that ended too early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The lease.
    pub id: u64,
    /// Its TTL.
    pub ttl_ms: u64,
    /// When the last acknowledged keep-alive before the end was sent.
    pub kept_at: u64,
    /// When it ended.
    pub ended_at: u64,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lease {:x} (TTL {} ms) ended at t={} ms, {} ms after a keep-alive sent at t={} ms \
             was acknowledged",
            self.id,
            self.ttl_ms,
            self.ended_at,
            self.ended_at.saturating_sub(self.kept_at),
            self.kept_at
        )
    }
}

/// Every lease that ended before its TTL after its last acknowledged
/// keep-alive; leases their holder revoked are held to nothing from the
/// revoke on.
pub fn check(lives: &[LeaseLife]) -> Vec<Violation> {
    lives
        .iter()
        .filter_map(|life| {
            let ended = life.ended?;
            let pinned_until = life
                .kept
                .iter()
                .filter(|sent| life.revoked.is_none_or(|revoked| **sent < revoked))
                .max()?;
            let early = life.revoked.is_none_or(|revoked| revoked > ended)
                && ended < pinned_until + life.ttl_ms;
            early.then_some(Violation {
                id: life.id,
                ttl_ms: life.ttl_ms,
                kept_at: *pinned_until,
                ended_at: ended,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(kept: &[u64], revoked: Option<u64>, ended: Option<u64>) -> LeaseLife {
        LeaseLife {
            id: 7,
            ttl_ms: 100,
            kept: kept.to_vec(),
            revoked,
            ended,
        }
    }

    #[test]
    fn a_lease_may_end_ttl_after_its_last_keep_alive_and_not_before() {
        assert!(check(&[life(&[0, 50], None, Some(150))]).is_empty());
        assert!(check(&[life(&[0, 50], None, None)]).is_empty());
        let early = check(&[life(&[0, 50, 80], None, Some(179))]);
        assert_eq!(
            early,
            [Violation {
                id: 7,
                ttl_ms: 100,
                kept_at: 80,
                ended_at: 179
            }]
        );
        assert!(early[0].to_string().contains("99 ms after a keep-alive"));
    }

    #[test]
    fn an_end_in_the_pass_that_acknowledged_a_keep_alive_is_caught() {
        // Kept at 40 (acknowledged at 60), ended at 60: the same pass.
        assert_eq!(check(&[life(&[0, 40], None, Some(60))]).len(), 1);
    }

    #[test]
    fn a_revoked_lease_may_end_at_once() {
        assert!(check(&[life(&[0, 50], Some(60), Some(61))]).is_empty());
        // A revoke sent after the end excuses nothing.
        assert_eq!(check(&[life(&[0, 50], Some(90), Some(80))]).len(), 1);
    }
}
