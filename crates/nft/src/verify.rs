//! `verify`: proves with real traffic that the namespace's policies do
//! what they say.
//!
//! A throw-away peer namespace (anonymous: it disappears with this process
//! whatever happens) is joined to the target by a veth pair with probe
//! addresses 198.18.0.1/30 and 2001:db8:7e1::1/64 on the target's end and
//! .2/::2 on the peer's, so "remote" destinations exist without any packet
//! leaving these two namespaces. Then:
//! - outbound probes connect (TCP) or send (UDP) from the target to the
//!   peer, as a redirected identity and as each excluded uid, gid and user
//!   (per-thread setfsuid/setfsgid: sockets take their owner from them), and
//!   to each excepted port;
//! - inbound probes come from the peer to the target's probe address;
//! - every rule gets its probe: each excepted port, an address inside each
//!   exception CIDR and each remote match address (up to four per list),
//!   and DNS (port 53, UDP and TCP) where a policy captures it. Such an
//!   address is added to the peer's end only, and the target reaches it by
//!   a source rule (`from 198.18.0.1 lookup 2018`, and the IPv6 probe
//!   address): only the probes' own packets are routed into the peer, the
//!   pod's traffic to that address is not hijacked meanwhile;
//! - destination proxies (DNAT) are probed when their proxy address is in
//!   the target: with a temporary route into the peer when the target has
//!   no route to the destination (then bypasses are observed too), else
//!   only as the redirected identity, so no excluded identity's probe is
//!   sent to a real destination on purpose.
//!
//! Not probed: local match addresses (the probe would need that address on
//! the pod's own interface).
//!
//! verify listens on every proxy port itself (TCP listeners reading
//! SO_ORIGINAL_DST, UDP IP_TRANSPARENT sockets reading IP_RECVORIGDSTADDR)
//! and puts servers on the probe destinations, so each probe is observed
//! either at a proxy port with its original destination, or at the real
//! destination (bypassed). The expectation comes from the policies as
//! `list` reads them, evaluated by an independent model of their meaning.
//!
//! A port verify cannot listen on (the real proxy is running, or a service
//! listens on an excepted port) is observed another way: for TCP, the
//! target's conntrack entry of the probe says where the kernel sent it
//! (NATed to which port, from which original destination). A UDP probe to
//! such a port cannot be observed: its row says NOT VERIFIED, which is
//! reported but is not a mismatch. Only mismatches fail the run.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use ipnet::IpNet;
use proxyctl_link::Rtnl;
use proxyctl_policy::{Policy, Protocol, loopback_nets};
use serde::Serialize;

use crate::probe;
use crate::ruleset::{self, ResolvedPolicy};
use crate::{NftError, Target};

const LOCAL_V4: &str = "198.18.0.1";
const PEER_V4: &str = "198.18.0.2";
const LOCAL_V6: &str = "2001:db8:7e1::1";
const PEER_V6: &str = "2001:db8:7e1::2";
/// Destination port of probes not aimed at an exception.
const PROBE_PORT: u16 = 40123;
const WAIT: Duration = Duration::from_millis(1500);

/// One probe: what was sent, what the policies say should happen, what did.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyRow {
    pub identity: String,
    pub direction: String,
    pub protocol: String,
    pub family: String,
    pub destination: String,
    pub expected: String,
    pub observed: String,
    /// False only for a mismatch.
    pub ok: bool,
    /// False when the probe could not be observed (reported, not a failure).
    pub verified: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub rows: Vec<VerifyRow>,
}

