//! Golden JSON: the documents proxyctl sends are byte-for-byte what
//! hcsshim's `hcn` package marshals (field names, order, string-typed ports,
//! Priority inside FilterTuple, FilterTuple and exception objects always
//! present), and every field reads back into the same policy.

use proxyctl_hns::schema::L4WfpProxyPolicySetting;
use proxyctl_hns::{dry_run, from_setting, to_setting};
use proxyctl_policy::{Family, Policy, PolicyError, PortRange, Protocol};

fn ipv4(mut p: Policy) -> Policy {
    p.family = Family::Ipv4;
    p
}

/// hcsshim hcn/hcnutils_test.go `HcnCreateWfpProxyPolicyRequest`.
fn hcsshim_fixture() -> Policy {
    let mut p = ipv4(Policy::default());
    p.inbound_port = Some(80);
    p.outbound_port = Some(81);
    // hcsshim's fixture carries no UserSID.
    p.allow_proxy_loop = true;
    p.protocols = vec![Protocol::Tcp];
    p.matching.remote_addresses = vec!["10.0.0.4/32".parse().unwrap()];
    p.priority = 8;
    p.outbound_exceptions.cidrs = vec!["10.0.1.12/32".parse().unwrap()];
    p.outbound_exceptions.ports = vec![PortRange::single(81)];
    p.inbound_exceptions.cidrs = vec!["12.0.1.12/32".parse().unwrap()];
    p.inbound_exceptions.ports = vec![PortRange::single(8181)];
    p
}

/// What Go's json.Marshal prints for that fixture's L4WfpProxyPolicySetting.
const HCSSHIM_FIXTURE_SETTINGS: &str = concat!(
    r#"{"InboundProxyPort":"80","OutboundProxyPort":"81","#,
    r#""FilterTuple":{"Protocols":"6","RemoteAddresses":"10.0.0.4","Priority":8},"#,
    r#""InboundExceptions":{"IpAddressExceptions":["12.0.1.12"],"PortExceptions":["8181"]},"#,
    r#""OutboundExceptions":{"IpAddressExceptions":["10.0.1.12"],"PortExceptions":["81"]}}"#
);

#[test]
fn hcsshim_fixture_settings_are_byte_exact() {
    let setting = to_setting(&hcsshim_fixture()).unwrap();
    assert_eq!(
        serde_json::to_string(&setting).unwrap(),
        HCSSHIM_FIXTURE_SETTINGS
    );
}

#[test]
fn hcsshim_fixture_add_request_is_byte_exact() {
    let expected = format!(
        r#"{{"ResourceType":"Policy","RequestType":"Add","Settings":{{"Policies":[{{"Type":"L4WFPPROXY","Settings":{HCSSHIM_FIXTURE_SETTINGS}}}]}}}}"#
    );
    assert_eq!(dry_run(&[hcsshim_fixture()]).unwrap(), expected);
}

#[test]
fn hcnproxyctl_readme_example_has_empty_objects_and_no_inbound_port() {
    // `hcnproxyctl add EP --port 8000 --usersid S-1-5-21-...`: AddPolicy forces protocol "6".
    let mut p = ipv4(Policy::default());
    p.outbound_port = Some(8000);
    p.exclude.sids = vec!["S-1-5-21-1688553208-1784504425-564974220-1000".into()];
    assert_eq!(
        serde_json::to_string(&to_setting(&p).unwrap()).unwrap(),
        concat!(
            r#"{"OutboundProxyPort":"8000","FilterTuple":{"Protocols":"6"},"#,
            r#""UserSID":"S-1-5-21-1688553208-1784504425-564974220-1000","#,
            r#""InboundExceptions":{},"OutboundExceptions":{}}"#
        )
    );
}

