//! imds-proxy against upstreams other than the fake: large or
//! unknown-length bodies stream through (the client gets the first bytes
//! while the upstream still holds back the rest; a buffering proxy would
//! deadlock and the test time out), and a refusing or silent upstream gives
//! 502 / 504. Everything runs on the loopback of a namespace the test makes.

mod common;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use common::{on, quiet_config, runtime_in};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use imds_proxy::audit::Audit;
use imds_proxy::pods::MemoryPodSource;
use imds_proxy::proxy::{Limits, ProxyConfig, ProxyHandle};
use imds_proxy::{Pod, Rules};
use proxyctl_testkit::{NetNs, require_root};

const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 16;

/// imds-proxy on `ns`'s 127.0.0.1:`port` for one pod, `name`, living in
/// `ns` and allowed under `prefix` of `upstream`; audit discarded and
/// default limits unless `tweak` says otherwise.
fn start_proxy(
    rt: &tokio::runtime::Runtime,
    ns: &NetNs,
    name: &str,
    prefix: &str,
    upstream: SocketAddr,
    port: u16,
    tweak: impl FnOnce(&mut ProxyConfig),
) -> ProxyHandle {
    let pod = Pod {
        name: name.into(),
        namespace: "default".into(),
        uid: None,
        labels: Default::default(),
        netns: Some(ns.path()),
        ip: None,
    };
    let rules = format!(
        "rules: [{{name: {name}, pods: {{name: {name}}}, paths: [{{prefix: {prefix}}}], imdsv1: true}}]"
    );
    let mut config = ProxyConfig {
        pod_listen: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        limits: Limits::default(),
        ..quiet_config(&upstream.to_string(), &rules)
    };
    tweak(&mut config);
    let source = Arc::new(MemoryPodSource::new(vec![pod]));
    on(rt, async move {
        ProxyHandle::start(config, source).await.unwrap()
    })
}

#[test]
fn large_bodies_stream_through() {
    if !require_root("large_bodies_stream_through") {
        return;
    }
    let ns = NetNs::new("imdstream");
    let rt = runtime_in(&ns.path());
    // The upstream: sends one chunk, then waits for the test's go-ahead
    // before sending the rest (chunked, no Content-Length).
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let upstream: SocketAddr = on(&rt, async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let go_rx = go_rx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let mut go = go_rx.clone();
                        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
                        tokio::spawn(async move {
                            let _ = tx.send(Bytes::from(vec![b'z'; CHUNK])).await;
                            let _ = go.wait_for(|v| *v).await;
                            for _ in 1..CHUNKS {
                                let _ = tx.send(Bytes::from(vec![b'z'; CHUNK])).await;
                            }
                        });
                        async move { Ok::<_, Infallible>(http::Response::new(ChannelBody(rx))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    });

    let proxy = start_proxy(
        &rt,
        &ns,
        "big",
        "/latest/user-data",
        upstream,
        15990,
        |_| {},
    );

    let (first_tx, first_rx) = mpsc::channel();
    let client = std::thread::spawn({
        let path = ns.path();
        move || {
            proxyctl_testkit::in_netns(&path, move || {
                let mut s = std::net::TcpStream::connect("127.0.0.1:15990").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(
                    b"GET /latest/user-data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = Vec::new();
                let mut signalled = false;
                loop {
                    let n = s
                        .read(&mut buf)
                        .expect("read (a buffering proxy times out here)");
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if !signalled && got.windows(4).any(|w| w == b"zzzz") {
                        first_tx.send(()).unwrap();
                        signalled = true;
                    }
                }
                String::from_utf8_lossy(&got).into_owned()
            })
        }
    });
    first_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the first chunk must reach the client before the upstream finishes");
    go_tx.send(true).unwrap();
    let text = client.join().unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{}",
        &text[..200]
    );
    assert_eq!(text.matches('z').count(), CHUNK * CHUNKS);
    drop(proxy);
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// An upstream body fed from a channel: no length known, so it goes out
/// chunked.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// An upstream that refuses connections gives 502; one that accepts but
/// never answers gives 504 after the upstream timeout. Both are audited.
#[test]
fn upstream_failures_are_502_and_504() {
    if !require_root("upstream_failures_are_502_and_504") {
        return;
    }
    let ns = NetNs::new("imdup");
    let rt = runtime_in(&ns.path());
    // A listener that never accepts: connections complete in the kernel,
    // requests are never answered.
    let silent: SocketAddr = on(&rt, async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Held (never accepting) until the runtime shuts down.
        tokio::spawn(async move {
            let _held = l;
            std::future::pending::<()>().await
        });
        addr
    });
    let dir = tempfile::tempdir().unwrap();
    for (upstream, port, status, decision) in [
        (
            "127.0.0.1:1".parse::<SocketAddr>().unwrap(),
            15990u16,
            502u16,
            "upstream_error",
        ),
        (silent, 15991, 504, "upstream_timeout"),
    ] {
        let audit_path = dir.path().join(format!("{port}.jsonl"));
        let proxy = start_proxy(&rt, &ns, "app", "/latest/", upstream, port, |c| {
            c.audit = Audit::to_file(&audit_path).unwrap();
            c.limits.upstream_timeout = Duration::from_millis(300);
        });
        let out = proxyctl_testkit::in_netns(&ns.path(), move || {
            common::send(
                SocketAddr::from(([127, 0, 0, 1], port)),
                "GET",
                "/latest/meta-data/instance-id",
                &[],
            )
        });
        assert_eq!(out.status, status, "{out:?}");
        proxy.flush_audit();
        let audit = std::fs::read_to_string(&audit_path).unwrap();
        assert!(
            audit.contains(&format!("\"decision\":\"{decision}\"")),
            "{audit}"
        );
        drop(proxy);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// imds-proxy keeps one upstream connection per caller connection. An
/// upstream that closes after every answer (without saying so) must not
/// cost the caller's next requests a 502: a closed kept connection is
/// noticed and replaced.
#[test]
fn kept_upstream_connections_closed_by_the_upstream_are_replaced() {
    if !require_root("kept_upstream_connections_closed_by_the_upstream_are_replaced") {
        return;
    }
    let ns = NetNs::new("imdkeep");
    let rt = runtime_in(&ns.path());
    let accepted = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let count = accepted.clone();
    let upstream: SocketAddr = on(&rt, async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    // Closes without `Connection: close`.
                });
            }
        });
        addr
    });
    let proxy = start_proxy(
        &rt,
        &ns,
        "keep",
        "/latest/meta-data",
        upstream,
        15990,
        |_| {},
    );
    let statuses = proxyctl_testkit::in_netns(&ns.path(), || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:15990").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            s.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            out.push(text.lines().next().unwrap_or_default().to_owned());
        }
        out
    });
    assert_eq!(statuses, vec!["HTTP/1.1 200 OK"; 3]);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    drop(proxy);
    drop(rt);
}

