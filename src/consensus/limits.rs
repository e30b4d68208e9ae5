//! What one request may ask of a member, and the store quota.
//!
//! Any caller, even an authenticated one, could otherwise make every member
//! hold whatever it sends: a value of hundreds of MiB, a transaction of a
//! million operations, a million leases, or a store that grows until the
//! disk or the memory runs out (the state machine lives in memory). The
//! member that takes a request checks it here BEFORE proposing it, so a
//! refusal changes nothing and costs the cluster no log entry.
//!
//! The quota works like etcd's NOSPACE alarm: once the keys and values
//! held exceed [`Limits::quota_bytes`], the alarm is on and writes that add
//! data (puts, lease grants) are refused, while reads, deletes, lease
//! revokes and keep-alives still work, so an operator can free space; the
//! alarm goes off by itself once the store is back under the quota.
//!
//! The checks are the taking member's, not the state machine's: members with
//! different settings never disagree on what a committed entry does.

use super::kv::{Command, KvStore, Op};

/// The limits one member enforces; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest encoded client request accepted, in bytes.
    pub request_bytes: usize,
    /// The largest value one put may carry, in bytes.
    pub value_bytes: usize,
    /// The most operations (compares and ops of both branches) one
    /// transaction may hold.
    pub txn_ops: usize,
    /// The shortest lease TTL granted, in milliseconds.
    pub min_lease_ttl_ms: u64,
    /// The longest lease TTL granted, in milliseconds.
    pub max_lease_ttl_ms: u64,
    /// The most leases the store may hold at once.
    pub leases: usize,
    /// Bytes of keys and values past which the no-space alarm refuses writes.
    pub quota_bytes: u64,
}

/// 1.5 MiB: a 1 MiB value and its key and framing, as etcd's default.
pub const DEFAULT_REQUEST_BYTES: usize = 1536 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_bytes: DEFAULT_REQUEST_BYTES,
            value_bytes: 1024 * 1024,
            txn_ops: 16_384,
            min_lease_ttl_ms: 1000,
            max_lease_ttl_ms: 24 * 3600 * 1000,
            leases: 10_000,
            quota_bytes: 2 * 1024 * 1024 * 1024,
        }
    }
}

/// Why a request was refused before it was proposed; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A request too large to take.
    #[error(
        "the request is {0} bytes, more than the {1}-byte limit (max_request_bytes); nothing was changed: split it or store less"
    )]
    RequestTooLarge(usize, usize),
    /// A value too large.
    #[error(
        "the value of {key:?} is {bytes} bytes, more than the {limit}-byte limit (max_value_bytes); nothing was changed"
    )]
    ValueTooLarge {
        /// The key it was for.
        key: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A transaction with too many operations.
    #[error(
        "the transaction has {0} operations, more than the limit of {1} (max_txn_ops); nothing was changed: split it"
    )]
    TooManyOps(usize, usize),
    /// A lease TTL outside the allowed range.
    #[error(
        "a lease TTL of {ttl_ms} ms is outside {min_ms}..={max_ms} ms (min_lease_ttl_ms, max_lease_ttl_ms); nothing was granted"
    )]
    LeaseTtl {
        /// The TTL asked for.
        ttl_ms: u64,
        /// The shortest allowed.
        min_ms: u64,
        /// The longest allowed.
        max_ms: u64,
    },
    /// Too many leases.
    #[error(
        "the store holds {0} leases, the limit (max_leases); nothing was granted: revoke unused leases or raise the limit"
    )]
    TooManyLeases(usize),
    /// The no-space alarm is on.
    #[error(
        "no space: the store holds {bytes} bytes of keys and values, over its quota of {quota} (quota_bytes); writes are refused until space is freed (delete keys; reads, deletes and lease revokes still work)"
    )]
    NoSpace {
        /// What the store holds.
        bytes: u64,
        /// The quota.
        quota: u64,
    },
}

impl Limits {
    /// Whether the no-space alarm is on for a store of this size.
    pub fn over_quota(&self, kv: &KvStore) -> bool {
        kv.data_bytes() > self.quota_bytes
    }