impl VerifyReport {
    /// True when there was something to verify and no probe mismatched.
    pub fn ok(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.ok)
    }

    /// Rows whose probe could not be observed.
    pub fn unverified(&self) -> usize {
        self.rows.iter().filter(|r| !r.verified).count()
    }

    /// A fixed-width table for terminals.
    pub fn table(&self) -> String {
        let headers = [
            "IDENTITY",
            "DIR",
            "PROTO",
            "FAMILY",
            "DESTINATION",
            "EXPECTED",
            "OBSERVED",
            "",
        ];
        let rows: Vec<[String; 8]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.identity.clone(),
                    r.direction.clone(),
                    r.protocol.clone(),
                    r.family.clone(),
                    r.destination.clone(),
                    r.expected.clone(),
                    r.observed.clone(),
                    match (r.ok, r.verified) {
                        (false, _) => "MISMATCH",
                        (true, true) => "ok",
                        (true, false) => "NOT VERIFIED",
                    }
                    .to_owned(),
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[&str]| {
            let parts: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(&headers);
        for r in &rows {
            line(&r.iter().map(String::as_str).collect::<Vec<_>>());
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Out,
    In,
}

#[derive(Debug, Clone)]
struct Probe {
    label: String,
    uid: u32,
    gid: u32,
    dir: Dir,
    proto: Protocol,
    v4: bool,
    dport: u16,
    /// The remote side's address when not the peer's probe address: the
    /// destination of an outbound probe, the source of an inbound one.
    addr: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Redirected { port: u16, original_dst: SocketAddr },
    Bypassed,
}

/// What the policies (in evaluation order) say should happen to a packet.
fn expect(policies: &[ResolvedPolicy], p: &Probe, src: SocketAddr, dst: SocketAddr) -> Option<u16> {
    policies
        .iter()
        .find_map(|rp| dns_port(rp, p, dst).or_else(|| redirect_port(rp, p, src, dst)))
}

fn excluded(rp: &ResolvedPolicy, p: &Probe) -> bool {
    let ex = &rp.policy.exclude;
    ex.uids.contains(&p.uid)
        || ex.gids.contains(&p.gid)
        || rp.users.iter().any(|(_, uid)| *uid == p.uid)
}

/// DNS capture: outbound UDP and TCP to port 53, whatever the protocols.
fn dns_port(rp: &ResolvedPolicy, p: &Probe, dst: SocketAddr) -> Option<u16> {
    let port = rp.policy.dns_port?;
    (p.dir == Dir::Out
        && dst.port() == ruleset::DNS_PORT
        && rp.policy.covers(&dst.ip())
        && !excluded(rp, p))
    .then_some(port)
}

fn redirect_port(rp: &ResolvedPolicy, p: &Probe, src: SocketAddr, dst: SocketAddr) -> Option<u16> {
    let pol: &Policy = &rp.policy;
    if !pol.has_protocol(p.proto) || !pol.covers(&dst.ip()) {
        return None;
    }
    let in_nets = |nets: &[ipnet::IpNet], ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
    let in_ports =
        |ports: &[proxyctl_policy::PortRange], port: u16| ports.iter().any(|r| r.contains(port));
    let m = &pol.matching;
    // local = this namespace's side; remote = the peer's.
    let (local, remote, port, exceptions) = match p.dir {
        Dir::Out => (src, dst, pol.outbound_port?, &pol.outbound_exceptions),
        Dir::In => (dst, src, pol.inbound_port?, &pol.inbound_exceptions),
    };
    if p.dir == Dir::Out {
        if excluded(rp, p) {
            return None;
        }
        if in_nets(&loopback_nets(), dst.ip()) {
            return None;
        }
    }
    // Outbound exceptions name destinations; inbound ones the local port
    // and the peer's address.
    let (ex_port, ex_addr) = match p.dir {
        Dir::Out => (dst.port(), dst.ip()),
        Dir::In => (dst.port(), src.ip()),
    };
    if in_ports(&exceptions.ports, ex_port) || in_nets(&exceptions.cidrs, ex_addr) {
        return None;
    }
    let miss_nets = |nets: &[ipnet::IpNet], ip| !nets.is_empty() && !in_nets(nets, ip);
    let miss_ports =
        |ports: &[proxyctl_policy::PortRange], port| !ports.is_empty() && !in_ports(ports, port);
    if miss_nets(&m.local_addresses, local.ip())
        || miss_nets(&m.remote_addresses, remote.ip())
        || miss_ports(&m.local_ports, local.port())
        || miss_ports(&m.remote_ports, remote.port())
    {
        return None;
    }
    Some(port)
}

/// Removes the probe veth pair and the probes' source rules from the
/// target (the peer namespace goes away on its own when its file is
/// closed; the table's routes go with the veth).
struct VethGuard {
    target: Target,
    name: String,
}

impl Drop for VethGuard {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = self.target.run_in(move || {
            let mut rt = rtnl()?;
            let _ = rt.delete_link(&name);
            for from in [LOCAL_V4, LOCAL_V6] {
                let from = from.parse().expect("literal");
                let _ = rt.delete_source_rule(from, PROBE_TABLE, PROBE_RULE_PREF);
            }
            Ok(())
        });
    }
}

/// The routing table (and rule preference) of the probes' source rules:
/// after the UDP tproxy rule (1300), before the main table.
const PROBE_TABLE: u32 = 2018;
const PROBE_RULE_PREF: u32 = 1400;

/// A route netlink socket of the calling thread's namespace (links,
/// addresses, routes and rules without running iproute2).
fn rtnl() -> Result<Rtnl, NftError> {
    Rtnl::new().map_err(link_err)
}

fn link_err(e: proxyctl_link::LinkError) -> NftError {
    NftError::io("probe network", std::io::Error::other(e.to_string()))
}

fn net(s: &str) -> IpNet {
    s.parse().expect("literal")
}

/// Listeners verify holds on one side.
#[derive(Default)]
struct Listeners {
    tcp: Vec<(u16, TcpListener)>,
    udp: Vec<(u16, UdpSocket)>,
    busy: Vec<(Protocol, u16)>,
}

impl Listeners {
    fn is_busy(&self, proto: Protocol, port: u16) -> bool {
        self.busy.contains(&(proto, port))
    }

    /// Binds TCP and UDP independently: a TCP service on a port does not
    /// make the UDP port busy, nor the other way round.
    fn bind(
        &mut self,
        port: u16,
        addr: SocketAddr,
        udp: impl Fn(SocketAddr) -> std::io::Result<UdpSocket>,
    ) {
        match probe::tcp_listener(addr) {
            Ok(t) => self.tcp.push((port, t)),
            Err(_) => self.busy.push((Protocol::Tcp, port)),
        }
        match udp(addr) {
            Ok(u) => self.udp.push((port, u)),
            Err(_) => self.busy.push((Protocol::Udp, port)),
        }
    }
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal address"), port)
}

/// Probes the policies held in `target`'s namespace; see the module docs.
pub fn verify(target: &Target) -> Result<VerifyReport, NftError> {
    let [sock] = target.sockets([libc::NETLINK_NETFILTER])?;
    let (table, _) = crate::read_table(&sock)?;
    let mut policies = match table {
        Some(t) => ruleset::decode_policies(&t).map_err(NftError::Decode)?,
        None => Vec::new(),
    };
    if policies.is_empty() {
        return Ok(VerifyReport { rows: Vec::new() });
    }
    ruleset::evaluation_order(&mut policies);
    // A policy whose rules were partly removed behind our back reads back
    // as an invalid policy: that is a failure in itself.
    let mut rows: Vec<VerifyRow> = policies
        .iter()
        .filter_map(|rp| {
            let err = rp.policy.validate().err()?;
            Some(VerifyRow {
                identity: "-".into(),
                direction: "-".into(),
                protocol: "-".into(),
                family: "-".into(),
                destination: format!("policy {}", rp.policy.name),
                expected: "a complete policy".into(),
                observed: format!("incomplete in the kernel: {err}"),
                ok: false,
                verified: true,
            })
        })
        .collect();

    // The peer namespace and the veth pair between it and the target.
    let peer_file: File =
        probe::anonymous_netns().map_err(|e| NftError::io("creating the probe namespace", e))?;
    let peer_path = format!("/proc/{}/fd/{}", std::process::id(), peer_file.as_raw_fd());
    let peer = Target::Path(peer_path.clone().into());
    let n = std::process::id() % 100_000;
    let (a, b) = (format!("pxv{n}a"), format!("pxv{n}b"));
    {
        let (a, b) = (a.clone(), b.clone());
        let peer_ns = peer_file
            .try_clone()
            .map_err(|e| NftError::io("probe namespace", e))?;
        target.run_in(move || {
            rtnl()?
                .add_veth(&a, &b, Some(peer_ns.as_fd()))
                .map_err(link_err)
        })?;
    }
    let _veth = VethGuard {
        target: target.clone(),
        name: a.clone(),
    };
    {
        let a = a.clone();
        target.run_in(move || {
            let mut rt = rtnl()?;
            rt.add_address(&a, net(&format!("{LOCAL_V4}/30")))
                .map_err(link_err)?;
            rt.add_address(&a, net(&format!("{LOCAL_V6}/64")))
                .map_err(link_err)?;
            rt.set_up(&a).map_err(link_err)
        })?;
        let b = b.clone();
        peer.run_in(move || {
            let mut rt = rtnl()?;
            rt.add_address(&b, net(&format!("{PEER_V4}/30")))
                .map_err(link_err)?;
            rt.add_address(&b, net(&format!("{PEER_V6}/64")))
                .map_err(link_err)?;
            rt.set_up(&b).map_err(link_err)
        })?;
    }

    // Only the probes (sourced from the probe addresses) are routed into
    // the peer, whatever their destination.
    {
        let a = a.clone();
        target.run_in(move || {
            let mut rt = rtnl()?;
            for (default, from) in [("0.0.0.0/0", LOCAL_V4), ("::/0", LOCAL_V6)] {
                rt.add_route_via_link_in(net(default), &a, PROBE_TABLE)
                    .map_err(link_err)?;
                rt.add_source_rule(from.parse().expect("literal"), PROBE_TABLE, PROBE_RULE_PREF)
                    .map_err(link_err)?;
            }
            Ok(())
        })?;
    }

    let probes = plan(&policies);
    // The sampled addresses exist on the peer's end only.
    let mut samples: Vec<IpAddr> = probes.iter().filter_map(|p| p.addr).collect();
    samples.sort();
    samples.dedup();
    {
        let (b, samples) = (b.clone(), samples.clone());
        peer.run_in(move || {
            let mut rt = rtnl()?;
            for addr in samples {
                rt.add_address(&b, IpNet::from(addr)).map_err(link_err)?;
            }
            Ok(())
        })?;
    }
    let families: Vec<bool> = {
        let mut f: Vec<bool> = probes.iter().map(|p| p.v4).collect();
        f.sort();
        f.dedup();
        f
    };
    let mut dports: Vec<u16> = probes.iter().map(|p| p.dport).collect();
    dports.sort();
    dports.dedup();

    // Proxy listeners in the target, on every proxy port.
    let mut proxy_ports: Vec<u16> = policies
        .iter()
        .flat_map(|p| {
            [
                p.policy.outbound_port,
                p.policy.inbound_port,
                p.policy.dns_port,
            ]
        })
        .flatten()
        .collect();
    proxy_ports.sort();
    proxy_ports.dedup();
    let dns_ports: Vec<u16> = policies.iter().filter_map(|p| p.policy.dns_port).collect();
    let proxies = {
        let (ports, fams) = (proxy_ports.clone(), families.clone());
        target.run_in(move || {
            let mut l = Listeners::default();
            for port in ports {
                for &v4 in &fams {
                    let any = if v4 { "0.0.0.0" } else { "::" };
                    l.bind(port, sa(any, port), probe::udp_tproxy_socket);
                }
            }
            Ok(l)
        })?
    };
    // Servers at the real destinations: outbound ones in the peer (on every
    // address, so sampled destinations reach them too), inbound ones on the
    // target's probe addresses.
    let servers = |t: &Target, v4_ip: &'static str, v6_ip: &'static str| {
        let (ports, fams) = (dports.clone(), families.clone());
        t.run_in(move || {
            let mut l = Listeners::default();
            for port in ports {
                for &v4 in &fams {
                    let addr = sa(if v4 { v4_ip } else { v6_ip }, port);
                    l.bind(port, addr, probe::udp_server);
                }
            }
            Ok(l)
        })
    };
    let peer_servers = servers(&peer, "0.0.0.0", "::")?;
    let local_servers = servers(target, LOCAL_V4, LOCAL_V6)?;

    for (i, p) in probes.iter().enumerate() {
        let token = format!("proxyctl-verify-{}-{i}", std::process::id()).into_bytes();
        let (src_ip, dst_ip, from, bypass) = match (p.dir, p.v4) {
            (Dir::Out, true) => (LOCAL_V4, PEER_V4, target, &peer_servers),
            (Dir::Out, false) => (LOCAL_V6, PEER_V6, target, &peer_servers),
            (Dir::In, true) => (PEER_V4, LOCAL_V4, &peer, &local_servers),
            (Dir::In, false) => (PEER_V6, LOCAL_V6, &peer, &local_servers),
        };
        let (mut src, mut dst) = (sa(src_ip, 0), sa(dst_ip, p.dport));
        match (p.dir, p.addr) {
            (Dir::Out, Some(addr)) => dst.set_ip(addr),
            (Dir::In, Some(addr)) => src.set_ip(addr),
            (_, None) => {}
        }
        let sent = send_probe(from, p, src, dst, &token);
        let row = |expected: String, observed: String, ok: bool, verified: bool| VerifyRow {
            identity: p.label.clone(),
            direction: match p.dir {
                Dir::Out => "out".into(),
                Dir::In => format!("in from {}", src.ip()),
            },
            protocol: p.proto.to_string(),
            family: if p.v4 { "ipv4" } else { "ipv6" }.into(),
            destination: dst.to_string(),
            expected,
            observed,
            ok,
            verified,
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => {
                rows.push(row("-".into(), format!("probe failed: {e}"), false, true));
                continue;
            }
        };
        let want = expect(&policies, p, sent.source, dst);
        let expected = match want {
            Some(port) => format!("redirect :{port}"),
            None => "bypass".to_owned(),
        };
        // Someone else holds the port the probe should (or may) reach.
        let busy = want.is_some_and(|port| proxies.is_busy(p.proto, port))
            || (want.is_none() && bypass.is_busy(p.proto, p.dport));
        let mut observed = if busy {
            None
        } else {
            observe(p.proto, &proxies, bypass, &token, sent.stream)
        };
        let mut via = "";
        // NATed UDP (DNS capture) arrives with its rewritten destination:
        // the original one is in conntrack.
        if let Some(Outcome::Redirected { port, original_dst }) = &mut observed
            && p.proto == Protocol::Udp
            && dns_ports.contains(port)
            && let Ok(Some((orig, _))) = crate::conntrack::nat_of(&sock, 17, sent.source)
        {
            *original_dst = orig;
        }
        if observed.is_none() && p.proto == Protocol::Tcp {
            // The kernel's own record of where it sent the connection.
            observed = match crate::conntrack::nat_of(&sock, 6, sent.source) {
                Ok(Some((orig, Some(port)))) => Some(Outcome::Redirected {
                    port,
                    original_dst: orig,
                }),
                Ok(Some((_, None))) => Some(Outcome::Bypassed),
                _ => None,
            };
            via = " (conntrack)";
        }
        if observed.is_none() && busy {
            let port = want.unwrap_or(p.dport);
            rows.push(row(
                expected,
                format!("NOT VERIFIED: udp port {port} is in use (proxy or service running?)"),
                true,
                false,
            ));
            continue;
        }
        let ok = match (&observed, want) {
            (Some(Outcome::Redirected { port, original_dst }), Some(w)) => {
                *port == w && *original_dst == dst
            }
            (Some(Outcome::Bypassed), None) => true,
            _ => false,
        };
        let observed = match observed {
            Some(Outcome::Redirected { port, original_dst }) => {
                format!("redirect :{port} (orig dst {original_dst}){via}")
            }
            Some(Outcome::Bypassed) => format!("bypass{via}"),
            None => "nothing arrived".into(),
        };
        rows.push(row(expected, observed, ok, true));
    }
    rows.extend(dnat_rows(target, &peer, &a, &b, &policies, &proxies)?);
    drop(peer_file);
    Ok(VerifyReport { rows })
}

/// Where the policies send an outbound TCP connection to `dst` by `uid/gid`
/// (destination proxies included): a proxy port, a DNAT proxy, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Port(u16),
    Dnat(SocketAddr),
    Bypass,
}

