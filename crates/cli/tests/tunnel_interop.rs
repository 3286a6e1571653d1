//! Wire interop with an independent gRPC stack: Python grpcio peers whose
//! stubs grpc_tools generates from our .proto files at test time. A Python
//! client and a Python agent against our server, our client against a
//! Python server: the wire format is proven without trusting our codegen.

mod tunnel_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tunnel_support::*;

fn have_grpcio(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if proxyctl_testkit::in_ci() {
            panic!(
                "{test}: needs python3 with grpcio and grpcio-tools (scripts/install-deps.sh installs them)"
            );
        }
        eprintln!(
            "SKIPPED {test}: python3 grpcio/grpcio-tools missing (scripts/install-deps.sh installs them)"
        );
    }
    ok
}

/// Generates Python stubs from our protos. The files are laid flat (a
/// directory named `konnectivity-client` is not an importable package);
/// with no `package` line the wire names are the same.
fn python_stubs(dir: &Path) -> PathBuf {
    let stubs = dir.join("py");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tunnel/proto");
    std::fs::copy(
        proto.join("konnectivity-client/proto/client/client.proto"),
        stubs.join("client.proto"),
    )
    .unwrap();
    let agent = std::fs::read_to_string(proto.join("proto/agent/agent.proto"))
        .unwrap()
        .replace(
            "konnectivity-client/proto/client/client.proto",
            "client.proto",
        );
    std::fs::write(stubs.join("agent.proto"), agent).unwrap();
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tunnel_py");
    for f in ["common.py", "agent.py", "server.py", "client.py"] {
        std::fs::copy(py.join(f), stubs.join(f)).unwrap();
    }
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I."])
        .args([
            "--python_out=.",
            "--grpc_python_out=.",
            "client.proto",
            "agent.proto",
        ])
        .current_dir(&stubs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stubs
}

fn py(stubs: &Path, script: &str, args: &[String], name: &str) -> Proc {
    let mut a = vec![stubs.join(script).display().to_string()];
    a.extend_from_slice(args);
    Proc::spawn("python3", &a, stubs, name)
}

/// The Python agent, id `id`, dialing our server's agent port with the
/// agent certificate from `dir`.
fn python_agent(stubs: &Path, dir: &Path, agent_port: u16, id: &str) -> Proc {
    let c = dir.join("certs/agent");
    py(
        stubs,
        "agent.py",
        &[
            "127.0.0.1".into(),
            agent_port.to_string(),
            c.join("issued/ca.crt").display().to_string(),
            c.join("issued/proxy-agent.crt").display().to_string(),
            c.join("private/proxy-agent.key").display().to_string(),
            id.into(),
        ],
        "pyagent",
    )
}

/// Our server in `dir` with `extra` flags and no agent, once it answers
/// /healthz.
fn server_without_agent(dir: &Path, p: &Ports, mode: &str, extra: &[&str]) -> Proc {
    let mut sa = server_args(p, mode);
    sa.extend(s(extra));
    let server = Proc::spawn(&bin("proxy-server"), &sa, dir, "server");
    wait_for("server listening", Duration::from_secs(60), || {
        http_get(p.health, "/healthz").is_some()
    });
    server
}

/// Our test client (README certificates from `dir`) makes `n` requests to
/// the backend through the proxy on `proxy_port`; every one must succeed.
/// `logs` explains a failure.
fn our_client_gets(dir: &Path, proxy_port: u16, backend_port: u16, n: usize, logs: &str) {
    let mut args = s(&[
        "--proxy-host=127.0.0.1",
        "--ca-cert=certs/master/issued/ca.crt",
        "--client-cert=certs/master/issued/proxy-client.crt",
        "--client-key=certs/master/private/proxy-client.key",
    ]);
    args.push(format!("--test-requests={n}"));
    args.push(format!("--proxy-port={proxy_port}"));
    args.push(format!("--request-port={backend_port}"));
    let out = Command::new(bin("proxy-test-client"))
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client: {}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("success: hello from the backend")
            .count(),
        n
    );
}

#[test]
fn python_client_against_our_server_and_agent() {
    if !have_grpcio("python_client_against_our_server_and_agent") {
        return;
    }
    let backend = HttpServer::start();
    let st = Stack::start("grpc");
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let stubs = python_stubs(st.dir.path());
    let c = st.path("certs/master");
    let mut client = py(
        &stubs,
        "client.py",
        &[
            "127.0.0.1".into(),
            st.ports.server.to_string(),
            c.join("issued/ca.crt").display().to_string(),
            c.join("issued/proxy-client.crt").display().to_string(),
            c.join("private/proxy-client.key").display().to_string(),
            format!("127.0.0.1:{}", backend.port),
        ],
        "pyclient",
    );
    let code = client.wait_exit(Duration::from_secs(60));
    let log = client.log_text();
    assert_eq!(code, Some(0), "python client failed:\n{log}\n{}", st.logs());
    for line in ["GET OK 300000", "ECHO OK", "DIAL ERROR OK", "ALL OK"] {
        assert!(log.contains(line), "missing {line:?} in:\n{log}");
    }
    st.wait_settled(sfd, afd);
}

