//! The peer frame decoder: an ordinary Raft frame, and the header frame
//! that opens a snapshot stream. Whatever bytes a peer sends, decoding never
//! panics; a header never announces more than the snapshot limit; an
//! ordinary frame's message re-encodes to one with the same meaning.

#![no_main]

use flotilla::consensus::transport;
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
});
