//! The proxy end to end: a real imds-proxy on 127.0.0.1 (started once)
//! allowing one pod every method under `/`, in front of a scripted upstream
//! on 127.0.0.1 that answers any request with the input's reply bytes and
//! closes. Each input is (what the caller sends, what the upstream
//! replies). The caller's answer must be well-framed HTTP/1.1, the proxy
//! must close within bounds after the caller's half-close, and a fresh
//! connection must still get a clean 200 afterwards.
//!
//! No root or network namespace: the pod's listener is a loopback socket
//! handed to the proxy (`fuzzing::loopback_proxy`) instead of one bound inside
//! the pod's namespace.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use imds_proxy::proxy::{Limits, ProxyHandle};
use imds_proxy_fuzz::check_answers;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The request the upstream always answers cleanly, whatever the input.
const HEALTH: &[u8] = b"GET /fuzz-health HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n";
const HEALTHY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhealthy";

/// Longest the proxy may keep a connection after the caller half-closed:
/// every wait it has on this path is bounded by the limits below or ends
/// with the upstream's close, so only a hang takes longer. Twice this (the
/// input's exchange and the health check) stays under the smoke run's
/// per-input -timeout=10, so a hang is reported by this assertion.
const CLOSE_WITHIN: Duration = Duration::from_secs(4);

struct Harness {
    _rt: tokio::runtime::Runtime,
    _proxy: ProxyHandle,
    addr: SocketAddr,
    /// The upstream's next reply, and where it splits it into two writes.
    reply: Arc<Mutex<(Vec<u8>, usize)>>,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let reply = Arc::new(Mutex::new((Vec::new(), 0)));
    let script = reply.clone();
    let (proxy, addr) = rt.block_on(async move {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(serve_upstream(upstream, script));
        imds_proxy::fuzzing::loopback_proxy(
            upstream_addr,
            "fuzz",
            "rules: [{name: all, pods: {name: fuzz}, paths: [{prefix: /}], \
             methods: [GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS]}]",
            Limits {
                header_read_timeout: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(1),
                upstream_timeout: Duration::from_secs(2),
                // 0: no rate limit, so the health check is never a 429.
                rate_per_sec: 0.0,
                ..Limits::default()
            },
            1,
        )
        .await
    });
    Harness {
        _rt: rt,
        _proxy: proxy,
        addr,
        reply,
    }
});

/// Answers the first request head on each connection with the current
/// reply (the health request with HEALTHY), then closes.
async fn serve_upstream(listener: tokio::net::TcpListener, reply: Arc<Mutex<(Vec<u8>, usize)>>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let reply = reply.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let head = tokio::time::timeout(Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            });
            if head.await != Ok(true) {
                return;
            }
            let health =
                buf.starts_with(&HEALTH[..HEALTH.iter().position(|b| *b == b'\r').unwrap()]);
            let (bytes, split) = if health {
                (HEALTHY.to_vec(), 0)
            } else {
                reply.lock().unwrap().clone()
            };
            let split = split.min(bytes.len());
            if s.write_all(&bytes[..split]).await.is_err() {
                return;
            }
            if split > 0 && split < bytes.len() {
                // Lets the proxy read the first part on its own.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let _ = s.write_all(&bytes[split..]).await;
            let _ = s.shutdown().await;
            // Closing with the proxy's bytes unread would reset the
            // connection, and a reset may destroy the reply before the
            // proxy reads it: read to the proxy's close first.
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                let mut sink = [0u8; 4096];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

/// Writes `request`, half-closes, reads to the proxy's close. Returns the
/// bytes and whether the connection ended cleanly (a reset may have
/// destroyed bytes the proxy sent).
fn exchange(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).expect("the proxy accepts");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // The proxy may answer and close before reading everything.
    let _ = s.write_all(request);
    let _ = s.shutdown(Shutdown::Write);
    let start = Instant::now();
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (out, false),
        }
        assert!(
            start.elapsed() < CLOSE_WITHIN,
            "the proxy kept the connection {CLOSE_WITHIN:?} after the caller's half-close; \
             so far: {:?}",
            String::from_utf8_lossy(&out)
        );
    }
}