#[test]
fn python_agent_against_our_server() {
    if !have_grpcio("python_agent_against_our_server") {
        return;
    }
    let backend = HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = Ports::new();
    let stubs = python_stubs(dir.path());
    let server = server_without_agent(
        dir.path(),
        &p,
        "grpc",
        &["--server-id=server-under-test", "--server-count=3"],
    );
    let agent = python_agent(&stubs, dir.path(), p.agent, "py-agent-1");
    wait_for("python agent connected", Duration::from_secs(30), || {
        http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    wait_for("agent saw headers", Duration::from_secs(10), || {
        agent.log_text().contains("HEADERS")
    });
    assert!(
        agent
            .log_text()
            .contains("HEADERS serverid=server-under-test servercount=3"),
        "headers: {}",
        agent.log_text()
    );
    // Our test client through our server and the Python agent.
    our_client_gets(
        dir.path(),
        p.server,
        backend.port,
        3,
        &format!("{}\n{}", server.log_text(), agent.log_text()),
    );
    // The server saw every connection closed (CLOSE_RSP from the Python agent).
    wait_for("connections closed", Duration::from_secs(10), || {
        metric(
            p.health,
            "konnectivity_network_proxy_server_established_connections",
        ) == 0.0
    });
}

#[test]
fn our_client_against_python_server() {
    if !have_grpcio("our_client_against_python_server") {
        return;
    }
    let backend = HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let stubs = python_stubs(dir.path());
    let port = free_port();
    let c = dir.path().join("certs/master");
    let server = py(
        &stubs,
        "server.py",
        &[
            port.to_string(),
            c.join("issued/ca.crt").display().to_string(),
            c.join("issued/proxy-master.crt").display().to_string(),
            c.join("private/proxy-master.key").display().to_string(),
        ],
        "pyserver",
    );
    wait_for("python server", Duration::from_secs(30), || {
        server.log_text().contains("LISTENING")
    });
    our_client_gets(dir.path(), port, backend.port, 2, &server.log_text());
}

/// With an agent that does not speak our flow-control extension (the
/// Python one, like upstream's Go agent), a client that stops reading gets
/// its own connection closed once its queue passes
/// `--max-connection-queue-bytes`; the server's memory stays bounded and
/// the other connections on the same agent stream carry on.
#[test]
fn upstream_style_agent_slow_reader_is_cut_alone() {
    if !have_grpcio("upstream_style_agent_slow_reader_is_cut_alone") {
        return;
    }
    let backend = HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = Ports::new();
    let stubs = python_stubs(dir.path());
    let server = server_without_agent(
        dir.path(),
        &p,
        "http-connect",
        &["--max-connection-queue-bytes=1048576"],
    );
    let agent = python_agent(&stubs, dir.path(), p.agent, "py-agent-2");
    wait_for("python agent connected", Duration::from_secs(30), || {
        http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    let addr = frontend_addr(dir.path(), p.server);
    let rt = runtime();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let target = format!("127.0.0.1:{}", backend.port);
        let mut stalled = konnectivity::client::http_connect(&addr, &target, "stalled")
            .await
            .unwrap();
        stalled
            .write_all(b"GET /bytes/134217728 HTTP/1.1\r\nHost: b\r\n\r\n")
            .await
            .unwrap();
        wait_for(
            "the slow reader's connection is cut",
            Duration::from_secs(60),
            || {
                metric(
                    p.health,
                    "konnectivity_network_proxy_server_queue_overflow_total",
                ) >= 1.0
            },
        );
        // Others still work over the same agent stream.
        for _ in 0..3 {
            let mut io = konnectivity::client::http_connect(&addr, &target, "t")
                .await
                .unwrap();
            let (status, body) = konnectivity::client::http_get(&mut *io, "b", "/success")
                .await
                .unwrap();
            assert_eq!(status, 200);
            assert_eq!(
                String::from_utf8_lossy(&body),
                "success: hello from the backend"
            );
        }
        // The cut connection ends for its client too.
        let mut sink = vec![0u8; 1 << 16];
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match stalled.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the cut connection never ended:\n{}",
            server.log_text()
        );
    });
    // Memory stayed bounded: far below the 128 MiB the backend sent.
    let rss = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap();
    assert!(rss < 100 * 1024, "server RSS {rss} KiB");
    drop(agent);
}
