//! End to end with the seed's roles on a real containerd: a
//! "MSIProxyContainer" pod whose network namespace runs imds-proxy (pods
//! from CRI) and is the only place that reaches 169.254.169.254 (a test-made
//! "cloud" namespace holding the fake, no route out), "ClientContainer" app
//! pods redirected by `proxyctl watch` (the library) through a label
//! selector, and an intruder pod.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{IMDS, on, quiet_config, runtime_in, start_mock};
use imds_proxy::proxy::{ProxyConfig, ProxyHandle};
use imds_proxy::{CriPodSource, PodSource};
use proxyctl_cri::RuntimeEndpoint;
use proxyctl_testkit::containerd::{
    Containerd, ContainerdOptions, ExecOutput, Pod, PodSpec, metadata_cloud,
};
use proxyctl_testkit::{require_root, require_tool};

const TEST: &str = "cri_e2e";
const INSTANCE: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";
const FALLBACK_PORT: u16 = 15992;

const RULES: &str = r#"
rules:
  - name: clients-read-instance
    pods: { labels: { role: ClientContainer } }
    paths: [ { prefix: /metadata/instance } ]
"#;

/// Every app pod is redirected (label imds=redirect); only ClientContainer
/// pods are allowed by the rules.
const WATCH: &str = r#"
rules:
  - selector: { imds: redirect }
    policies:
      - name: imds
        destinationProxy: { destination: "169.254.169.254:80", proxy: "127.0.0.1:15990" }
"#;

fn wget(cd: &Containerd, pod: &Pod, url: &str, metadata_header: bool) -> ExecOutput {
    // (No -T: busybox 1.35's wget crashes with it; ExecSync times out at 30 s.)
    let mut argv = vec!["wget", "-q", "-O", "-"];
    if metadata_header {
        argv.extend(["--header", "Metadata: true"]);
    }
    argv.push(url);
    cd.exec(&pod.container_id, &argv)
}

