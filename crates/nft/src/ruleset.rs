//! Policies <-> the `inet proxyctl` table.
//!
//! Owns the ruleset layout (which chains, sets and rules a policy becomes),
//! its encoding as one nf_tables batch, and the reverse: reconstructing the
//! policies from what the kernel holds. Layout, per policy NAME:
//!
//! ```text
//! nat-output        nat    output      -100  jump pol-NAME-out    (TCP redirect, DNAT)
//! nat-prerouting    nat    prerouting  -100  jump pol-NAME-in     (TCP redirect inbound)
//! mark-output       route  output      -150  jump pol-NAME-mark   (UDP: mark -> reroute via lo)
//! tproxy-prerouting filter prerouting  -150  jump pol-NAME-tproxy (UDP tproxy, both directions)
//! sets NAME-{oxp,ixp,lp,rp}           interval sets of ports (exceptions, matches)
//!      NAME-{la4,la6,ra4,ra6}          interval sets of match addresses
//!      NAME-{ox4,ox6,ix4,ix6}-LEN      hash sets of exception networks, one per
//!                                      prefix length, looked up after `& mask`
//! ```
//!
//! Exception CIDRs can be many (10,000 in the benchmark): a hash element
//! costs the kernel half what an interval does (one element, not a start
//! and an end), and a lookup is one probe per distinct prefix length, so
//! cost does not grow with the number of addresses.
//!
//! Base chains jump to policy chains by priority (higher first, ties by
//! name); a policy chain ends in a terminal redirect/tproxy, so the first
//! policy whose filters take a packet wins. Every rule carries a comment
//! naming what it implements ("exclude-uid", "except-v4", "redirect", ...):
//! the comment tells which field a rule stands for, the expressions carry
//! the value, so `list` reports what the kernel enforces.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proxyctl_policy::{DestinationProxy, Family, Policy, PortRange, Protocol};

use crate::expr::{self, Data, Expr, cmp, load, lookup, meta, payload, verdict};
use crate::netlink::{
    self, Attrs, MsgBuf, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, attr, be32,
};

pub const TABLE: &str = "proxyctl";
pub const NFPROTO_INET: u8 = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_BATCH_GENID: u16 = 1;
const NLM_F_APPEND: u16 = 0x800;

// enum nf_tables_msg_types
pub const MSG_NEWTABLE: u16 = 0;
pub const MSG_GETTABLE: u16 = 1;
pub const MSG_DELTABLE: u16 = 2;
pub const MSG_NEWCHAIN: u16 = 3;
pub const MSG_GETCHAIN: u16 = 4;
pub const MSG_NEWRULE: u16 = 6;
pub const MSG_GETRULE: u16 = 7;
pub const MSG_NEWSET: u16 = 9;
pub const MSG_GETSET: u16 = 10;
pub const MSG_NEWSETELEM: u16 = 12;
pub const MSG_GETSETELEM: u16 = 13;
pub const MSG_GETGEN: u16 = 16;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_GEN_ID: u16 = 1;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
/// libnftnl's userdata TLV type for comments (rules and chains), so `nft
/// list` shows our comments as `comment "..."`.
const UDATA_COMMENT: u8 = 0;

// Hooks (enum nf_inet_hooks).
const HOOK_PREROUTING: u32 = 0;
const HOOK_OUTPUT: u32 = 3;

/// Outbound UDP is marked `MARK_BASE | proxy port` so it is rerouted to lo
/// (policy routing) and the tproxy rule knows which port to deliver to.
pub const MARK_BASE: u32 = 0x07e1_0000;
pub const MARK_MASK: u32 = 0xffff_0000;
/// Loopback's ifindex is 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// The base chains: (name, type, hook, priority).
pub const BASE_CHAINS: [(&str, &str, u32, i32); 4] = [
    ("nat-output", "nat", HOOK_OUTPUT, -100),
    ("nat-prerouting", "nat", HOOK_PREROUTING, -100),
    ("mark-output", "route", HOOK_OUTPUT, -150),
    ("tproxy-prerouting", "filter", HOOK_PREROUTING, -150),
];

/// Which path a policy chain serves; its suffix and its base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Out,
    In,
    Mark,
    Tproxy,
    Dns,
}

impl Role {
    const ALL: [Role; 5] = [Role::Out, Role::In, Role::Mark, Role::Tproxy, Role::Dns];

    fn suffix(self) -> &'static str {
        match self {
            Role::Dns => "dns",
            Role::Out => "out",
            Role::In => "in",
            Role::Mark => "mark",
            Role::Tproxy => "tproxy",
        }
    }

    fn base(self) -> &'static str {
        match self {
            Role::Out | Role::Dns => "nat-output",
            Role::In => "nat-prerouting",
            Role::Mark => "mark-output",
            Role::Tproxy => "tproxy-prerouting",
        }
    }

    pub fn chain(self, policy: &str) -> String {
        format!("pol-{policy}-{}", self.suffix())
    }

    fn of_chain(chain: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| chain.ends_with(&format!("-{}", r.suffix())))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Port,
    V4,
    V6,
}

impl KeyKind {
    /// nft's datatype ids (TYPE_INET_SERVICE, TYPE_IPADDR, TYPE_IP6ADDR),
    /// so `nft list` prints elements as ports and addresses.
    fn nft_type(self) -> u32 {
        match self {
            KeyKind::Port => 13,
            KeyKind::V4 => 7,
            KeyKind::V6 => 8,
        }
    }

    fn len(self) -> usize {
        match self {
            KeyKind::Port => 2,
            KeyKind::V4 => 4,
            KeyKind::V6 => 16,
        }
    }
}

/// `[start, end)` key ranges; `end` is None when a range runs to the largest key.
pub type Intervals = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A named interval set: `[start, end)` ranges as key bytes; `end` is None
/// when the range runs to the largest key.
#[derive(Debug, Clone)]
pub struct SetSpec {
    pub name: String,
    pub key: KeyKind,
    pub id: u32,
    /// An interval (rbtree) set; otherwise a hash set of exact keys.
    pub interval: bool,
    pub intervals: Intervals,
}

#[derive(Debug, Clone)]
pub struct ChainSpec {
    pub name: String,
    /// (type, hook, priority) for base chains.
    pub hook: Option<(String, u32, i32)>,
    pub comment: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub chain: String,
    pub exprs: Vec<Expr>,
    pub comment: String,
}

/// A whole `inet proxyctl` table, as we build it or as the kernel holds it.
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    pub chains: Vec<ChainSpec>,
    pub sets: Vec<SetSpec>,
    pub rules: Vec<RuleSpec>,
}

/// A uid to exclude, with the user name it was resolved from.
#[derive(Debug, Clone)]
pub struct ResolvedPolicy {
    pub policy: Policy,
    pub users: Vec<(String, u32)>,
}

// ----------------------------------------------------------------- building

