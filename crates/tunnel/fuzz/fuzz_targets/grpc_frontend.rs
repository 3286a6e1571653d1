//! (e) The gRPC frontend's own HTTP/2 server: arbitrary bytes from a client,
//! from the first byte or from inside an open Proxy call, with an agent
//! that accepts or refuses dials. The harness checks that the server writes
//! whole frames, starts with SETTINGS, and leaves no stream, dial or
//! connection behind.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let dial_error = if mode & 2 == 0 { "" } else { "connection refused" };
    konnectivity::server::fuzzing::grpc_frontend(input, mode & 1 == 1, dial_error);
});