/// Retries `wget` until `done` accepts its output (watch and the proxy
/// act asynchronously); panics with the last output after `secs`.
fn wget_until(
    cd: &Containerd,
    pod: &Pod,
    url: &str,
    header: bool,
    secs: u64,
    what: &str,
    done: impl Fn(&ExecOutput) -> bool,
) -> ExecOutput {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let out = wget(cd, pod, url, header);
        if done(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{} never got {what}: {out:?}",
            pod.name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn seed_roles_on_containerd_through_cri_and_watch() {
    if !require_root(TEST) {
        return;
    }
    for tool in ["containerd", "ctr", "runc", "nsenter"] {
        if !require_tool(TEST, tool) {
            return;
        }
    }
    let started = Instant::now();
    let cd = Containerd::start(ContainerdOptions::default());
    let proxy_pod = cd.run_pod(
        &PodSpec::new("msi-proxy")
            .namespace("kube-system")
            .label("role", "MSIProxyContainer"),
    );

    // The cloud: 169.254.169.254 exists only here, linked to the proxy pod.
    let cloud = metadata_cloud(&proxy_pod, "imc");
    let cloud_rt = runtime_in(&cloud.path());
    let (mock, _) = start_mock(&cloud_rt, format!("{IMDS}:80").parse().unwrap());

    // imds-proxy in the proxy pod's namespace, pods from CRI.
    let endpoint = RuntimeEndpoint::parse(&cd.endpoint()).unwrap();
    let source = Arc::new(CriPodSource::new(endpoint.clone()));
    let proxy_rt = runtime_in(&proxy_pod.netns);
    let config = ProxyConfig {
        pod_listen: Some("127.0.0.1:15990".parse().unwrap()),
        source_ip_listen: Some(format!("{}:{FALLBACK_PORT}", proxy_pod.ip).parse().unwrap()),
        workers: 0,
        ..quiet_config(IMDS, RULES)
    };
    let src: Arc<dyn PodSource> = source.clone();
    let proxy = on(
        &proxy_rt,
        async move { ProxyHandle::start(config, src).await },
    )
    .unwrap();

    // proxyctl watch: DNAT for every pod labelled imds=redirect.
    let dir = tempfile::tempdir().unwrap();
    let watch_cfg = dir.path().join("watch.yaml");
    std::fs::write(&watch_cfg, WATCH).unwrap();
    let rules = Arc::new(proxyctl_watch::load_config(&watch_cfg).unwrap());
    let (stop_watch, stopped) = tokio::sync::oneshot::channel::<()>();
    let watch_task = proxy_rt.spawn(proxyctl_watch::run(
        endpoint,
        rules,
        // Polling keeps this test about imds-proxy, not about event delivery.
        proxyctl_cri::WatchOptions::poll(Duration::from_millis(200)),
        Arc::new(proxyctl_watch::Metrics::default()),
        async move {
            let _ = stopped.await;
        },
    ));

    let client = |name: &str| {
        PodSpec::new(name)
            .label("role", "ClientContainer")
            .label("imds", "redirect")
    };
    let clients: Vec<Pod> = (1..=3)
        .map(|i| cd.run_pod(&client(&format!("client-{i}"))))
        .collect();
    let stranger = cd.run_pod(&PodSpec::new("stranger").label("imds", "redirect"));
    // The node has no route to 169.254.169.254: no way around the proxy.
    for p in clients.iter().chain([&stranger]) {
        p.add_default_route();
    }

    // The CRI source sees every pod with its labels, netns and IP.
    let listed = source.pods().unwrap();
    for p in clients.iter().chain([&stranger, &proxy_pod]) {
        let found = listed
            .iter()
            .find(|l| l.name == p.name)
            .unwrap_or_else(|| panic!("{} not listed: {listed:?}", p.name));
        assert_eq!(found.namespace, p.namespace);
        assert_eq!(found.uid.as_deref(), Some(p.id.as_str()));
        assert_eq!(found.netns.as_deref(), Some(p.netns.as_path()));
        assert_eq!(found.ip, Some(p.ip.parse().unwrap()));
    }
    let report = proxy_rt.block_on(proxy.reconcile()).unwrap();
    assert!(report.failed.is_empty(), "{report:?}");

    // Each client reaches the fake through its own listener and gets its body.
    let before = mock.requests();
    for c in &clients {
        let out = wget_until(&cd, c, INSTANCE, true, 20, "the instance document", |o| {
            o.exit_code == 0
        });
        let body: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(&body, mock.instance(), "{} got another body", c.name);
    }
    assert!(mock.requests() >= before + 3);

    // Without the header: the service's 400, nothing forwarded.
    let before = mock.requests();
    let out = wget(&cd, &clients[0], INSTANCE, false);
    assert!(out.stderr.contains("400"), "{out:?}");
    // The stranger is redirected too but the rules do not allow it: 403.
    let out = wget_until(&cd, &stranger, INSTANCE, true, 20, "a 403", |o| {
        o.stderr.contains("403")
    });
    assert_ne!(out.exit_code, 0);
    assert_eq!(mock.requests(), before, "a refused request was forwarded");

    // The source-IP fallback serves a live client.
    let fallback = format!(
        "http://{}:{FALLBACK_PORT}/metadata/instance?api-version=2021-02-01",
        proxy_pod.ip
    );
    let out = wget(&cd, &clients[1], &fallback, true);
    assert_eq!(out.exit_code, 0, "fallback for a live client: {out:?}");

    // Spoofing: client-1 is deleted; an intruder without the label takes its
    // IP. Neither its own listener nor the fallback gives it client-1's access.
    let victim_ip = clients[0].ip.clone();
    cd.remove_pod(&clients[0].id);
    let intruder = cd.run_pod(&PodSpec::new("intruder").label("imds", "redirect"));
    let own = format!("{}/16", intruder.ip);
    intruder.run_in_netns(&["ip", "addr", "del", &own, "dev", "eth0"]);
    let taken = format!("{victim_ip}/16");
    intruder.run_in_netns(&["ip", "addr", "add", &taken, "dev", "eth0"]);
    intruder.add_default_route();
    let before = mock.requests();
    // Before the proxy knows the intruder: redirected, but refused (fail closed).
    wget_until(
        &cd,
        &intruder,
        INSTANCE,
        true,
        20,
        "a refused connection",
        |o| o.exit_code != 0 && o.stderr.contains("refused"),
    );
    // Fallback with client-1's IP, before and after the proxy re-lists pods.
    let out = wget(&cd, &intruder, &fallback, true);
    assert!(out.stderr.contains("403"), "stale owner served: {out:?}");
    let report = proxy_rt.block_on(proxy.reconcile()).unwrap();
    assert!(
        report.removed.contains(&"default/client-1".to_owned()),
        "{report:?}"
    );
    let out = wget(&cd, &intruder, &fallback, true);
    assert!(out.stderr.contains("403"), "reused IP served: {out:?}");
    let out = wget(&cd, &intruder, INSTANCE, true);
    assert!(
        out.stderr.contains("403"),
        "intruder's own listener: {out:?}"
    );
    assert_eq!(
        mock.requests(),
        before,
        "the intruder's requests were forwarded"
    );
    // The other clients still work.
    let out = wget(&cd, &clients[2], INSTANCE, true);
    assert_eq!(out.exit_code, 0, "{out:?}");

    // Fail closed: with imds-proxy gone, redirected pods get refused.
    drop(proxy);
    wget_until(
        &cd,
        &clients[1],
        INSTANCE,
        true,
        10,
        "a refused connection",
        |o| o.exit_code != 0 && o.stderr.contains("refused"),
    );

    let _ = stop_watch.send(());
    let _ = proxy_rt.block_on(watch_task);
    drop(proxy_rt);
    drop(cloud_rt);
    eprintln!("{TEST}: {:?}", started.elapsed());
}