fn expect_outbound_tcp(
    policies: &[ResolvedPolicy],
    p: &Probe,
    src: SocketAddr,
    dst: SocketAddr,
) -> Expect {
    for rp in policies {
        let pol = &rp.policy;
        let ex = &pol.exclude;
        let excluded = ex.uids.contains(&p.uid)
            || ex.gids.contains(&p.gid)
            || rp.users.iter().any(|(_, uid)| *uid == p.uid);
        if excluded || !pol.covers(&dst.ip()) {
            continue;
        }
        if let Some(dp) = pol.destination_proxy
            && dp.destination == dst
        {
            return Expect::Dnat(dp.proxy);
        }
        if let Some(port) = redirect_port(rp, p, src, dst) {
            return Expect::Port(port);
        }
    }
    Expect::Bypass
}

/// Probes each destination proxy (DNAT) whose proxy address is in the
/// target. When the target has no route to the destination, a temporary one
/// leads into the peer (which then answers for it, so bypasses are seen);
/// when it has one, only the redirected identity is probed, so verify never
/// sends an excluded identity's probe to a real destination on purpose.
fn dnat_rows(
    target: &Target,
    peer: &Target,
    a: &str,
    b: &str,
    policies: &[ResolvedPolicy],
    proxies: &Listeners,
) -> Result<Vec<VerifyRow>, NftError> {
    let mut dps: Vec<proxyctl_policy::DestinationProxy> = policies
        .iter()
        .filter_map(|p| p.policy.destination_proxy)
        .collect();
    dps.dedup();
    let identities = identities(policies);
    let mut rows = Vec::new();
    for dp in dps {
        let dest = dp.destination;
        let v4 = dest.is_ipv4();
        let row = |label: &str, expected: String, observed: String, ok: bool| VerifyRow {
            identity: label.to_owned(),
            direction: "out".into(),
            protocol: "tcp".into(),
            family: if v4 { "ipv4" } else { "ipv6" }.into(),
            destination: dest.to_string(),
            expected,
            verified: !observed.starts_with("NOT VERIFIED"),
            ok: ok || observed.starts_with("NOT VERIFIED"),
            observed,
        };
        let listener = target.run_in(move || Ok(probe::tcp_listener(dp.proxy)))?;
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                let why = if e.raw_os_error() == Some(libc::EADDRINUSE) {
                    format!("NOT VERIFIED: {} is in use (proxy running?)", dp.proxy)
                } else {
                    format!("NOT VERIFIED: cannot listen on {} here: {e}", dp.proxy)
                };
                rows.push(row(
                    &identities[0].0,
                    format!("dnat {}", dp.proxy),
                    why,
                    false,
                ));
                continue;
            }
        };
        let routed = {
            let d = dest.ip();
            target.run_in(move || rtnl()?.has_route(d).map_err(link_err))?
        };
        let server = if routed {
            None
        } else {
            let (d, a) = (IpNet::from(dest.ip()), a.to_owned());
            target.run_in(move || rtnl()?.add_route_via_link(d, &a).map_err(link_err))?;
            let b = b.to_owned();
            peer.run_in(move || {
                rtnl()?.add_address(&b, d).map_err(link_err)?;
                probe::tcp_listener(dest).map_err(|e| NftError::io("probe server", e))
            })
            .ok()
        };
        let who: Vec<_> = if server.is_some() {
            identities.clone()
        } else {
            identities[..1].to_vec()
        };
        for (i, (label, uid, gid)) in who.into_iter().enumerate() {
            let p = Probe {
                label: label.clone(),
                uid,
                gid,
                dir: Dir::Out,
                proto: Protocol::Tcp,
                v4,
                dport: dest.port(),
                addr: None,
            };
            let src = SocketAddr::new(probe::unspecified_like(dest.ip()), 0);
            let token = format!("proxyctl-verify-dnat-{}-{i}", std::process::id()).into_bytes();
            let sent = send_probe(target, &p, src, dest, &token);
            let source = match sent {
                Ok(s) => s.source,
                Err(e) => {
                    rows.push(row(&label, "-".into(), format!("probe failed: {e}"), false));
                    continue;
                }
            };
            let want = expect_outbound_tcp(policies, &p, source, dest);
            let expected = match want {
                Expect::Dnat(to) => format!("dnat {to}"),
                Expect::Port(port) => format!("redirect :{port}"),
                Expect::Bypass => "bypass".into(),
            };
            let mut seen = None;
            let deadline = std::time::Instant::now() + WAIT;
            while seen.is_none() && std::time::Instant::now() < deadline {
                if let Some(s) = accept_token(&listener, &token) {
                    let orig = probe::original_dst(&s).ok();
                    seen = Some((Expect::Dnat(dp.proxy), orig));
                } else if let Some(s) = server.as_ref().and_then(|l| accept_token(l, &token)) {
                    seen = Some((Expect::Bypass, s.local_addr().ok()));
                } else if let Some((port, s)) = proxies
                    .tcp
                    .iter()
                    .find_map(|(port, l)| accept_token(l, &token).map(|s| (*port, s)))
                {
                    seen = Some((Expect::Port(port), probe::original_dst(&s).ok()));
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let (observed, ok) = match seen {
                Some((Expect::Dnat(to), orig)) => (
                    format!(
                        "dnat {to} (orig dst {})",
                        orig.map_or("?".into(), |o| o.to_string())
                    ),
                    want == Expect::Dnat(to) && orig == Some(dest),
                ),
                Some((Expect::Port(port), orig)) => (
                    format!("redirect :{port}"),
                    want == Expect::Port(port) && orig == Some(dest),
                ),
                Some((Expect::Bypass, _)) => ("bypass".into(), want == Expect::Bypass),
                None => ("nothing arrived".into(), false),
            };
            rows.push(row(&label, expected, observed, ok));
        }
    }
    Ok(rows)
}

