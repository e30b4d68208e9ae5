//! The client protocol decoder: whatever bytes a client (or a member, for
//! the client) sends, decoding never panics, and whatever it accepts
//! encodes back to a frame that decodes to the same value.

#![no_main]

use flotilla::consensus::codec;
use flotilla::consensus::protocol::{Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = codec::decode::<Request>(data) {
        let again: Request = codec::decode(&codec::encode(&request))
            .expect("a request this release encoded decodes");
        assert_eq!(again, request);
    }
    if let Ok(response) = codec::decode::<Response>(data) {
        let again: Response = codec::decode(&codec::encode(&response))
            .expect("a response this release encoded decodes");
        assert_eq!(again, response);
    }
});
