//! (c) The HTTP-CONNECT request reader: arbitrary bytes from a client, with
//! no agent, an agent that accepts the dial, or one that refuses it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, request)) = data.split_first() else {
        return;
    };
    let (with_agent, err) = match mode % 4 {
        0 => (false, ""),
        1 => (true, ""),
        2 => (true, "dial tcp: i/o timeout"),
        _ => (true, "connection refused"),
    };
    let out = konnectivity::server::fuzzing::http_connect(request, with_agent, err);
    // Whatever the input, any answer is an HTTP/1.1 status line.
    assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 "), "{out:?}");
});
