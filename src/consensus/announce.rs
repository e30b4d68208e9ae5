//! Membership announcements between members: how a member that is behind
//! on the log learns of members it has not applied the addition of.
//!
//! A member learns a peer's address, and under TLS admits its messages,
//! from the membership it has *applied*. A member that fell behind the
//! addition of a newcomer could then neither answer the newcomer nor hear
//! it, and once the newcomer led, it never caught up (issue 11, found by
//! tests/transport_faults.rs). So members tell each other their applied
//! membership:
//!
//! * The peer listener offers a [`capability`](capability_frame) frame on
//!   an ordinary connection: "I understand announcements". It carries no
//!   information. A dialer of the first release never reads its
//!   connection, so the bytes sit unread in its socket buffer.
//! * A dialer that sees the offer sends an [`Announcement`]: its Raft id
//!   and name, the log index at which its applied membership is in force,
//!   and that membership; and a fresh one whenever its applied membership
//!   changes. A listener of the first release never offers, so it is never
//!   sent a frame it cannot decode.
//! * The listener records an announcement only from a sender it admits
//!   (under TLS: a member certificate whose member is in its admitted set,
//!   announcing as that member; see `transport::admit_announcement`). When
//!   the announced index is newer than its own membership's, the members it
//!   does not know become *vouched* ([`Book`]): the transport dials them and
//!   admits their messages. Once its own applied membership reaches that
//!   index the vouched ones are dropped and the applied membership alone
//!   rules again. A member's own applied members are never dropped because
//!   of an announcement.
//!
//! Only applied memberships are announced, never vouched members, and a
//! member certificate that no trusted member announced stays refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::codec::{CodecError, MemberInfo};
use super::member;

/// First byte of the listener's offer: above [`super::codec::FORMAT_VERSION`]
/// and the snapshot stream's 0x80, so no older frame starts with it.
pub const CAPABLE: u8 = 0x81;
/// First byte of an announcement frame.
pub const ANNOUNCEMENT: u8 = 0x82;
/// The announcement format this release writes and reads.
pub const ANNOUNCE_VERSION: u8 = 1;
/// The most members one announcement may name.
pub const MAX_MEMBERS: usize = 128;
/// The longest peer address an announcement may carry (a DNS name and a port).
pub const MAX_ADDRESS: usize = 261;
/// The largest announcement frame: [`MAX_MEMBERS`] members with the longest
/// names and addresses fit with room to spare.
pub const MAX_ANNOUNCEMENT: usize = 64 * 1024;
/// The largest frame a dialer reads back from a listener (the offer is 2 bytes;
/// a later release may append to it).
pub const MAX_OFFER: usize = 64;

/// The offer a listener writes on an ordinary peer connection.
pub fn capability_frame() -> [u8; 2] {
    [CAPABLE, ANNOUNCE_VERSION]
}

/// Whether `frame` is a listener's offer that this release can answer:
/// any version from [`ANNOUNCE_VERSION`] on (a newer listener still reads
/// the announcement format before its own).
pub fn is_capability(frame: &[u8]) -> bool {
    matches!(frame, [CAPABLE, version, ..] if *version >= ANNOUNCE_VERSION)
}

/// One member's applied membership, as it tells its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The announcing member's Raft id.
    pub from: u64,
    /// Its name (under TLS, the name its certificate must carry).
    pub name: String,
    /// The log index at which `members` is in force: the index of the
    /// membership change (or snapshot) it was applied from. A larger index
    /// means a membership at least as new.
    pub index: u64,
    /// The announcing member's applied members by Raft id.
    pub members: BTreeMap<u64, MemberInfo>,
}

/// Encodes an announcement frame; `None` when it exceeds the limits a
/// receiver enforces (it would be refused). Public for tests/trust.rs,
/// which forges announcements.
pub fn encode(announcement: &Announcement) -> Option<Vec<u8>> {
    check(announcement).ok()?;
    let frame = postcard::to_extend(announcement, vec![ANNOUNCEMENT, ANNOUNCE_VERSION])
        .expect("postcard cannot fail on an in-memory announcement");
    (frame.len() <= MAX_ANNOUNCEMENT).then_some(frame)
}

/// Decodes and checks an announcement frame: at most [`MAX_ANNOUNCEMENT`]
/// bytes and [`MAX_MEMBERS`] members, every name and address valid, no Raft
/// id 0. Public for the fuzz target (`fuzz/fuzz_targets/peer_frame.rs`).
pub fn decode(frame: &[u8]) -> Result<Announcement, CodecError> {
    let malformed = |what: String| CodecError::Malformed(format!("announcement: {what}"));
    if frame.len() > MAX_ANNOUNCEMENT {
        return Err(CodecError::TooLarge(frame.len()));
    }
    let body = match frame {
        [ANNOUNCEMENT, ANNOUNCE_VERSION, body @ ..] => body,
        [ANNOUNCEMENT, version, ..] => return Err(CodecError::Version { found: *version }),
        _ => return Err(malformed("not an announcement frame".into())),
    };
    let announcement: Announcement =
        postcard::from_bytes(body).map_err(|e| malformed(e.to_string()))?;
    check(&announcement).map_err(malformed)?;
    Ok(announcement)
}