/// A scripted upstream speaking raw HTTP/1.1, answering by path; it records
/// every request (head and body) it received.
fn scripted_upstream(
    rt: &tokio::runtime::Runtime,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let addr = on(rt, async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            let mut chunk = [0u8; 4096];
                            let n = s.read(&mut chunk).await.unwrap();
                            assert!(n > 0, "caller body cut short");
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        let body = buf[end + 4..end + 4 + len].to_vec();
                        buf.drain(..end + 4 + len);
                        log.lock()
                            .unwrap()
                            .push(format!("{head}\r\n\r\n{}", String::from_utf8_lossy(&body)));
                        let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                        let answer: Vec<u8> = match path.as_str() {
                            "/latest/one" => {
                                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Kept: yes\r\n\r\none"
                                    .to_vec()
                            }
                            "/latest/two" => {
                                b"HTTP/1.1 201 Made Here\r\nContent-Length: 3\r\n\r\ntwo".to_vec()
                            }
                            "/latest/echo" => {
                                let mut a = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    body.len()
                                )
                                .into_bytes();
                                a.extend_from_slice(&body);
                                a
                            }
                            "/latest/big" => {
                                let mut a =
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n".to_vec();
                                a.extend((0..300_000u32).map(|i| b'a' + (i % 26) as u8));
                                a
                            }
                            "/latest/untilclose" => {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbytes until the close").await;
                                return;
                            }
                            _ => b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
                        };
                        if s.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    });
    (addr, seen)
}

/// Writes `parts` (with a pause between them), then reads to the close.
fn exchange_raw(ns: &NetNs, port: u16, parts: Vec<Vec<u8>>) -> Vec<u8> {
    proxyctl_testkit::in_netns(&ns.path(), move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for part in parts {
            s.write_all(&part).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .expect("the proxy must close when asked to");
        out
    })
}

/// Decodes a chunked body (the test's own decoder).
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap(), 16).unwrap();
        body = &body[eol + 2..];
        if size == 0 {
            assert_eq!(body, b"\r\n", "last chunk, no trailers");
            return out;
        }
        out.extend_from_slice(&body[..size]);
        assert_eq!(&body[size..size + 2], b"\r\n");
        body = &body[size + 2..];
    }
}

