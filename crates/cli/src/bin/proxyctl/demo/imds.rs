//! `proxyctl demo imds`: two pods ask one metadata service and get the
//! answers their labels allow.
//!
//! A "node" namespace holds the metadata-service fake on 169.254.169.254:80
//! (on its loopback: the namespace has no other link, so nothing leaves it)
//! and imds-proxy. Each pod namespace gets the destination-proxy policy
//! that sends 169.254.169.254:80 to the proxy's listener inside that pod,
//! which is how the proxy knows who asks. Both run in this process on the
//! same library code as `imds-proxy mock` and `imds-proxy serve`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use imds_proxy::audit::Audit;
use imds_proxy::mock::{self, MockState};
use imds_proxy::pods::MemoryPodSource;
use imds_proxy::proxy::{Limits, ProxyConfig, ProxyHandle, parse_upstream};
use imds_proxy::{Pod, Rules};
use proxyctl_policy::{DestinationProxy, Policy};

use super::{anonymous_netns, in_ns, intro, links, ns_path, on, runtime_in};

const IMDS: &str = "169.254.169.254";
const POD_LISTEN: &str = imds_proxy::proxy::DEFAULT_POD_LISTEN;

const RULES: &str = "\
rules:
  - name: web-reads-instance-and-gets-a-token
    pods: { labels: { app: web } }
    paths: [ { prefix: /metadata/instance }, { exact: /metadata/identity/oauth2/token } ]
  - name: batch-reads-instance-only
    pods: { labels: { app: batch } }
    paths: [ { prefix: /metadata/instance } ]
identities:
  - name: web
    pods: { labels: { app: web } }
    azure: { client_id: 11111111-0000-0000-0000-000000000001 }
";

const INSTANCE: &str = "/metadata/instance/compute/name?api-version=2021-02-01&format=text";
const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";

