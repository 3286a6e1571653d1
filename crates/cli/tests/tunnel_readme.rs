//! Upstream README's examples, verbatim but for the ports (tests run in
//! parallel): certificates from `proxyctl certs`, a real HTTP backend,
//! real processes, real mTLS, real curl.

mod tunnel_support;

use std::process::Command;
use std::time::Duration;

use tunnel_support::*;

fn client(dir: &std::path::Path, args: &[String]) -> (bool, String, String) {
    let out = Command::new(bin("proxy-test-client"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn readme_grpc_client_with_mtls() {
    let backend = HttpServer::start();
    let st = Stack::start("grpc");
    let mut args = s(&[
        "--ca-cert=certs/master/issued/ca.crt",
        "--client-cert=certs/master/issued/proxy-client.crt",
        "--client-key=certs/master/private/proxy-client.key",
    ]);
    args.push(format!("--proxy-port={}", st.ports.server));
    args.push(format!("--request-port={}", backend.port));
    args.push("--test-requests=3".into());
    let (ok, out, err) = client(st.dir.path(), &args);
    assert!(ok, "client failed: {err}\n{}", st.logs());
    assert_eq!(
        out.matches("success: hello from the backend").count(),
        3,
        "stdout: {out}"
    );

    // The same client without a client certificate is refused by mTLS.
    let mut bad = s(&["--ca-cert=certs/master/issued/ca.crt"]);
    bad.push(format!("--proxy-port={}", st.ports.server));
    bad.push(format!("--request-port={}", backend.port));
    let (ok, _, _) = client(st.dir.path(), &bad);
    assert!(!ok, "a client without a certificate must fail");
}

#[test]
fn readme_grpc_over_uds() {
    let backend = HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = Ports::new();
    let uds = dir.path().join("uds-proxy");
    let mut sa = s(&[
        "--server-port=0",
        "--cluster-ca-cert=certs/agent/issued/ca.crt",
        "--cluster-cert=certs/agent/issued/proxy-master.crt",
        "--cluster-key=certs/agent/private/proxy-master.key",
    ]);
    sa.push(format!("--uds-name={}", uds.display()));
    sa.extend(port_args(&p).into_iter().skip(1));
    let server = Proc::spawn(&bin("proxy-server"), &sa, dir.path(), "server");
    let agent = Proc::spawn(&bin("proxy-agent"), &agent_args(&p), dir.path(), "agent");
    wait_for("server ready", Duration::from_secs(60), || {
        http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    let mut args = s(&["--proxy-port=0", "--proxy-host="]);
    args.push(format!("--proxy-uds={}", uds.display()));
    args.push(format!("--request-port={}", backend.port));
    let (ok, out, err) = client(dir.path(), &args);
    assert!(
        ok,
        "client failed: {err}\n{}\n{}",
        server.log_text(),
        agent.log_text()
    );
    assert!(
        out.contains("success: hello from the backend"),
        "stdout: {out}"
    );
}

#[test]
fn readme_http_connect_client_and_curl() {
    let backend = HttpServer::start();
    let st = Stack::start("http-connect");
    let mut args = s(&[
        "--mode=http-connect",
        "--proxy-host=127.0.0.1",
        "--ca-cert=certs/master/issued/ca.crt",
        "--client-cert=certs/master/issued/proxy-client.crt",
        "--client-key=certs/master/private/proxy-client.key",
    ]);
    args.push(format!("--proxy-port={}", st.ports.server));
    args.push(format!("--request-port={}", backend.port));
    let (ok, out, err) = client(st.dir.path(), &args);
    assert!(ok, "client failed: {err}\n{}", st.logs());
    assert!(
        out.contains("success: hello from the backend"),
        "stdout: {out}"
    );

    if !proxyctl_testkit::require_tool("readme_http_connect_client_and_curl", "curl") {
        return;
    }
    let out = Command::new("curl")
        .args([
            "-v",
            "-p",
            "--proxy-key",
            "certs/master/private/proxy-client.key",
            "--proxy-cert",
            "certs/master/issued/proxy-client.crt",
            "--proxy-cacert",
            "certs/master/issued/ca.crt",
            "--proxy-cert-type",
            "PEM",
            "-x",
            &format!("https://127.0.0.1:{}", st.ports.server),
            &format!("http://localhost:{}/success", backend.port),
        ])
        .current_dir(st.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}\n{}", st.logs());
    assert!(
        stdout.contains("success: hello from the backend"),
        "curl stdout: {stdout}"
    );
    assert!(
        stderr.contains("200 Connection Established"),
        "curl stderr: {stderr}"
    );

    // Without a client certificate curl is refused during the handshake.
    let out = Command::new("curl")
        .args([
            "-s",
            "-p",
            "--proxy-cacert",
            "certs/master/issued/ca.crt",
            "-x",
        ])
        .arg(format!("https://127.0.0.1:{}", st.ports.server))
        .arg(format!("http://localhost:{}/success", backend.port))
        .current_dir(st.dir.path())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "curl without a client certificate must fail"
    );
}

#[test]
fn certs_layout_matches_make_certs() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    for f in [
        "certs/master/issued/ca.crt",
        "certs/master/issued/proxy-master.crt",
        "certs/master/issued/proxy-client.crt",
        "certs/master/private/ca.key",
        "certs/master/private/proxy-master.key",
        "certs/master/private/proxy-client.key",
        "certs/agent/issued/ca.crt",
        "certs/agent/issued/proxy-master.crt",
        "certs/agent/issued/proxy-agent.crt",
        "certs/agent/private/ca.key",
        "certs/agent/private/proxy-master.key",
        "certs/agent/private/proxy-agent.key",
        "certs/frontend/issued/proxy-frontend.crt",
        "certs/frontend/private/proxy-frontend.key",
    ] {
        let text =
            std::fs::read_to_string(dir.path().join(f)).unwrap_or_else(|_| panic!("missing {f}"));
        assert!(text.starts_with("-----BEGIN"), "{f} is not PEM");
    }
    // The server certificate carries upstream's SANs: check with openssl if present.
    if let Ok(out) = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(dir.path().join("certs/master/issued/proxy-master.crt"))
        .output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        for san in ["DNS:kubernetes", "DNS:localhost", "IP Address:127.0.0.1"] {
            assert!(text.contains(san), "missing {san} in {text}");
        }
    }
}
