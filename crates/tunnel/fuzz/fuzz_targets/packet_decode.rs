//! (a) protobuf Packet decoding plus the type/payload check both stream
//! readers apply to every packet.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = konnectivity::server::fuzzing::decode_packet(data);
});