const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "get", "TRACE",
];
const PATHS: [&str; 10] = [
    "/",
    "/latest/meta-data/",
    "/metadata/instance?api-version=2021-02-01",
    "/metadata/identity/oauth2/token",
    "/latest/api/token",
    "/a/../b",
    "*",
    "http://169.254.169.254/",
    "/%6d",
    "//x",
];
const REQUEST_FIELDS: [&str; 12] = [
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Expect",
    "Metadata",
    "X-Forwarded-For",
    "Keep-Alive",
    "Upgrade",
    "TE",
    "X-Drop",
    "X-Aws-Ec2-Metadata-Token-Ttl-Seconds",
];
const RESPONSE_FIELDS: [&str; 9] = [
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Keep-Alive",
    "Trailer",
    "Upgrade",
    "X-Drop",
    "Content-Type",
    "Proxy-Connection",
];
const VALUES: [&str; 14] = [
    "chunked",
    "close",
    "keep-alive",
    "100-continue",
    "true",
    "0",
    "5",
    "70000",
    "gzip, chunked",
    "chunked, gzip",
    "keep-alive, X-Drop",
    "1.2.3.4",
    "5, 5",
    "",
];

#[derive(Arbitrary, Debug)]
enum Value {
    Pick(u8),
    /// The length of what follows the head (the body as rendered).
    BodyLength(i8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    /// Rendered as a chunked body, with a trailer field or not.
    Chunks(Vec<Vec<u8>>, bool),
}

#[derive(Arbitrary, Debug)]
struct Message {
    /// Method and path (request) or status code (response).
    first: u16,
    second: u8,
    http10: bool,
    fields: Vec<(u8, Value)>,
    body: Body,
}

#[derive(Arbitrary, Debug)]
enum Side {
    Raw(Vec<u8>),
    Messages(Vec<Message>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    caller: Side,
    reply: Side,
    reply_split: u16,
}

fn render_body(body: &Body) -> Vec<u8> {
    match body {
        Body::Raw(b) => b.clone(),
        Body::Chunks(chunks, trailer) => {
            let mut out = Vec::new();
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n");
            if *trailer {
                out.extend_from_slice(b"X-Trailer: t\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out
        }
    }
}

fn render(m: &Message, request: bool, out: &mut Vec<u8>) {
    let version = if m.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
    let names: &[&str] = if request {
        out.extend_from_slice(METHODS[usize::from(m.first) % METHODS.len()].as_bytes());
        out.push(b' ');
        out.extend_from_slice(PATHS[usize::from(m.second) % PATHS.len()].as_bytes());
        out.push(b' ');
        out.extend_from_slice(version.as_bytes());
        &REQUEST_FIELDS
    } else {
        out.extend_from_slice(version.as_bytes());
        out.extend_from_slice(format!(" {:03} ", m.first % 1000).as_bytes());
        if m.second % 4 != 0 {
            out.extend_from_slice(b"Reason");
        }
        &RESPONSE_FIELDS
    };
    out.extend_from_slice(b"\r\n");
    let body = render_body(&m.body);
    for (name, value) in m.fields.iter().take(80) {
        out.extend_from_slice(names[usize::from(*name) % names.len()].as_bytes());
        out.extend_from_slice(b": ");
        match value {
            Value::Pick(i) => {
                out.extend_from_slice(VALUES[usize::from(*i) % VALUES.len()].as_bytes())
            }
            Value::BodyLength(d) => out.extend_from_slice(
                (body.len() as i64 + i64::from(*d))
                    .max(0)
                    .to_string()
                    .as_bytes(),
            ),
            Value::Raw(v) => out.extend_from_slice(v),
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
}

fn bytes(side: &Side, request: bool) -> Vec<u8> {
    match side {
        Side::Raw(b) => b.clone(),
        Side::Messages(ms) => {
            let mut out = Vec::new();
            for m in ms.iter().take(8) {
                render(m, request, &mut out);
            }
            out
        }
    }
}

fuzz_target!(|input: Input| {
    let h = &*HARNESS;
    let caller = bytes(&input.caller, true);
    let reply = bytes(&input.reply, false);
    let split = usize::from(input.reply_split);
    *h.reply.lock().unwrap() = (reply, split);

    let (out, whole) = exchange(h.addr, &caller);
    check_answers(&caller, &out, whole);

    let (out, whole) = exchange(h.addr, HEALTH);
    let text = String::from_utf8_lossy(&out);
    assert!(whole, "the health request's connection was reset: {text:?}");
    check_answers(HEALTH, &out, whole);
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\nhealthy"),
        "the proxy no longer serves a clean request: {text:?}"
    );
});
