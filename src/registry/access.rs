//! Which identity may make which request of the store: the policy the daemon
//! gives the store's client listener ([`crate::consensus::server::Authorize`]).
//!
//! * A **member** or an **admin** may make any request.
//! * An **agent**, named by its machine id, may read anything (nothing in
//!   the store is secret from the hosts that run its units), grant leases,
//!   and write only what its own machine writes: its presence
//!   (`machines/<id>`, `renewed/<id>`), everything under its own
//!   `m/<id>/` (claims, the claim generation, proposals it re-places on
//!   itself when it rejoins), its own unit states (`states/<unit>/<id>`),
//!   its reboot mark and drain mark (its reboot coordinator drains it before
//!   a reboot), and a placement pointer that names itself
//!   (`placed/<unit>` = `<id>`, written when it re-places an orphan).
//!   Units, bodies, membership, backups (`snapshot save`) and other
//!   machines' keys are refused.
//! * **Reboot semaphores** (`lock/<group>`, shared by a group's machines):
//!   an agent may only take a free slot for itself, give its own slot back
//!   or record its own boot in it ([`Semaphore::changes_only_holder`]),
//!   never change the limit or another holder. Its put must sit in the
//!   success branch of a transaction that compares the semaphore's value
//!   (or its absence: the default semaphore), so the change is judged
//!   against the very value it will replace. Freeing a stale holder is the
//!   members' job ([`crate::lock::stale`]), `lock set-max` an admin's.
//! * **Leases**: an agent may keep alive (one lease per request: the member
//!   batches them), revoke and attach keys to only the
//!   leases it granted itself (the store records the owner,
//!   [`crate::consensus::kv::Lease::owner`]). A lease without an owner (one
//!   granted by a member or an admin, or before the store recorded owners)
//!   is an agent's only while its presence key `machines/<id>` is attached
//!   to it: only that agent (or a member or admin) can have attached it, and
//!   only to a lease of its own, so this proves the lease is the one its
//!   daemon held before an upgrade.
//!
//! A transaction is allowed only if every write in both of its branches is.

use crate::consensus::kv::{Command, Compare, CompareOp, Lease, Op, Target};
use crate::consensus::protocol::Request;
use crate::consensus::server::Authorize;
use crate::registry::semaphore::Semaphore;
use crate::tls::{Identity, Role};

use super::{keys, records};

/// The role-based policy described in the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct RolePolicy;

impl Authorize for RolePolicy {
    fn check(&self, who: &Identity, request: &Request) -> Result<(), String> {
        match who.role {
            Role::Member | Role::Admin => Ok(()),
            Role::Agent => agent_may(&who.name, request),
        }
    }

    fn may_use_lease(&self, who: &Identity, lease: &Lease) -> Result<(), String> {
        match who.role {
            Role::Member | Role::Admin => Ok(()),
            Role::Agent => agent_may_use(&who.name, lease),
        }
    }
}

/// Whether the agent of machine `id` may keep alive, revoke or attach keys
/// to `lease`. See the module docs.
pub fn agent_may_use(id: &str, lease: &Lease) -> Result<(), String> {
    match &lease.owner {
        Some(owner) if owner == id => Ok(()),
        Some(owner) => Err(format!(
            "lease {:x} was granted by agent {owner:?}; an agent may use only the leases it \
             granted itself",
            lease.id
        )),
        None if lease.keys.contains(&keys::machine(id)) => Ok(()),
        None => Err(format!(
            "lease {:x} was not granted by this agent and does not hold its presence; grant \
             a lease of your own",
            lease.id
        )),
    }
}

/// Whether the agent of machine `id` may make `request`.
pub fn agent_may(id: &str, request: &Request) -> Result<(), String> {
    match request {
        Request::Range { .. }
        | Request::RangePage { .. }
        | Request::GetKeys { .. }
        | Request::Watch { .. }
        | Request::WatchRequireLeader { .. }
        | Request::Status
        | Request::LeaseRenewals => Ok(()),
        Request::MemberAdd { .. } | Request::MemberRemove { .. } => Err(
            "membership changes need an admin or member certificate (flotilla tls issue NAME --role admin)"
                .into(),
        ),
        Request::Snapshot => Err(
            "backups need an admin or member certificate (flotilla tls issue NAME --role admin)"
                .into(),
        ),
        Request::Command(command) => agent_command(id, command),
    }
}

