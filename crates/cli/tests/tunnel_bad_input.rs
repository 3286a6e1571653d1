//! Bad input against a real server and agent: each case gets upstream's
//! answer or a clean stream close, is counted in
//! `konnectivity_network_proxy_server_bad_input_total`, and leaves the
//! processes serving with no descriptor leaked.

mod tunnel_support;

use std::time::Duration;

use konnectivity::client::{self, ProxyAddr};
use konnectivity::proto::agent_service_client::AgentServiceClient;
use konnectivity::proto::proxy_service_client::ProxyServiceClient;
use konnectivity::proto::{Checked, Packet, headers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tunnel_support::*;

fn bad_count(st: &Stack, kind: &str) -> f64 {
    bad_input_count(st.ports.health, kind)
}

async fn raw_http(addr: &ProxyAddr, bytes: &[u8]) -> String {
    let mut io = client::raw_connect(addr, false).await.unwrap();
    io.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn http_connect_port_refuses_other_methods_garbage_and_bad_certificates() {
    let backend = HttpServer::start();
    let st = Stack::start("http-connect");
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let addr = st.frontend();
    let rt = runtime();
    rt.block_on(async {
        let r = raw_http(&addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed"), "{r}");
        assert!(
            r.contains("this proxy only supports CONNECT passthrough"),
            "{r}"
        );
        let r = raw_http(
            &addr,
            b"\x16\x03\x01garbage that is not HTTP at all\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400 Bad Request"), "{r}");
        let mut huge = b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 20_000));
        let r = raw_http(&addr, &huge).await;
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        // Half a request, then hang up: nothing must linger.
        let mut io = client::raw_connect(&addr, false).await.unwrap();
        io.write_all(b"CONNECT 127.0.0.1:80 HT").await.unwrap();
        drop(io);
        // A dial the agent cannot complete: the agent's error, upstream's status.
        let r = raw_http(
            &addr,
            b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n",
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 502 Bad Gateway") && r.contains("connection refused"),
            "{r}"
        );

        // TLS without a client certificate, and with one from another CA.
        let c = st.path("certs/master");
        let no_cert = konnectivity::tls::client_config(
            &c.join("issued/ca.crt"),
            None,
            &Default::default(),
            &[],
        )
        .unwrap();
        let a2 = tls_addr(st.ports.server, no_cert);
        assert!(
            client::http_connect(&a2, &format!("127.0.0.1:{}", backend.port), "t")
                .await
                .is_err()
        );
        let other = tempfile::tempdir().unwrap();
        make_certs(other.path());
        let o = other.path().join("certs/master");
        let wrong = konnectivity::tls::client_config(
            &c.join("issued/ca.crt"),
            Some((
                &o.join("issued/proxy-client.crt"),
                &o.join("private/proxy-client.key"),
            )),
            &Default::default(),
            &[],
        )
        .unwrap();
        let a3 = tls_addr(st.ports.server, wrong);
        assert!(
            client::http_connect(&a3, &format!("127.0.0.1:{}", backend.port), "t")
                .await
                .is_err()
        );

        // Still serving.
        let mut io = client::http_connect(&addr, &format!("127.0.0.1:{}", backend.port), "t")
            .await
            .unwrap();
        let (status, body) = client::http_get(&mut *io, "b", "/success").await.unwrap();
        assert_eq!(
            (status, String::from_utf8_lossy(&body).as_ref()),
            (200, "success: hello from the backend")
        );
    });
    drop(rt);
    assert!(bad_count(&st, "http_method") >= 1.0);
    assert!(bad_count(&st, "http_malformed") >= 1.0);
    assert!(bad_count(&st, "http_head_too_large") >= 1.0);
    assert!(
        bad_count(&st, "tls_handshake_frontend") >= 2.0,
        "{}",
        st.logs()
    );
    st.wait_settled(sfd, afd);
}

/// Opens a raw Proxy stream whose first packet is `first`: (sender,
/// receiver of checked packets), or the status a Trailers-Only response
/// gave. The first packet goes before the response is awaited: the server
/// sends its response head with its first message, as grpc-go's server
/// (and so upstream's) does.
async fn open_call(
    addr: &ProxyAddr,
    first: Packet,
) -> Result<(mpsc::Sender<Packet>, tonic::Streaming<Packet>), tonic::Status> {
    let channel = client::grpc_channel(addr).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let resp = ProxyServiceClient::new(channel)
        .proxy(ReceiverStream::new(rx))
        .await?;
    Ok((tx, resp.into_inner()))
}

async fn proxy_stream(
    addr: &ProxyAddr,
    first: Packet,
) -> (mpsc::Sender<Packet>, tonic::Streaming<Packet>) {
    open_call(addr, first).await.unwrap()
}

