//! The table as a whole: atomicity (a batch the kernel refuses changes
//! nothing), clear, other tables untouched, list round-trips, randomized
//! add/replace/clear cycles checked through list AND the `nft` binary.

mod common;

use common::nft_text;
use proxyctl_nft::{self as nft, NftError, Target};
use proxyctl_policy::{
    DestinationProxy, Exceptions, Exclusions, Family, Match, Policy, PortRange, Protocol,
};
use proxyctl_testkit::{NetNs, require_root};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn ns(prefix: &str) -> (NetNs, Target) {
    let ns = NetNs::new(prefix);
    let t = Target::Path(ns.path());
    (ns, t)
}

fn full_policy() -> Policy {
    Policy {
        name: "full".into(),
        priority: 7,
        outbound_port: Some(15001),
        inbound_port: Some(15006),
        protocols: vec![Protocol::Tcp, Protocol::Udp],
        family: Family::Both,
        exclude: Exclusions {
            uids: vec![1337, 0],
            gids: vec![1338],
            users: vec!["nobody".into()],
            sids: vec![],
        },
        allow_proxy_loop: false,
        dns_port: Some(15053),
        matching: Match {
            local_addresses: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            remote_addresses: vec!["0.0.0.0/1".parse().unwrap()],
            local_ports: vec!["1-1000".parse().unwrap(), "8080".parse().unwrap()],
            remote_ports: vec![
                "80".parse().unwrap(),
                "81".parse().unwrap(),
                "65535".parse().unwrap(),
            ],
        },
        outbound_exceptions: Exceptions {
            ports: vec!["22".parse().unwrap(), "6000-7000".parse().unwrap()],
            cidrs: vec![
                "192.168.0.0/16".parse().unwrap(),
                "192.169.0.0/16".parse().unwrap(),
                "255.255.255.255/32".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
                "ffff::/16".parse().unwrap(),
            ],
        },
        inbound_exceptions: Exceptions {
            ports: vec!["15020".parse().unwrap(), "15090".parse().unwrap()],
            cidrs: vec!["172.16.0.0/12".parse().unwrap()],
        },
        destination_proxy: Some(DestinationProxy {
            destination: "169.254.169.254:80".parse().unwrap(),
            proxy: "127.0.0.1:8080".parse().unwrap(),
        }),
    }
    .checked()
    .unwrap()
}

#[test]
fn list_round_trips_every_field() {
    if !require_root("list_round_trips") {
        return;
    }
    let (_ns, t) = ns("rt");
    let variants = vec![
        full_policy(),
        Policy {
            name: "v6-udp-in".into(),
            inbound_port: Some(9999),
            protocols: vec![Protocol::Udp],
            family: Family::Ipv6,
            inbound_exceptions: Exceptions {
                ports: vec![],
                cidrs: vec!["::/0".parse().unwrap()],
            },
            ..Policy::default()
        },
        Policy {
            name: "v4".into(),
            priority: 65535,
            outbound_port: Some(1),
            family: Family::Ipv4,
            // No identity excluded: read back with the loop permission.
            allow_proxy_loop: true,
            matching: Match {
                remote_addresses: vec!["0.0.0.0/0".parse().unwrap()],
                ..Match::default()
            },
            ..Policy::default()
        },
        Policy {
            name: "imds-only".into(),
            destination_proxy: Some(DestinationProxy {
                destination: "[fd00:ec2::254]:80".parse().unwrap(),
                proxy: "[::1]:8081".parse().unwrap(),
            }),
            family: Family::Ipv6,
            exclude: Exclusions {
                gids: vec![5],
                ..Exclusions::default()
            },
            ..Policy::default()
        },
    ];
    for p in &variants {
        let p = p.clone().checked().unwrap();
        nft::apply(&t, std::slice::from_ref(&p)).unwrap();
        assert_eq!(
            nft::list(&t).unwrap(),
            vec![p.clone()],
            "round trip of {}",
            p.name
        );
    }
    let all: Vec<Policy> = variants
        .iter()
        .map(|p| p.clone().checked().unwrap())
        .collect();
    nft::apply(&t, &all).unwrap();
    let mut listed = nft::list(&t).unwrap();
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    let mut want = all.clone();
    want.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(listed, want);
}

#[test]
fn a_batch_the_kernel_refuses_leaves_the_ruleset_byte_for_byte_intact() {
    if !require_root("kernel_refusal") {
        return;
    }
    let (ns, t) = ns("atom");
    // No table yet: a refused batch must not create one.
    let err = nft::apply_with_kernel_fault(&t, &[full_policy()]).unwrap_err();
    assert!(matches!(err, NftError::Kernel { .. }), "{err}");
    assert!(!err.is_bad_input());
    assert_eq!(nft_text(&ns), None, "a refused batch created the table");
    let rules = ns.run(&["ip", "rule"]);
    assert!(
        !rules.contains("fwmark"),
        "a refused batch left UDP routing: {rules}"
    );

    nft::apply(&t, &[full_policy()]).unwrap();
    let before = nft_text(&ns).expect("table exists");
    let rules_before = ns.run(&["ip", "rule"]);
    let other = Policy {
        name: "other".into(),
        outbound_port: Some(2000),
        allow_proxy_loop: true,
        ..Policy::default()
    };
    let err = nft::apply_with_kernel_fault(&t, std::slice::from_ref(&other)).unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");
    let after = nft_text(&ns).expect("table still exists");
    assert_eq!(before, after, "the refused batch changed the ruleset");
    assert_eq!(ns.run(&["ip", "rule"]), rules_before);
    assert_eq!(nft::list(&t).unwrap(), vec![full_policy()]);
    // And the same apply without the fault goes through.
    nft::apply(&t, std::slice::from_ref(&other)).unwrap();
    assert_eq!(nft::list(&t).unwrap(), vec![other.checked().unwrap()]);
}