fn nfproto(family: u8) -> [Expr; 2] {
    [meta(expr::META_NFPROTO), cmp(expr::CMP_EQ, [family])]
}

/// Loads the packet's conntrack direction. UDP redirection is matched to
/// ORIGINAL only: UDP has no NAT state to follow, so without it the replies
/// to the app's own flows (and the app's replies to peers) would be
/// tproxied too.
fn ct_direction() -> Expr {
    Expr::Ct {
        key: expr::CT_DIRECTION,
        dreg: expr::REG_1,
    }
}

fn ret() -> Expr {
    verdict(expr::NFT_RETURN, None)
}

fn v4_addr(offset_daddr: bool) -> Expr {
    payload(expr::PAYLOAD_NETWORK, if offset_daddr { 16 } else { 12 }, 4)
}

fn v6_addr(offset_daddr: bool) -> Expr {
    payload(expr::PAYLOAD_NETWORK, if offset_daddr { 24 } else { 8 }, 16)
}

fn th_port(dport: bool) -> Expr {
    payload(expr::PAYLOAD_TRANSPORT, if dport { 2 } else { 0 }, 2)
}

fn family_byte(v4: bool) -> u8 {
    if v4 {
        expr::NFPROTO_IPV4
    } else {
        expr::NFPROTO_IPV6
    }
}

pub fn udp_mark(port: u16) -> u32 {
    MARK_BASE | port as u32
}

struct Builder {
    rs: Ruleset,
    next_set_id: u32,
}

impl Builder {
    fn rule(&mut self, chain: &str, comment: &str, exprs: Vec<Expr>) {
        self.rs.rules.push(RuleSpec {
            chain: chain.to_owned(),
            exprs,
            comment: comment.to_owned(),
        });
    }

    /// Adds a set (once per name) and returns its (name, id).
    fn set(&mut self, name: String, key: KeyKind, intervals: Intervals) -> (String, u32) {
        self.set_of(name, key, true, intervals)
    }

    fn set_of(
        &mut self,
        name: String,
        key: KeyKind,
        interval: bool,
        intervals: Intervals,
    ) -> (String, u32) {
        if let Some(s) = self.rs.sets.iter().find(|s| s.name == name) {
            return (s.name.clone(), s.id);
        }
        self.next_set_id += 1;
        let id = self.next_set_id;
        self.rs.sets.push(SetSpec {
            name: name.clone(),
            key,
            id,
            interval,
            intervals,
        });
        (name, id)
    }

    fn port_set(&mut self, name: String, ports: &[PortRange]) -> (String, u32) {
        let intervals = ports
            .iter()
            .map(|r| {
                let end = r.end.checked_add(1).map(|e| e.to_be_bytes().to_vec());
                (r.start.to_be_bytes().to_vec(), end)
            })
            .collect();
        self.set(name, KeyKind::Port, intervals)
    }

    /// Exception addresses as one hash set per prefix length, looked up
    /// after masking: the kernel inserts a hash element about twice as fast
    /// as an interval (which needs a start and an end element), and a lookup
    /// costs one probe per distinct prefix length however many addresses.
    fn prefix_sets(&mut self, name: &str, v4: bool, nets: &[IpNet]) -> Vec<(String, u32, u8)> {
        let mut by_len: BTreeMap<u8, Vec<Vec<u8>>> = BTreeMap::new();
        for n in nets {
            match (n, v4) {
                (IpNet::V4(n), true) => by_len
                    .entry(n.prefix_len())
                    .or_default()
                    .push(n.network().octets().to_vec()),
                (IpNet::V6(n), false) => by_len
                    .entry(n.prefix_len())
                    .or_default()
                    .push(n.network().octets().to_vec()),
                _ => {}
            }
        }
        let key = if v4 { KeyKind::V4 } else { KeyKind::V6 };
        by_len
            .into_iter()
            .rev()
            .map(|(len, keys)| {
                let elems = keys.into_iter().map(|k| (k, None)).collect();
                let (set, id) = self.set_of(format!("{name}-{len}"), key, false, elems);
                (set, id, len)
            })
            .collect()
    }

    fn net_set(&mut self, name: String, v4: bool, nets: &[IpNet]) -> Option<(String, u32)> {
        let intervals: Vec<_> = nets
            .iter()
            .filter_map(|n| match (n, v4) {
                (IpNet::V4(n), true) => {
                    let end = u32::from(n.broadcast()).checked_add(1);
                    Some((
                        n.network().octets().to_vec(),
                        end.map(|e| e.to_be_bytes().to_vec()),
                    ))
                }
                (IpNet::V6(n), false) => {
                    let end = u128::from(n.broadcast()).checked_add(1);
                    Some((
                        n.network().octets().to_vec(),
                        end.map(|e| e.to_be_bytes().to_vec()),
                    ))
                }
                _ => None,
            })
            .collect();
        if intervals.is_empty() {
            return None;
        }
        Some(self.set(name, if v4 { KeyKind::V4 } else { KeyKind::V6 }, intervals))
    }

    /// Rules shared by the filters of a direction: family guard, exceptions,
    /// matches. `outbound` picks which header fields are local and remote.
    fn family_guard(&mut self, chain: &str, rp: &ResolvedPolicy) {
        match rp.policy.family {
            Family::Both => {}
            f => self.rule(
                chain,
                "family",
                vec![
                    meta(expr::META_NFPROTO),
                    cmp(expr::CMP_NEQ, [family_byte(f == Family::Ipv4)]),
                    ret(),
                ],
            ),
        }
    }