    /// Checks a command before it is proposed against the store `kv`.
    pub fn check(&self, command: &Command, kv: &KvStore) -> Result<(), Refused> {
        match command {
            Command::Txn {
                compare,
                success,
                failure,
            } => {
                let ops = compare.len() + success.len() + failure.len();
                if ops > self.txn_ops {
                    return Err(Refused::TooManyOps(ops, self.txn_ops));
                }
                let mut puts = success.iter().chain(failure).filter_map(|op| match op {
                    Op::Put { key, value, .. } => Some((key, value)),
                    _ => None,
                });
                if let Some((key, value)) = puts.clone().find(|(_, v)| v.len() > self.value_bytes) {
                    return Err(Refused::ValueTooLarge {
                        key: key.clone(),
                        bytes: value.len(),
                        limit: self.value_bytes,
                    });
                }
                if puts.next().is_some() {
                    self.room(kv)?;
                }
                Ok(())
            }
            Command::LeaseGrant { ttl_ms } => {
                if !(self.min_lease_ttl_ms..=self.max_lease_ttl_ms).contains(ttl_ms) {
                    return Err(Refused::LeaseTtl {
                        ttl_ms: *ttl_ms,
                        min_ms: self.min_lease_ttl_ms,
                        max_ms: self.max_lease_ttl_ms,
                    });
                }
                if kv.lease_count() >= self.leases {
                    return Err(Refused::TooManyLeases(kv.lease_count()));
                }
                self.room(kv)
            }
            // Keep-alives, revokes and the leader's own lease commands free
            // space or hold it steady: never refused, or a full store would
            // also lose every host's presence.
            Command::LeaseKeepAlive { .. }
            | Command::LeaseKeepAlives { .. }
            | Command::LeaseRevoke { .. }
            | Command::LeaseExpire { .. }
            | Command::LeaseCheckpoint { .. } => Ok(()),
        }
    }

    fn room(&self, kv: &KvStore) -> Result<(), Refused> {
        if self.over_quota(kv) {
            return Err(Refused::NoSpace {
                bytes: kv.data_bytes(),
                quota: self.quota_bytes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::kv::Compare;

    fn small() -> Limits {
        Limits {
            request_bytes: 100,
            value_bytes: 10,
            txn_ops: 3,
            min_lease_ttl_ms: 100,
            max_lease_ttl_ms: 1000,
            leases: 2,
            quota_bytes: 30,
        }
    }

    #[test]
    fn values_ops_and_lease_ttls_are_bounded() {
        let limits = small();
        let kv = KvStore::default();
        assert_eq!(
            limits.check(&Command::put("k", vec![0; 10], None), &kv),
            Ok(())
        );
        assert!(matches!(
            limits.check(&Command::put("k", vec![0; 11], None), &kv),
            Err(Refused::ValueTooLarge { bytes: 11, .. })
        ));
        let txn = Command::Txn {
            compare: vec![Compare::exists("a"), Compare::exists("b")],
            success: vec![Op::delete("a".into())],
            failure: vec![Op::delete("b".into())],
        };
        assert_eq!(limits.check(&txn, &kv), Err(Refused::TooManyOps(4, 3)));
        for ttl_ms in [0, 99, 1001] {
            assert!(matches!(
                limits.check(&Command::LeaseGrant { ttl_ms }, &kv),
                Err(Refused::LeaseTtl { .. })
            ));
        }
        assert_eq!(
            limits.check(&Command::LeaseGrant { ttl_ms: 100 }, &kv),
            Ok(())
        );
    }

    #[test]
    fn lease_count_is_bounded() {
        let limits = small();
        let mut kv = KvStore::default();
        kv.apply(&Command::LeaseGrant { ttl_ms: 500 });
        kv.apply(&Command::LeaseGrant { ttl_ms: 500 });
        assert_eq!(
            limits.check(&Command::LeaseGrant { ttl_ms: 500 }, &kv),
            Err(Refused::TooManyLeases(2))
        );
        assert_eq!(limits.check(&Command::LeaseRevoke { id: 1 }, &kv), Ok(()));
    }

    #[test]
    fn over_the_quota_only_deletes_revokes_and_keep_alives_pass_until_space_is_freed() {
        let limits = small();
        let mut kv = KvStore::default();
        kv.apply(&Command::put("aaaa", vec![0; 10], None));
        kv.apply(&Command::put("bbbb", vec![0; 10], None));
        assert_eq!(kv.data_bytes(), 28);
        assert_eq!(limits.check(&Command::put("c", "1", None), &kv), Ok(()));
        kv.apply(&Command::put("cccc", vec![0; 10], None));
        assert!(limits.over_quota(&kv));
        assert!(matches!(
            limits.check(&Command::put("d", "1", None), &kv),
            Err(Refused::NoSpace {
                bytes: 42,
                quota: 30
            })
        ));
        assert!(matches!(
            limits.check(&Command::LeaseGrant { ttl_ms: 500 }, &kv),
            Err(Refused::NoSpace { .. })
        ));
        assert_eq!(limits.check(&Command::delete("aaaa", false), &kv), Ok(()));
        assert_eq!(
            limits.check(&Command::LeaseKeepAlive { id: 9 }, &kv),
            Ok(())
        );
        kv.apply(&Command::delete("aaaa", false));
        assert!(
            !limits.over_quota(&kv),
            "the alarm clears once space is freed"
        );
        assert_eq!(limits.check(&Command::put("d", "1", None), &kv), Ok(()));
    }
}