#[test]
fn every_field_is_written_in_hns_form() {
    let mut p = ipv4(Policy::default());
    p.outbound_port = Some(15001);
    p.inbound_port = Some(15006);
    p.priority = 65535;
    p.exclude.sids = vec!["S-1-5-32-556".into()];
    p.matching.local_addresses = vec![
        "10.1.0.0/16".parse().unwrap(),
        "10.2.0.9/32".parse().unwrap(),
    ];
    p.matching.remote_addresses = vec!["192.0.2.0/24".parse().unwrap()];
    p.matching.local_ports = vec![PortRange::single(80), "1000-2000".parse().unwrap()];
    p.matching.remote_ports = vec!["443".parse().unwrap()];
    p.outbound_exceptions.cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    p.outbound_exceptions.ports = vec!["15000-15002".parse().unwrap()];
    p.inbound_exceptions.ports = vec![PortRange::single(15021), PortRange::single(15090)];
    assert_eq!(
        serde_json::to_string(&to_setting(&p).unwrap()).unwrap(),
        concat!(
            r#"{"InboundProxyPort":"15006","OutboundProxyPort":"15001","#,
            r#""FilterTuple":{"Protocols":"6","LocalAddresses":"10.1.0.0/16,10.2.0.9","#,
            r#""RemoteAddresses":"192.0.2.0/24","LocalPorts":"80,1000-2000","RemotePorts":"443","#,
            r#""Priority":65535},"UserSID":"S-1-5-32-556","#,
            r#""InboundExceptions":{"PortExceptions":["15021","15090"]},"#,
            r#""OutboundExceptions":{"IpAddressExceptions":["127.0.0.0/8"],"PortExceptions":["15000-15002"]}}"#
        )
    );
    let back = from_setting(&to_setting(&p).unwrap()).unwrap();
    let mut expected = p.clone();
    expected.normalize();
    assert_eq!(back, expected);
}

#[test]
fn fixture_round_trips_through_json() {
    let text = serde_json::to_string(&to_setting(&hcsshim_fixture()).unwrap()).unwrap();
    let parsed: L4WfpProxyPolicySetting = serde_json::from_str(&text).unwrap();
    assert_eq!(
        from_setting(&parsed).unwrap(),
        hcsshim_fixture().checked().unwrap()
    );
}

