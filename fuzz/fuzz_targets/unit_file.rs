//! Fuzz target: the unit-file parser must round-trip its own output.
//!
//! Property: whenever `UnitFile::parse(text)` accepts an input, the text that
//! `to_text()` renders from the result parses again, to the same canonical
//! options list and so to the same hash. The hash is what the store uses to
//! address a unit body, so a rendering that drifts would make one unit look
//! like two (or two like one) after a save and reload.
//!
//! Inputs that are not UTF-8 or that the parser rejects are not interesting
//! here: rejecting bad input cleanly is the parser's job, and a panic while
//! doing so is still caught, because libFuzzer reports every panic.

#![no_main]

use flotilla::units::UnitFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(first) = UnitFile::parse(text) else {
        return;
    };

    let rendered = first.to_text();
    let second = match UnitFile::parse(&rendered) {
        Ok(second) => second,
        Err(err) => panic!(
            "to_text() produced a unit file that does not parse: {err}\n\
             input:    {text:?}\n\
             rendered: {rendered:?}"
        ),
    };

    assert_eq!(
        second.options(),
        first.options(),
        "options changed across parse -> to_text -> parse \
         (left: reparsed, right: first parse)\n\
         input:    {text:?}\n\
         rendered: {rendered:?}"
    );
    assert_eq!(
        second.hash(),
        first.hash(),
        "hash changed across parse -> to_text -> parse although the options \
         are equal (left: reparsed, right: first parse)\n\
         input:    {text:?}\n\
         rendered: {rendered:?}"
    );
});