/// Accepts a pending connection carrying `token`, if there is one.
fn accept_token(listener: &TcpListener, token: &[u8]) -> Option<std::net::TcpStream> {
    let (mut s, _) = listener.accept().ok()?;
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    let mut buf = vec![0u8; token.len()];
    s.read_exact(&mut buf).ok()?;
    (buf == token).then_some(s)
}

/// Who probes outbound: an identity no policy excludes ("app"), then each
/// excluded uid, user and gid.
fn identities(policies: &[ResolvedPolicy]) -> Vec<(String, u32, u32)> {
    let mut excluded_uids: BTreeMap<u32, String> = BTreeMap::new();
    let mut excluded_gids: BTreeMap<u32, String> = BTreeMap::new();
    for rp in policies {
        for uid in &rp.policy.exclude.uids {
            excluded_uids.insert(*uid, format!("uid {uid}"));
        }
        for (user, uid) in &rp.users {
            excluded_uids.insert(*uid, format!("user {user}"));
        }
        for gid in &rp.policy.exclude.gids {
            excluded_gids.insert(*gid, format!("gid {gid}"));
        }
    }
    let free = |taken: &BTreeMap<u32, String>| {
        (60000..u32::MAX)
            .find(|id| !taken.contains_key(id))
            .unwrap_or(60000)
    };
    let (app_uid, app_gid) = (free(&excluded_uids), free(&excluded_gids));
    let mut identities = vec![(format!("app {app_uid}:{app_gid}"), app_uid, app_gid)];
    for (uid, label) in &excluded_uids {
        identities.push((label.clone(), *uid, app_gid));
    }
    for (gid, label) in &excluded_gids {
        identities.push((label.clone(), app_uid, *gid));
    }
    identities
}

