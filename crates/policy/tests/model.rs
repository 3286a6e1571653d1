//! The model's contract: what it accepts, what it refuses (naming the field),
//! and that the file form round-trips.

use proxyctl_policy::*;

fn base() -> Policy {
    let mut p = Policy {
        outbound_port: Some(15001),
        ..Policy::default()
    };
    p.exclude.uids = vec![1337];
    p
}

fn field_of(result: Result<Policy, PolicyError>) -> &'static str {
    result
        .expect_err("policy should be refused")
        .field()
        .expect("error names a field")
}

#[test]
fn port_parsing_names_the_field() {
    assert_eq!(parse_port("outbound-port", "8000").unwrap(), 8000);
    for bad in ["0", "70000", "-1", "eighty", ""] {
        let err = parse_port("outbound-port", bad).unwrap_err();
        assert_eq!(err.field(), Some("outbound-port"), "{bad}");
        assert!(err.to_string().contains("--outbound-port"), "{err}");
    }
}

#[test]
fn port_ranges_parse_and_refuse_reversed_ranges() {
    let r = parse_port_ranges("remote-ports", "80, 443,1000-2000").unwrap();
    assert_eq!(
        r,
        vec![
            PortRange::single(80),
            PortRange::single(443),
            PortRange {
                start: 1000,
                end: 2000
            }
        ]
    );
    assert!(parse_port_ranges("remote-ports", "2000-1000").is_err());
    assert!(parse_port_ranges("remote-ports", "0-10").is_err());
    assert!(parse_port_ranges("remote-ports", "1-65536").is_err());
}

#[test]
fn cidrs_refuse_host_bits_and_garbage() {
    let nets = parse_cidrs("exclude-outbound-cidr", "10.0.0.0/8,fd00::/8,192.0.2.1").unwrap();
    assert_eq!(nets.len(), 3);
    assert_eq!(nets[2].to_string(), "192.0.2.1/32");
    let err = parse_cidrs("exclude-outbound-cidr", "10.0.0.1/8").unwrap_err();
    assert!(err.to_string().contains("10.0.0.0/8"), "{err}");
    assert!(parse_cidrs("exclude-outbound-cidr", "10.0.0.0/33").is_err());
    assert!(parse_cidrs("exclude-outbound-cidr", "ten").is_err());
}

#[test]
fn protocols_and_families() {
    assert_eq!(
        parse_protocols("protocol", "tcp,udp").unwrap(),
        vec![Protocol::Tcp, Protocol::Udp]
    );
    assert_eq!(
        parse_protocols("protocol", "6").unwrap(),
        vec![Protocol::Tcp]
    );
    assert!(parse_protocols("protocol", "sctp").is_err());
    assert!(parse_protocols("protocol", "").is_err());
    assert_eq!(parse_family("family", "ipv6").unwrap(), Family::Ipv6);
    assert!(parse_family("family", "ipx").is_err());
}

#[test]
fn a_policy_needs_somewhere_to_send_traffic() {
    assert_eq!(field_of(Policy::default().checked()), "outbound-port");
    assert!(base().checked().is_ok());
}

#[test]
fn zero_ports_are_refused() {
    let p = Policy {
        outbound_port: Some(0),
        ..Policy::default()
    };
    assert_eq!(field_of(p.checked()), "outbound-port");
    let p = Policy {
        inbound_port: Some(0),
        ..base()
    };
    assert_eq!(field_of(p.checked()), "inbound-port");
}

#[test]
fn inbound_exceptions_need_an_inbound_port() {
    let mut p = base();
    p.inbound_exceptions.ports = vec![PortRange::single(15090)];
    assert_eq!(field_of(p.clone().checked()), "exclude-inbound-port");
    p.inbound_exceptions.ports.clear();
    p.inbound_exceptions.cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    assert_eq!(field_of(p.clone().checked()), "exclude-inbound-cidr");
    p.inbound_port = Some(15006);
    assert!(p.checked().is_ok());
}

