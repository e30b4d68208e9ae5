//! The layout of the cluster's records in the Raft store.
//!
//! ```text
//! /flotilla/units/<unit>             UnitRecord: body hash + desired state
//! /flotilla/bodies/<hash>            the unit file text, content-addressed
//! /flotilla/machines/<id>            MachineRecord, on the machine's presence lease
//! /flotilla/drain/<id>               present while the machine is drained
//! /flotilla/placed/<unit>            the machine a non-global unit is proposed to
//! /flotilla/m/<id>/p/<unit>          Proposal: the scheduler asks <id> to run <unit>
//! /flotilla/m/<id>/c/<unit>          Claim: <id> runs <unit> (on its presence lease)
//! /flotilla/m/<id>/gen               bumped by every claim on <id>: serialises claims
//! /flotilla/states/<unit>/<id>       ReportedState: systemd's LOAD/ACTIVE/SUB there
//! /flotilla/lock/<group>             Semaphore: the reboot lock of a group of machines
//! /flotilla/reboot/<id>              RebootMark: `flotilla lock need-reboot` asked <id> to reboot
//! /flotilla/metadata/<id>/<key>      metadata set through the API ("": key removed)
//! /flotilla/reasons/<unit>           why the scheduler cannot place <unit>
//! /flotilla/renewed/<id>             Renewal: when <id> last renewed (on its lease;
//!                                    written by agents of the first release only)
//! ```
//!
//! Everything an agent must react to lives under its own `/flotilla/m/<id>/`,
//! so each agent watches one prefix and wakes only for its own work.

use crate::units::{UnitHash, UnitName};

/// Root of every flotilla record.
pub const ROOT: &str = "/flotilla/";
/// Prefix of every unit body.
pub const BODIES: &str = "/flotilla/bodies/";
/// Prefix of every unit record.
pub const UNITS: &str = "/flotilla/units/";
/// Prefix of every machine's presence record.
pub const MACHINES: &str = "/flotilla/machines/";
/// Prefix of drain marks.
pub const DRAIN: &str = "/flotilla/drain/";
/// Prefix of the placement pointers of non-global units.
pub const PLACED: &str = "/flotilla/placed/";
/// Prefix of every machine's proposals, claims and generation key.
pub const PER_MACHINE: &str = "/flotilla/m/";
/// Prefix of every reported unit state.
pub const STATES: &str = "/flotilla/states/";
/// Prefix of the metadata set through the API, per machine and key.
pub const METADATA: &str = "/flotilla/metadata/";
/// Prefix of the scheduler's reasons for units it cannot place.
pub const REASONS: &str = "/flotilla/reasons/";
/// Prefix of every machine's last renewal.
pub const RENEWALS: &str = "/flotilla/renewed/";

/// The record of unit `name`.
pub fn unit(name: &UnitName) -> String {
    format!("{UNITS}{name}")
}

/// The body with this hash.
pub fn body(hash: &UnitHash) -> String {
    format!("{BODIES}{hash}")
}

/// The hash a body key is stored under; `None` for anything else.
pub fn parse_body_key(key: &str) -> Option<UnitHash> {
    key.strip_prefix(BODIES)?.parse().ok()
}

/// The presence record of machine `id`.
pub fn machine(id: &str) -> String {
    format!("{MACHINES}{id}")
}

/// The drain mark of machine `id`.
pub fn drain(id: &str) -> String {
    format!("{DRAIN}{id}")
}

/// Where non-global unit `name` is proposed.
pub fn placed(name: &UnitName) -> String {
    format!("{PLACED}{name}")
}

/// Everything machine `id` watches.
pub fn machine_prefix(id: &str) -> String {
    format!("{PER_MACHINE}{id}/")
}

/// The proposal that machine `id` run `name`.
pub fn proposal(id: &str, name: &UnitName) -> String {
    format!("{PER_MACHINE}{id}/p/{name}")
}

/// Machine `id`'s claim on `name`.
pub fn claim(id: &str, name: &UnitName) -> String {
    format!("{PER_MACHINE}{id}/c/{name}")
}

/// Machine `id`'s claim generation key.
pub fn generation(id: &str) -> String {
    format!("{PER_MACHINE}{id}/gen")
}

/// Every reported state of unit `name`.
pub fn states_of(name: &UnitName) -> String {
    format!("{STATES}{name}/")
}