async fn next(rx: &mut tonic::Streaming<Packet>) -> Option<Checked> {
    match tokio::time::timeout(Duration::from_secs(10), rx.message()).await {
        Ok(Ok(Some(p))) => p.checked().ok(),
        Ok(_) => None,
        Err(_) => panic!("no answer within 10 s"),
    }
}

/// A Proxy stream dialled to `address`: (sender, receiver, connectID).
async fn dial(
    addr: &ProxyAddr,
    address: &str,
) -> (mpsc::Sender<Packet>, tonic::Streaming<Packet>, i64) {
    let (tx, mut rx) = proxy_stream(addr, Packet::dial_req("tcp", address, 4242)).await;
    match next(&mut rx).await {
        Some(Checked::DialRsp(r)) if r.error.is_empty() => (tx, rx, r.connect_id),
        other => panic!("dial: {other:?}"),
    }
}

#[test]
fn grpc_frontend_bad_packets_close_only_their_own_stream() {
    let backend = HttpServer::start();
    let st = Stack::start("grpc");
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let addr = st.frontend();
    let target = format!("127.0.0.1:{}", backend.port);
    let rt = runtime();
    rt.block_on(async {
        // DATA before any dial: CLOSE_RSP with upstream's error, stream ends.
        let (_tx, mut rx) =
            proxy_stream(&addr, Packet::data(7, bytes::Bytes::from_static(b"early"))).await;
        match next(&mut rx).await {
            Some(Checked::CloseRsp(c)) => assert_eq!(c.error, "backend not initialized"),
            other => panic!("{other:?}"),
        }
        assert!(next(&mut rx).await.is_none(), "stream must end");

        // A good connection A, and B trying to write into A's connectID.
        let (txa, mut rxa, ida) = dial(&addr, &target).await;
        let (txb, mut rxb, idb) = dial(&addr, &target).await;
        assert_ne!(ida, idb);
        txb.send(Packet::data(
            ida,
            bytes::Bytes::from_static(b"GET /success HTTP/1.1\r\n\r\n"),
        ))
        .await
        .unwrap();
        match next(&mut rxb).await {
            Some(Checked::CloseRsp(c)) => assert_eq!(c.error, "mismatched connection IDs"),
            other => panic!("{other:?}"),
        }
        // A is untouched and works.
        txa.send(Packet::data(
            ida,
            bytes::Bytes::from_static(
                b"GET /success HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
            ),
        ))
        .await
        .unwrap();
        let mut got = Vec::new();
        loop {
            match next(&mut rxa).await {
                Some(Checked::Data(d)) => got.extend_from_slice(&d.data),
                Some(Checked::CloseRsp(_)) | None => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(String::from_utf8_lossy(&got).contains("success: hello from the backend"));

        // Malformed packets: unknown type; type and payload that disagree.
        for bad in [
            Packet {
                r#type: 42,
                payload: None,
            },
            Packet {
                r#type: 4,
                payload: Some(konnectivity::proto::Payload::DialRequest(Default::default())),
            },
        ] {
            let (_tx, mut rx) = proxy_stream(&addr, bad).await;
            assert!(
                next(&mut rx).await.is_none(),
                "a malformed packet must end the stream"
            );
        }

        // An oversized message (over gRPC's 4 MiB) is refused by the codec.
        // Refused before any message of the server's: a Trailers-Only
        // response, so the status comes with the response itself.
        let big = Packet::data(1, bytes::Bytes::from(vec![0u8; 5 << 20]));
        let status = match open_call(&addr, big).await {
            Err(status) => status,
            Ok((_tx, mut rx)) => {
                match tokio::time::timeout(Duration::from_secs(10), rx.message())
                    .await
                    .unwrap()
                {
                    Err(status) => status,
                    Ok(m) => panic!("oversized message accepted: {m:?}"),
                }
            }
        };
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

        // A protocol the agent does not dial.
        let (tx, mut rx) = proxy_stream(&addr, Packet::dial_req("udp", &target, 99)).await;
        match next(&mut rx).await {
            Some(Checked::DialRsp(r)) => {
                assert!(r.error.contains("unsupported protocol"), "{}", r.error)
            }
            other => panic!("{other:?}"),
        }
        drop((tx, rx, txa, rxa, txb, rxb));
    });
    drop(rt);
    assert!(bad_count(&st, "data_before_dial_response") >= 1.0);
    assert!(bad_count(&st, "data_foreign_connection") >= 1.0);
    assert!(bad_count(&st, "malformed_client_packet") >= 2.0);
    assert_eq!(http_get(st.ports.health, "/readyz").map(|r| r.0), Some(200));
    st.wait_settled(sfd, afd);
}

#[test]
fn agent_listener_refuses_agents_without_id_and_survives_bad_agent_packets() {
    let st = Stack::start("grpc");
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let addr = tls_addr(
        st.ports.agent,
        client_tls(st.dir.path(), "agent", "proxy-agent"),
    );
    let rt = runtime();
    rt.block_on(async {
        // No agentID: refused.
        let channel = client::grpc_channel(&addr).await.unwrap();
        let (_tx, rx) = mpsc::channel::<Packet>(4);
        let r = AgentServiceClient::new(channel.clone())
            .connect(ReceiverStream::new(rx))
            .await;
        assert!(r.is_err(), "an agent without agentID must be refused");

        // A misbehaving agent with an ID: garbage is dropped, DATA for an
        // unknown connection is answered with CLOSE_REQ, as upstream does.
        let (tx, rx) = mpsc::channel::<Packet>(4);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(headers::AGENT_ID, "rogue-agent".parse().unwrap());
        let resp = AgentServiceClient::new(channel).connect(req).await.unwrap();
        assert!(resp.metadata().get(headers::SERVER_ID).is_some());
        let mut inbound = resp.into_inner();
        tx.send(Packet {
            r#type: 77,
            payload: None,
        })
        .await
        .unwrap();
        tx.send(Packet::dial_rsp(123456789, 55, "")).await.unwrap();
        tx.send(Packet::data(999, bytes::Bytes::from_static(b"x")))
            .await
            .unwrap();
        let mut close_reqs = Vec::new();
        while close_reqs.len() < 2 {
            match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
                Ok(Ok(Some(p))) => {
                    if let Ok(Checked::CloseReq(c)) = p.checked() {
                        close_reqs.push(c.connect_id);
                    }
                }
                other => panic!("server stream ended: {other:?}"),
            }
        }
        close_reqs.sort();
        assert_eq!(close_reqs, vec![55, 999]);
        drop(tx);
    });
    drop(rt);
    // Without an agent certificate the TLS handshake fails.
    let out = std::process::Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "--cacert"])
        .arg(st.path("certs/agent/issued/ca.crt"))
        .arg(format!(
            "https://127.0.0.1:{}/AgentService/Connect",
            st.ports.agent
        ))
        .output();
    if let Ok(out) = out {
        assert!(!out.status.success());
    }
    assert!(bad_count(&st, "agent_without_id") >= 1.0);
    assert!(bad_count(&st, "malformed_agent_packet") >= 1.0);
    wait_for("rogue agent gone", Duration::from_secs(10), || {
        metric(
            st.ports.health,
            "konnectivity_network_proxy_server_ready_backend_connections",
        ) == 1.0
    });
    st.wait_settled(sfd, afd);
}