#[test]
fn overlapping_exceptions_are_refused() {
    let mut p = base();
    p.outbound_exceptions.cidrs = vec![
        "10.0.0.0/8".parse().unwrap(),
        "10.1.0.0/16".parse().unwrap(),
    ];
    assert_eq!(field_of(p.clone().checked()), "exclude-outbound-cidr");
    p.outbound_exceptions.cidrs = vec![
        "10.0.0.0/16".parse().unwrap(),
        "10.1.0.0/16".parse().unwrap(),
    ];
    assert!(p.clone().checked().is_ok());
    p.outbound_exceptions.ports = vec![
        PortRange {
            start: 100,
            end: 200,
        },
        PortRange {
            start: 150,
            end: 160,
        },
        PortRange::single(300),
    ];
    assert_eq!(field_of(p.clone().checked()), "exclude-outbound-port");
    // Overlap hidden behind a narrower neighbour: 1-1000 covers 500 though 2-3 sorts between.
    p.outbound_exceptions.ports = vec![
        PortRange {
            start: 1,
            end: 1000,
        },
        PortRange { start: 2, end: 3 },
    ];
    assert_eq!(field_of(p.checked()), "exclude-outbound-port");
}

#[test]
fn addresses_must_fit_the_family() {
    let mut p = base();
    p.family = Family::Ipv4;
    p.outbound_exceptions.cidrs = vec!["fd00::/8".parse().unwrap()];
    assert_eq!(field_of(p.clone().checked()), "exclude-outbound-cidr");
    p.outbound_exceptions.cidrs.clear();
    p.matching.remote_addresses = vec!["fd00::/8".parse().unwrap()];
    assert_eq!(field_of(p.checked()), "remote-address");
}

#[test]
fn names_sids_and_users_are_checked() {
    let p = Policy {
        name: "has space".into(),
        ..base()
    };
    assert_eq!(field_of(p.checked()), "name");
    let p = Policy {
        name: "x".repeat(MAX_NAME_LEN + 1),
        ..base()
    };
    assert_eq!(field_of(p.checked()), "name");
    let mut p = base();
    p.exclude.sids = vec!["S-1-5-32-556".into()];
    assert!(p.clone().checked().is_ok());
    p.exclude.sids = vec!["S-2-x".into()];
    assert_eq!(field_of(p.checked()), "usersid");
    let mut p = base();
    p.exclude.users = vec!["-rf".into()];
    assert_eq!(field_of(p.checked()), "exclude-user");
}

#[test]
fn destination_proxy_is_checked() {
    let dp = |d: &str, p: &str| Policy {
        destination_proxy: Some(DestinationProxy {
            destination: d.parse().unwrap(),
            proxy: p.parse().unwrap(),
        }),
        ..Policy::default()
    };
    assert!(dp("169.254.169.254:80", "10.0.0.1:8080").checked().is_ok());
    assert_eq!(
        field_of(dp("169.254.169.254:80", "[fd00::1]:8080").checked()),
        "destination-proxy"
    );
    assert_eq!(
        field_of(dp("169.254.169.254:80", "169.254.169.254:80").checked()),
        "destination-proxy"
    );
}

#[test]
fn files_round_trip_every_field() {
    let mut p = Policy {
        name: "sidecar".into(),
        priority: 7,
        outbound_port: Some(15001),
        inbound_port: Some(15006),
        protocols: vec![Protocol::Udp, Protocol::Tcp],
        family: Family::Both,
        ..Policy::default()
    };
    p.exclude.uids = vec![1337, 0];
    p.exclude.gids = vec![1337];
    p.exclude.users = vec!["envoy".into()];
    p.matching.local_addresses = vec!["10.0.0.0/24".parse().unwrap()];
    p.matching.remote_addresses = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
    p.matching.local_ports = vec![PortRange {
        start: 1,
        end: 1024,
    }];
    p.matching.remote_ports = vec![PortRange::single(80), PortRange::single(443)];
    p.outbound_exceptions.ports = vec![PortRange::single(22)];
    p.outbound_exceptions.cidrs =
        vec!["192.0.2.0/24".parse().unwrap(), "fd00::/8".parse().unwrap()];
    p.inbound_exceptions.ports = vec![PortRange {
        start: 15090,
        end: 15099,
    }];
    p.inbound_exceptions.cidrs = vec!["198.51.100.0/24".parse().unwrap()];
    let p = p.checked().unwrap();

    let json = serde_json::to_string(&p).unwrap();
    let back = policies_from_str("json", &json, FileFormat::Json).unwrap();
    assert_eq!(back, vec![p.clone()]);
    let yaml = serde_yaml::to_string(&vec![p.clone()]).unwrap();
    assert_eq!(
        policies_from_str("yaml", &yaml, FileFormat::Yaml).unwrap(),
        vec![p.clone()]
    );
    let wrapped = format!("{{\"policies\": [{json}]}}");
    assert_eq!(
        policies_from_str("w", &wrapped, FileFormat::Json).unwrap(),
        vec![p]
    );
}