    fn filters(&mut self, chain: &str, rp: &ResolvedPolicy, outbound: bool) {
        let p = &rp.policy;
        let name = &p.name;
        let (exceptions, tag) = if outbound {
            (&p.outbound_exceptions, "o")
        } else {
            (&p.inbound_exceptions, "i")
        };
        // Exceptions: outbound = destination port/address; inbound = local
        // (destination) port and the peer's (source) address.
        if !exceptions.ports.is_empty() {
            let (set, id) = self.port_set(format!("{name}-{tag}xp"), &exceptions.ports);
            self.rule(
                chain,
                "except-port",
                vec![th_port(true), lookup(&set, id, false), ret()],
            );
        }
        for v4 in [true, false] {
            let fam = if v4 { 4 } else { 6 };
            let sets = self.prefix_sets(&format!("{name}-{tag}x{fam}"), v4, &exceptions.cidrs);
            for (set, id, len) in sets {
                let mut e = nfproto(family_byte(v4)).to_vec();
                e.push(if v4 {
                    v4_addr(outbound)
                } else {
                    v6_addr(outbound)
                });
                if len < if v4 { 32 } else { 128 } {
                    e.push(expr::prefix_mask(if v4 { 4 } else { 16 }, len));
                }
                e.extend([lookup(&set, id, false), ret()]);
                self.rule(chain, &format!("except-v{fam}"), e);
            }
        }
        // Matches: traffic outside a non-empty match list is not redirected.
        let m = &p.matching;
        for (nets, local) in [(&m.local_addresses, true), (&m.remote_addresses, false)] {
            if nets.is_empty() {
                continue;
            }
            let which = if local { "local" } else { "remote" };
            // Outbound: local = source; inbound: local = destination.
            let daddr = local != outbound;
            for v4 in [true, false] {
                let covered = if v4 {
                    p.family.has_ipv4()
                } else {
                    p.family.has_ipv6()
                };
                if !covered {
                    continue;
                }
                let fam = if v4 { 4 } else { 6 };
                let mut e = nfproto(family_byte(v4)).to_vec();
                match self.net_set(format!("{name}-{}a{fam}", &which[..1]), v4, nets) {
                    Some((set, id)) => {
                        e.push(if v4 { v4_addr(daddr) } else { v6_addr(daddr) });
                        e.extend([lookup(&set, id, true), ret()]);
                        self.rule(chain, &format!("match-{which}-v{fam}"), e);
                    }
                    None => {
                        e.push(ret());
                        self.rule(chain, &format!("match-{which}-none-v{fam}"), e);
                    }
                }
            }
        }
        for (ports, local) in [(&m.local_ports, true), (&m.remote_ports, false)] {
            if ports.is_empty() {
                continue;
            }
            let which = if local { "local" } else { "remote" };
            let dport = local != outbound;
            let (set, id) = self.port_set(format!("{name}-{}p", &which[..1]), ports);
            self.rule(
                chain,
                &format!("match-{which}-ports"),
                vec![th_port(dport), lookup(&set, id, true), ret()],
            );
        }
    }

    fn exclusions(&mut self, chain: &str, rp: &ResolvedPolicy) {
        let p = &rp.policy;
        for uid in &p.exclude.uids {
            self.rule(
                chain,
                "exclude-uid",
                vec![
                    meta(expr::META_SKUID),
                    cmp(expr::CMP_EQ, uid.to_ne_bytes()),
                    ret(),
                ],
            );
        }
        for (user, uid) in &rp.users {
            self.rule(
                chain,
                &format!("exclude-user={user}"),
                vec![
                    meta(expr::META_SKUID),
                    cmp(expr::CMP_EQ, uid.to_ne_bytes()),
                    ret(),
                ],
            );
        }
        for gid in &p.exclude.gids {
            self.rule(
                chain,
                "exclude-gid",
                vec![
                    meta(expr::META_SKGID),
                    cmp(expr::CMP_EQ, gid.to_ne_bytes()),
                    ret(),
                ],
            );
        }
    }

    fn loopback(&mut self, chain: &str) {
        let mut v4 = nfproto(expr::NFPROTO_IPV4).to_vec();
        v4.extend([
            payload(expr::PAYLOAD_NETWORK, 16, 1),
            cmp(expr::CMP_EQ, [127u8]),
            ret(),
        ]);
        self.rule(chain, "loopback", v4);
        let mut v6 = nfproto(expr::NFPROTO_IPV6).to_vec();
        v6.extend([
            v6_addr(true),
            cmp(expr::CMP_EQ, Ipv6Addr::LOCALHOST.octets()),
            ret(),
        ]);
        self.rule(chain, "loopback", v6);
    }

    fn policy(&mut self, rp: &ResolvedPolicy) -> Vec<Role> {
        let p = &rp.policy;
        let tcp = p.has_protocol(Protocol::Tcp);
        let udp = p.has_protocol(Protocol::Udp);
        let mut roles = Vec::new();
        let comment = format!("proxyctl policy={} priority={}", p.name, p.priority);
        let mut chain = |b: &mut Builder, role: Role| {
            roles.push(role);
            b.rs.chains.push(ChainSpec {
                name: role.chain(&p.name),
                hook: None,
                comment: Some(comment.clone()),
            });
            role.chain(&p.name)
        };

        if let Some(port) = p.dns_port {
            // NAT, not tproxy: conntrack rewrites the replies' source back
            // to the address the client asked, so any DNS server can serve
            // the port. First, so TCP/53 is not taken by the outbound proxy.
            let c = chain(self, Role::Dns);
            self.exclusions(&c, rp);
            self.family_guard(&c, rp);
            for proto in [Protocol::Udp, Protocol::Tcp] {
                self.rule(&c, "dns-redirect", dns_redirect_exprs(proto, port));
            }
        }
        if (p.outbound_port.is_some() && tcp) || p.destination_proxy.is_some() {
            let c = chain(self, Role::Out);
            self.exclusions(&c, rp);
            self.family_guard(&c, rp);
            if let Some(dp) = &p.destination_proxy {
                for proto in &p.protocols {
                    self.rule(&c, "dnat", dnat_exprs(dp, *proto));
                }
            }
            if let (Some(port), true) = (p.outbound_port, tcp) {
                self.filters(&c, rp, true);
                self.loopback(&c);
                self.rule(&c, "redirect", tcp_redirect_exprs(port));
            }
        }
        if let (Some(port), true) = (p.inbound_port, tcp) {
            let c = chain(self, Role::In);
            self.family_guard(&c, rp);
            self.filters(&c, rp, false);
            self.rule(&c, "redirect", tcp_redirect_exprs(port));
        }
        if let (Some(port), true) = (p.outbound_port, udp) {
            let c = chain(self, Role::Mark);
            self.exclusions(&c, rp);
            self.family_guard(&c, rp);
            // Traffic the nat chains take (DNS, the destination proxy) must
            // not be marked for tproxy first (this chain runs before nat).
            if p.dns_port.is_some() {
                self.rule(
                    &c,
                    "dns-skip",
                    vec![
                        th_port(true),
                        cmp(expr::CMP_EQ, DNS_PORT.to_be_bytes()),
                        ret(),
                    ],
                );
            }
            if let Some(dp) = &p.destination_proxy {
                let mut e = dnat_match(dp, Protocol::Udp);
                e.push(ret());
                self.rule(&c, "dnat-skip", e);
            }
            self.filters(&c, rp, true);
            self.loopback(&c);
            self.rule(
                &c,
                "mark",
                vec![
                    meta(expr::META_L4PROTO),
                    cmp(expr::CMP_EQ, [Protocol::Udp.number()]),
                    ct_direction(),
                    cmp(expr::CMP_EQ, [expr::CT_DIR_ORIGINAL]),
                    Expr::Counter,
                    load(expr::REG_1, udp_mark(port).to_ne_bytes()),
                    Expr::MetaSet {
                        key: expr::META_MARK,
                        sreg: expr::REG_1,
                    },
                    verdict(expr::NF_ACCEPT, None),
                ],
            );
        }
        if udp && (p.outbound_port.is_some() || p.inbound_port.is_some()) {
            let c = chain(self, Role::Tproxy);
            if let Some(port) = p.outbound_port {
                // Outbound UDP marked in mark-output comes back in on lo.
                self.rule(
                    &c,
                    "tproxy-out",
                    vec![
                        meta(expr::META_IIF),
                        cmp(expr::CMP_EQ, LOOPBACK_IFINDEX.to_ne_bytes()),
                        meta(expr::META_MARK),
                        cmp(expr::CMP_EQ, udp_mark(port).to_ne_bytes()),
                        meta(expr::META_L4PROTO),
                        cmp(expr::CMP_EQ, [Protocol::Udp.number()]),
                        Expr::Counter,
                        load(expr::REG_1, port.to_be_bytes()),
                        Expr::Tproxy {
                            reg_port: expr::REG_1,
                        },
                        verdict(expr::NF_ACCEPT, None),
                    ],
                );
            }
            if let Some(port) = p.inbound_port {
                self.rule(
                    &c,
                    "skip-lo",
                    vec![
                        meta(expr::META_IIF),
                        cmp(expr::CMP_EQ, LOOPBACK_IFINDEX.to_ne_bytes()),
                        ret(),
                    ],
                );
                self.family_guard(&c, rp);
                self.filters(&c, rp, false);
                self.rule(
                    &c,
                    "tproxy-in",
                    vec![
                        meta(expr::META_L4PROTO),
                        cmp(expr::CMP_EQ, [Protocol::Udp.number()]),
                        ct_direction(),
                        cmp(expr::CMP_EQ, [expr::CT_DIR_ORIGINAL]),
                        Expr::Counter,
                        load(expr::REG_1, port.to_be_bytes()),
                        Expr::Tproxy {
                            reg_port: expr::REG_1,
                        },
                        verdict(expr::NF_ACCEPT, None),
                    ],
                );
            }
        }
        roles
    }
}