fn check(announcement: &Announcement) -> Result<(), String> {
    if announcement.from == 0 {
        return Err("raft id 0".into());
    }
    member::check_name(&announcement.name)?;
    if announcement.members.len() > MAX_MEMBERS {
        return Err(format!(
            "{} members, more than {MAX_MEMBERS}",
            announcement.members.len()
        ));
    }
    for (id, info) in &announcement.members {
        if *id == 0 {
            return Err("a member with raft id 0".into());
        }
        if info.peer_addr.len() > MAX_ADDRESS {
            return Err(format!("an address longer than {MAX_ADDRESS} bytes"));
        }
        member::check(&info.name, &info.peer_addr)?;
    }
    Ok(())
}

/// The members one member talks to: its own applied membership and the
/// members that announcements newer than it vouched for. See the module
/// docs for the rules.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Book {
    me: u64,
    own: BTreeMap<u64, MemberInfo>,
    own_index: u64,
    vouched: BTreeMap<u64, MemberInfo>,
    /// The index of the announcement behind `vouched` (0: none).
    vouched_index: u64,
}

impl Book {
    /// An empty book of member `me` (it never vouches for itself).
    pub fn new(me: u64) -> Book {
        Book {
            me,
            ..Book::default()
        }
    }

    /// This member's applied membership, in force at log index `index`.
    /// Once it is as new as the vouching announcement, the vouched members
    /// are dropped; before that, those it now knows itself are.
    pub fn set_own(&mut self, members: &BTreeMap<u64, MemberInfo>, index: u64) {
        self.own = members.clone();
        self.own_index = index;
        if index >= self.vouched_index {
            self.vouched.clear();
            self.vouched_index = 0;
        } else {
            let own = &self.own;
            self.vouched.retain(|id, _| !own.contains_key(id));
        }
    }

    /// Records an announcement from a sender already admitted; true when
    /// it vouched for members this book did not hold. Ignored when it is
    /// not newer than this member's own membership or than the one already
    /// vouching, and while this member knows no membership at all.
    pub fn vouch(&mut self, announcement: &Announcement) -> bool {
        if self.own.is_empty()
            || announcement.index <= self.own_index
            || announcement.index <= self.vouched_index
        {
            return false;
        }
        let before = std::mem::take(&mut self.vouched);
        self.vouched = announcement
            .members
            .iter()
            .filter(|(id, _)| **id != self.me && !self.own.contains_key(id))
            .map(|(id, info)| (*id, info.clone()))
            .collect();
        self.vouched_index = announcement.index;
        self.vouched != before
    }

    /// Everyone this member talks to and admits: its own members, and the
    /// vouched ones it does not know itself.
    pub fn members(&self) -> BTreeMap<u64, MemberInfo> {
        let mut all = self.vouched.clone();
        all.extend(self.own.iter().map(|(id, info)| (*id, info.clone())));
        all
    }

    /// The members vouched for now.
    pub fn vouched(&self) -> &BTreeMap<u64, MemberInfo> {
        &self.vouched
    }

