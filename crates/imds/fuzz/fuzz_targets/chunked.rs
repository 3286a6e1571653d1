//! The chunked body decoder on arbitrary bytes cut into arbitrary reads:
//! it never yields more than it consumed, never an empty Data (a caller
//! that rechunks would write it as the last chunk), stays at End once
//! there, and the reads' boundaries change nothing: the same data, the
//! same outcome and the same bytes left over as when fed in one piece.
#![no_main]

use bytes::BytesMut;
use imds_proxy::fuzzing::{Chunk, ChunkedDecoder};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// End of the body; the bytes after it (the next message).
    End(Vec<u8>),
    /// The input ran out first.
    Starved,
    Failed(&'static str),
}

fn decode(pieces: &[&[u8]]) -> (Vec<u8>, Outcome) {
    let mut decoder = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut next = pieces.iter();
    let (mut fed, mut data) = (0usize, Vec::new());
    loop {
        let before = buf.len();
        let step = decoder.step(&mut buf);
        assert!(buf.len() <= before, "the decoder grew its input");
        let consumed = fed - buf.len();
        match step {
            Ok(Chunk::Data(d)) => {
                assert!(!d.is_empty(), "empty Data");
                data.extend_from_slice(&d);
                assert!(
                    data.len() <= consumed,
                    "{} bytes of data from {consumed} consumed",
                    data.len()
                );
            }
            Ok(Chunk::NeedMore) => match next.next() {
                Some(piece) => {
                    buf.extend_from_slice(piece);
                    fed += piece.len();
                }
                None => return (data, Outcome::Starved),
            },
            Ok(Chunk::End) => {
                let left = buf.clone();
                assert_eq!(decoder.step(&mut buf), Ok(Chunk::End), "End is not final");
                assert_eq!(buf, left, "a step after End consumed input");
                let mut rest = left.to_vec();
                next.for_each(|p| rest.extend_from_slice(p));
                return (data, Outcome::End(rest));
            }
            Err(why) => return (data, Outcome::Failed(why)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte says how many cuts, the next two bytes per cut where.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16);
    if rest.len() < 2 * n {
        return;
    }
    let (cuts, wire) = rest.split_at(2 * n);
    let mut at: Vec<usize> = cuts
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (wire.len() + 1))
        .collect();
    at.sort_unstable();
    let mut pieces = Vec::with_capacity(n + 1);
    let mut from = 0;
    for cut in at.into_iter().chain([wire.len()]) {
        pieces.push(&wire[from..cut]);
        from = cut;
    }

    let whole = decode(&[wire]);
    let split = decode(&pieces);
    assert_eq!(split, whole, "cut at {pieces:?}");
});