/// An address inside `net` (its first host, or the address of a host
/// prefix), unless it is loopback (never routed into the peer).
fn sample(net: &ipnet::IpNet) -> Option<IpAddr> {
    let addr = match net {
        ipnet::IpNet::V4(n) if n.prefix_len() < 31 => {
            IpAddr::from(std::net::Ipv4Addr::from(u32::from(n.network()) + 1))
        }
        ipnet::IpNet::V6(n) if n.prefix_len() < 127 => {
            IpAddr::from(std::net::Ipv6Addr::from(u128::from(n.network()) + 1))
        }
        n => n.network(),
    };
    let reserved: [IpAddr; 4] = [
        LOCAL_V4.parse().expect("literal"),
        PEER_V4.parse().expect("literal"),
        LOCAL_V6.parse().expect("literal"),
        PEER_V6.parse().expect("literal"),
    ];
    (!addr.is_loopback()
        && !addr.is_unspecified()
        && !addr.is_multicast()
        && !reserved.contains(&addr))
    .then_some(addr)
}

/// How many addresses of one list are probed.
const SAMPLES_PER_LIST: usize = 4;

/// The probes worth sending for these policies: every identity, excepted
/// port, exception CIDR, remote match address and DNS capture.
fn plan(policies: &[ResolvedPolicy]) -> Vec<Probe> {
    let pols: Vec<&Policy> = policies.iter().map(|p| &p.policy).collect();
    let identities = identities(policies);
    let (app_uid, app_gid) = (identities[0].1, identities[0].2);
    let app = format!("app {app_uid}:{app_gid}");
    let mut protos: Vec<Protocol> = pols.iter().flat_map(|p| p.protocols.clone()).collect();
    let any_dns = pols.iter().any(|p| p.dns_port.is_some());
    if any_dns {
        protos.extend([Protocol::Tcp, Protocol::Udp]);
    }
    protos.sort();
    protos.dedup();
    let fams: Vec<bool> = [true, false]
        .into_iter()
        .filter(|&v4| {
            pols.iter().any(|p| {
                if v4 {
                    p.family.has_ipv4()
                } else {
                    p.family.has_ipv6()
                }
            })
        })
        .collect();
    let any_out = pols
        .iter()
        .any(|p| p.outbound_port.is_some() || p.dns_port.is_some());
    let any_in = pols.iter().any(|p| p.inbound_port.is_some());
    let mut out_ports = vec![];
    let mut in_ports = vec![];
    let mut out_addrs: Vec<IpAddr> = Vec::new();
    let mut in_addrs: Vec<IpAddr> = Vec::new();
    for p in &pols {
        let take = |nets: &[ipnet::IpNet]| -> Vec<IpAddr> {
            nets.iter()
                .filter_map(sample)
                .take(SAMPLES_PER_LIST)
                .collect()
        };
        if p.outbound_port.is_some() {
            out_ports.extend(
                p.outbound_exceptions
                    .ports
                    .iter()
                    .take(SAMPLES_PER_LIST)
                    .map(|r| r.start),
            );
            out_addrs.extend(take(&p.outbound_exceptions.cidrs));
            out_addrs.extend(take(&p.matching.remote_addresses));
        }
        if p.inbound_port.is_some() {
            in_ports.extend(
                p.inbound_exceptions
                    .ports
                    .iter()
                    .take(SAMPLES_PER_LIST)
                    .map(|r| r.start),
            );
            in_addrs.extend(take(&p.inbound_exceptions.cidrs));
            in_addrs.extend(take(&p.matching.remote_addresses));
        }
    }
    if any_dns {
        out_ports.push(ruleset::DNS_PORT);
    }
    for v in [&mut out_ports, &mut in_ports] {
        v.retain(|&p| p != PROBE_PORT);
        v.sort();
        v.dedup();
    }
    for v in [&mut out_addrs, &mut in_addrs] {
        v.sort();
        v.dedup();
    }

    let mut probes = Vec::new();
    for &proto in &protos {
        for &v4 in &fams {
            let app_probe = |dir, dport, addr| Probe {
                label: if dir == Dir::Out {
                    app.clone()
                } else {
                    "peer".into()
                },
                uid: if dir == Dir::Out { app_uid } else { 0 },
                gid: if dir == Dir::Out { app_gid } else { 0 },
                dir,
                proto,
                v4,
                dport,
                addr,
            };
            let family = |a: &&IpAddr| a.is_ipv4() == v4;
            if any_out {
                for (label, uid, gid) in &identities {
                    probes.push(Probe {
                        label: label.clone(),
                        uid: *uid,
                        gid: *gid,
                        dir: Dir::Out,
                        proto,
                        v4,
                        dport: PROBE_PORT,
                        addr: None,
                    });
                }
                for &dport in &out_ports {
                    probes.push(app_probe(Dir::Out, dport, None));
                }
                for addr in out_addrs.iter().filter(family) {
                    probes.push(app_probe(Dir::Out, PROBE_PORT, Some(*addr)));
                }
            }
            if any_in {
                probes.push(app_probe(Dir::In, PROBE_PORT, None));
                for &dport in &in_ports {
                    probes.push(app_probe(Dir::In, dport, None));
                }
                for addr in in_addrs.iter().filter(family) {
                    probes.push(app_probe(Dir::In, PROBE_PORT, Some(*addr)));
                }
            }
        }
    }
    probes
}

