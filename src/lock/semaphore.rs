//! The reboot semaphore: at most `max` machines may hold it, i.e. be rebooting.
//!
//! The whole semaphore is one value in the store. Every change is computed here,
//! purely, from the current value, and written back with a transaction that
//! compares the key's mod revision, so two hosts racing for the last slot can
//! never both win: one transaction fails and that host re-reads and retries.

use serde::{Deserialize, Serialize};

/// The semaphore's value as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    /// How many holders are allowed at once.
    pub max: u32,
    /// Machine ids holding it, in the order they took it.
    pub holders: Vec<String>,
}

impl Default for Semaphore {
    /// One reboot at a time, as locksmith does by default.
    fn default() -> Self {
        Semaphore {
            max: 1,
            holders: Vec::new(),
        }
    }
}

/// Why a semaphore operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Every slot is taken.
    #[error(
        "the reboot lock is full ({held} of {max} held by {holders}); wait for a holder to unlock"
    )]
    Full {
        /// Current holders.
        held: usize,
        /// The limit.
        max: u32,
        /// The holders, comma-separated.
        holders: String,
    },
    /// The machine already holds it.
    #[error("{0} already holds the reboot lock")]
    AlreadyHeld(String),
    /// The machine does not hold it.
    #[error("{0} does not hold the reboot lock")]
    NotHeld(String),
    /// An empty holder id.
    #[error("a holder needs a non-empty machine id")]
    EmptyHolder,
}

impl Semaphore {
    /// Free slots (zero when `max` was lowered below the current holders).
    pub fn available(&self) -> usize {
        (self.max as usize).saturating_sub(self.holders.len())
    }

    /// The value after `holder` takes a slot.
    pub fn lock(&self, holder: &str) -> Result<Semaphore, LockError> {
        if holder.is_empty() {
            return Err(LockError::EmptyHolder);
        }
        if self.holders.iter().any(|h| h == holder) {
            return Err(LockError::AlreadyHeld(holder.to_string()));
        }
        if self.available() == 0 {
            return Err(LockError::Full {
                held: self.holders.len(),
                max: self.max,
                holders: self.holders.join(", "),
            });
        }
        let mut next = self.clone();
        next.holders.push(holder.to_string());
        Ok(next)
    }

    /// The value after `holder` gives its slot back.
    pub fn unlock(&self, holder: &str) -> Result<Semaphore, LockError> {
        let Some(at) = self.holders.iter().position(|h| h == holder) else {
            return Err(LockError::NotHeld(holder.to_string()));
        };
        let mut next = self.clone();
        next.holders.remove(at);
        Ok(next)
    }

    /// The value with a new limit. Lowering it below the current holders keeps
    /// them (they are already rebooting) and admits nobody until enough leave.
    pub fn set_max(&self, max: u32) -> Semaphore {
        Semaphore {
            max,
            holders: self.holders.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_at_a_time_by_default() {
        let s = Semaphore::default().lock("m1").unwrap();
        assert!(matches!(
            s.lock("m2"),
            Err(LockError::Full {
                held: 1,
                max: 1,
                ..
            })
        ));
        assert_eq!(s.lock("m1"), Err(LockError::AlreadyHeld("m1".into())));
        let s = s.unlock("m1").unwrap();
        assert_eq!(s.unlock("m1"), Err(LockError::NotHeld("m1".into())));
        assert!(s.lock("m2").is_ok());
        assert_eq!(Semaphore::default().lock(""), Err(LockError::EmptyHolder));
    }

    #[test]
    fn lowering_max_keeps_holders_and_blocks_newcomers() {
        let s = Semaphore::default()
            .set_max(2)
            .lock("a")
            .unwrap()
            .lock("b")
            .unwrap();
        let s = s.set_max(1);
        assert_eq!(s.holders, ["a", "b"]);
        assert_eq!(s.available(), 0);
        assert!(s.lock("c").is_err());
        let s = s.unlock("a").unwrap();
        assert!(s.lock("c").is_err(), "still at the new limit");
        assert!(s.unlock("b").unwrap().lock("c").is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Whatever sequence of operations runs, a successful lock never takes the
        /// holder count above max.
        #[test]
        fn never_more_holders_than_max(ops in proptest::collection::vec((0u8..3, 0u8..5, 0u32..4), 0..40)) {
            let mut s = Semaphore::default();
            for (kind, who, max) in ops {
                let who = format!("m{who}");
                match kind {
                    0 => if let Ok(next) = s.lock(&who) {
                        prop_assert!(next.holders.len() <= next.max as usize);
                        s = next;
                    },
                    1 => if let Ok(next) = s.unlock(&who) { s = next },
                    _ => s = s.set_max(max),
                }
                let mut unique = s.holders.clone();
                unique.sort();
                unique.dedup();
                prop_assert_eq!(unique.len(), s.holders.len());
            }
        }
    }
}
