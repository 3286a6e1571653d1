//! Data path: what a redirect costs each new connection, proxyctl's
//! ruleset against the equivalent istio-iptables-style rules under
//! iptables-legacy and iptables-nft, with 0 and with 10,000 exception
//! CIDRs; and the replacing apply, split into time-to-enforcement (the
//! batch committed, the new rules in force) and the whole call (which also
//! waits for the kernel to free the old rules). Needs root.
//!
//! `cargo bench -p proxyctl-nft --bench datapath` (CONNS=N connections per
//! round, ROUNDS=N rounds; APPLY_RUNS=N).
//!
//! Each configuration gets a fresh "pod" namespace joined to a "peer" by a
//! veth pair. One thread in the pod connects to the peer's 10.88.0.2:80,
//! the redirect sends it to the proxy port 15001 in the pod, where the same
//! thread accepts it; both ends close with a reset (no TIME_WAIT). NAT is
//! evaluated on a connection's first packet, so the exception list is
//! walked (iptables: linearly) once per connection; the destination is in
//! none of the 10,000 exceptions, the worst case for a linear chain.
//! "added latency" is the median connect() time minus that of a direct
//! connect to 127.0.0.1:15001 in a namespace without rules. Rounds
//! interleave the configurations so machine noise spreads over all.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use proxyctl_nft::Target;
use proxyctl_policy::{Exclusions, Policy};
use proxyctl_testkit::NetNs;

const PROXY_PORT: u16 = 15001;
const POD: &str = "10.88.0.1";
const PEER: &str = "10.88.0.2";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rules {
    None,
    Ours,
    Legacy,
    IptNft,
}

impl Rules {
    fn label(self) -> &'static str {
        match self {
            Rules::None => "no rules, direct to :15001",
            Rules::Ours => "proxyctl (nftables sets)",
            Rules::Legacy => "iptables-legacy (istio-style)",
            Rules::IptNft => "iptables-nft (istio-style)",
        }
    }
}

/// 10,000 (or `n`) /24s in 100.64.0.0/10, none holding the destination.
fn exception_cidrs(n: usize) -> Vec<IpNet> {
    (0..n as u32)
        .map(|i| {
            let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (i << 8);
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), 24).unwrap())
        })
        .collect()
}

fn policy(exceptions: usize) -> Policy {
    let mut p = Policy {
        name: "sidecar".into(),
        outbound_port: Some(PROXY_PORT),
        exclude: Exclusions {
            uids: vec![1337],
            gids: vec![1337],
            ..Default::default()
        },
        ..Policy::default()
    };
    p.outbound_exceptions.cidrs = exception_cidrs(exceptions);
    p.checked().unwrap()
}

/// What istio-iptables writes for outbound capture (nat OUTPUT ->
/// ISTIO_OUTPUT -> ISTIO_REDIRECT), one RETURN rule per excluded CIDR.
fn istio_rules(exceptions: usize) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n\
         -A OUTPUT -p tcp -j ISTIO_OUTPUT\n\
         -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
         -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN\n\
         -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
         -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n\
         -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n",
    );
    for cidr in exception_cidrs(exceptions) {
        r += &format!("-A ISTIO_OUTPUT -d {cidr} -j RETURN\n");
    }
    r += "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
    r
}

fn restore(ns: &NetNs, bin: &str, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), bin])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
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

/// A pod namespace (with the rules) and its peer; dropped after the round.
struct Setup {
    pod: NetNs,
    _peer: NetNs,
    dest: SocketAddr,
}