struct Sent {
    source: SocketAddr,
    stream: Option<std::net::TcpStream>,
}

/// Sends one probe from a thread inside `from`, under the probe's identity.
fn send_probe(
    from: &Target,
    p: &Probe,
    src: SocketAddr,
    dst: SocketAddr,
    token: &[u8],
) -> Result<Sent, NftError> {
    let (p, token) = (p.clone(), token.to_vec());
    from.run_in(move || {
        let io = |e| NftError::io("probe", e);
        if p.dir == Dir::Out {
            probe::set_thread_fs_ids(p.uid, p.gid).map_err(io)?;
        }
        match p.proto {
            Protocol::Tcp => {
                let mut s = probe::tcp_connect(src, dst, WAIT).map_err(io)?;
                let source = s.local_addr().map_err(io)?;
                s.write_all(&token).map_err(io)?;
                Ok(Sent {
                    source,
                    stream: Some(s),
                })
            }
            Protocol::Udp => {
                let s = probe::udp_client(src).map_err(io)?;
                let source = s.local_addr().map_err(io)?;
                s.send_to(&token, dst).map_err(io)?;
                Ok(Sent {
                    source,
                    stream: None,
                })
            }
        }
    })
}

/// Waits for the probe's token at a proxy port or at the real destination.
fn observe(
    proto: Protocol,
    proxies: &Listeners,
    bypass: &Listeners,
    token: &[u8],
    _client: Option<std::net::TcpStream>,
) -> Option<Outcome> {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        match proto {
            Protocol::Tcp => {
                for (side, l) in [(true, proxies), (false, bypass)] {
                    for (port, listener) in &l.tcp {
                        let Ok((mut s, _)) = listener.accept() else {
                            continue;
                        };
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(WAIT));
                        let mut buf = vec![0u8; token.len()];
                        if s.read_exact(&mut buf).is_err() || buf != token {
                            continue;
                        }
                        if !side {
                            return Some(Outcome::Bypassed);
                        }
                        let original_dst = probe::original_dst(&s).ok()?;
                        return Some(Outcome::Redirected {
                            port: *port,
                            original_dst,
                        });
                    }
                }
            }
            Protocol::Udp => {
                for (side, l) in [(true, proxies), (false, bypass)] {
                    for (port, sock) in &l.udp {
                        let Ok(Some(d)) = probe::recv_datagram(sock) else {
                            continue;
                        };
                        if d.payload != token {
                            continue;
                        }
                        if !side {
                            return Some(Outcome::Bypassed);
                        }
                        return Some(Outcome::Redirected {
                            port: *port,
                            original_dst: d.original_dst?,
                        });
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}