#[test]
fn reading_refuses_unknown_fields_and_bad_values() {
    // A field hcsshim does not define must not be silently ignored on read.
    let err = serde_json::from_str::<L4WfpProxyPolicySetting>(
        r#"{"OutboundProxyPort":"8000","ProxyPorts":"1"}"#,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("unknown field `ProxyPorts`"),
        "{err}"
    );
    // The pre-2020-12 single `Port` (hcnproxyctl's first schema) reads as outbound.
    let old: L4WfpProxyPolicySetting =
        serde_json::from_str(r#"{"Port":"8000","FilterTuple":{"Protocols":"6"}}"#).unwrap();
    assert_eq!(from_setting(&old).unwrap().outbound_port, Some(8000));
    assert!(
        serde_json::to_string(&old)
            .unwrap()
            .starts_with(r#"{"OutboundProxyPort":"8000""#)
    );
    // Ports are strings in HNS; a number is a type error.
    assert!(
        serde_json::from_str::<L4WfpProxyPolicySetting>(r#"{"OutboundProxyPort":8000}"#).is_err()
    );
    // hcnproxyctl's README example excepts port "90001", which is no port.
    let readme: L4WfpProxyPolicySetting = serde_json::from_str(
        r#"{"InboundProxyPort":"9091","OutboundProxyPort":"9191","FilterTuple":{"Protocols":"6"},
            "InboundExceptions":{"PortExceptions":["90001","90002"],"IpAddressExceptions":["127.0.0.1"]},
            "OutboundExceptions":{"PortExceptions":["90001","90002"],"IpAddressExceptions":["127.0.0.1"]},
            "UserSID":"S-1-5-32-556"}"#,
    )
    .unwrap();
    let err = from_setting(&readme).unwrap_err();
    assert_eq!(err.field, "InboundExceptions.PortExceptions");
    assert_eq!(err.value, "90001");
}

#[test]
fn blank_protocols_read_as_tcp_like_hcnproxyctl() {
    let s: L4WfpProxyPolicySetting =
        serde_json::from_str(r#"{"OutboundProxyPort":"8000","FilterTuple":{}}"#).unwrap();
    assert_eq!(from_setting(&s).unwrap().protocols, vec![Protocol::Tcp]);
}

fn refused_field(p: Policy) -> &'static str {
    let err: PolicyError = dry_run(&[p]).unwrap_err();
    err.field().expect("names a field")
}

#[test]
fn what_hns_cannot_express_is_refused_naming_the_flag() {
    let base = || {
        let mut p = ipv4(Policy::default());
        p.outbound_port = Some(8000);
        p.exclude.sids = vec!["S-1-5-18".into()];
        p
    };
    let mut p = base();
    p.protocols = vec![Protocol::Tcp, Protocol::Udp];
    assert_eq!(refused_field(p.clone()), "protocol");
    let message = dry_run(&[p]).unwrap_err().to_string();
    assert!(
        message.contains("not supported by HNS") && message.contains("TCP only"),
        "{message}"
    );
    let mut p = base();
    p.protocols = vec![Protocol::Udp];
    assert_eq!(refused_field(p), "protocol");
    let mut p = base();
    p.family = Family::Both;
    assert_eq!(refused_field(p), "family");
    let mut p = base();
    p.family = Family::Ipv6;
    assert_eq!(refused_field(p), "family");
    let mut p = base();
    p.exclude.uids = vec![1337];
    assert_eq!(refused_field(p), "exclude-uid");
    let mut p = base();
    p.exclude.gids = vec![1337];
    assert_eq!(refused_field(p), "exclude-gid");
    let mut p = base();
    p.exclude.users = vec!["envoy".into()];
    assert_eq!(refused_field(p), "exclude-user");
    let mut p = base();
    p.exclude.sids = vec!["S-1-5-18".into(), "S-1-5-32-556".into()];
    assert_eq!(refused_field(p), "usersid");
    let mut p = base();
    p.destination_proxy = Some(proxyctl_policy::DestinationProxy {
        destination: "169.254.169.254:80".parse().unwrap(),
        proxy: "10.0.0.2:8080".parse().unwrap(),
    });
    assert_eq!(refused_field(p), "destination-proxy");
    let mut p = base();
    p.dns_port = Some(15053);
    assert_eq!(refused_field(p), "dns-port");
    let mut p = base();
    p.name = "web".into();
    assert_eq!(refused_field(p), "name");
    // Invalid before HNS is even considered: the model's own validation.
    let mut p = base();
    p.outbound_port = None;
    assert_eq!(refused_field(p), "outbound-port");
    // Two policies of one set with the same match and priority: HNS could
    // not tell them apart (their identity there), so the set is refused...
    let err = dry_run(&[base(), base()]).unwrap_err();
    assert_eq!(err.field(), Some("priority"));
    assert!(
        err.to_string()
            .contains("policies 1 and 2 have the same match and priority 0"),
        "{err}"
    );
    // ...while several proxies with different priorities are one request.
    let mut second = base();
    second.outbound_port = Some(8001);
    second.priority = 20;
    assert_eq!(
        dry_run(&[base(), second]).unwrap(),
        concat!(
            r#"{"ResourceType":"Policy","RequestType":"Add","Settings":{"Policies":["#,
            r#"{"Type":"L4WFPPROXY","Settings":{"OutboundProxyPort":"8000","FilterTuple":{"Protocols":"6"},"#,
            r#""UserSID":"S-1-5-18","InboundExceptions":{},"OutboundExceptions":{}}},"#,
            r#"{"Type":"L4WFPPROXY","Settings":{"OutboundProxyPort":"8001","FilterTuple":{"Protocols":"6","Priority":20},"#,
            r#""UserSID":"S-1-5-18","InboundExceptions":{},"OutboundExceptions":{}}}]}}"#
        )
    );
}

#[test]
fn guids_parse_in_windows_layout() {
    use proxyctl_hns::Guid;
    let g: Guid = "{93F86A7F-E361-4362-B8A4-81BBB6A622DD}".parse().unwrap();
    assert_eq!((g.data1, g.data2, g.data3), (0x93f8_6a7f, 0xe361, 0x4362));
    assert_eq!(g.data4, [0xb8, 0xa4, 0x81, 0xbb, 0xb6, 0xa6, 0x22, 0xdd]);
    assert_eq!(g.to_string(), "93f86a7f-e361-4362-b8a4-81bbb6a622dd");
    assert_eq!(std::mem::size_of::<Guid>(), 16);
    for bad in [
        "",
        "93f86a7f-e361-4362-b8a4-81bbb6a622d",
        "93f86a7f-e361-4362-b8a4-81bbb6a622dg",
        "93f86a7fe3614362b8a481bbb6a622dd",
        "ccaae3aba155c",
        "+3f86a7f-e361-4362-b8a4-81bbb6a622dd",
    ] {
        assert!(bad.parse::<Guid>().is_err(), "{bad}");
    }
}
