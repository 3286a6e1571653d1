//! HTTP/2 attacks on the gRPC frontend of a real proxy-server process (mTLS,
//! ALPN h2), with frames written by hand: for each, the server's resident
//! memory and descriptors stay within a stated bound of where they were
//! before, a legitimate client (proxy-test-client) is served during or
//! right after it, and a counter says what happened.
//!
//! The frame and HPACK encoding below is written here on purpose, apart
//! from the server's own: an attacker does not use our encoder.

mod tunnel_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use konnectivity::client::{self, Io};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_support::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 4;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The largest frame a peer may send before the server raises its limit.
const MAX_FRAME: usize = 16_384;

/// Growth of the server's resident memory an attack may cause (KiB): the
/// attacks below are ~2 MB on the wire and once cost hundreds of MB.
const RSS_GROWTH_KIB: u64 = 48 * 1024;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A field as a literal without indexing, new name, no Huffman.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// The header block of a Proxy call, as a gRPC client sends it.
fn proxy_call_block() -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/ProxyService/Proxy"),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        literal(&mut b, n, v);
    }
    b
}

/// A header block split into HEADERS and CONTINUATION frames.
fn header_frames(stream: u32, block: &[u8]) -> Vec<u8> {
    let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        out.extend(frame(kind, flags, stream, chunk));
    }
    out
}

/// What the server sent an attacker before the connection ended.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// The error code of its GOAWAY.
    goaway: Option<u32>,
    /// Streams it reset, with the error codes.
    resets: Vec<(u32, u32)>,
}

/// A connection to the frontend past the preface and an empty SETTINGS,
/// whose incoming frames are read by a task that returns what it saw when
/// a GOAWAY comes or the connection ends, and shares it as it goes.
async fn attacker(
    st: &Stack,
) -> (
    tokio::io::WriteHalf<Box<dyn Io>>,
    tokio::task::JoinHandle<Seen>,
    Arc<Mutex<Seen>>,
) {
    let io = client::raw_connect(&st.frontend(), true)
        .await
        .expect("TLS to the frontend");
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    wr.write_all(&hello).await.unwrap();
    let so_far = Arc::new(Mutex::new(Seen::default()));
    let shared = so_far.clone();
    let reader = tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut head = [0u8; 9];
        loop {
            if rd.read_exact(&mut head).await.is_err() {
                return seen;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                return seen;
            }
            let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
            match head[3] {
                GOAWAY if len >= 8 => {
                    seen.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                    return seen;
                }
                RST_STREAM if len == 4 => seen
                    .resets
                    .push((stream, u32::from_be_bytes(payload[..4].try_into().unwrap()))),
                _ => {}
            }
            *shared.lock().unwrap() = seen.clone();
        }
    });
    (wr, reader, so_far)
}

fn bad_input(st: &Stack, kind: &str) -> f64 {
    bad_input_count(st.ports.health, kind)
}

/// The server's memory and descriptors before an attack.
struct Baseline {
    rss_kib: u64,
    fds: usize,
}

impl Baseline {
    fn of(st: &Stack) -> Baseline {
        Baseline {
            rss_kib: st.server.rss_kib(),
            fds: st.server.fd_count(),
        }
    }

    /// RSS within [`RSS_GROWTH_KIB`] of the baseline and, once closed
    /// connections are torn down, at most `extra_fds` more descriptors (the
    /// attack's connections still open).
    fn check(&self, st: &Stack, what: &str, extra_fds: usize) {
        let rss = st.server.rss_kib();
        let settled = std::time::Instant::now() + Duration::from_secs(10);
        while st.server.fd_count() > self.fds + extra_fds && std::time::Instant::now() < settled {
            std::thread::sleep(Duration::from_millis(50));
        }
        let fds = st.server.fd_count();
        println!(
            "{what}: server RSS {} -> {rss} KiB, fds {} -> {fds}",
            self.rss_kib, self.fds
        );
        assert!(
            rss <= self.rss_kib + RSS_GROWTH_KIB,
            "{what}: RSS grew from {} to {rss} KiB\n{}",
            self.rss_kib,
            st.logs()
        );
        assert!(
            fds <= self.fds + extra_fds,
            "{what}: fds grew from {} to {fds}",
            self.fds
        );
    }
}

fn legitimate_client_served(st: &Stack, backend: &HttpServer, when: &str) {
    let (ok, out) = test_client_request(st.dir.path(), st.ports.server, backend.port);
    assert!(ok, "legitimate client {when}: {out}\n{}", st.logs());
    assert!(out.contains("hello from the backend"), "{when}: {out}");
}