/// `meta l4proto tcp counter redirect to :PORT` — the same rule serves the
/// outbound (nat output) and inbound (nat prerouting) chains.
fn tcp_redirect_exprs(port: u16) -> Vec<Expr> {
    vec![
        meta(expr::META_L4PROTO),
        cmp(expr::CMP_EQ, [Protocol::Tcp.number()]),
        Expr::Counter,
        load(expr::REG_1, port.to_be_bytes()),
        Expr::Redir {
            reg_port: expr::REG_1,
        },
    ]
}

/// The port DNS clients send to.
pub const DNS_PORT: u16 = 53;

/// `meta l4proto PROTO th dport 53 counter redirect to :PORT`.
fn dns_redirect_exprs(proto: Protocol, port: u16) -> Vec<Expr> {
    vec![
        meta(expr::META_L4PROTO),
        cmp(expr::CMP_EQ, [proto.number()]),
        th_port(true),
        cmp(expr::CMP_EQ, DNS_PORT.to_be_bytes()),
        Expr::Counter,
        load(expr::REG_1, port.to_be_bytes()),
        Expr::Redir {
            reg_port: expr::REG_1,
        },
    ]
}

/// Matches `proto` packets to the destination proxy's destination.
fn dnat_match(dp: &DestinationProxy, proto: Protocol) -> Vec<Expr> {
    let v4 = dp.destination.is_ipv4();
    let mut e = nfproto(family_byte(v4)).to_vec();
    e.extend([
        meta(expr::META_L4PROTO),
        cmp(expr::CMP_EQ, [proto.number()]),
    ]);
    e.push(if v4 { v4_addr(true) } else { v6_addr(true) });
    e.push(cmp(expr::CMP_EQ, ip_bytes(dp.destination.ip())));
    e.push(th_port(true));
    e.push(cmp(expr::CMP_EQ, dp.destination.port().to_be_bytes()));
    e
}

/// NAT works for UDP as for TCP: conntrack rewrites the replies.
fn dnat_exprs(dp: &DestinationProxy, proto: Protocol) -> Vec<Expr> {
    let v4 = dp.destination.is_ipv4();
    let mut e = dnat_match(dp, proto);
    e.push(Expr::Counter);
    e.push(load(expr::REG_1, ip_bytes(dp.proxy.ip())));
    e.push(load(expr::REG_2, dp.proxy.port().to_be_bytes()));
    e.push(Expr::Dnat {
        family: family_byte(v4) as u32,
        reg_addr: expr::REG_1,
        reg_port: expr::REG_2,
    });
    e
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Sorts policies into evaluation order: higher priority first, then name.
pub fn evaluation_order(policies: &mut [ResolvedPolicy]) {
    policies.sort_by(|a, b| {
        b.policy
            .priority
            .cmp(&a.policy.priority)
            .then_with(|| a.policy.name.cmp(&b.policy.name))
    });
}

/// The whole table for these policies.
pub fn build(policies: &[ResolvedPolicy]) -> Ruleset {
    let mut ordered = policies.to_vec();
    evaluation_order(&mut ordered);
    let mut b = Builder {
        rs: Ruleset::default(),
        next_set_id: 0,
    };
    let mut jumps = Vec::new();
    for rp in &ordered {
        for role in b.policy(rp) {
            jumps.push(RuleSpec {
                chain: role.base().to_owned(),
                exprs: vec![verdict(expr::NFT_JUMP, Some(&role.chain(&rp.policy.name)))],
                comment: format!("policy={}", rp.policy.name),
            });
        }
    }
    // Only the base chains something jumps from: every base chain is a
    // hook every packet of its kind traverses (the route and filter ones
    // every packet, not only a connection's first), so a TCP-only table
    // does not make each packet walk empty UDP chains.
    let base: Vec<ChainSpec> = BASE_CHAINS
        .iter()
        .filter(|(name, ..)| jumps.iter().any(|j| j.chain == *name))
        .map(|(name, ty, hook, prio)| ChainSpec {
            name: (*name).to_owned(),
            hook: Some(((*ty).to_owned(), *hook, *prio)),
            comment: None,
        })
        .collect();
    b.rs.chains.splice(0..0, base);
    b.rs.rules.extend(jumps);
    b.rs
}

// ----------------------------------------------------------------- encoding

fn nfgen(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0, r[0], r[1]]
}

fn comment_udata(text: &str) -> Vec<u8> {
    let mut v = vec![UDATA_COMMENT, (text.len() + 1) as u8];
    v.extend_from_slice(text.as_bytes());
    v.push(0);
    v
}

fn comment_of(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (ty, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if ty == UDATA_COMMENT {
            return Some(netlink::cstr(value));
        }
        rest = &rest[2 + len..];
    }
    None
}

/// A batch under construction: BEGIN ... END around nf_tables messages.
pub struct Batch {
    pub msg: MsgBuf,
    seq: u32,
}

