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
use common::{on, runtime_in};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use imds_proxy::audit::Audit;
use imds_proxy::pods::MemoryPodSource;
use imds_proxy::proxy::{Limits, ProxyConfig, ProxyHandle, parse_upstream};
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
    let mut config = ProxyConfig {
        upstream: parse_upstream(&format!("http://{upstream}")).unwrap(),
        rules: Rules::from_yaml(
            &format!(
                "rules: [{{name: {name}, pods: {{name: {name}}}, paths: [{{prefix: {prefix}}}]}}]"
            ),
            "test",
        )
        .unwrap(),
        pod_listen: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        source_ip_listen: None,
        admin_listen: None,
        audit: Audit::discard(),
        limits: Limits::default(),
        reconcile_every: Duration::ZERO,
        workers: 2,
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