/// An audit sink the demo prints from.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn run() -> anyhow::Result<bool> {
    intro(
        "proxyctl demo imds: one metadata service, two pods, different answers",
        &[
            "imds-proxy stands between pods and the node's metadata service",
            "(169.254.169.254). It knows which pod asks because it listens inside each",
            "pod's namespace, where a proxyctl policy sends 169.254.169.254:80 to it;",
            "never by what the request claims. Rules by pod label say who may ask for",
            "what, identities by pod label say whose token a pod gets; every decision",
            "is an audit line. Pod \"web\" may read instance metadata and gets a token",
            "for its own managed identity; pod \"batch\" may only read instance metadata.",
        ],
    );
    let node = anonymous_netns()?;
    links(&node, |rt| {
        rt.set_up("lo")?;
        rt.add_address("lo", format!("{IMDS}/32").parse().expect("literal"))
    })?;
    let node_rt = runtime_in(&node, 2)?;

    println!("$ imds-proxy mock --listen {IMDS}:80          (in the node namespace)");
    let state = MockState::new();
    let s = state.clone();
    on(&node_rt, async move {
        let listener = tokio::net::TcpListener::bind((IMDS, 80))
            .await
            .context("binding the metadata-service fake")?;
        tokio::spawn(mock::serve(listener, s));
        anyhow::Ok(())
    })??;

    let mut pods = Vec::new();
    for (name, app, addr) in [("web", "web", "10.77.0.2"), ("batch", "batch", "10.77.0.3")] {
        let ns = anonymous_netns()?;
        pod_network(&ns, addr)?;
        let pod_listen: SocketAddr = POD_LISTEN.parse()?;
        let policy = Policy {
            name: "imds".into(),
            destination_proxy: Some(DestinationProxy {
                destination: format!("{IMDS}:80").parse()?,
                proxy: pod_listen,
            }),
            ..Policy::default()
        }
        .checked()?;
        proxyctl_nft::add(&proxyctl_nft::Target::Path(ns_path(&ns)), &policy)?;
        println!(
            "$ proxyctl add POD-{name} --name imds --destination-proxy {IMDS}:80={POD_LISTEN}"
        );
        pods.push((name, app, addr, ns));
    }

    let rules_yaml = RULES;
    println!("\nrules.yaml:\n{}", indent(rules_yaml));
    let audit = Lines::default();
    let source = Arc::new(MemoryPodSource::new(
        pods.iter()
            .map(|(name, app, addr, ns)| Pod {
                name: (*name).into(),
                namespace: "shop".into(),
                uid: Some(format!("demo-{name}")),
                labels: [("app".to_owned(), (*app).to_owned())].into(),
                netns: Some(ns_path(ns)),
                ip: Some(addr.parse().expect("literal")),
            })
            .collect(),
    ));
    let config = ProxyConfig {
        upstream: parse_upstream(&format!("http://{IMDS}"))?,
        rules: Rules::from_yaml(rules_yaml, "rules.yaml")?,
        pod_listen: Some(POD_LISTEN.parse()?),
        source_ip_listen: None,
        admin_listen: Some("127.0.0.1:0".parse()?),
        audit: Audit::to_writer(Box::new(audit.clone())),
        limits: Limits::default(),
        reconcile_every: Duration::ZERO,
        workers: 1,
    };
    println!(
        "$ imds-proxy serve --upstream http://{IMDS} --rules rules.yaml --pods pods.yaml   (in the node namespace)\n"
    );
    let handle = on(&node_rt, async move {
        let handle = ProxyHandle::start(config, source).await?;
        handle.reconcile().await?;
        anyhow::Ok(handle)
    })??;

    let mut as_expected = true;
    for (name, _, _, ns) in &pods {
        for (what, path, want) in [
            ("instance metadata", INSTANCE, 200),
            (
                "a managed-identity token",
                TOKEN,
                if *name == "web" { 200 } else { 403 },
            ),
        ] {
            println!(
                "-- pod {name} asks for {what}: GET http://{IMDS}{}",
                short(path)
            );
            let target = path.to_owned();
            let (status, body) = in_ns(ns, move || get(&target))?;
            let shown = if status == 200 && path.contains("oauth2/token") {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let token = v["access_token"].as_str().unwrap_or("");
                format!(
                    "access_token {}... (expires_in {})",
                    &token[..token.len().min(16)],
                    v["expires_in"]
                )
            } else {
                body.trim().chars().take(100).collect()
            };
            println!("   {status}  {shown}");
            as_expected &= status == want;
        }
    }

    handle.flush_audit();
    println!("\n-- the audit log (JSON lines, one per decision):\n");
    let text =
        String::from_utf8_lossy(&audit.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    for line in text.lines() {
        println!("   {line}");
    }
    println!(
        "\nThe metadata service saw {} requests: the refused one never reached it.",
        state.requests()
    );
    drop(handle);
    node_rt.shutdown_timeout(Duration::from_secs(2));
    if !as_expected {
        println!("a pod did not get the answer its rules give");
    }
    Ok(as_expected)
}

/// The pod's own link: a veth pair with both ends inside the pod, so
/// 169.254.169.254 has a route (the DNAT takes the packet before it
/// would leave) and nothing can leave the namespace.
fn pod_network(ns: &std::fs::File, addr: &str) -> anyhow::Result<()> {
    let addr: ipnet::IpNet = format!("{addr}/24").parse()?;
    links(ns, move |rt| {
        rt.set_up("lo")?;
        rt.add_veth("eth0", "eth0-peer", None)?;
        rt.add_address("eth0", addr)?;
        rt.set_up("eth0")?;
        rt.set_up("eth0-peer")?;
        rt.add_route_via_link("0.0.0.0/0".parse().expect("literal"), "eth0")
    })
}

/// A GET with `Metadata: true`, as an Azure SDK sends it; (status, body).
fn get(path: &str) -> anyhow::Result<(u16, String)> {
    let addr: SocketAddr = format!("{IMDS}:80").parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {IMDS}\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP answer: {text:?}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn short(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}