impl Batch {
    pub fn new(genid: Option<u32>) -> Self {
        let mut b = Self {
            msg: MsgBuf::default(),
            seq: 0,
        };
        let s = b.next_seq();
        let m = b.msg.begin(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            s,
            &nfgen(0, NFNL_SUBSYS_NFTABLES),
        );
        if let Some(g) = genid {
            b.msg.attr_be32(NFNL_BATCH_GENID, g);
        }
        b.msg.end(m);
        b
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Starts an nf_tables message that asks for an ack.
    pub fn begin(&mut self, msg: u16, extra_flags: u16) -> usize {
        let s = self.next_seq();
        self.msg.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | extra_flags,
            s,
            &nfgen(NFPROTO_INET, 0),
        )
    }

    pub fn table(&mut self, msg: u16, extra_flags: u16) {
        let flags = if msg == MSG_NEWTABLE { NLM_F_CREATE } else { 0 };
        let m = self.begin(msg, flags | extra_flags);
        self.msg.attr_str(NFTA_TABLE_NAME, TABLE);
        if msg == MSG_NEWTABLE {
            self.msg.attr_be32(NFTA_TABLE_FLAGS, 0);
        }
        self.msg.end(m);
    }

    pub fn chain(&mut self, c: &ChainSpec) {
        let m = self.begin(MSG_NEWCHAIN, NLM_F_CREATE);
        self.msg.attr_str(NFTA_CHAIN_TABLE, TABLE);
        self.msg.attr_str(NFTA_CHAIN_NAME, &c.name);
        if let Some((ty, hook, prio)) = &c.hook {
            let h = self.msg.nest_begin(NFTA_CHAIN_HOOK);
            self.msg.attr_be32(NFTA_HOOK_HOOKNUM, *hook);
            self.msg.attr_be32(NFTA_HOOK_PRIORITY, *prio as u32);
            self.msg.nest_end(h);
            self.msg
                .attr_be32(NFTA_CHAIN_POLICY, expr::NF_ACCEPT as u32);
            self.msg.attr_str(NFTA_CHAIN_TYPE, ty);
        }
        if let Some(comment) = &c.comment {
            self.msg.attr(NFTA_CHAIN_USERDATA, &comment_udata(comment));
        }
        self.msg.end(m);
    }

    pub fn set(&mut self, s: &SetSpec) {
        let m = self.begin(MSG_NEWSET, NLM_F_CREATE);
        self.msg.attr_str(NFTA_SET_TABLE, TABLE);
        self.msg.attr_str(NFTA_SET_NAME, &s.name);
        let flags = if s.interval { NFT_SET_INTERVAL } else { 0 };
        self.msg.attr_be32(NFTA_SET_FLAGS, flags);
        self.msg.attr_be32(NFTA_SET_KEY_TYPE, s.key.nft_type());
        self.msg.attr_be32(NFTA_SET_KEY_LEN, s.key.len() as u32);
        self.msg.attr_be32(NFTA_SET_ID, s.id);
        if !s.interval {
            // A known size lets the kernel pick its fixed-size hash instead
            // of a resizing one.
            let d = self.msg.nest_begin(NFTA_SET_DESC);
            self.msg
                .attr_be32(NFTA_SET_DESC_SIZE, s.intervals.len() as u32);
            self.msg.nest_end(d);
        }
        self.msg.end(m);
        // Elements: each interval is a start key and an end key flagged
        // INTERVAL_END. One nested attribute holds at most 64 KiB, so the
        // elements are spread over as many messages as needed.
        let mut elems: Vec<(&[u8], bool)> = Vec::with_capacity(s.intervals.len() * 2);
        for (start, end) in &s.intervals {
            elems.push((start, false));
            if let Some(end) = end {
                elems.push((end, true));
            }
        }
        for chunk in elems.chunks(1500) {
            let m = self.begin(MSG_NEWSETELEM, NLM_F_CREATE);
            self.msg.attr_str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
            self.msg.attr_str(NFTA_SET_ELEM_LIST_SET, &s.name);
            self.msg.attr_be32(NFTA_SET_ELEM_LIST_SET_ID, s.id);
            let list = self.msg.nest_begin(NFTA_SET_ELEM_LIST_ELEMENTS);
            for (key, is_end) in chunk {
                let e = self.msg.nest_begin(NFTA_LIST_ELEM);
                let k = self.msg.nest_begin(NFTA_SET_ELEM_KEY);
                self.msg.attr(NFTA_DATA_VALUE, key);
                self.msg.nest_end(k);
                if *is_end {
                    self.msg
                        .attr_be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
                }
                self.msg.nest_end(e);
            }
            debug_assert!(self.msg.since(list) < 65536);
            self.msg.nest_end(list);
            self.msg.end(m);
        }
    }