#[test]
fn bad_input_is_refused_before_the_kernel_and_changes_nothing() {
    if !require_root("bad_input") {
        return;
    }
    let (ns, t) = ns("bad");
    nft::add(&t, &full_policy()).unwrap();
    let before = nft_text(&ns);
    let base = Policy {
        name: "x".into(),
        outbound_port: Some(100),
        allow_proxy_loop: true,
        ..Policy::default()
    };
    let cases = [
        Policy {
            exclude: Exclusions {
                users: vec!["no-such-user-pxt".into()],
                ..Default::default()
            },
            ..base.clone()
        },
        Policy {
            exclude: Exclusions {
                sids: vec!["S-1-5-18".into()],
                ..Default::default()
            },
            ..base.clone()
        },
        Policy {
            outbound_port: Some(0),
            ..base.clone()
        },
        Policy {
            outbound_port: None,
            inbound_port: Some(5),
            exclude: Exclusions {
                uids: vec![1],
                ..Default::default()
            },
            ..base.clone()
        },
        Policy {
            outbound_exceptions: Exceptions {
                cidrs: vec![
                    "10.0.0.0/8".parse().unwrap(),
                    "10.1.0.0/16".parse().unwrap(),
                ],
                ports: vec![],
            },
            ..base.clone()
        },
    ];
    for p in cases {
        let err = nft::add(&t, &p).unwrap_err();
        assert!(err.is_bad_input(), "{err} should be bad input");
        assert_eq!(nft_text(&ns), before, "{err}: changed the ruleset");
    }
    let sid = nft::validate(&Policy {
        exclude: Exclusions {
            sids: vec!["S-1-5-18".into()],
            ..Default::default()
        },
        ..base.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(
        sid.contains("--exclude-uid") && sid.contains("usersid"),
        "{sid}"
    );
    let missing = Target::parse("netns:pxt-does-not-exist").unwrap();
    let err = nft::add(&missing, &base).unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    for bad in ["pid:x", "netns:", "relative/path", "pid:0"] {
        assert!(Target::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn clear_removes_our_table_only_and_counts() {
    if !require_root("clear") {
        return;
    }
    let (ns, t) = ns("clr");
    ns.run(&["nft", "add", "table", "inet", "someone-else"]);
    ns.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "someone-else",
        "c",
        "{ type filter hook output priority 0; }",
    ]);
    let theirs = ns.run(&["nft", "list", "table", "inet", "someone-else"]);
    let mk = |name: &str, port| Policy {
        name: name.into(),
        outbound_port: Some(port),
        protocols: vec![Protocol::Tcp, Protocol::Udp],
        exclude: Exclusions {
            uids: vec![1337],
            ..Default::default()
        },
        ..Policy::default()
    };
    nft::add(&t, &mk("a", 1000)).unwrap();
    nft::add(&t, &mk("b", 2000)).unwrap();
    assert_eq!(nft::clear(&t, Some("nope")).unwrap(), 0);
    assert_eq!(nft::clear(&t, Some("a")).unwrap(), 1);
    assert_eq!(nft::list(&t).unwrap().len(), 1);
    assert_eq!(nft::clear(&t, None).unwrap(), 1);
    assert_eq!(nft_text(&ns), None, "clear left the table");
    assert_eq!(nft::clear(&t, None).unwrap(), 0, "clearing nothing is fine");
    assert!(!ns.run(&["ip", "rule"]).contains("fwmark"));
    assert_eq!(
        ns.run(&["nft", "list", "table", "inet", "someone-else"]),
        theirs
    );
}

fn random_policy(rng: &mut StdRng, name: &str) -> Policy {
    let port = |rng: &mut StdRng| rng.gen_range(1..=65535u16);
    let mut p = Policy {
        name: name.into(),
        priority: rng.gen_range(0..4),
        ..Policy::default()
    };
    if rng.gen_bool(0.8) {
        p.outbound_port = Some(port(rng));
    }
    if rng.gen_bool(0.4) || p.outbound_port.is_none() {
        p.inbound_port = Some(port(rng));
    }
    p.protocols = match rng.gen_range(0..3) {
        0 => vec![Protocol::Tcp],
        1 => vec![Protocol::Udp],
        _ => vec![Protocol::Tcp, Protocol::Udp],
    };
    p.family = [Family::Both, Family::Ipv4, Family::Ipv6][rng.gen_range(0..3)];
    if p.outbound_port.is_some() {
        for _ in 0..rng.gen_range(0..3) {
            p.exclude.uids.push(rng.gen_range(0..5000));
        }
        p.allow_proxy_loop = p.exclude.uids.is_empty();
        if rng.gen_bool(0.3) {
            p.dns_port = Some(port(rng));
        }
        for _ in 0..rng.gen_range(0..3) {
            p.outbound_exceptions
                .ports
                .push(PortRange::single(rng.gen_range(1..100) * 100));
        }
        for _ in 0..rng.gen_range(0..4) {
            if p.family.has_ipv4() {
                let a = rng.gen_range(1..=223u8);
                p.outbound_exceptions.cidrs.push(
                    format!("{a}.{}.0.0/16", rng.gen_range(0..=255u8))
                        .parse()
                        .unwrap(),
                );
            }
        }
    }
    if p.inbound_port.is_some() && rng.gen_bool(0.5) {
        p.inbound_exceptions.ports.push(PortRange {
            start: 15000,
            end: 15000 + rng.gen_range(0..50),
        });
    }
    // Overlapping picks are invalid input: drop them by retrying without.
    p.clone().checked().unwrap_or_else(|_| {
        Policy {
            outbound_exceptions: Exceptions::default(),
            ..p
        }
        .checked()
        .unwrap()
    })
}

#[test]
fn randomized_add_replace_clear_cycles_end_with_exactly_the_expected_rules() {
    if !require_root("randomized") {
        return;
    }
    let seed: u64 = std::env::var("PXT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    eprintln!("randomized cycles: PXT_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (ns, t) = ns("rnd");
    let (fresh_ns, fresh) = self::ns("rndf");
    let names = ["a", "b", "c", "d", "e", "f"];
    let mut model: std::collections::BTreeMap<String, Policy> = Default::default();
    for cycle in 0..200 {
        match rng.gen_range(0..10) {
            0..=5 => {
                let name = names[rng.gen_range(0..names.len())];
                let p = random_policy(&mut rng, name);
                nft::add(&t, &p).unwrap();
                model.insert(name.into(), p);
            }
            6..=7 => {
                let name = names[rng.gen_range(0..names.len())];
                let removed = nft::clear(&t, Some(name)).unwrap();
                assert_eq!(
                    removed,
                    usize::from(model.remove(name).is_some()),
                    "cycle {cycle}"
                );
            }
            8 => {
                assert_eq!(nft::clear(&t, None).unwrap(), model.len(), "cycle {cycle}");
                model.clear();
            }
            _ => {
                let n = rng.gen_range(0..4);
                let ps: Vec<Policy> = names[..n]
                    .iter()
                    .map(|n| random_policy(&mut rng, n))
                    .collect();
                nft::apply(&t, &ps).unwrap();
                model = ps.into_iter().map(|p| (p.name.clone(), p)).collect();
            }
        }
        let mut listed = nft::list(&t).unwrap();
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        let want: Vec<Policy> = model.values().cloned().collect();
        assert_eq!(listed, want, "cycle {cycle} (PXT_SEED={seed})");
        // Independent check with nft every 25 cycles and at the end: the
        // table equals the one a single apply of the model produces in a
        // fresh namespace (handles aside).
        if cycle % 25 == 24 || cycle == 199 {
            nft::apply(&fresh, &want).unwrap();
            let strip = |s: Option<String>| {
                s.map(|s| {
                    s.lines()
                        .map(|l| l.split(" # handle").next().unwrap().to_owned())
                        .collect::<Vec<_>>()
                })
            };
            assert_eq!(
                strip(nft_text(&ns)),
                strip(nft_text(&fresh_ns)),
                "cycle {cycle} (PXT_SEED={seed})"
            );
        }
    }
}

#[test]
fn concurrent_writers_never_lose_each_others_policies() {
    if !require_root("concurrent") {
        return;
    }
    // Each add reads, merges and writes with the generation it read; the
    // kernel refuses a stale batch and add retries, so no update is lost.
    let (_ns, t) = ns("conc");
    let home = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let t = t.clone();
            std::thread::spawn(move || {
                for i in 0..8 {
                    let p = Policy {
                        name: format!("w{w}-{i}"),
                        outbound_port: Some(1000 + i),
                        allow_proxy_loop: true,
                        ..Policy::default()
                    };
                    nft::add(&t, &p).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(nft::list(&t).unwrap().len(), 16);
    // Opening sockets in the target never moves the caller's thread.
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        home
    );
}

#[test]
fn clear_all_works_on_a_table_edited_behind_our_back() {
    if !require_root("clear_damaged") {
        return;
    }
    let (ns, t) = ns("dmg");
    nft::add(&t, &full_policy()).unwrap();
    // A rule we would never write makes the table unreadable as policies.
    ns.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "proxyctl",
        "pol-full-out",
        "counter",
        "comment",
        "\"alien\"",
    ]);
    let err = nft::list(&t).unwrap_err();
    assert!(matches!(err, NftError::Decode(_)), "{err}");
    assert_eq!(nft::clear(&t, None).unwrap(), 1);
    assert_eq!(nft_text(&ns), None);
}
