//! The peer frame decoder: an ordinary Raft frame, the header frame that
//! opens a snapshot stream, and a membership announcement. Whatever bytes a
//! peer sends, decoding never panics; a header never announces more than
//! the snapshot limit; an ordinary frame's message re-encodes to one with
//! the same meaning; an announcement accepted is within its limits and
//! encodes back to the same announcement.

#![no_main]

use flotilla::consensus::{announce, member, transport};
use libfuzzer_sys::fuzz_target;
use protobuf::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = transport::decode(data) {
        // What a member forwards or stores decodes again with the same
        // meaning. (Not byte- or field-for-field equality: protobuf 2 keeps
        // unknown fields in a hash map and merges repeated singular fields,
        // as this target's first runs showed.)
        let mut frame = vec![data[0]];
        message
            .write_to_vec(&mut frame)
            .expect("a decoded message encodes");
        let again = transport::decode(&frame).expect("a re-encoded message decodes");
        assert_eq!(again.get_msg_type(), message.get_msg_type());
        assert_eq!(
            (again.to, again.from, again.term),
            (message.to, message.from, message.term)
        );
        assert_eq!(
            (again.index, again.log_term, again.commit),
            (message.index, message.log_term, message.commit)
        );
        assert_eq!(again.get_entries().len(), message.get_entries().len());
    }
    if let Ok((message, len)) = transport::snapshot_header(data) {
        assert!(
            len as u64 <= 16 * 1024 * 1024 * 1024,
            "announced {len} bytes"
        );
        assert_eq!(
            message.get_msg_type(),
            raft::eraftpb::MessageType::MsgSnapshot
        );
    }
    if let Ok(announcement) = announce::decode(data) {
        assert!(announcement.members.len() <= announce::MAX_MEMBERS);
        assert_ne!(announcement.from, 0);
        for (id, info) in &announcement.members {
            assert_ne!(*id, 0);
            assert!(info.peer_addr.len() <= announce::MAX_ADDRESS);
            assert!(member::check(&info.name, &info.peer_addr).is_ok());
        }
        let again = announce::encode(&announcement).expect("an accepted announcement encodes");
        assert_eq!(announce::decode(&again).expect("and decodes again"), announcement);
    }
});
