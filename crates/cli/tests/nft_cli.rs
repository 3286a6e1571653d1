//! The proxyctl binary on Linux: add/list/clear/verify/demo against the
//! real kernel in namespaces these tests create.

use std::process::{Command, Output};

use proxyctl_testkit::{NetNs, require_root};

fn proxyctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxyctl"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running proxyctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// proxyctl with `args`, which must succeed.
fn proxyctl_ok(args: &[&str]) -> Output {
    let out = proxyctl(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

/// stdout of a command in the test's own (root) namespace.
fn host(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes, behind proxyctl's back, the rule of `chain` whose listing
/// contains `marker`.
fn delete_rule(ns: &NetNs, chain: &str, marker: &str) {
    let listing = ns.run(&["nft", "-a", "list", "chain", "inet", "proxyctl", chain]);
    let handle = listing
        .lines()
        .find(|l| l.contains(marker))
        .and_then(|l| l.rsplit("handle ").next())
        .unwrap_or_else(|| panic!("no rule with {marker} in {listing}"))
        .trim()
        .to_owned();
    ns.run(&[
        "nft", "delete", "rule", "inet", "proxyctl", chain, "handle", &handle,
    ]);
}

/// `proxyctl verify` on `target` passes; returns its report.
fn verify_passes(target: &str) -> String {
    let out = proxyctl_ok(&["verify", target]);
    assert!(!text(&out).contains("MISMATCH"), "{}", text(&out));
    text(&out)
}

/// `proxyctl verify` on `target` exits 1 reporting a mismatch.
fn verify_finds_a_mismatch(target: &str) {
    let out = proxyctl(&["verify", target]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("MISMATCH"), "{}", text(&out));
}

/// The demo's interfaces (pxd*) and table never reach the root namespace.
fn assert_root_namespace_untouched() {
    let links = host(&["ip", "-o", "link"]);
    assert!(!links.contains("pxd"), "demo left an interface: {links}");
    let tables = host(&["nft", "list", "tables"]);
    assert!(
        !tables.contains("proxyctl"),
        "demo touched the root namespace: {tables}"
    );
}

fn nft_table(ns: &NetNs) -> Option<String> {
    let out = ns.exec(&["nft", "-a", "list", "table", "inet", "proxyctl"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn bad_input_exits_2_names_the_flag_and_changes_nothing() {
    if !require_root("cli_bad_input") {
        return;
    }
    let ns = NetNs::new("clibad");
    let target = format!("netns:{}", ns.name());
    proxyctl_ok(&[
        "add",
        &target,
        "--name",
        "web",
        "--port",
        "15001",
        "--exclude-uid",
        "1337",
    ]);
    let before = nft_table(&ns).expect("table");
    let t = target.as_str();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["add", t, "--outbound-port", "0"], "outbound-port"),
        (vec!["add", t, "--outbound-port", "70000"], "outbound-port"),
        (
            vec![
                "add",
                t,
                "--outbound-port",
                "1",
                "--exclude-inbound-port",
                "9",
            ],
            "exclude-inbound-port",
        ),
        (
            vec![
                "add",
                t,
                "--outbound-port",
                "1",
                "--exclude-outbound-cidr",
                "10.0.0.0/8,10.1.0.0/16",
            ],
            "exclude-outbound-cidr",
        ),
        (
            vec![
                "add",
                t,
                "--outbound-port",
                "1",
                "--exclude-outbound-cidr",
                "10.0.0.300/8",
            ],
            "exclude-outbound-cidr",
        ),
        (
            vec!["add", t, "--outbound-port", "1", "--usersid", "S-1-5-18"],
            "--exclude-uid",
        ),
        (
            vec![
                "add",
                t,
                "--outbound-port",
                "1",
                "--exclude-user",
                "no-such-user-pxt",
            ],
            "exclude-user",
        ),
        (vec!["add", t, "--outbound-port", "1"], "--allow-proxy-loop"),
        (vec!["add", t, "--outbound-port", "1"], "--exclude-uid"),
        (
            vec!["add", t, "--dns-port", "15053", "--protocol", "udp"],
            "--allow-proxy-loop",
        ),
        (
            vec!["add", t, "--outbound-port", "1", "--dns-port", "0"],
            "dns-port",
        ),
        (
            vec![
                "add",
                "netns:pxt-no-such-namespace",
                "--outbound-port",
                "1",
                "--exclude-uid",
                "1",
            ],
            "no network namespace",
        ),
        (
            vec!["add", "bogus", "--outbound-port", "1", "--exclude-uid", "1"],
            "target",
        ),
        (vec!["list", "pid:999999999"], "no network namespace"),
        (vec!["clear", "/nonexistent/ns"], "no network namespace"),
    ];
    for (args, needle) in cases {
        let out = proxyctl(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains(needle),
            "{args:?} should mention {needle}: {}",
            text(&out)
        );
        // `check` validates exactly as `add` does: a policy add refuses is
        // refused by check too, with the same words.
        if args[0] == "add" && args[1] == t {
            let mut check = vec!["check"];
            check.extend_from_slice(&args[2..]);
            let out = proxyctl(&check);
            assert_eq!(out.status.code(), Some(2), "{check:?}: {}", text(&out));
            assert!(text(&out).contains(needle), "{check:?}: {}", text(&out));
        }
        assert_eq!(
            nft_table(&ns).as_deref(),
            Some(before.as_str()),
            "{args:?} changed the ruleset"
        );
    }
    let hns = proxyctl(&["list", t, "--backend", "hns"]);
    assert_eq!(hns.status.code(), Some(1));
    assert!(
        text(&hns).contains("PROXYCTL_HNS_LIBRARY"),
        "{}",
        text(&hns)
    );
}

#[test]
fn add_list_clear_round_trip_through_the_cli() {
    if !require_root("cli_round_trip") {
        return;
    }
    let ns = NetNs::new("clirt");
    let t = format!("netns:{}", ns.name());
    proxyctl_ok(&[
        "add",
        &t,
        "--name",
        "mesh",
        "--outbound-port",
        "15001",
        "--inbound-port",
        "15006",
        "--protocol",
        "tcp,udp",
        "--exclude-uid",
        "1337",
        "--exclude-outbound-port",
        "22,6000-6010",
        "--exclude-outbound-cidr",
        "10.0.0.0/8",
        "--exclude-inbound-port",
        "15020",
        "--priority",
        "3",
    ]);
    let json = proxyctl(&["list", &t, "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let p = &listed[0];
    assert_eq!(p["name"], "mesh");
    assert_eq!(p["priority"], 3);
    assert_eq!(p["outboundPort"], 15001);
    assert_eq!(p["inboundPort"], 15006);
    assert_eq!(p["protocols"], serde_json::json!(["tcp", "udp"]));
    assert_eq!(p["exclude"]["uids"], serde_json::json!([1337]));
    assert_eq!(
        p["outboundExceptions"]["ports"],
        serde_json::json!([22, "6000-6010"])
    );
    assert_eq!(
        p["outboundExceptions"]["cidrs"],
        serde_json::json!(["10.0.0.0/8"])
    );
    assert_eq!(p["inboundExceptions"]["ports"], serde_json::json!([15020]));
    // The same namespace named as pid:N and as a /proc path.
    let mut sleeper = proxyctl_testkit::spawn_tied(Command::new("ip").args([
        "netns",
        "exec",
        ns.name(),
        "sleep",
        "30",
    ]))
    .unwrap();
    let pid = sleeper.id();
    std::thread::sleep(std::time::Duration::from_millis(200));
    for other in [format!("pid:{pid}"), format!("/proc/{pid}/ns/net")] {
        let o = proxyctl(&["list", &other, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        assert_eq!(v[0]["name"], "mesh", "{other}: {}", text(&o));
    }
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let yaml = text(&proxyctl(&["list", &t, "-o", "yaml"]));
    assert!(yaml.contains("outboundPort: 15001"), "{yaml}");
    let table = text(&proxyctl(&["list", &t]));
    assert!(
        table.contains("mesh") && table.contains("uid:1337"),
        "{table}"
    );
    // The listed YAML is a valid --file for add: replace via file.
    let dir = std::env::temp_dir().join(format!("pxt-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("p.yaml");
    std::fs::write(
        &file,
        yaml.replace("outboundPort: 15001", "outboundPort: 15002"),
    )
    .unwrap();
    let re = proxyctl(&["add", &t, "--file", file.to_str().unwrap()]);
    // A file whose policy would loop is refused like the flags are.
    let looping = dir.join("loop.yaml");
    std::fs::write(&looping, "name: loop\noutboundPort: 15003\n").unwrap();
    let refused = proxyctl(&["add", &t, "--file", looping.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(re.status.success(), "{}", text(&re));
    assert_eq!(
        text(&re).trim(),
        format!("replaced policy mesh in {t}"),
        "a replace says so"
    );
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("--allow-proxy-loop"),
        "{}",
        text(&refused)
    );
    let json = proxyctl(&["list", &t, "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["outboundPort"], 15002);

    // A replace that also flushes conntrack says what it did.
    let flushed = proxyctl_ok(&[
        "add",
        &t,
        "--name",
        "mesh",
        "--outbound-port",
        "15003",
        "--exclude-uid",
        "1337",
        "--flush-conntrack",
    ]);
    assert_eq!(
        text(&flushed),
        format!(
            "replaced policy mesh in {t}\nflushed 0 conntrack entries of redirected connections\n"
        )
    );

    let clear = proxyctl(&["clear", &t, "--flush-conntrack"]);
    assert!(
        text(&clear).contains("removed 1 policy") && text(&clear).contains("flushed 0 conntrack"),
        "{}",
        text(&clear)
    );
    assert_eq!(nft_table(&ns), None);
}

#[test]
fn check_and_add_accept_and_refuse_the_same_policies() {
    if !require_root("cli_check_parity") {
        return;
    }
    let ns = NetNs::new("clichk");
    let t = format!("netns:{}", ns.name());
    // UDP to a destination proxy is NAT, which works for UDP: both accept.
    let udp_dnat = [
        "--destination-proxy",
        "169.254.169.254:53=127.0.0.1:5353",
        "--protocol",
        "udp",
    ];
    let mut check = vec!["check"];
    check.extend(udp_dnat);
    proxyctl_ok(&check);
    let mut add = vec!["add", t.as_str()];
    add.extend(udp_dnat);
    proxyctl_ok(&add);
    // What only a backend refuses is refused by check for that backend.
    for (args, flag) in [
        (
            vec!["check", "--outbound-port", "1", "--usersid", "S-1-5-18"],
            "--exclude-uid",
        ),
        (
            vec![
                "check",
                "--backend",
                "hns",
                "--port",
                "8000",
                "--usersid",
                "system",
                "--dns-port",
                "53",
            ],
            "--dns-port",
        ),
        (
            vec!["check", "--backend", "hns", "--port", "8000"],
            "--allow-proxy-loop",
        ),
    ] {
        let out = proxyctl(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(flag), "{args:?}: {}", text(&out));
    }
    proxyctl_ok(&[
        "check",
        "--backend",
        "hns",
        "--port",
        "8000",
        "--usersid",
        "system",
    ]);
}

#[test]
fn verify_passes_on_a_good_policy_and_fails_on_a_tampered_one() {
    if !require_root("cli_verify") {
        return;
    }
    let ns = NetNs::new("cliver");
    let t = format!("netns:{}", ns.name());
    proxyctl_ok(&[
        "add",
        &t,
        "--name",
        "mesh",
        "--outbound-port",
        "15001",
        "--inbound-port",
        "15006",
        "--protocol",
        "tcp,udp",
        "--exclude-uid",
        "1337",
        "--exclude-gid",
        "1338",
        "--exclude-outbound-port",
        "5432",
    ]);
    let good = verify_passes(&t);
    assert!(good.contains("orig dst 198.18.0.2:40123"), "{good}");
    // Tamper: drop the proxy-uid exclusion from the TCP chain behind our back.
    delete_rule(&ns, "pol-mesh-out", "exclude-uid");
    verify_finds_a_mismatch(&t);
    // With the real proxy running on its port (TCP and UDP), verify reads
    // where each TCP probe went from conntrack, and says which UDP probes
    // it could not observe, without failing the run.
    proxyctl_ok(&[
        "add",
        &t,
        "--name",
        "mesh",
        "--outbound-port",
        "15001",
        "--inbound-port",
        "15006",
        "--protocol",
        "tcp,udp",
        "--exclude-uid",
        "1337",
        "--exclude-gid",
        "1338",
        "--exclude-outbound-port",
        "5432",
    ]);
    let tt = t.clone();
    let busy = ns.enter(move || {
        let l = std::net::TcpListener::bind("0.0.0.0:15001").unwrap();
        let u = std::net::UdpSocket::bind("0.0.0.0:15001").unwrap();
        let out = proxyctl(&["verify", &tt]);
        drop((l, u));
        out
    });
    let report = text(&busy);
    assert_eq!(busy.status.code(), Some(0), "{report}");
    assert!(!report.contains("MISMATCH"), "{report}");
    assert!(
        report.contains("redirect :15001 (orig dst 198.18.0.2:40123) (conntrack)"),
        "{report}"
    );
    assert!(report.contains("NOT VERIFIED: udp port 15001"), "{report}");
    assert!(report.contains("could not be observed"), "{report}");
    // verify leaves no probe interfaces behind.
    let links = ns.run(&["ip", "-o", "link"]);
    assert!(!links.contains("pxv"), "{links}");
}

#[test]
fn verify_probes_every_rule_and_reports_only_real_mismatches() {
    if !require_root("cli_verify_rules") {
        return;
    }
    let ns = NetNs::new("cliverr");
    let t = format!("netns:{}", ns.name());
    proxyctl_ok(&[
        "add",
        &t,
        "--name",
        "mesh",
        "--outbound-port",
        "15001",
        "--inbound-port",
        "15006",
        "--protocol",
        "tcp,udp",
        "--exclude-uid",
        "1337",
        "--exclude-inbound-port",
        "15020",
        "--exclude-outbound-cidr",
        "10.96.0.0/12,fd10::/64",
        "--exclude-inbound-cidr",
        "192.0.2.0/24",
        "--dns-port",
        "15053",
    ]);
    proxyctl_ok(&[
        "add",
        &t,
        "--name",
        "web",
        "--priority",
        "5",
        "--outbound-port",
        "15002",
        "--exclude-uid",
        "1337",
        "--remote-address",
        "203.0.113.0/24",
    ]);
    // A service on the excepted inbound port (TCP only): its UDP port is
    // free and verify's own server takes it.
    let tt = t.clone();
    let out = ns.enter(move || {
        let service = std::net::TcpListener::bind("0.0.0.0:15020").unwrap();
        let out = proxyctl(&["verify", &tt]);
        drop(service);
        out
    });
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(!report.contains("MISMATCH"), "{report}");
    assert!(!report.contains("NOT VERIFIED"), "{report}");
    for probed in [
        // exception CIDRs, outbound and inbound (as the peer's source)
        "10.96.0.1:40123",
        "[fd10::1]:40123",
        "in from 192.0.2.1",
        // the match address of the higher-priority policy
        "203.0.113.1:40123",
        // DNS capture, both protocols
        "198.18.0.2:53",
    ] {
        assert!(report.contains(probed), "{probed} not probed:\n{report}");
    }
    let line = |needle: &str, proto: &str| {
        report
            .lines()
            .find(|l| l.contains(needle) && l.contains(proto))
            .unwrap_or_else(|| panic!("no {proto} row for {needle}:\n{report}"))
            .to_owned()
    };
    assert!(
        line("203.0.113.1:40123", "tcp").contains("redirect :15002 (orig"),
        "{report}"
    );
    assert!(
        line("10.96.0.1:40123", "tcp").contains("bypass"),
        "{report}"
    );
    assert!(
        line("198.18.0.2:53", "udp").contains("redirect :15053 (orig dst 198.18.0.2:53)"),
        "{report}"
    );
    assert!(
        line("198.18.0.1:15020", "tcp").contains("bypass (conntrack)"),
        "{report}"
    );
    assert!(line("198.18.0.1:15020", "udp").ends_with("ok"), "{report}");
    // Tampering with an exception CIDR is caught.
    delete_rule(&ns, "pol-mesh-out", "except-v4");
    verify_finds_a_mismatch(&t);
    assert!(
        !ns.run(&["ip", "rule"]).contains("2018"),
        "verify left its rule"
    );
}

#[test]
fn demo_runs_and_leaves_nothing_behind() {
    if !require_root("cli_demo") {
        return;
    }
    let before = host(&["ip", "netns", "list"]);
    let out = proxyctl(&["demo"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("original destination 198.18.1.2:80 (SO_ORIGINAL_DST)"),
        "{all}"
    );
    assert!(
        all.contains("original destination [2001:db8:7e2::2]:80"),
        "{all}"
    );
    assert!(all.contains("(IP_RECVORIGDSTADDR)"), "{all}");
    assert!(all.contains("bypasses the redirect"), "{all}");
    assert!(all.contains("hello from 198.18.1.2:80"), "{all}");
    assert!(all.contains("table inet proxyctl"), "{all}");
    assert!(!all.contains("MISMATCH"), "{all}");
    // Tests running in parallel add and remove their own pxt-* namespaces.
    let new: Vec<String> = host(&["ip", "netns", "list"])
        .lines()
        .filter(|l| !before.contains(*l) && !l.starts_with("pxt-"))
        .map(str::to_owned)
        .collect();
    assert!(new.is_empty(), "demo left named namespaces: {new:?}");
    assert_root_namespace_untouched();
}

#[test]
fn demo_interrupted_by_ctrl_c_leaves_nothing_behind() {
    if !require_root("cli_demo_ctrl_c") {
        return;
    }
    use std::io::{BufRead, BufReader};
    let mut child = proxyctl_testkit::spawn_tied(
        Command::new(env!("CARGO_BIN_EXE_proxyctl"))
            .arg("demo")
            .stdout(std::process::Stdio::piped()),
    )
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reached = false;
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().contains("added policy sidecar") {
            reached = true;
            break;
        }
    }
    assert!(reached, "demo never applied its policy");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "demo should have been interrupted");
    // Its namespaces were anonymous: they died with the process, taking
    // the veth pair, rules and routes with them. The root namespace saw
    // nothing.
    assert_root_namespace_untouched();
    let netns = host(&["ip", "netns", "list"]);
    assert!(netns.lines().all(|l| l.starts_with("pxt-")), "{netns}");
}

#[test]
fn verify_probes_destination_proxies() {
    if !require_root("cli_verify_dnat") {
        return;
    }
    let ns = NetNs::new("clidnat");
    let t = format!("netns:{}", ns.name());
    proxyctl_ok(&[
        "add",
        &t,
        "--name",
        "imds",
        "--destination-proxy",
        "169.254.169.254:80=127.0.0.1:18080",
        "--exclude-uid",
        "1337",
    ]);
    let good = verify_passes(&t);
    assert!(
        good.contains("dnat 127.0.0.1:18080 (orig dst 169.254.169.254:80)"),
        "{good}"
    );
    delete_rule(&ns, "pol-imds-out", "\"dnat\"");
    verify_finds_a_mismatch(&t);
}
