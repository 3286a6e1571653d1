//! Apply time: proxyctl's one netlink batch vs `iptables-restore` of the
//! equivalent rules (nft and legacy backends, IPv4 + IPv6), each run in a
//! fresh network namespace; median of many runs. Needs root.
//!
//! `cargo bench -p proxyctl-nft --bench apply` (RUNS=N to change the count).
//!
//! Equivalence: the iptables rule sets implement the same policy in the
//! `nat` table of both families (proxyctl's `inet` table covers both in one
//! batch, so the iptables figure is the v4 run plus the v6 run). Exception
//! CIDRs become one RETURN rule each, as iptables-based injectors do; our
//! side puts them in one interval set.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use proxyctl_nft::{Target, probe};
use proxyctl_policy::{Exceptions, Exclusions, Policy, PortRange};

fn typical() -> Policy {
    Policy {
        name: "sidecar".into(),
        outbound_port: Some(15001),
        inbound_port: Some(15006),
        exclude: Exclusions {
            uids: vec![1337],
            gids: vec![1337],
            ..Default::default()
        },
        inbound_exceptions: Exceptions {
            ports: [15020, 15021, 15090].map(PortRange::single).to_vec(),
            cidrs: vec![],
        },
        outbound_exceptions: Exceptions {
            ports: vec![PortRange::single(15021)],
            cidrs: vec![],
        },
        ..Policy::default()
    }
    .checked()
    .unwrap()
}

fn many_cidrs(n: usize) -> Policy {
    let mut p = typical();
    p.name = "cidrs".into();
    p.outbound_exceptions.cidrs = (0..n as u32)
        .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from((10 << 24) | (i << 8)), 24).unwrap()))
        .collect();
    p.checked().unwrap()
}

/// The same policy as iptables-restore input for one family.
fn iptables_rules(p: &Policy, v6: bool) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:PROXYCTL_IN - [0:0]\n:PROXYCTL_OUT - [0:0]\n-A PREROUTING -p tcp -j PROXYCTL_IN\n-A OUTPUT -p tcp -j PROXYCTL_OUT\n",
    );
    for port in &p.inbound_exceptions.ports {
        r += &format!("-A PROXYCTL_IN -p tcp --dport {} -j RETURN\n", port.start);
    }
    r += &format!(
        "-A PROXYCTL_IN -p tcp -j REDIRECT --to-ports {}\n",
        p.inbound_port.unwrap()
    );
    for uid in &p.exclude.uids {
        r += &format!("-A PROXYCTL_OUT -m owner --uid-owner {uid} -j RETURN\n");
    }
    for gid in &p.exclude.gids {
        r += &format!("-A PROXYCTL_OUT -m owner --gid-owner {gid} -j RETURN\n");
    }
    r += &format!(
        "-A PROXYCTL_OUT -d {} -j RETURN\n",
        if v6 { "::1/128" } else { "127.0.0.0/8" }
    );
    for port in &p.outbound_exceptions.ports {
        r += &format!("-A PROXYCTL_OUT -p tcp --dport {} -j RETURN\n", port.start);
    }
    for cidr in &p.outbound_exceptions.cidrs {
        if cidr.addr().is_ipv6() == v6 {
            r += &format!("-A PROXYCTL_OUT -d {cidr} -j RETURN\n");
        }
    }
    r += &format!(
        "-A PROXYCTL_OUT -p tcp -j REDIRECT --to-ports {}\nCOMMIT\n",
        p.outbound_port.unwrap()
    );
    r
}

fn fresh() -> (std::fs::File, Target) {
    let f = probe::anonymous_netns().expect("creating a namespace (root needed)");
    let t = Target::Path(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()).into());
    (f, t)
}

/// Times one apply in a fresh namespace; with `replace`, times the second
/// apply of the policy (replacing the first) instead.
fn ours(p: &Policy, replace: bool) -> Duration {
    let (_ns, t) = fresh();
    if replace {
        proxyctl_nft::apply(&t, std::slice::from_ref(p)).expect("apply");
    }
    let start = Instant::now();
    proxyctl_nft::apply(&t, std::slice::from_ref(p)).expect("apply");
    let d = start.elapsed();
    assert_eq!(proxyctl_nft::list(&t).unwrap().len(), 1);
    d
}

fn iptables(p: &Policy, v4_bin: &str, v6_bin: &str, replace: bool) -> Duration {
    let (_ns, t) = fresh();
    let inputs = [
        (v4_bin, iptables_rules(p, false)),
        (v6_bin, iptables_rules(p, true)),
    ];
    t.run_in(move || {
        let mut start = Instant::now();
        for (i, (bin, rules)) in inputs.iter().chain(inputs.iter()).enumerate() {
            if i == 2 {
                if !replace {
                    break;
                }
                start = Instant::now();
            }
            let mut child = Command::new(bin)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("{bin}: {e}"));
            child
                .stdin
                .take()
                .unwrap()
                .write_all(rules.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "{bin} failed");
        }
        Ok(start.elapsed())
    })
    .unwrap()
}

fn median(mut f: impl FnMut() -> Duration, runs: usize) -> Duration {
    let mut v: Vec<Duration> = (0..runs).map(|_| f()).collect();
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("apply bench: needs root (network namespaces); skipped");
        return;
    }
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(21);
    println!("apply time, median of {runs} runs, each in a fresh network namespace (ms)\n");
    println!(
        "{:<22} {:>10} {:>22} {:>8} {:>25} {:>8}",
        "policy", "proxyctl", "iptables-nft-restore", "ratio", "iptables-legacy-restore", "ratio"
    );
    for (label, p, runs, replace) in [
        ("typical sidecar", typical(), runs, false),
        (
            "10,000 exception CIDRs",
            many_cidrs(10_000),
            runs.div_ceil(2),
            false,
        ),
        ("typical, replacing", typical(), runs, true),
        (
            "10,000 CIDRs, replacing",
            many_cidrs(10_000),
            runs.div_ceil(2),
            true,
        ),
    ] {
        let (nft4, nft6) = ("iptables-nft-restore", "ip6tables-nft-restore");
        let (leg4, leg6) = ("iptables-legacy-restore", "ip6tables-legacy-restore");
        // Warm-up: module loads and page cache on the first run of each.
        ours(&p, replace);
        iptables(&p, nft4, nft6, replace);
        iptables(&p, leg4, leg6, replace);
        let o = median(|| ours(&p, replace), runs);
        let n = median(|| iptables(&p, nft4, nft6, replace), runs);
        let l = median(|| iptables(&p, leg4, leg6, replace), runs);
        println!(
            "{:<22} {:>10} {:>22} {:>7.3}x {:>25} {:>7.3}x",
            label,
            ms(o),
            ms(n),
            o.as_secs_f64() / n.as_secs_f64(),
            ms(l),
            o.as_secs_f64() / l.as_secs_f64()
        );
    }
    println!("\ntargets: typical < 0.2x iptables-restore; 10,000 CIDRs < 20 ms");
    println!("(replacing: deleted objects are freed after an RCU grace period, which the");
    println!(" kernel waits for when the writer's netlink socket closes; nft pays it too)");
}