#[test]
fn files_refuse_typos_duplicates_and_bad_values() {
    let err =
        policies_from_str("f", "outboundPort: 8000\nexclde: {}\n", FileFormat::Yaml).unwrap_err();
    assert!(err.to_string().contains("exclde"), "{err}");
    let err = policies_from_str("f", "outboundPort: 70000\n", FileFormat::Yaml).unwrap_err();
    assert!(
        err.to_string().contains("70000") || err.to_string().contains("outboundPort"),
        "{err}"
    );
    let err = policies_from_str(
        "f",
        "- {outboundPort: 1, exclude: {uids: [1]}}\n- {outboundPort: 2, exclude: {uids: [1]}}\n",
        FileFormat::Yaml,
    )
    .unwrap_err();
    assert_eq!(err.field(), Some("name"));
    let text = "- {name: a, outboundPort: 1, exclude: {gids: [1]}}\n- {name: b, inboundPort: 2, protocols: [tcp, udp], outboundExceptions: {ports: ['1000-2000']}}\n";
    let err = policies_from_str("f", text, FileFormat::Yaml).unwrap_err();
    assert_eq!(err.field(), Some("exclude-outbound-port"));
    assert!(policies_from_str("f", "[]", FileFormat::Json).is_err());
}

#[test]
fn an_outbound_redirect_without_an_identity_exclusion_is_a_loop_refused() {
    let mut p = base();
    p.exclude.uids.clear();
    let err = p.clone().checked().unwrap_err();
    assert_eq!(err.field(), Some("outbound-port"));
    for flag in [
        "--exclude-uid",
        "--exclude-gid",
        "--exclude-user",
        "--allow-proxy-loop",
    ] {
        assert!(err.to_string().contains(flag), "{err}");
    }
    // DNS capture redirects outbound traffic too.
    let dns = Policy {
        dns_port: Some(15053),
        ..Policy::default()
    };
    assert_eq!(field_of(dns.clone().checked()), "dns-port");
    // Any identity kind is enough, as is saying so explicitly.
    for exclude in [
        Exclusions {
            gids: vec![7],
            ..Exclusions::default()
        },
        Exclusions {
            users: vec!["squid".into()],
            ..Exclusions::default()
        },
        Exclusions {
            sids: vec!["S-1-5-18".into()],
            ..Exclusions::default()
        },
    ] {
        let q = Policy {
            exclude,
            ..p.clone()
        };
        assert!(q.checked().is_ok());
    }
    let allowed = Policy {
        allow_proxy_loop: true,
        ..p.clone()
    }
    .checked()
    .unwrap();
    assert!(allowed.allow_proxy_loop);
    // Inbound-only and destination-proxy-only policies cannot loop: no
    // exclusion needed, and the permission is dropped as meaningless.
    let inbound = Policy {
        inbound_port: Some(15006),
        allow_proxy_loop: true,
        ..Policy::default()
    }
    .checked()
    .unwrap();
    assert!(!inbound.allow_proxy_loop);
    // Files obey the same rule, and take the permission by its key.
    let err = policies_from_str("p.yaml", "outboundPort: 15001\n", FileFormat::Yaml).unwrap_err();
    assert!(err.to_string().contains("--allow-proxy-loop"), "{err}");
    let ok = policies_from_str(
        "p.yaml",
        "outboundPort: 15001\nallowProxyLoop: true\n",
        FileFormat::Yaml,
    )
    .unwrap();
    assert!(ok[0].allow_proxy_loop);
    let _ = dns;
}
