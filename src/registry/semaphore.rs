//! The reboot semaphore: at most `max` machines may take it, i.e. be rebooting.
//! No lock ever takes a slot beyond `max`; lowering `max` below the current
//! holders ([`Semaphore::set_max`]) keeps them, so only then can the holders
//! outnumber it, until enough release.
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
    /// The machines holding it, in the order they took it.
    pub holders: Vec<Holder>,
}

/// One holder of the semaphore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The machine id (or any id a person acquired it for).
    pub id: String,
    /// When it was taken, in seconds since the Unix epoch: `lock status`
    /// shows it, so a person can tell a reboot in progress from a lock
    /// forgotten for days.
    pub since: u64,
    /// The boot the holder's coordinator took it in. After a reboot the
    /// coordinator sees another boot id and knows the reboot happened; a lock
    /// taken by hand (`flotilla lock acquire`) has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
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
        "the reboot lock is full ({held} of {max} held by {holders}); wait for a holder to \
         release it (flotilla lock status shows who holds it)"
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
    #[error("{0} does not hold the reboot lock (flotilla lock status shows who does)")]
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

    /// The holder `id`, if it holds a slot.
    pub fn holder(&self, id: &str) -> Option<&Holder> {
        self.holders.iter().find(|h| h.id == id)
    }

    /// The value after `id` takes a slot at `since` (seconds since the epoch),
    /// in boot `boot_id` when a coordinator takes it.
    pub fn lock(
        &self,
        id: &str,
        since: u64,
        boot_id: Option<&str>,
    ) -> Result<Semaphore, LockError> {
        if id.is_empty() {
            return Err(LockError::EmptyHolder);
        }
        if self.holder(id).is_some() {
            return Err(LockError::AlreadyHeld(id.to_string()));
        }
        if self.available() == 0 {
            return Err(LockError::Full {
                held: self.holders.len(),
                max: self.max,
                holders: self
                    .holders
                    .iter()
                    .map(|h| h.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let mut next = self.clone();
        next.holders.push(Holder {
            id: id.to_string(),
            since,
            boot_id: boot_id.map(str::to_string),
        });
        Ok(next)
    }

    /// The value after holder `id` records the boot it is in (a coordinator
    /// adopting a lock someone took for its machine by hand).
    pub fn record_boot(&self, id: &str, boot_id: &str) -> Result<Semaphore, LockError> {
        let mut next = self.clone();
        let holder = next
            .holders
            .iter_mut()
            .find(|h| h.id == id)
            .ok_or_else(|| LockError::NotHeld(id.to_string()))?;
        holder.boot_id = Some(boot_id.to_string());
        Ok(next)
    }

    /// The value after `id` gives its slot back.
    pub fn unlock(&self, id: &str) -> Result<Semaphore, LockError> {
        let Some(at) = self.holders.iter().position(|h| h.id == id) else {
            return Err(LockError::NotHeld(id.to_string()));
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

    fn ids(s: &Semaphore) -> Vec<&str> {
        s.holders.iter().map(|h| h.id.as_str()).collect()
    }

    #[test]
    fn one_at_a_time_by_default() {
        let s = Semaphore::default().lock("m1", 10, Some("boot1")).unwrap();
        assert_eq!(
            s.holder("m1"),
            Some(&Holder {
                id: "m1".into(),
                since: 10,
                boot_id: Some("boot1".into())
            })
        );
        assert!(matches!(
            s.lock("m2", 11, None),
            Err(LockError::Full {
                held: 1,
                max: 1,
                ..
            })
        ));
        assert_eq!(
            s.lock("m1", 12, None),
            Err(LockError::AlreadyHeld("m1".into()))
        );
        let s = s.unlock("m1").unwrap();
        assert_eq!(s.unlock("m1"), Err(LockError::NotHeld("m1".into())));
        assert!(s.lock("m2", 13, None).is_ok());
        assert_eq!(
            Semaphore::default().lock("", 0, None),
            Err(LockError::EmptyHolder)
        );
    }

    #[test]
    fn a_hand_taken_lock_records_its_boot_later() {
        let s = Semaphore::default().lock("m1", 5, None).unwrap();
        let s = s.record_boot("m1", "b").unwrap();
        assert_eq!(s.holder("m1").unwrap().boot_id.as_deref(), Some("b"));
        assert_eq!(s.holder("m1").unwrap().since, 5);
        assert_eq!(
            s.record_boot("m2", "b"),
            Err(LockError::NotHeld("m2".into()))
        );
    }

    #[test]
    fn holders_without_boot_id_read_and_write_compactly() {
        let s = Semaphore::default().lock("m1", 7, None).unwrap();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(text, r#"{"max":1,"holders":[{"id":"m1","since":7}]}"#);
        assert_eq!(serde_json::from_str::<Semaphore>(&text).unwrap(), s);
    }

    #[test]
    fn lowering_max_keeps_holders_and_blocks_newcomers() {
        let s = Semaphore::default()
            .set_max(2)
            .lock("a", 1, None)
            .unwrap()
            .lock("b", 2, None)
            .unwrap();
        let s = s.set_max(1);
        assert_eq!(ids(&s), ["a", "b"]);
        assert_eq!(s.available(), 0);
        assert!(s.lock("c", 3, None).is_err());
        let s = s.unlock("a").unwrap();
        assert!(s.lock("c", 4, None).is_err(), "still at the new limit");
        assert!(s.unlock("b").unwrap().lock("c", 5, None).is_ok());
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
                    0 => if let Ok(next) = s.lock(&who, u64::from(max), None) {
                        prop_assert!(next.holders.len() <= next.max as usize);
                        s = next;
                    },
                    1 => if let Ok(next) = s.unlock(&who) { s = next },
                    _ => s = s.set_max(max),
                }
                let mut unique = ids(&s);
                unique.sort();
                unique.dedup();
                prop_assert_eq!(unique.len(), s.holders.len());
            }
        }
    }
}