/// HTTP/1.1 framing cases the proxy must get right both ways: pipelined
/// requests answered in order on one upstream connection, HTTP/1.0
/// callers, request bodies (with `Expect: 100-continue`), a long body of
/// known length, a body delimited by the upstream's close (re-framed as
/// chunked for HTTP/1.1 callers, raw for HTTP/1.0), hop-by-hop fields
/// dropped, and a broken upstream answer (502).
#[test]
fn http1_framing_through_the_proxy() {
    if !require_root("http1_framing_through_the_proxy") {
        return;
    }
    let ns = NetNs::new("imdframe");
    let rt = runtime_in(&ns.path());
    let (upstream, seen) = scripted_upstream(&rt);
    let proxy = start_proxy(&rt, &ns, "frame", "/latest/", upstream, 15990, |c| {
        c.rules = Rules::from_yaml(
            "rules: [{name: frame, pods: {name: frame}, paths: [{prefix: /latest/}], methods: [GET, PUT], imdsv1: true}]",
            "test",
        )
        .unwrap();
    });
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    // Two pipelined requests in one write, the second asking to close.
    let out = text(&exchange_raw(
        &ns,
        15990,
        vec![b"GET /latest/one HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: drop me\r\nX-Keep: keep me\r\n\r\nGET /latest/two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()],
    ));
    let one = out.find("HTTP/1.1 200 OK").expect(&out);
    let two = out.find("HTTP/1.1 201 Made Here").expect(&out);
    assert!(one < two, "answers in request order: {out}");
    assert!(out.contains("X-Kept: yes") && out.ends_with("two"), "{out}");
    assert!(
        out[two..]
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{out}"
    );
    {
        let seen = seen.lock().unwrap();
        let first = &seen[seen.len() - 2];
        assert!(first.contains("X-Keep: keep me"), "{first}");
        assert!(
            !first.contains("X-Hop") && !first.to_ascii_lowercase().contains("connection:"),
            "hop-by-hop fields must not go upstream: {first}"
        );
    }

    // HTTP/1.0: answered and closed (read_to_end returns).
    let out = text(&exchange_raw(
        &ns,
        15990,
        vec![b"GET /latest/one HTTP/1.0\r\nHost: x\r\n\r\n".to_vec()],
    ));
    assert!(
        out.starts_with("HTTP/1.1 200 OK") && out.ends_with("\r\n\r\none"),
        "{out}"
    );
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );

    // A body sent after the head, announced with Expect: 100-continue.
    let out = text(&exchange_raw(
        &ns,
        15990,
        vec![
            b"PUT /latest/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".to_vec(),
            b"hello world".to_vec(),
        ],
    ));
    assert!(
        out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\nhello world"), "{out}");
    assert!(
        !seen
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .to_ascii_lowercase()
            .contains("expect:"),
        "Expect is answered by the proxy, not forwarded"
    );

    // A long body of known length streams through byte for byte.
    let out = exchange_raw(
        &ns,
        15990,
        vec![b"GET /latest/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()],
    );
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let expected: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(out[split..], expected[..]);

    // A body delimited by the upstream's close: chunked to an HTTP/1.1
    // caller, whose connection stays usable; raw to an HTTP/1.0 caller.
    let out = exchange_raw(
        &ns,
        15990,
        vec![b"GET /latest/untilclose HTTP/1.1\r\nHost: x\r\n\r\nGET /latest/one HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()],
    );
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = text(&out[..head_end]).to_ascii_lowercase();
    assert!(
        head.contains("transfer-encoding: chunked") && !head.contains("connection: close"),
        "{head}"
    );
    let all = text(&out);
    let next = all[head_end..]
        .find("HTTP/1.1 200 OK")
        .map(|p| p + head_end)
        .unwrap_or_else(|| panic!("no answer to the second request: {all}"));
    assert_eq!(dechunk(&out[head_end..next]), b"bytes until the close");
    assert!(text(&out).ends_with("one"));
    let out = text(&exchange_raw(
        &ns,
        15990,
        vec![b"GET /latest/untilclose HTTP/1.0\r\nHost: x\r\n\r\n".to_vec()],
    ));
    assert!(out.ends_with("\r\n\r\nbytes until the close"), "{out}");

    // An answer that is not HTTP: 502, and nothing of it reaches the caller.
    let out = text(&exchange_raw(
        &ns,
        15990,
        vec![b"GET /latest/garbage HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()],
    ));
    assert!(out.starts_with("HTTP/1.1 502 Bad Gateway"), "{out}");
    assert!(!out.contains("NOT HTTP"), "{out}");

    drop(proxy);
    rt.shutdown_timeout(Duration::from_secs(1));
}
