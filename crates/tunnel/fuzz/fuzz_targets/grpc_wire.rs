//! (f) The agent link's gRPC message decoder: a byte stream cut into
//! chunks (the first bytes give their sizes) must decode as it does whole,
//! and every packet decoded must re-encode as prost encodes it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 8).min(rest.len());
    let (cuts, input) = rest.split_at(n);
    konnectivity::server::fuzzing::grpc_wire_stream(cuts, input);
});