fn agent_command(id: &str, command: &Command) -> Result<(), String> {
    match command {
        Command::Txn {
            compare,
            success,
            failure,
        } => {
            success
                .iter()
                .try_for_each(|op| agent_op(id, op, Some(compare)))?;
            failure.iter().try_for_each(|op| agent_op(id, op, None))
        }
        Command::LeaseGrant { .. }
        | Command::LeaseKeepAlive { .. }
        | Command::LeaseRevoke { .. } => Ok(()),
        Command::LeaseExpire { .. } | Command::LeaseCheckpoint { .. } => {
            Err("only members expire or checkpoint leases".into())
        }
        // A member batches the keep-alives its clients sent one by one, each
        // checked for its owner on the way in: an agent sends one at a time.
        Command::LeaseKeepAlives { .. } => Err(
            "an agent keeps its lease alive one keep-alive at a time (members batch them)".into(),
        ),
    }
}

/// Whether the agent `id` may run `op`; `guard` holds the compares that
/// must all hold for it to run (`None`: in a failure branch, which runs when
/// any does not).
fn agent_op(id: &str, op: &Op, guard: Option<&[Compare]>) -> Result<(), String> {
    let refused = |key: &str| {
        Err(format!(
            "an agent may write only its own machine's keys, not {key:?}; unit and machine \
             changes need an admin certificate"
        ))
    };
    match op {
        Op::Get { .. } => Ok(()),
        Op::Put { key, value, .. } if key.starts_with(keys::LOCKS) => {
            semaphore_change(id, key, value, guard)
        }
        Op::Put { key, value, .. } if agent_owns(id, key, Some(value)) => Ok(()),
        Op::Delete { key, prefix: false } if agent_owns(id, key, None) => Ok(()),
        Op::Delete { key, prefix: true } if key.starts_with(&keys::machine_prefix(id)) => Ok(()),
        Op::Put { key, .. } | Op::Delete { key, .. } => refused(key),
    }
}

/// Whether the agent of machine `id` may set `key` to `value` (`None`:
/// delete it). See the module docs.
pub fn agent_owns(id: &str, key: &str, value: Option<&[u8]>) -> bool {
    key == keys::machine(id)
        || key == keys::renewal(id)
        || key.starts_with(&keys::machine_prefix(id))
        || keys::parse_state_key(key).is_some_and(|(_, machine)| machine == id)
        || key == keys::reboot_mark(id)
        || key == keys::drain(id)
        || (key.starts_with(keys::PLACED) && value == Some(id.as_bytes()))
}

