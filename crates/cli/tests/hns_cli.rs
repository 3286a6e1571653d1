//! The hcnproxyctl workflow through the real `proxyctl` binary with
//! `--backend hns`, against the strict HCN fake (PROXYCTL_HNS_LIBRARY), one
//! process per command as a user would run them.

#[path = "../../hns-fake/harness.rs"]
mod harness;
#[path = "../../cri/tests/support/windows_cri.rs"]
mod windows_cri;

use std::process::{Command, Output};

use harness::{ENDPOINT, FakeHns, NAMESPACE, OTHER_ENDPOINT};
use windows_cri::{FakeContainer, WindowsCri};

fn proxyctl(fake: Option<&FakeHns>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_proxyctl"));
    cmd.args(args)
        .env_remove("PROXYCTL_HNS_LIBRARY")
        .env_remove("PROXYCTL_HNS_FAKE_STATE")
        .env_remove("CONTAINER_RUNTIME_ENDPOINT");
    if let Some(fake) = fake {
        cmd.env("PROXYCTL_HNS_LIBRARY", fake.library())
            .env("PROXYCTL_HNS_FAKE_STATE", fake.state_file());
    }
    cmd.output().expect("run proxyctl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "failed: {}", stderr(&out));
    stdout(&out)
}

const ADD: &[&str] = &[
    "add",
    ENDPOINT,
    "--backend",
    "hns",
    "--port",
    "8000",
    "--usersid",
    "system",
    "--remoteaddr",
    "10.0.0.4",
    "--remoteports",
    "443,8443",
    "--priority",
    "8",
    "--exclude-outbound-cidr",
    "127.0.0.1",
];

const EXPECTED_SETTINGS: &str = concat!(
    r#"{"OutboundProxyPort":"8000","FilterTuple":{"Protocols":"6","RemoteAddresses":"10.0.0.4","#,
    r#""RemotePorts":"443,8443","Priority":8},"UserSID":"S-1-5-18","InboundExceptions":{},"#,
    r#""OutboundExceptions":{"IpAddressExceptions":["127.0.0.1"]}}"#
);

#[test]
fn add_list_clear_workflow() {
    let fake = FakeHns::new(13, 2);
    assert_eq!(
        ok(proxyctl(Some(&fake), ADD)),
        "Successfully added the policy\n"
    );
    let held = fake.policies(ENDPOINT);
    assert_eq!(held.len(), 2);
    assert_eq!(
        held[1]["Settings"],
        serde_json::from_str::<serde_json::Value>(EXPECTED_SETTINGS).unwrap()
    );

    let listed: serde_json::Value = serde_json::from_str(&ok(proxyctl(
        Some(&fake),
        &["list", ENDPOINT, "--backend", "hns", "-o", "json"],
    )))
    .unwrap();
    assert_eq!(
        listed,
        serde_json::json!([{
            "name": "default", "priority": 8, "outboundPort": 8000,
            "protocols": ["tcp"], "family": "ipv4",
            "exclude": {"sids": ["S-1-5-18"]},
            "match": {"remoteAddresses": ["10.0.0.4/32"], "remotePorts": [443, 8443]},
            "outboundExceptions": {"cidrs": ["127.0.0.1/32"]}
        }])
    );

    let clear = ["clear", ENDPOINT, "--backend", "hns"];
    assert_eq!(ok(proxyctl(Some(&fake), &clear)), "Removed 1 policies\n");
    assert_eq!(
        ok(proxyctl(
            Some(&fake),
            &["list", ENDPOINT, "--backend", "hns"]
        )),
        ""
    );
    assert_eq!(ok(proxyctl(Some(&fake), &clear)), "Removed 0 policies\n");
    assert_eq!(fake.policies(ENDPOINT).len(), 1, "the foreign policy stays");
}

#[test]
fn dry_run_prints_the_exact_request_and_changes_nothing() {
    let expected = format!(
        "{{\"ResourceType\":\"Policy\",\"RequestType\":\"Add\",\"Settings\":{{\"Policies\":[{{\"Type\":\"L4WFPPROXY\",\"Settings\":{EXPECTED_SETTINGS}}}]}}}}\n"
    );
    let mut args = ADD.to_vec();
    args.push("--dry-run");
    // Without any library at all...
    assert_eq!(ok(proxyctl(None, &args)), expected);
    // ...and with one, which is left untouched.
    let fake = FakeHns::new(15, 4);
    let before = fake.state();
    assert_eq!(ok(proxyctl(Some(&fake), &args)), expected);
    assert_eq!(fake.state(), before);
}

#[test]
fn refusals_exit_2_name_the_flag_and_change_nothing() {
    let fake = FakeHns::new(15, 4);
    let before = fake.state();
    for (extra, flag) in [
        (&["--protocol", "udp"][..], "--protocol"),
        (&["--family", "both"][..], "--family"),
        (&["--family", "ipv6"][..], "--family"),
        (&["--exclude-uid", "1337"][..], "--exclude-uid"),
        (&["--exclude-user", "envoy"][..], "--exclude-user"),
        (
            &["--destination-proxy", "169.254.169.254:80=10.0.0.2:8080"][..],
            "--destination-proxy",
        ),
        (&["--name", "web"][..], "--name"),
        (
            &["--exclude-outbound-cidr", "fd00::/8"][..],
            "--exclude-outbound-cidr",
        ),
    ] {
        let mut args = vec![
            "add",
            ENDPOINT,
            "--backend",
            "hns",
            "--port",
            "8000",
            "--allow-proxy-loop",
        ];
        args.extend_from_slice(extra);
        let out = proxyctl(Some(&fake), &args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(flag), "{extra:?}: {}", stderr(&out));
        assert_eq!(fake.state(), before, "{extra:?} changed the fake");
    }
}

#[test]
fn old_hns_and_hns_errors_are_reported_clearly() {
    let old = FakeHns::new(13, 1);
    let out = proxyctl(Some(&old), ADD);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("HNS 13.1 is too old"),
        "{}",
        stderr(&out)
    );
    assert!(old.modify_requests().is_empty());

    let fake = FakeHns::new(15, 4);
    let missing = "11111111-2222-4333-8444-555555555555";
    let out = proxyctl(Some(&fake), &["list", missing, "--backend", "hns"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("HcnOpenEndpoint failed: HCN_E_ENDPOINT_NOT_FOUND (0x803B0002)"),
        "{}",
        stderr(&out)
    );
    fake.inject("HcnModifyEndpoint", 0x803B_000D, "WFP rejected the filter");
    let out = proxyctl(Some(&fake), ADD);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "HcnModifyEndpoint failed: HCN_E_INVALID_POLICY (0x803B000D): the provided policy \
             configuration is invalid or missing parameters; HNS says: WFP rejected the filter"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(fake.policies(ENDPOINT).len(), 1, "nothing was added");
    // A container id with no runtime to ask: the socket named, exit 1.
    let out = proxyctl(
        Some(&fake),
        &[
            "list",
            "ccaae3aba155c",
            "--backend",
            "hns",
            "--runtime-endpoint",
            "unix:///nonexistent/proxyctl-test.sock",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("cannot connect to the container runtime at /nonexistent/proxyctl-test.sock"),
        "{}",
        stderr(&out)
    );
    let out = proxyctl(None, &["list", ENDPOINT, "--backend", "hns"]);
    assert!(
        stderr(&out).contains("PROXYCTL_HNS_LIBRARY"),
        "{}",
        stderr(&out)
    );
}

/// The hcnproxyctl workflow by container id: `lookup` -> `add` -> `list` ->
/// `clear`, the container resolved through CRI (a strict Windows-shaped
/// runtime, see crates/cri/tests/support/windows_cri.rs) and its network
/// namespace's endpoints through the HCN fake. The namespace holds two
/// endpoints, so every command must act on both.
#[test]
fn container_workflow_through_cri_lookup() {
    let fake = FakeHns::with_state(serde_json::json!({
        "Version": {"Major": 15, "Minor": 4},
        "Endpoints": [
            {"ID": ENDPOINT, "HostComputeNamespace": NAMESPACE},
            {"ID": OTHER_ENDPOINT, "HostComputeNamespace": NAMESPACE},
            {"ID": "7c8d9e0f-1a2b-4c3d-8e4f-5a6b7c8d9e0f"}
        ],
        "Namespaces": [{"ID": NAMESPACE, "Endpoints": [ENDPOINT, OTHER_ENDPOINT]}]
    }));
    let container = "ccaae3aba155c7f2c1b5e4f0a9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0";
    let cri = WindowsCri::start(vec![
        FakeContainer::windows(container, "app", NAMESPACE),
        FakeContainer::windows(
            "0123456789ab",
            "other",
            "6a7b8c9d-0e1f-4a2b-9c3d-4e5f6a7b8c9d",
        ),
        FakeContainer::windows("0123456789cd", "third", NAMESPACE),
    ]);
    let endpoint = cri.endpoint();
    let with_cri = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--backend", "hns", "--runtime-endpoint", &endpoint]);
        proxyctl(Some(&fake), &all)
    };

    assert_eq!(
        ok(with_cri(&["lookup", container])),
        format!("{ENDPOINT},{OTHER_ENDPOINT}\n")
    );
    assert_eq!(
        cri.calls(),
        [
            "Version(v1)".to_owned(),
            "ListContainers".to_owned(),
            format!("ContainerStatus({container}, verbose=true)")
        ]
    );
    // A unique prefix works as well as the full id (crictl's habit).
    assert_eq!(
        ok(with_cri(&["lookup", "ccaae3aba155c"])),
        format!("{ENDPOINT},{OTHER_ENDPOINT}\n")
    );

    assert_eq!(
        ok(with_cri(&[
            "add",
            container,
            "--port",
            "8000",
            "--usersid",
            "system"
        ])),
        "Successfully added the policy\n"
    );
    let expected = serde_json::json!([{"Type": "L4WFPPROXY", "Settings": {
        "OutboundProxyPort": "8000", "FilterTuple": {"Protocols": "6"},
        "UserSID": "S-1-5-18", "InboundExceptions": {}, "OutboundExceptions": {}}}]);
    assert_eq!(serde_json::Value::from(fake.policies(ENDPOINT)), expected);
    assert_eq!(
        serde_json::Value::from(fake.policies(OTHER_ENDPOINT)),
        expected
    );

    let listed: serde_json::Value =
        serde_json::from_str(&ok(with_cri(&["list", container, "-o", "json"]))).unwrap();
    let one = serde_json::json!({"name": "default", "priority": 0, "outboundPort": 8000,
        "protocols": ["tcp"], "family": "ipv4", "exclude": {"sids": ["S-1-5-18"]}});
    assert_eq!(listed, serde_json::json!([one, one]), "one per endpoint");

    assert_eq!(ok(with_cri(&["clear", container])), "Removed 2 policies\n");
    assert!(fake.policies(ENDPOINT).is_empty());
    assert!(fake.policies(OTHER_ENDPOINT).is_empty());

    // Unknown and ambiguous ids are the caller's input at fault: exit 2,
    // HNS untouched.
    let sent = fake.modify_requests().len();
    for (id, why) in [("feedface", "no container"), ("", "empty container id")] {
        let out = with_cri(&["add", id, "--port", "8000", "--usersid", "system"]);
        assert_eq!(out.status.code(), Some(2), "{id}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{id}: {}", stderr(&out));
    }
    let out = with_cri(&["lookup", "0123"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("ambiguous"), "{}", stderr(&out));
    // A container whose namespace HNS does not know: HNS's error, exit 1.
    let out = with_cri(&["list", "0123456789ab"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("HcnOpenNamespace failed: ERROR_NOT_FOUND"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fake.modify_requests().len(), sent);
}

/// Several proxies on one endpoint, by repeated `add`s with different
/// priorities; an `add` of the same match and priority replaces that one.
#[test]
fn several_proxies_per_endpoint_replace_by_match_and_priority() {
    let fake = FakeHns::new(15, 4);
    let add = |port: &str, priority: &str, extra: &[&str]| {
        let mut args = vec![
            "add",
            ENDPOINT,
            "--backend",
            "hns",
            "--port",
            port,
            "--priority",
            priority,
            "--usersid",
            "S-1-5-32-556",
        ];
        args.extend_from_slice(extra);
        ok(proxyctl(Some(&fake), &args))
    };
    add("15001", "10", &["--remoteports", "443"]);
    add("15002", "20", &[]);
    add("15011", "10", &["--remoteports", "443"]);
    let listed: serde_json::Value = serde_json::from_str(&ok(proxyctl(
        Some(&fake),
        &["list", ENDPOINT, "--backend", "hns", "-o", "json"],
    )))
    .unwrap();
    let ports: Vec<(u64, u64)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["priority"].as_u64().unwrap(),
                p["outboundPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [(20, 15002), (10, 15011)], "{listed}");
    assert_eq!(
        ok(proxyctl(
            Some(&fake),
            &["clear", ENDPOINT, "--backend", "hns"]
        )),
        "Removed 2 policies\n"
    );
}
