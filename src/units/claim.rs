//! Which proposed units a machine may claim now: the co-location rules as the
//! agent enforces them at claim time. Pure.
//!
//! The scheduler already avoids bad placements, but it decides from a view
//! that may be stale; the claim is where the rules become a guarantee. The
//! claim transaction bumps the machine's generation key, so claims on one
//! machine are serialised, and this check runs against every unit present
//! here: claimed, still running while being released, or claimed in the same
//! batch.
//!
//! It asks the very functions placement asks ([`super::colocation`]), so the
//! two cannot drift apart. Two differences are on purpose: a unit that
//! replaces one present here waits until that one has left instead of
//! displacing it (the scheduler withdraws the replaced unit's proposal), and
//! only units claimed here count as `MachineOf` peers (one being released is
//! leaving). `MachineID` and metadata are left to the scheduler, which
//! withdraws a proposal once its machine no longer qualifies.

use super::colocation::{between, missing_peer};
use super::name::UnitName;

pub use super::colocation::Ruled;

/// Why a proposal is not claimed in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A `MachineOf` peer is not claimed here (yet).
    Peer(UnitName),
    /// It may not share the machine with this unit (Conflicts or Replaces).
    Excludes(UnitName),
}

/// Splits `candidates` (in the order given) into those claimable together
/// now and those that must wait, given the units `present` here and the
/// units `claimed` here (a subset of present, the only valid peers).
pub fn choose<'a>(
    present: &[Ruled<'a>],
    claimed: &[&'a UnitName],
    candidates: &[Ruled<'a>],
) -> (Vec<&'a UnitName>, Vec<(&'a UnitName, Wait)>) {
    let mut chosen: Vec<Ruled<'a>> = Vec::new();
    let mut waiting = Vec::new();
    'next: for &candidate in candidates {
        if let Some(peer) = missing_peer(candidate.1, |peer| claimed.contains(&peer)) {
            waiting.push((candidate.0, Wait::Peer(peer.clone())));
            continue 'next;
        }
        for &other in present.iter().chain(chosen.iter()) {
            if !between(candidate, other).allows_sharing() {
                waiting.push((candidate.0, Wait::Excludes(other.0.clone())));
                continue 'next;
            }
        }
        chosen.push(candidate);
    }
    (chosen.into_iter().map(|c| c.0).collect(), waiting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::colocation::tests::unit;

    #[test]
    fn conflicting_candidates_are_never_chosen_together() {
        let a = unit("hello@1.service", "Conflicts=hello@*.service");
        let b = unit("hello@2.service", "Conflicts=hello@*.service");
        let c = unit("other.service", "");
        let (chosen, waiting) = choose(&[], &[], &[(&a.0, &a.1), (&b.0, &b.1), (&c.0, &c.1)]);
        assert_eq!(chosen, vec![&a.0, &c.0]);
        assert_eq!(waiting, vec![(&b.0, Wait::Excludes(a.0.clone()))]);
    }

    #[test]
    fn present_units_block_by_either_side() {
        let running = unit("db.service", "Conflicts=web*.service");
        let web = unit("web.service", "");
        let (chosen, waiting) = choose(
            &[(&running.0, &running.1)],
            &[&running.0],
            &[(&web.0, &web.1)],
        );
        assert!(chosen.is_empty());
        assert_eq!(waiting, vec![(&web.0, Wait::Excludes(running.0.clone()))]);
        let replacer = unit("v2.service", "Replaces=v1.service");
        let v1 = unit("v1.service", "");
        let (chosen, _) = choose(&[(&v1.0, &v1.1)], &[&v1.0], &[(&replacer.0, &replacer.1)]);
        assert!(
            chosen.is_empty(),
            "a replacing unit waits until the replaced one left"
        );
    }

    #[test]
    fn machine_of_needs_the_peer_claimed_here() {
        let peer = unit("app.service", "");
        let side = unit("side.service", "MachineOf=app.service");
        let (chosen, waiting) = choose(&[], &[], &[(&peer.0, &peer.1), (&side.0, &side.1)]);
        assert_eq!(chosen, vec![&peer.0]);
        assert_eq!(waiting, vec![(&side.0, Wait::Peer(peer.0.clone()))]);
        let (chosen, _) = choose(&[(&peer.0, &peer.1)], &[&peer.0], &[(&side.0, &side.1)]);
        assert_eq!(chosen, vec![&side.0]);
    }
}