/// Whether the agent `id` may set the semaphore at `key` to `value` under
/// the compares `guard`. See the module docs.
fn semaphore_change(
    id: &str,
    key: &str,
    value: &[u8],
    guard: Option<&[Compare]>,
) -> Result<(), String> {
    let unguarded = || {
        format!(
            "an agent may change the reboot lock {key:?} only in a transaction that compares \
             its current value"
        )
    };
    let guard = guard.ok_or_else(unguarded)?;
    let was = guard
        .iter()
        .filter(|c| c.key == key && c.op == CompareOp::Equal)
        .find_map(|c| match &c.target {
            Target::Value(bytes) => Some(records::decode::<Semaphore>(key, bytes)),
            Target::Exists(false) | Target::ModRevision(0) | Target::Version(0) => {
                Some(Ok(Semaphore::default()))
            }
            _ => None,
        })
        .ok_or_else(unguarded)?
        .map_err(|e| e.to_string())?;
    let next: Semaphore = records::decode(key, value).map_err(|e| e.to_string())?;
    if was.changes_only_holder(&next, id) {
        Ok(())
    } else {
        Err(format!(
            "an agent may only take or give back its own slot of the reboot lock {key:?}, not \
             change its limit or other holders (flotilla lock set-max, and releasing another \
             machine, need an admin certificate)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::UnitName;

    fn agent(name: &str) -> Identity {
        Identity {
            cluster: "c".into(),
            role: Role::Agent,
            name: name.into(),
        }
    }

    fn put(key: &str, value: &str) -> Request {
        Request::Command(Command::put(key, value, None))
    }

    #[test]
    fn an_agent_writes_only_its_own_machine() {
        let unit = UnitName::parse("web@1.service").unwrap();
        let me = agent("aaa");
        for key in [
            keys::machine("aaa"),
            keys::renewal("aaa"),
            keys::claim("aaa", &unit),
            keys::generation("aaa"),
            keys::proposal("aaa", &unit),
            keys::state(&unit, "aaa"),
            keys::reboot_mark("aaa"),
            keys::drain("aaa"),
        ] {
            assert_eq!(RolePolicy.check(&me, &put(&key, "x")), Ok(()), "{key}");
            let delete = Request::Command(Command::delete(key.clone(), false));
            assert_eq!(RolePolicy.check(&me, &delete), Ok(()), "{key}");
        }
        assert_eq!(
            RolePolicy.check(&me, &put(&keys::placed(&unit), "aaa")),
            Ok(())
        );
        for key in [
            keys::machine("bbb"),
            keys::renewal("bbb"),
            keys::claim("bbb", &unit),
            keys::generation("aaab"),
            keys::state(&unit, "bbb"),
            keys::reboot_mark("bbb"),
            keys::unit(&unit),
            "/flotilla/bodies/0123".to_string(),
            keys::drain("bbb"),
            keys::metadata("aaa", "region"),
            "/flotilla/m/aaa".to_string(),
            "/elsewhere".to_string(),
        ] {
            let err = RolePolicy.check(&me, &put(&key, "x")).unwrap_err();
            assert!(err.contains("only its own machine"), "{key}: {err}");
        }
        assert!(
            RolePolicy
                .check(&me, &put(&keys::placed(&unit), "bbb"))
                .is_err()
        );
        assert!(
            RolePolicy
                .check(
                    &me,
                    &Request::Command(Command::delete(keys::placed(&unit), false))
                )
                .is_err()
        );
        assert!(
            RolePolicy
                .check(&me, &Request::Command(Command::delete(keys::STATES, true)))
                .is_err()
        );
        assert_eq!(
            RolePolicy.check(
                &me,
                &Request::Command(Command::delete(keys::machine_prefix("aaa"), true))
            ),
            Ok(())
        );
    }

    #[test]
    fn an_agent_sends_no_batch_of_keep_alives() {
        let batch = Request::Command(Command::LeaseKeepAlives { ids: vec![1, 2] });
        let err = RolePolicy.check(&agent("aaa"), &batch).unwrap_err();
        assert!(err.contains("one keep-alive at a time"), "{err}");
        let one = Request::Command(Command::LeaseKeepAlive { id: 1 });
        assert_eq!(RolePolicy.check(&agent("aaa"), &one), Ok(()));
    }

    #[test]
    fn an_agent_changes_only_its_own_slot_of_a_compared_semaphore() {
        let me = agent("aaa");
        let key = keys::semaphore("default");
        let held = Semaphore::default().lock("bbb", 1, None).unwrap();
        let stored = records::encode(&held);
        let two = held.set_max(2);
        let txn = |compare: Vec<Compare>, next: &Semaphore, in_failure: bool| {
            let put = vec![Op::put(key.clone(), records::encode(next))];
            let (success, failure) = if in_failure {
                (Vec::new(), put)
            } else {
                (put, Vec::new())
            };
            Request::Command(Command::Txn {
                compare,
                success,
                failure,
            })
        };
        let value = || vec![Compare::value_is(&key, stored.clone())];
        let absent = || vec![Compare::revision_is(&key, 0)];
        let mine = Semaphore::default().lock("aaa", 2, Some("boot")).unwrap();
        // Allowed: its own slot of the value compared.
        assert_eq!(RolePolicy.check(&me, &txn(absent(), &mine, false)), Ok(()));
        let compared_two = vec![Compare::value_is(&key, records::encode(&two))];
        let took = two.lock("aaa", 2, None).unwrap();
        assert_eq!(
            RolePolicy.check(&me, &txn(compared_two, &took, false)),
            Ok(())
        );
        // Refused: not compared, compared by revision only, in the failure
        // branch, a full lock, another holder, the limit, a delete.
        for (compare, next, in_failure) in [
            (Vec::new(), &mine, false),
            (vec![Compare::revision_is(&key, 7)], &mine, false),
            (value(), &mine, true),
            (
                value(),
                &Semaphore::default()
                    .set_max(2)
                    .lock("aaa", 2, None)
                    .unwrap(),
                false,
            ),
            (value(), &held.unlock("bbb").unwrap(), false),
            (value(), &two, false),
            (absent(), &Semaphore::default().set_max(3), false),
        ] {
            let err = RolePolicy.check(&me, &txn(compare.clone(), next, in_failure));
            assert!(err.is_err(), "{compare:?} {next:?} {in_failure}");
        }
        let delete = Request::Command(Command::delete(key.clone(), false));
        assert!(RolePolicy.check(&me, &delete).is_err());
    }

    #[test]
    fn an_agent_uses_its_own_leases_or_ownerless_ones_holding_its_presence() {
        let lease = |owner: Option<&str>, keys: &[String]| Lease {
            id: 7,
            ttl_ms: 1000,
            remaining_ms: 1000,
            keys: keys.iter().cloned().collect(),
            owner: owner.map(str::to_string),
        };
        let me = agent("aaa");
        let mine = [keys::machine("aaa")];
        assert_eq!(
            RolePolicy.may_use_lease(&me, &lease(Some("aaa"), &[])),
            Ok(())
        );
        assert_eq!(RolePolicy.may_use_lease(&me, &lease(None, &mine)), Ok(()));
        let theirs = [keys::machine("bbb")];
        for refused in [
            lease(Some("bbb"), &mine),
            lease(None, &[]),
            lease(None, &theirs),
        ] {
            assert!(
                RolePolicy.may_use_lease(&me, &refused).is_err(),
                "{refused:?}"
            );
        }
        let admin = Identity {
            role: Role::Admin,
            ..agent("x")
        };
        assert_eq!(
            RolePolicy.may_use_lease(&admin, &lease(Some("bbb"), &[])),
            Ok(())
        );
    }

    #[test]
    fn one_foreign_write_refuses_the_whole_transaction() {
        let me = agent("aaa");
        let txn = Request::Command(Command::Txn {
            compare: Vec::new(),
            success: vec![Op::put(keys::machine("aaa"), Vec::new())],
            failure: vec![Op::put(keys::machine("bbb"), Vec::new())],
        });
        assert!(RolePolicy.check(&me, &txn).is_err());
        let reads = Request::Command(Command::Txn {
            compare: Vec::new(),
            success: vec![Op::Get {
                key: keys::UNITS.into(),
                prefix: true,
            }],
            failure: Vec::new(),
        });
        assert_eq!(RolePolicy.check(&me, &reads), Ok(()));
    }

    #[test]
    fn membership_and_lease_bookkeeping_are_not_for_agents() {
        let me = agent("aaa");
        let add = Request::MemberAdd {
            name: "evil".into(),
            peer_addr: "10.0.0.9:4002".into(),
        };
        assert!(RolePolicy.check(&me, &add).unwrap_err().contains("admin"));
        assert!(
            RolePolicy
                .check(&me, &Request::Snapshot)
                .unwrap_err()
                .contains("admin")
        );
        let expire = Request::Command(Command::LeaseExpire { ids: vec![1] });
        assert!(RolePolicy.check(&me, &expire).is_err());
        assert_eq!(
            RolePolicy.check(&me, &Request::Command(Command::LeaseGrant { ttl_ms: 1000 })),
            Ok(())
        );
        for role in [Role::Admin, Role::Member] {
            let who = Identity { role, ..agent("x") };
            assert_eq!(RolePolicy.check(&who, &add), Ok(()));
            assert_eq!(RolePolicy.check(&who, &Request::Snapshot), Ok(()));
            assert_eq!(RolePolicy.check(&who, &put(keys::UNITS, "x")), Ok(()));
        }
        for read in [
            Request::Status,
            Request::Range {
                key: keys::ROOT.into(),
                prefix: true,
                serializable: false,
            },
            Request::RangePage {
                key: keys::ROOT.into(),
                prefix: true,
                serializable: false,
                after: Some(keys::UNITS.into()),
                limit: 10,
            },
            Request::GetKeys {
                keys: vec![keys::machine("bbb")],
                serializable: false,
            },
            Request::Watch {
                prefix: keys::machine_prefix("aaa"),
                from: 1,
            },
        ] {
            assert_eq!(RolePolicy.check(&me, &read), Ok(()));
        }
    }
}
