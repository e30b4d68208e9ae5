//! Which identity may make which request of the store: the policy the daemon
//! gives the store's client listener ([`crate::consensus::server::Authorize`]).
//!
//! * A **member** or an **admin** may make any request.
//! * An **agent**, named by its machine id, may read anything (nothing in
//!   the store is secret from the hosts that run its units), hold leases,
//!   and write only what its own machine writes: its presence
//!   (`machines/<id>`, `renewed/<id>`), everything under its own
//!   `m/<id>/` (claims, the claim generation, proposals it re-places on
//!   itself when it rejoins), its own unit states (`states/<unit>/<id>`),
//!   its reboot mark and drain mark (its reboot coordinator drains it before
//!   a reboot), the reboot semaphores (shared by a group's machines,
//!   which take and free slots in them), and a placement pointer that names
//!   itself (`placed/<unit>` = `<id>`, written when it re-places an orphan).
//!   Units, bodies, membership, backups (`snapshot save`) and other
//!   machines' keys are refused.
//!
//! A transaction is allowed only if every write in both of its branches is.

use crate::consensus::kv::{Command, Op};
use crate::consensus::protocol::Request;
use crate::consensus::server::Authorize;
use crate::tls::{Identity, Role};

use super::keys;

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
}

/// Whether the agent of machine `id` may make `request`.
pub fn agent_may(id: &str, request: &Request) -> Result<(), String> {
    match request {
        Request::Range { .. }
        | Request::Watch { .. }
        | Request::WatchRequireLeader { .. }
        | Request::Status => Ok(()),
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
            success, failure, ..
        } => success
            .iter()
            .chain(failure)
            .try_for_each(|op| agent_op(id, op)),
        Command::LeaseGrant { .. }
        | Command::LeaseKeepAlive { .. }
        | Command::LeaseRevoke { .. } => Ok(()),
        Command::LeaseExpire { .. } | Command::LeaseCheckpoint { .. } => {
            Err("only members expire or checkpoint leases".into())
        }
    }
}

fn agent_op(id: &str, op: &Op) -> Result<(), String> {
    let refused = |key: &str| {
        Err(format!(
            "an agent may write only its own machine's keys, not {key:?}; unit and machine \
             changes need an admin certificate"
        ))
    };
    match op {
        Op::Get { .. } => Ok(()),
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
        || key.starts_with(keys::LOCKS)
        || (key.starts_with(keys::PLACED) && value == Some(id.as_bytes()))
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
            keys::semaphore("default"),
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
            Request::Watch {
                prefix: keys::machine_prefix("aaa"),
                from: 1,
            },
        ] {
            assert_eq!(RolePolicy.check(&me, &read), Ok(()));
        }
    }
}