/// An agent that never answers a dial: with `--backend-dial-timeout` the
/// client gets upstream's timeout (504 on HTTP-CONNECT, DIAL_RSP error on
/// gRPC) and the agent a DIAL_CLS; the pending dial is released.
#[test]
fn backend_dial_timeout_releases_the_pending_dial() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = Ports::new();
    let mut sa = server_args(&p, "http-connect");
    sa.push("--backend-dial-timeout=1s".into());
    let server = Proc::spawn(&bin("proxy-server"), &sa, dir.path(), "server");
    wait_for("server up", Duration::from_secs(60), || {
        http_get(p.health, "/healthz").is_some()
    });
    let rt = runtime();
    rt.block_on(async {
        let aaddr = tls_addr(p.agent, client_tls(dir.path(), "agent", "proxy-agent"));
        let channel = client::grpc_channel(&aaddr).await.unwrap();
        let (_tx, rx) = mpsc::channel::<Packet>(4);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(headers::AGENT_ID, "silent-agent".parse().unwrap());
        let mut inbound = AgentServiceClient::new(channel)
            .connect(req)
            .await
            .unwrap()
            .into_inner();
        wait_for("silent agent registered", Duration::from_secs(10), || {
            http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200)
        });
        let caddr = frontend_addr(dir.path(), p.server);
        let r = raw_http(
            &caddr,
            b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 504 Gateway Timeout")
                && r.contains("timed out waiting for backend dial"),
            "{r}"
        );
        // The agent saw the DIAL_REQ, then the DIAL_CLS for it.
        let mut kinds = Vec::new();
        while kinds.len() < 2 {
            let p = tokio::time::timeout(Duration::from_secs(10), inbound.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            kinds.push(p.checked().unwrap().type_name());
        }
        assert_eq!(kinds, vec!["DIAL_REQ", "DIAL_CLS"]);
    });
    drop(rt);
    assert_eq!(
        metric(
            p.health,
            "konnectivity_network_proxy_server_pending_backend_dials"
        ),
        0.0,
        "{}",
        server.log_text()
    );
    let timeouts: f64 = http_get(p.health, "/metrics")
        .unwrap()
        .1
        .lines()
        .filter(|l| l.contains("dial_failure_count{reason=\"backend_dial_timeout\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(timeouts >= 1.0);
}