/// 2 MB of 1-byte DATA frames (the gRPC message they belong to never
/// completes) on eight connections: once each frame pinned a 64 KiB read
/// buffer (2 MB raised RSS by ~760 MB); now the bytes held are what came.
#[test]
fn tiny_data_frames_cost_their_bytes_not_read_buffers() {
    let backend = HttpServer::start();
    let st = Stack::start("grpc");
    legitimate_client_served(&st, &backend, "before");
    let before = Baseline::of(&st);
    let rt = runtime();
    let conns = rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..8 {
            let (mut wr, _reader, seen) = attacker(&st).await;
            let mut burst = header_frames(1, &proxy_call_block());
            // A gRPC message of just under 4 MiB announced, then 25,000
            // of its bytes in frames of one byte each.
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&4_000_000u32.to_be_bytes());
            burst.extend(frame(DATA, 0, 1, &prefix));
            for _ in 0..25_000 {
                burst.extend(frame(DATA, 0, 1, b"x"));
            }
            wr.write_all(&burst).await.unwrap();
            wr.flush().await.unwrap();
            conns.push((wr, seen));
        }
        conns
    });
    // Held open while the server holds what they sent.
    std::thread::sleep(Duration::from_secs(1));
    before.check(&st, "8 x 25,000 one-byte DATA frames", 8);
    legitimate_client_served(&st, &backend, "during the tiny-frame attack");
    // The calls were taken, not refused: the bytes were the server's to hold.
    let seen: Vec<Seen> = conns
        .iter()
        .map(|(_, s)| s.lock().unwrap().clone())
        .collect();
    assert!(
        seen.iter()
            .all(|s| s.resets.is_empty() && s.goaway.is_none()),
        "{seen:?}\n{}",
        st.logs()
    );
    drop(conns);
    drop(rt);
}

/// One 64 KB header block naming a 4 KB table entry 60,000 times (240 MB
/// if expanded), on twenty connections: each is refused with GOAWAY
/// ENHANCE_YOUR_CALM before it expands, and counted.
#[test]
fn hpack_amplification_is_refused_before_it_expands() {
    let backend = HttpServer::start();
    let st = Stack::start("grpc");
    let before = Baseline::of(&st);
    let seen_before = bad_input(&st, "h2_header_list_too_large");
    let mut block = vec![0x40, 5];
    block.extend_from_slice(b"x-big");
    hpack_int(&mut block, 0, 7, 4000);
    block.extend(std::iter::repeat_n(b'v', 4000));
    block.extend(std::iter::repeat_n(0x80 | 62, 60_000));
    let rt = runtime();
    let codes = rt.block_on(async {
        let mut codes = Vec::new();
        for _ in 0..20 {
            let (mut wr, reader, _) = attacker(&st).await;
            wr.write_all(&header_frames(1, &block)).await.unwrap();
            let code = tokio::time::timeout(Duration::from_secs(20), reader)
                .await
                .expect("the server answers the block")
                .unwrap();
            codes.push(code);
        }
        codes
    });
    assert!(
        codes.iter().all(|c| c.goaway == Some(ENHANCE_YOUR_CALM)),
        "GOAWAY codes: {codes:?}\n{}",
        st.logs()
    );
    before.check(&st, "20 amplifying header blocks", 0);
    assert_eq!(
        bad_input(&st, "h2_header_list_too_large") - seen_before,
        20.0,
        "every block counted"
    );
    legitimate_client_served(&st, &backend, "after the HPACK attack");
}

/// A header block that never ends, followed by 200,000 empty CONTINUATION
/// frames (a billion were once accepted and never counted): GOAWAY
/// ENHANCE_YOUR_CALM, counted as a flood of frames without progress.
#[test]
fn a_continuation_flood_gets_enhance_your_calm() {
    let backend = HttpServer::start();
    let st = Stack::start("grpc");
    let before = Baseline::of(&st);
    let rt = runtime();
    let code = rt.block_on(async {
        let (mut wr, reader, _) = attacker(&st).await;
        let block = proxy_call_block();
        let mut flood = frame(HEADERS, 0, 1, &block[..2]);
        let empty = frame(CONTINUATION, 0, 1, &[]);
        for _ in 0..200_000 {
            flood.extend_from_slice(&empty);
        }
        // The server may close while the flood is still being written.
        let _ = wr.write_all(&flood).await;
        let code = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the server ends the flood")
            .unwrap();
        legitimate_client_served(&st, &backend, "right after the CONTINUATION flood");
        code
    });
    assert_eq!(code.goaway, Some(ENHANCE_YOUR_CALM), "{}", st.logs());
    assert!(bad_input(&st, "h2_no_progress_flood") >= 1.0);
    before.check(&st, "200,000 empty CONTINUATION frames", 0);
}