fn setup(rules: Rules, exceptions: usize) -> Setup {
    let pod = NetNs::new("dp");
    let peer = NetNs::new("dpp");
    pod.run(&[
        "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ]);
    pod.run(&["ip", "link", "set", "v1", "netns", peer.name()]);
    pod.run(&["ip", "addr", "add", &format!("{POD}/24"), "dev", "v0"]);
    pod.run(&["ip", "link", "set", "v0", "up"]);
    peer.run(&["ip", "addr", "add", &format!("{PEER}/24"), "dev", "v1"]);
    peer.run(&["ip", "link", "set", "v1", "up"]);
    let dest = match rules {
        Rules::None => SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
        _ => SocketAddr::new(PEER.parse().unwrap(), 80),
    };
    match rules {
        Rules::None => {}
        Rules::Ours => {
            proxyctl_nft::apply(&Target::Path(pod.path()), &[policy(exceptions)]).unwrap()
        }
        Rules::Legacy => restore(&pod, "iptables-legacy-restore", &istio_rules(exceptions)),
        Rules::IptNft => restore(&pod, "iptables-nft-restore", &istio_rules(exceptions)),
    }
    Setup {
        pod,
        _peer: peer,
        dest,
    }
}

fn set_linger_zero(fd: i32) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

/// `conns` connections: (connections per second, connect() times).
fn round(s: &Setup, conns: usize) -> (f64, Vec<Duration>) {
    let dest = s.dest;
    s.pod.enter(move || {
        let listener = TcpListener::bind(("0.0.0.0", PROXY_PORT)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut times = Vec::with_capacity(conns);
        let start = Instant::now();
        for _ in 0..conns {
            let t0 = Instant::now();
            let client = TcpStream::connect(dest).expect("connect through the redirect");
            times.push(t0.elapsed());
            // The handshake completed before connect returned: the
            // connection is in the proxy's accept queue.
            let (server, _) = loop {
                match listener.accept() {
                    Ok(c) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::yield_now()
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            set_linger_zero(client.as_raw_fd());
            set_linger_zero(server.as_raw_fd());
        }
        let rate = conns as f64 / start.elapsed().as_secs_f64();
        (rate, times)
    })
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Replacing apply of the typical policy: (commit acknowledged, whole call).
fn replacing_apply(runs: usize) -> (Duration, Duration) {
    let mut enforce = Vec::new();
    let mut whole = Vec::new();
    for _ in 0..runs {
        let ns = NetNs::new("dpa");
        let t = Target::Path(ns.path());
        let p = policy(0);
        proxyctl_nft::apply(&t, std::slice::from_ref(&p)).unwrap();
        let t0 = Instant::now();
        let committed = proxyctl_nft::apply_timed(&t, std::slice::from_ref(&p)).unwrap();
        whole.push(t0.elapsed());
        enforce.push(committed);
    }
    (median(&mut enforce), median(&mut whole))
}

fn legacy_replace(runs: usize) -> Duration {
    let mut v = Vec::new();
    for _ in 0..runs {
        let ns = NetNs::new("dpl");
        let rules = istio_rules(0);
        restore(&ns, "iptables-legacy-restore", &rules);
        // Timed inside the namespace: the restore binary alone, as the
        // apply bench does (no `ip netns exec` in the measurement).
        let path = ns.path();
        let d = proxyctl_testkit::in_netns(&path, move || {
            let t0 = Instant::now();
            let mut child = Command::new("iptables-legacy-restore")
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(rules.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
            t0.elapsed()
        });
        v.push(d);
    }
    median(&mut v)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("datapath bench: needs root (network namespaces); skipped");
        return;
    }
    let conns = env("CONNS", 4000);
    let rounds = env("ROUNDS", 5);
    let configs: Vec<(Rules, usize)> = vec![
        (Rules::None, 0),
        (Rules::Ours, 0),
        (Rules::Legacy, 0),
        (Rules::IptNft, 0),
        (Rules::Ours, 10_000),
        (Rules::Legacy, 10_000),
        (Rules::IptNft, 10_000),
    ];
    // Rules are installed once per configuration; rounds interleave.
    let setups: Vec<Setup> = configs.iter().map(|(r, n)| setup(*r, *n)).collect();
    for s in &setups {
        round(s, conns / 10); // warm-up
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, s) in setups.iter().enumerate() {
            let (rate, t) = round(s, conns);
            rates[i].push(rate);
            times[i].extend(t);
        }
    }
    drop(setups);
    let med_rate = |i: usize| {
        let mut r = rates[i].clone();
        r.sort_by(|a, b| a.total_cmp(b));
        r[r.len() / 2]
    };
    let base = median(&mut times[0].clone());
    println!(
        "new connections through the redirect: {rounds} rounds x {conns} connections, \
         median of rounds (rate) and of all connects (latency)\n"
    );
    println!(
        "{:<32} {:>11} {:>11} {:>13} {:>13} {:>12} {:>12}",
        "rules", "exceptions", "conn/s", "connect p50", "connect p99", "added p50", "vs legacy"
    );
    for (i, (rules, n)) in configs.iter().enumerate() {
        let legacy = configs
            .iter()
            .position(|c| *c == (Rules::Legacy, *n))
            .unwrap();
        let mut t = times[i].clone();
        let (p50, p99) = (median(&mut t), percentile(&mut t, 0.99));
        let ratio = if *rules == Rules::None {
            "-".to_owned()
        } else {
            format!("{:.2}x", med_rate(i) / med_rate(legacy))
        };
        println!(
            "{:<32} {:>11} {:>11.0} {:>11.1}us {:>11.1}us {:>10.1}us {:>12}",
            rules.label(),
            n,
            med_rate(i),
            us(p50),
            us(p99),
            us(p50) - us(base),
            ratio
        );
    }
    println!("\n(vs legacy: connection rate relative to iptables-legacy with the same exceptions)");
    println!("goals: >= 1x iptables-legacy with 0 exceptions; >= 3x with 10,000\n");

    let runs = env("APPLY_RUNS", 15);
    let (enforce, whole) = replacing_apply(runs);
    let legacy = legacy_replace(runs);
    println!("replacing apply of the typical policy, median of {runs} runs (ms)\n");
    println!("{:<44} {:>9} {:>10}", "", "ms", "vs legacy");
    for (label, d) in [
        ("proxyctl: batch committed (rules enforced)", enforce),
        ("proxyctl: whole call (old rules freed)", whole),
        ("iptables-legacy-restore: whole run", legacy),
    ] {
        println!(
            "{:<44} {:>9.2} {:>9.2}x",
            label,
            d.as_secs_f64() * 1000.0,
            d.as_secs_f64() / legacy.as_secs_f64()
        );
    }
}