    /// The announcement of this member's own applied membership; `None`
    /// while it is not a member of it (a member still joining, or removed).
    pub fn announcement(&self) -> Option<Announcement> {
        let name = self.own.get(&self.me)?.name.clone();
        Some(Announcement {
            from: self.me,
            name,
            index: self.own_index,
            members: self.own.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> MemberInfo {
        MemberInfo {
            name: name.into(),
            peer_addr: format!("127.0.0.1:{}", 4000 + name.len()),
        }
    }

    fn members(ids: &[u64]) -> BTreeMap<u64, MemberInfo> {
        ids.iter()
            .map(|id| (*id, info(&format!("n{id}"))))
            .collect()
    }

    fn announced(from: u64, index: u64, ids: &[u64]) -> Announcement {
        Announcement {
            from,
            name: format!("n{from}"),
            index,
            members: members(ids),
        }
    }

    #[test]
    fn newer_announcements_vouch_older_ones_do_not_and_applied_catching_up_drops_them() {
        let mut book = Book::new(1);
        book.set_own(&members(&[1, 2, 3]), 10);
        // Not newer than the own membership: nothing vouched.
        assert!(!book.vouch(&announced(2, 10, &[1, 2, 3, 4])));
        assert!(!book.vouch(&announced(2, 7, &[1, 2, 3, 4])));
        assert!(book.vouched().is_empty());
        // Newer: the unknown member 4 is vouched, the known ones stay own.
        assert!(book.vouch(&announced(2, 12, &[1, 2, 3, 4])));
        assert_eq!(book.vouched().keys().copied().collect::<Vec<_>>(), [4]);
        assert_eq!(
            book.members().keys().copied().collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        // An older announcement than the vouching one changes nothing.
        assert!(!book.vouch(&announced(3, 11, &[1, 2, 3, 5])));
        assert_eq!(book.vouched().keys().copied().collect::<Vec<_>>(), [4]);
        // A newer one replaces it; own members it leaves out stay.
        assert!(book.vouch(&announced(3, 15, &[2, 4, 5])));
        assert_eq!(book.vouched().keys().copied().collect::<Vec<_>>(), [4, 5]);
        assert_eq!(
            book.members().keys().copied().collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        // Applying a membership not yet as new keeps the vouched it lacks.
        book.set_own(&members(&[1, 2, 3, 4]), 12);
        assert_eq!(book.vouched().keys().copied().collect::<Vec<_>>(), [5]);
        // Catching up to the announcement drops the rest: the applied
        // membership rules again, even where it differs.
        book.set_own(&members(&[1, 2, 3]), 15);
        assert!(book.vouched().is_empty());
        assert_eq!(
            book.members().keys().copied().collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn own_members_are_never_dropped_or_readdressed_and_no_one_vouches_for_me() {
        let mut book = Book::new(1);
        book.set_own(&members(&[1, 2, 3]), 10);
        let mut moved = announced(2, 20, &[2]);
        moved.members.insert(
            3,
            MemberInfo {
                name: "n3".into(),
                peer_addr: "10.9.9.9:1".into(),
            },
        );
        moved.members.insert(
            1,
            MemberInfo {
                name: "evil".into(),
                peer_addr: "10.9.9.9:2".into(),
            },
        );
        assert!(!book.vouch(&moved), "nothing unknown was announced");
        let all = book.members();
        assert_eq!(all.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(all[&3], info("n3"));
        assert_eq!(all[&1], info("n1"));
    }

    #[test]
    fn a_member_without_a_membership_records_nothing() {
        let mut book = Book::new(1);
        assert!(!book.vouch(&announced(2, 5, &[2, 3])));
        assert!(book.members().is_empty());
        assert_eq!(
            book.announcement(),
            None,
            "not a member: nothing to announce"
        );
        book.set_own(&members(&[1, 2]), 3);
        let mine = book.announcement().unwrap();
        assert_eq!((mine.from, mine.index, mine.name.as_str()), (1, 3, "n1"));
    }

    #[test]
    fn frames_round_trip_and_refuse_what_breaks_the_limits() {
        let good = announced(2, 9, &[1, 2, 3]);
        let frame = encode(&good).unwrap();
        assert_eq!(&frame[..2], &[ANNOUNCEMENT, ANNOUNCE_VERSION]);
        assert_eq!(decode(&frame).unwrap(), good);
        assert!(is_capability(&capability_frame()));
        assert!(!is_capability(&frame));
        assert!(!is_capability(&[CAPABLE, 0]));
        assert!(!is_capability(&[super::super::codec::FORMAT_VERSION, 1]));

        let mut newer = frame.clone();
        newer[1] = ANNOUNCE_VERSION + 1;
        assert!(matches!(decode(&newer), Err(CodecError::Version { .. })));
        assert!(decode(&[]).is_err());
        assert!(decode(&frame[..frame.len() - 1]).is_err(), "cut short");

        let too_many = announced(2, 9, &(1..=MAX_MEMBERS as u64 + 1).collect::<Vec<_>>());
        assert!(encode(&too_many).is_none());
        let forged = postcard::to_extend(&too_many, vec![ANNOUNCEMENT, ANNOUNCE_VERSION]).unwrap();
        assert!(decode(&forged).unwrap_err().to_string().contains("members"));

        let mut bad_name = good.clone();
        bad_name.members.insert(
            7,
            MemberInfo {
                name: "a b".into(),
                peer_addr: "127.0.0.1:1".into(),
            },
        );
        let forged = postcard::to_extend(&bad_name, vec![ANNOUNCEMENT, ANNOUNCE_VERSION]).unwrap();
        assert!(decode(&forged).is_err());
        let mut long_address = good.clone();
        long_address.members.insert(
            7,
            MemberInfo {
                name: "n7".into(),
                peer_addr: format!("{}.example:1", "a".repeat(MAX_ADDRESS)),
            },
        );
        assert!(encode(&long_address).is_none());
        // The fuzz target's seed is a valid announcement.
        let seed = include_bytes!("../../fuzz/seeds/peer_frame/announcement");
        let seeded = decode(seed).unwrap();
        assert_eq!((seeded.name.as_str(), seeded.index), ("m2", 42));
        assert_eq!(seeded.members.len(), 3);
        let mut zero = good;
        zero.from = 0;
        assert!(encode(&zero).is_none());
        assert!(matches!(
            decode(&vec![ANNOUNCEMENT; MAX_ANNOUNCEMENT + 1]),
            Err(CodecError::TooLarge(_))
        ));
    }
}