/// The state of unit `name` reported by machine `id`.
pub fn state(name: &UnitName, id: &str) -> String {
    format!("{STATES}{name}/{id}")
}

/// Metadata `key` of machine `id`, as set through the API.
pub fn metadata(id: &str, key: &str) -> String {
    format!("{METADATA}{id}/{key}")
}

/// `/flotilla/metadata/<id>/<key>` taken apart; `None` for anything else.
pub fn parse_metadata_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(METADATA)?.split_once('/')
}

/// Why the scheduler cannot place unit `name`.
pub fn reason(name: &UnitName) -> String {
    format!("{REASONS}{name}")
}

/// When machine `id` last renewed its presence, as an agent of the first
/// release stamped it (this release's agent removes it: see
/// [`super::liveness::last_renewals`]).
pub fn renewal(id: &str) -> String {
    format!("{RENEWALS}{id}")
}

/// A key under `/flotilla/m/`, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineKey {
    /// `/flotilla/m/<id>/p/<unit>`
    Proposal(String, UnitName),
    /// `/flotilla/m/<id>/c/<unit>`
    Claim(String, UnitName),
    /// `/flotilla/m/<id>/gen`
    Generation(String),
}

/// Parses a key under [`PER_MACHINE`]; `None` for anything else.
pub fn parse_machine_key(key: &str) -> Option<MachineKey> {
    let rest = key.strip_prefix(PER_MACHINE)?;
    let (id, rest) = rest.split_once('/')?;
    if rest == "gen" {
        return Some(MachineKey::Generation(id.to_string()));
    }
    let (kind, unit) = rest.split_once('/')?;
    let unit = UnitName::parse(unit).ok()?;
    match kind {
        "p" => Some(MachineKey::Proposal(id.to_string(), unit)),
        "c" => Some(MachineKey::Claim(id.to_string(), unit)),
        _ => None,
    }
}

/// `/flotilla/states/<unit>/<id>` taken apart; `None` for anything else.
pub fn parse_state_key(key: &str) -> Option<(UnitName, String)> {
    let (unit, id) = key.strip_prefix(STATES)?.rsplit_once('/')?;
    Some((UnitName::parse(unit).ok()?, id.to_string()))
}

/// The unit name at the end of a key under `prefix`.
pub fn unit_after(prefix: &str, key: &str) -> Option<UnitName> {
    UnitName::parse(key.strip_prefix(prefix)?).ok()
}

/// Prefix of every reboot semaphore.
pub const LOCKS: &str = "/flotilla/lock/";
/// Prefix of the marks of machines asked to reboot.
pub const REBOOTS: &str = "/flotilla/reboot/";

/// The reboot semaphore of machine group `group`.
pub fn semaphore(group: &str) -> String {
    format!("{LOCKS}{group}")
}

/// The mark asking machine `id` to reboot.
pub fn reboot_mark(id: &str) -> String {
    format!("{REBOOTS}{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_keys_round_trip() {
        let name = UnitName::parse("web@1.service").unwrap();
        assert_eq!(
            parse_machine_key(&proposal("abc", &name)),
            Some(MachineKey::Proposal("abc".into(), name.clone()))
        );
        assert_eq!(
            parse_machine_key(&claim("abc", &name)),
            Some(MachineKey::Claim("abc".into(), name.clone()))
        );
        assert_eq!(
            parse_machine_key(&generation("abc")),
            Some(MachineKey::Generation("abc".into()))
        );
        assert_eq!(parse_machine_key("/flotilla/m/abc/x/web.service"), None);
        assert_eq!(parse_machine_key("/flotilla/units/web.service"), None);
        assert_eq!(
            parse_state_key(&state(&name, "abc")),
            Some((name.clone(), "abc".into()))
        );
        assert_eq!(parse_state_key("/flotilla/states/nounit"), None);
        assert_eq!(unit_after(UNITS, &unit(&name)), Some(name.clone()));
        assert_eq!(unit_after(REASONS, &reason(&name)), Some(name));
        assert_eq!(
            parse_metadata_key(&metadata("abc", "region")),
            Some(("abc", "region"))
        );
        assert_eq!(parse_metadata_key("/flotilla/metadata/abc"), None);
        let hash = crate::units::UnitFile::parse("[Service]\nExecStart=/bin/true\n")
            .unwrap()
            .hash();
        assert_eq!(parse_body_key(&body(&hash)), Some(hash));
        assert_eq!(parse_body_key("/flotilla/bodies/xyz"), None);
    }
}
