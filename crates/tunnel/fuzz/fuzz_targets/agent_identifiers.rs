//! (d) The `agentIdentifiers` parser (and the dial-address host split that
//! destHost routing compares with it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = konnectivity::server::fuzzing::parse_identifiers(s);
    }
});
