//! Lookups against a real containerd started by the test (testkit harness).

use std::process::Command;

use proxyctl_cri::{CriClient, CriError, PodState, Query, RuntimeEndpoint, lookup, resolve_target};
use proxyctl_testkit::containerd::{Containerd, ContainerdOptions, Pod, PodSpec};
use proxyctl_testkit::{require_root, require_tool};

fn prerequisites(test: &str) -> bool {
    require_root(test)
        && ["containerd", "ctr", "runc", "nsenter"]
            .iter()
            .all(|t| require_tool(test, t))
}

/// The IPv4 addresses inside a network namespace, read with the kernel's
/// own tools: proves a netns path really is the pod's.
fn addresses_in(netns: &std::path::Path) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "-4", "addr", "show"])
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The shortest prefix shared by two different ids among `ids`, if any.
fn shared_prefix(ids: &[&str]) -> Option<String> {
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            if a.as_bytes()[0] == b.as_bytes()[0] {
                return Some(a[..1].to_owned());
            }
        }
    }
    None
}

#[test]
fn lookup_resolves_ids_prefixes_and_pod_names_and_refuses_the_rest() {
    let test = "lookup_resolves_ids_prefixes_and_pod_names_and_refuses_the_rest";
    if !prerequisites(test) {
        return;
    }
    let cd = Containerd::start(ContainerdOptions::default());
    let web = cd.run_pod(
        &PodSpec::new("web")
            .namespace("shop")
            .label("app", "web")
            .annotation("note", "hello"),
    );
    // Pods until two objects (containers or sandboxes) share a first id
    // character, so an ambiguous prefix exists (at most 17 ids by pigeonhole).
    let mut pods: Vec<Pod> = vec![web.clone()];
    let ambiguous = loop {
        let ids: Vec<&str> = pods
            .iter()
            .flat_map(|p| [p.id.as_str(), p.container_id.as_str()])
            .collect();
        if let Some(prefix) = shared_prefix(&ids) {
            break prefix;
        }
        let n = pods.len();
        pods.push(cd.run_pod(&PodSpec::new(&format!("other-{n}"))));
    };

    let endpoint = RuntimeEndpoint::parse(&cd.endpoint()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = CriClient::connect(&endpoint).await.unwrap();

        // Full container id: the whole record.
        let rec = lookup(&mut client, &Query::Id(web.container_id.clone()))
            .await
            .unwrap();
        let container = rec.container.as_ref().expect("a container was named");
        assert_eq!(container.id, web.container_id);
        assert_eq!(container.name, "app");
        assert_eq!(container.state, "running");
        assert_eq!(rec.pod.id, web.id);
        assert_eq!(rec.pod.name, "web");
        assert_eq!(rec.pod.namespace, "shop");
        assert_eq!(rec.pod.state, PodState::Ready);
        assert_eq!(rec.pod.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            rec.pod.annotations.get("note").map(String::as_str),
            Some("hello")
        );
        assert_eq!(
            rec.pod.ips,
            vec![web.ip.parse::<std::net::IpAddr>().unwrap()]
        );
        let netns = rec.netns().unwrap();
        assert_eq!(netns, web.netns);
        assert!(
            addresses_in(&netns).contains(&format!("inet {}/", web.ip)),
            "netns {} does not hold the pod's address {}",
            netns.display(),
            web.ip
        );

        // A unique prefix of the container id, and of the sandbox id.
        let by_prefix = lookup(&mut client, &Query::Id(web.container_id[..12].into()))
            .await
            .unwrap();
        assert_eq!(by_prefix.pod.id, web.id);
        let by_sandbox = lookup(&mut client, &Query::Id(web.id[..12].into()))
            .await
            .unwrap();
        assert!(by_sandbox.container.is_none());
        assert_eq!(by_sandbox.netns().unwrap(), web.netns);

        // pod:NAMESPACE/NAME.
        let by_name = lookup(&mut client, &Query::parse("pod:shop/web").unwrap())
            .await
            .unwrap();
        assert_eq!(by_name.pod.id, web.id);

        // A prefix shared by two objects is refused, naming the candidates.
        match lookup(&mut client, &Query::Id(ambiguous.clone())).await {
            Err(CriError::Ambiguous { candidates, .. }) => {
                assert!(candidates.len() >= 2, "{candidates:?}");
                assert!(
                    candidates
                        .iter()
                        .all(|c| c.contains(&format!(" {ambiguous}")))
                );
            }
            other => panic!("prefix {ambiguous} shared by two ids gave {other:?}"),
        }

        // Unknown ids and names: NotFound with the query in the message.
        let unknown = (0..16u8)
            .map(|c| format!("{c:x}").repeat(20))
            .find(|cand| {
                pods.iter()
                    .all(|p| !p.id.starts_with(cand) && !p.container_id.starts_with(cand))
            })
            .unwrap();
        let err = lookup(&mut client, &Query::Id(unknown.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, CriError::NotFound(_)), "{err:?}");
        assert!(err.to_string().contains(&unknown), "{err}");
        let err = lookup(&mut client, &Query::parse("pod:shop/nope").unwrap())
            .await
            .unwrap_err();
        assert!(matches!(err, CriError::NotFound(_)), "{err:?}");
    });

    // The blocking TARGET fallback the CLI uses.
    let endpoint_flag = cd.endpoint();
    assert_eq!(
        resolve_target(&web.container_id[..10], Some(&endpoint_flag)).unwrap(),
        web.netns
    );
    assert_eq!(
        resolve_target("pod:shop/web", Some(&endpoint_flag)).unwrap(),
        web.netns
    );

    // A removed pod is gone from lookups.
    cd.remove_pod(&web.id);
    let err = resolve_target(&web.container_id, Some(&endpoint_flag)).unwrap_err();
    assert!(matches!(err, CriError::NotFound(_)), "{err:?}");

    // A runtime that is down is a connection error naming the socket.
    cd.stop_containerd();
    let err = resolve_target(&pods[0].container_id, Some(&endpoint_flag)).unwrap_err();
    assert!(matches!(err, CriError::Connect { .. }), "{err:?}");
    assert!(err.is_unavailable());
    assert!(err.to_string().contains("containerd.sock"), "{err}");
    cd.start_containerd();
}