    pub fn rule(&mut self, r: &RuleSpec) {
        let m = self.begin(MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
        self.msg.attr_str(NFTA_RULE_TABLE, TABLE);
        self.msg.attr_str(NFTA_RULE_CHAIN, &r.chain);
        let list = self.msg.nest_begin(NFTA_RULE_EXPRESSIONS);
        for e in &r.exprs {
            e.encode(&mut self.msg);
        }
        self.msg.nest_end(list);
        self.msg
            .attr(NFTA_RULE_USERDATA, &comment_udata(&r.comment));
        self.msg.end(m);
    }

    /// Replaces the whole table; the kernel applies all of it or none of it.
    /// An existing table is deleted and rebuilt (declared first, so the
    /// delete cannot fail); a missing one is created with NLM_F_EXCL, so a
    /// table someone created since we looked makes the batch fail instead
    /// of being merged into. Not creating and deleting a throw-away table
    /// matters: deleted objects are freed after an RCU grace period, which
    /// the kernel waits for when our socket closes.
    pub fn replace_table(&mut self, exists: bool, rs: Option<&Ruleset>) {
        if exists {
            self.table(MSG_NEWTABLE, 0);
            self.table(MSG_DELTABLE, 0);
        }
        let Some(rs) = rs else { return };
        self.table(MSG_NEWTABLE, NLM_F_EXCL);
        for c in &rs.chains {
            self.chain(c);
        }
        for s in &rs.sets {
            self.set(s);
        }
        for r in &rs.rules {
            self.rule(r);
        }
    }

    /// True when nothing but BEGIN has been added.
    pub fn is_empty(&self) -> bool {
        self.msg.messages.len() == 1
    }

    pub fn finish(mut self) -> MsgBuf {
        let s = self.next_seq();
        let m = self.msg.begin(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            s,
            &nfgen(0, NFNL_SUBSYS_NFTABLES),
        );
        self.msg.end(m);
        self.msg
    }
}

/// A one-message request (get/dump) to nf_tables.
pub fn request(msg: u16, flags: u16, attrs: &[(u16, &str)]) -> MsgBuf {
    let mut m = MsgBuf::default();
    let start = m.begin(
        (NFNL_SUBSYS_NFTABLES << 8) | msg,
        NLM_F_REQUEST | flags,
        1,
        &nfgen(NFPROTO_INET, 0),
    );
    for (ty, value) in attrs {
        m.attr_str(*ty, value);
    }
    m.end(start);
    m
}

pub fn genid_request() -> MsgBuf {
    let mut m = MsgBuf::default();
    let start = m.begin(
        (NFNL_SUBSYS_NFTABLES << 8) | MSG_GETGEN,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        &nfgen(0, 0),
    );
    m.end(start);
    m
}

pub fn genid_of(messages: &[netlink::Message]) -> Option<u32> {
    messages
        .iter()
        .find_map(|m| attr(m.payload.get(4..)?, NFTA_GEN_ID).and_then(be32))
}

pub const TABLE_NAME_ATTR: u16 = NFTA_TABLE_NAME;
pub const CHAIN_TABLE_ATTR: u16 = NFTA_CHAIN_TABLE;
pub const RULE_TABLE_ATTR: u16 = NFTA_RULE_TABLE;
pub const SET_TABLE_ATTR: u16 = NFTA_SET_TABLE;
pub const SETELEM_TABLE_ATTR: u16 = NFTA_SET_ELEM_LIST_TABLE;
pub const SETELEM_SET_ATTR: u16 = NFTA_SET_ELEM_LIST_SET;

// ----------------------------------------------------------------- decoding

fn is_ours(payload: &[u8], table_attr: u16) -> Option<&[u8]> {
    // nfgenmsg: family must be inet; the table attribute must be ours.
    if payload.first() != Some(&NFPROTO_INET) {
        return None;
    }
    let attrs = payload.get(4..)?;
    (attr(attrs, table_attr).map(netlink::cstr).as_deref() == Some(TABLE)).then_some(attrs)
}

pub fn decode_chains(messages: &[netlink::Message]) -> Vec<ChainSpec> {
    messages
        .iter()
        .filter_map(|m| {
            let a = is_ours(&m.payload, NFTA_CHAIN_TABLE)?;
            let hook = attr(a, NFTA_CHAIN_HOOK).map(|h| {
                (
                    attr(a, NFTA_CHAIN_TYPE)
                        .map(netlink::cstr)
                        .unwrap_or_default(),
                    attr(h, NFTA_HOOK_HOOKNUM).and_then(be32).unwrap_or(0),
                    attr(h, NFTA_HOOK_PRIORITY).and_then(be32).unwrap_or(0) as i32,
                )
            });
            Some(ChainSpec {
                name: attr(a, NFTA_CHAIN_NAME).map(netlink::cstr)?,
                hook,
                comment: attr(a, NFTA_CHAIN_USERDATA).and_then(comment_of),
            })
        })
        .collect()
}

pub fn decode_rules(messages: &[netlink::Message]) -> Vec<RuleSpec> {
    messages
        .iter()
        .filter_map(|m| {
            let a = is_ours(&m.payload, NFTA_RULE_TABLE)?;
            Some(RuleSpec {
                chain: attr(a, NFTA_RULE_CHAIN).map(netlink::cstr)?,
                exprs: attr(a, NFTA_RULE_EXPRESSIONS)
                    .map(expr::decode_list)
                    .unwrap_or_default(),
                comment: attr(a, NFTA_RULE_USERDATA)
                    .and_then(comment_of)
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Set names and key kinds (from the key length).
pub fn decode_sets(messages: &[netlink::Message]) -> Vec<(String, KeyKind)> {
    messages
        .iter()
        .filter_map(|m| {
            let a = is_ours(&m.payload, NFTA_SET_TABLE)?;
            let key = match attr(a, NFTA_SET_KEY_LEN).and_then(be32)? {
                2 => KeyKind::Port,
                4 => KeyKind::V4,
                16 => KeyKind::V6,
                _ => return None,
            };
            Some((attr(a, NFTA_SET_NAME).map(netlink::cstr)?, key))
        })
        .collect()
}

/// Rebuilds `[start, end)` intervals from start and end elements.
pub fn decode_elements(messages: &[netlink::Message]) -> Intervals {
    let mut elems: Vec<(Vec<u8>, bool)> = Vec::new();
    for m in messages {
        let Some(a) = is_ours(&m.payload, NFTA_SET_ELEM_LIST_TABLE) else {
            continue;
        };
        let Some(list) = attr(a, NFTA_SET_ELEM_LIST_ELEMENTS) else {
            continue;
        };
        for (ty, e) in Attrs::new(list) {
            if ty != NFTA_LIST_ELEM {
                continue;
            }
            let Some(key) = attr(e, NFTA_SET_ELEM_KEY).and_then(|k| attr(k, NFTA_DATA_VALUE))
            else {
                continue;
            };
            let flags = attr(e, NFTA_SET_ELEM_FLAGS).and_then(be32).unwrap_or(0);
            elems.push((key.to_vec(), flags & NFT_SET_ELEM_INTERVAL_END != 0));
        }
    }
    // At one key an end (of the range before) sorts before a start.
    elems.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
    let mut out = Vec::new();
    let mut open: Option<Vec<u8>> = None;
    for (key, is_end) in elems {
        match (is_end, open.take()) {
            (true, Some(start)) => out.push((start, Some(key))),
            (true, None) => {}
            (false, Some(start)) => {
                out.push((start, None));
                open = Some(key);
            }
            (false, None) => open = Some(key),
        }
    }
    if let Some(start) = open {
        out.push((start, None));
    }
    out
}

fn be_dec(bytes: &[u8]) -> Vec<u8> {
    // big-endian decrement; the caller guarantees a non-zero value.
    let mut v = bytes.to_vec();
    for b in v.iter_mut().rev() {
        if *b == 0 {
            *b = 0xff;
        } else {
            *b -= 1;
            break;
        }
    }
    v
}

pub fn intervals_to_ports(iv: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<PortRange> {
    iv.iter()
        .filter_map(|(s, e)| {
            let start = u16::from_be_bytes(s.as_slice().try_into().ok()?);
            let end = match e {
                Some(e) => u16::from_be_bytes(be_dec(e).as_slice().try_into().ok()?),
                None => u16::MAX,
            };
            Some(PortRange { start, end })
        })
        .collect()
}

pub fn intervals_to_nets(iv: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<IpNet> {
    iv.iter()
        .filter_map(|(s, e)| match s.len() {
            4 => {
                let start = u32::from_be_bytes(s.as_slice().try_into().ok()?);
                let last = match e {
                    Some(e) => u32::from_be_bytes(be_dec(e).as_slice().try_into().ok()?),
                    None => u32::MAX,
                };
                let host_bits = (last - start).count_ones();
                let net = Ipv4Net::new(Ipv4Addr::from(start), (32 - host_bits) as u8).ok()?;
                Some(IpNet::V4(net))
            }
            16 => {
                let start = u128::from_be_bytes(s.as_slice().try_into().ok()?);
                let last = match e {
                    Some(e) => u128::from_be_bytes(be_dec(e).as_slice().try_into().ok()?),
                    None => u128::MAX,
                };
                let host_bits = (last - start).count_ones();
                let net = Ipv6Net::new(Ipv6Addr::from(start), (128 - host_bits) as u8).ok()?;
                Some(IpNet::V6(net))
            }
            _ => None,
        })
        .collect()
}

/// Everything read back from the kernel's `inet proxyctl` table.
#[derive(Debug, Clone, Default)]
pub struct KernelTable {
    pub chains: Vec<ChainSpec>,
    pub rules: Vec<RuleSpec>,
    pub sets: BTreeMap<String, (KeyKind, Intervals)>,
}

/// Why a table could not be read back as policies.
pub type DecodeError = String;

fn cmp_values(exprs: &[Expr]) -> Vec<&[u8]> {
    exprs
        .iter()
        .filter_map(|e| match e {
            Expr::Cmp { data, .. } => Some(data.as_slice()),
            _ => None,
        })
        .collect()
}

fn immediates(exprs: &[Expr]) -> Vec<&[u8]> {
    exprs
        .iter()
        .filter_map(|e| match e {
            Expr::Immediate {
                data: Data::Value(v),
                ..
            } => Some(v.as_slice()),
            _ => None,
        })
        .collect()
}

fn lookup_set(exprs: &[Expr]) -> Option<&str> {
    exprs.iter().find_map(|e| match e {
        Expr::Lookup { set, .. } => Some(set.as_str()),
        _ => None,
    })
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

fn port_from(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

fn u32_ne(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// The policy names the table's chains carry, however damaged the rules.
pub fn policy_names(t: &KernelTable) -> std::collections::BTreeSet<String> {
    t.chains
        .iter()
        .filter_map(|c| c.comment.as_deref()?.strip_prefix("proxyctl policy="))
        .map(|rest| rest.split(" priority=").next().unwrap_or(rest).to_owned())
        .collect()
}

/// Reconstructs the policies from a table read back from the kernel.
pub fn decode_policies(t: &KernelTable) -> Result<Vec<ResolvedPolicy>, DecodeError> {
    let mut policies: BTreeMap<String, ResolvedPolicy> = BTreeMap::new();
    for chain in &t.chains {
        let Some(comment) = chain.comment.as_deref() else {
            continue;
        };
        let Some(rest) = comment.strip_prefix("proxyctl policy=") else {
            continue;
        };
        let (name, prio) = rest
            .split_once(" priority=")
            .ok_or_else(|| format!("chain {}: malformed comment `{comment}`", chain.name))?;
        let role = Role::of_chain(&chain.name)
            .ok_or_else(|| format!("chain {}: not a policy chain", chain.name))?;
        let rp = policies
            .entry(name.to_owned())
            .or_insert_with(|| ResolvedPolicy {
                policy: Policy {
                    name: name.to_owned(),
                    protocols: Vec::new(),
                    ..Policy::default()
                },
                users: Vec::new(),
            });
        rp.policy.priority = prio
            .parse()
            .map_err(|_| format!("chain {}: bad priority `{prio}`", chain.name))?;
        let outbound = matches!(role, Role::Out | Role::Mark);
        for rule in t.rules.iter().filter(|r| r.chain == chain.name) {
            decode_rule(rp, role, outbound, rule, t).ok_or_else(|| {
                format!("chain {}: cannot read rule `{}`", chain.name, rule.comment)
            })?;
        }
    }
    Ok(policies
        .into_values()
        .map(|mut rp| {
            let p = &mut rp.policy;
            if p.protocols.is_empty() {
                p.protocols = vec![Protocol::Tcp];
            }
            // The kernel holds what is enforced: a loop it allows was allowed
            // (normalize keeps the flag only where a loop is possible).
            p.allow_proxy_loop = true;
            p.normalize();
            rp.users.sort();
            rp.users.dedup();
            rp
        })
        .collect())
}

fn decode_rule(
    rp: &mut ResolvedPolicy,
    role: Role,
    outbound: bool,
    rule: &RuleSpec,
    t: &KernelTable,
) -> Option<()> {
    let p = &mut rp.policy;
    let e = &rule.exprs;
    let cmps = cmp_values(e);
    let set =
        || -> Option<&Intervals> { lookup_set(e).and_then(|s| t.sets.get(s)).map(|(_, iv)| iv) };
    let kind = rule.comment.as_str();
    match kind {
        "exclude-uid" => p.exclude.uids.push(u32_ne(cmps.first()?)?),
        "exclude-gid" => p.exclude.gids.push(u32_ne(cmps.first()?)?),
        k if k.starts_with("exclude-user=") => {
            let user = k["exclude-user=".len()..].to_owned();
            rp.users.push((user.clone(), u32_ne(cmps.first()?)?));
            p.exclude.users.push(user);
        }
        "family" => {
            p.family = match *cmps.first()?.first()? {
                expr::NFPROTO_IPV4 => Family::Ipv4,
                expr::NFPROTO_IPV6 => Family::Ipv6,
                _ => return None,
            }
        }
        "loopback" | "skip-lo" | "tproxy-out" | "dns-skip" | "dnat-skip" => {}
        "dns-redirect" => {
            if role != Role::Dns {
                return None;
            }
            p.dns_port = Some(port_from(immediates(e).first()?)?);
        }
        "except-port" => {
            let ports = intervals_to_ports(set()?);
            let ex = if outbound {
                &mut p.outbound_exceptions
            } else {
                &mut p.inbound_exceptions
            };
            ex.ports.extend(ports);
        }
        "except-v4" | "except-v6" => {
            let full = if kind == "except-v4" { 32 } else { 128 };
            let len = e
                .iter()
                .find_map(|x| match x {
                    Expr::Bitwise { mask, .. } => {
                        Some(mask.iter().map(|b| b.count_ones()).sum::<u32>() as u8)
                    }
                    _ => None,
                })
                .unwrap_or(full);
            let nets = set()?
                .iter()
                .map(|(k, _)| ip_from(k).and_then(|ip| IpNet::new(ip, len).ok()))
                .collect::<Option<Vec<_>>>()?;
            let ex = if outbound {
                &mut p.outbound_exceptions
            } else {
                &mut p.inbound_exceptions
            };
            ex.cidrs.extend(nets);
        }
        "match-local-v4" | "match-local-v6" => {
            p.matching.local_addresses.extend(intervals_to_nets(set()?))
        }
        "match-remote-v4" | "match-remote-v6" => p
            .matching
            .remote_addresses
            .extend(intervals_to_nets(set()?)),
        "match-local-ports" => p.matching.local_ports.extend(intervals_to_ports(set()?)),
        "match-remote-ports" => p.matching.remote_ports.extend(intervals_to_ports(set()?)),
        k if k.starts_with("match-") && k.contains("-none-") => {}
        "redirect" => {
            let port = port_from(immediates(e).first()?)?;
            p.protocols.push(Protocol::Tcp);
            match role {
                Role::Out => p.outbound_port = Some(port),
                Role::In => p.inbound_port = Some(port),
                _ => return None,
            }
        }
        "mark" => {
            let mark = u32_ne(immediates(e).first()?)?;
            p.protocols.push(Protocol::Udp);
            p.outbound_port = Some((mark & !MARK_MASK) as u16);
        }
        "tproxy-in" => {
            p.protocols.push(Protocol::Udp);
            p.inbound_port = Some(port_from(immediates(e).first()?)?);
        }
        "dnat" => {
            let dest_ip = ip_from(cmps.get(2)?)?;
            let dest_port = port_from(cmps.get(3)?)?;
            let imm = immediates(e);
            let proxy_ip = ip_from(imm.first()?)?;
            let proxy_port = port_from(imm.get(1)?)?;
            p.protocols
                .push(Protocol::from_number(*cmps.get(1)?.first()?)?);
            p.destination_proxy = Some(DestinationProxy {
                destination: SocketAddr::new(dest_ip, dest_port),
                proxy: SocketAddr::new(proxy_ip, proxy_port),
            });
        }
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{Message, parse_messages};

    fn policy() -> ResolvedPolicy {
        let p = Policy {
            name: "t".into(),
            priority: 3,
            outbound_port: Some(15001),
            inbound_port: Some(15006),
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            family: Family::Ipv4,
            dns_port: Some(15053),
            allow_proxy_loop: true,
            destination_proxy: Some(DestinationProxy {
                destination: "169.254.169.254:80".parse().unwrap(),
                proxy: "127.0.0.1:9".parse().unwrap(),
            }),
            ..Policy::default()
        };
        let mut p = p.checked().unwrap();
        p.outbound_exceptions.cidrs =
            vec!["10.0.0.0/8".parse().unwrap(), "1.2.3.4/32".parse().unwrap()];
        p.outbound_exceptions.ports = vec![PortRange {
            start: 1,
            end: 65535,
        }];
        p.exclude.uids = vec![7];
        p.exclude.users = vec!["alice".into()];
        p.normalize();
        ResolvedPolicy {
            policy: p,
            users: vec![("alice".into(), 1001)],
        }
    }

    /// What the kernel would echo back for our own messages: the encoded
    /// batch decoded by the same code that decodes dumps.
    fn echo(rs: &Ruleset) -> KernelTable {
        let mut b = Batch::new(None);
        b.replace_table(false, Some(rs));
        let msgs: Vec<Message> = parse_messages(&b.finish().buf);
        let of = |ty: u16| -> Vec<Message> {
            msgs.iter()
                .filter(|m| m.ty == (NFNL_SUBSYS_NFTABLES << 8) | ty)
                .cloned()
                .collect()
        };
        let mut t = KernelTable {
            chains: decode_chains(&of(MSG_NEWCHAIN)),
            rules: decode_rules(&of(MSG_NEWRULE)),
            sets: Default::default(),
        };
        for s in &rs.sets {
            let elems: Vec<Message> = of(MSG_NEWSETELEM)
                .into_iter()
                .filter(|m| {
                    attr(&m.payload[4..], NFTA_SET_ELEM_LIST_SET).map(netlink::cstr)
                        == Some(s.name.clone())
                })
                .collect();
            t.sets
                .insert(s.name.clone(), (s.key, decode_elements(&elems)));
        }
        t
    }

    #[test]
    fn encoded_policies_decode_to_the_same_policies() {
        let rp = policy();
        let rs = build(std::slice::from_ref(&rp));
        let back = decode_policies(&echo(&rs)).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].policy, rp.policy);
        assert_eq!(back[0].users, rp.users);
    }

    #[test]
    fn base_chains_jump_in_priority_order_then_name() {
        let mk = |name: &str, priority| ResolvedPolicy {
            policy: Policy {
                name: name.into(),
                priority,
                outbound_port: Some(1),
                ..Policy::default()
            },
            users: vec![],
        };
        let rs = build(&[mk("b", 1), mk("a", 1), mk("z", 9)]);
        let jumps: Vec<&str> = rs
            .rules
            .iter()
            .filter(|r| r.chain == "nat-output")
            .map(|r| r.comment.as_str())
            .collect();
        assert_eq!(jumps, ["policy=z", "policy=a", "policy=b"]);
    }

    #[test]
    fn intervals_round_trip_at_the_edges() {
        let ports = vec![
            PortRange::single(1),
            PortRange { start: 2, end: 3 },
            PortRange::single(65535),
        ];
        let mut b = Builder {
            rs: Ruleset::default(),
            next_set_id: 0,
        };
        b.port_set("p".into(), &ports);
        let iv = &b.rs.sets[0].intervals;
        assert_eq!(iv[2].1, None, "65535 runs to the end: no end element");
        // Adjacent ranges share a key: the end of one, the start of the next.
        let mut elems = Vec::new();
        for (s, e) in iv {
            elems.push((s.clone(), false));
            if let Some(e) = e {
                elems.push((e.clone(), true));
            }
        }
        elems.reverse(); // the kernel dumps in its own order
        let msgs = element_messages(&elems);
        assert_eq!(intervals_to_ports(&decode_elements(&msgs)), ports);
        let nets: Vec<IpNet> = vec!["0.0.0.0/0".parse().unwrap()];
        assert!(b.net_set("n".into(), true, &nets).is_some());
        let iv = &b.rs.sets[1].intervals;
        assert_eq!(intervals_to_nets(iv), nets);
    }

    fn element_messages(elems: &[(Vec<u8>, bool)]) -> Vec<Message> {
        let mut m = MsgBuf::default();
        let s = m.begin(0, 0, 1, &[NFPROTO_INET, 0, 0, 0]);
        m.attr_str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
        let list = m.nest_begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for (k, end) in elems {
            let e = m.nest_begin(NFTA_LIST_ELEM);
            let kk = m.nest_begin(NFTA_SET_ELEM_KEY);
            m.attr(NFTA_DATA_VALUE, k);
            m.nest_end(kk);
            if *end {
                m.attr_be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            m.nest_end(e);
        }
        m.nest_end(list);
        m.end(s);
        parse_messages(&m.buf)
    }

    #[test]
    fn prefix_masks() {
        let Expr::Bitwise { mask, .. } = expr::prefix_mask(4, 20) else {
            unreachable!()
        };
        assert_eq!(mask, [255, 255, 240, 0]);
        let Expr::Bitwise { mask, .. } = expr::prefix_mask(16, 0) else {
            unreachable!()
        };
        assert_eq!(mask, [0; 16]);
    }
}
