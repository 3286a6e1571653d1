//! The policy types and their file representation (camelCase JSON/YAML keys,
//! unknown keys refused so a typo never silently weakens a policy).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::PolicyError;

/// Name given to a policy when none is set (`--name`).
pub const DEFAULT_POLICY_NAME: &str = "default";
/// Longest policy name: names become part of nftables chain and set names.
pub const MAX_NAME_LEN: usize = 32;

/// One redirect policy. See the crate docs and ARCHITECTURE.md for how each
/// field maps to nftables and HNS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Identifies the policy inside a namespace/endpoint; `add` with an
    /// existing name replaces that policy atomically.
    #[serde(default = "default_name")]
    pub name: String,
    /// Order among several policies: the higher value is evaluated first
    /// (as a WFP filter weight is in HNS). Ties are broken by name.
    #[serde(default)]
    pub priority: u16,
    /// Where outbound traffic is redirected (`--outbound-port`, hcnproxyctl's `--port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_port: Option<u16>,
    /// Where inbound traffic is redirected (`--inbound-port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_port: Option<u16>,
    /// Transport protocols the policy applies to.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    /// Address families the policy applies to.
    #[serde(default)]
    pub family: Family,
    /// Identities whose traffic is never redirected (the proxy itself).
    #[serde(default, skip_serializing_if = "Exclusions::is_empty")]
    pub exclude: Exclusions,
    /// Accept an outbound redirect that excludes no identity, so the proxy's
    /// own upstream connections are redirected back into it (a loop, unless
    /// the proxy bypasses the redirect by other means). Without it such a
    /// policy is refused. After [`Policy::normalize`] it is true exactly
    /// when the policy redirects outbound traffic and excludes no identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_proxy_loop: bool,
    /// Redirect DNS (UDP and TCP to port 53) to this local port with NAT,
    /// so any DNS server can serve it (conntrack rewrites the replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_port: Option<u16>,
    /// When non-empty, only matching traffic is redirected.
    #[serde(default, rename = "match", skip_serializing_if = "Match::is_empty")]
    pub matching: Match,
    /// Outbound traffic that is never redirected.
    #[serde(default, skip_serializing_if = "Exceptions::is_empty")]
    pub outbound_exceptions: Exceptions,
    /// Inbound traffic that is never redirected.
    #[serde(default, skip_serializing_if = "Exceptions::is_empty")]
    pub inbound_exceptions: Exceptions,
    /// Send traffic for one destination to a proxy elsewhere (DNAT), as the
    /// metadata-service proxy needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_proxy: Option<DestinationProxy>,
}

fn default_name() -> String {
    DEFAULT_POLICY_NAME.to_owned()
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Tcp]
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            name: default_name(),
            priority: 0,
            outbound_port: None,
            inbound_port: None,
            protocols: default_protocols(),
            family: Family::Both,
            exclude: Exclusions::default(),
            allow_proxy_loop: false,
            dns_port: None,
            matching: Match::default(),
            outbound_exceptions: Exceptions::default(),
            inbound_exceptions: Exceptions::default(),
            destination_proxy: None,
        }
    }
}

impl Policy {
    /// Sorts and de-duplicates every list so that two policies meaning the
    /// same thing compare equal (what `list` reads back is normalized).
    pub fn normalize(&mut self) {
        // DNS capture always takes UDP and TCP; a policy doing nothing else
        // has no other traffic for --protocol to choose.
        if self.dns_port.is_some()
            && self.outbound_port.is_none()
            && self.inbound_port.is_none()
            && self.destination_proxy.is_none()
        {
            self.protocols = vec![Protocol::Tcp, Protocol::Udp];
        }
        sort_dedup(&mut self.protocols);
        sort_dedup(&mut self.exclude.uids);
        sort_dedup(&mut self.exclude.gids);
        sort_dedup(&mut self.exclude.users);
        sort_dedup(&mut self.exclude.sids);
        sort_dedup(&mut self.matching.local_addresses);
        sort_dedup(&mut self.matching.remote_addresses);
        sort_dedup(&mut self.matching.local_ports);
        sort_dedup(&mut self.matching.remote_ports);
        for exceptions in [&mut self.outbound_exceptions, &mut self.inbound_exceptions] {
            sort_dedup(&mut exceptions.ports);
            sort_dedup(&mut exceptions.cidrs);
        }
        // The loop permission only means something where a loop can happen.
        self.allow_proxy_loop &= self.redirects_outbound() && self.exclude.is_empty();
    }

    /// Whether local processes' outbound traffic goes to a proxy in this
    /// namespace (the proxy's own traffic then needs an identity exclusion).
    /// A destination proxy alone does not count: its proxy runs elsewhere.
    pub fn redirects_outbound(&self) -> bool {
        self.outbound_port.is_some() || self.dns_port.is_some()
    }

    /// Normalizes, then validates: the form every backend should accept.
    pub fn checked(mut self) -> Result<Self, PolicyError> {
        self.normalize();
        self.validate()?;
        Ok(self)
    }

    pub fn has_protocol(&self, protocol: Protocol) -> bool {
        self.protocols.contains(&protocol)
    }

    /// Whether the policy applies to addresses of this family.
    pub fn covers(&self, addr: &IpAddr) -> bool {
        match addr {
            IpAddr::V4(_) => self.family.has_ipv4(),
            IpAddr::V6(_) => self.family.has_ipv6(),
        }
    }
}

fn sort_dedup<T: Ord>(items: &mut Vec<T>) {
    items.sort();
    items.dedup();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as HNS and `meta l4proto` use it.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
    #[default]
    Both,
}

impl Family {
    pub fn has_ipv4(self) -> bool {
        matches!(self, Self::Ipv4 | Self::Both)
    }

    pub fn has_ipv6(self) -> bool {
        matches!(self, Self::Ipv6 | Self::Both)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::Both => "both",
        })
    }
}

/// Identities whose traffic bypasses the proxy, so the proxy's own
/// connections do not loop back into it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Exclusions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gids: Vec<u32>,
    /// User names, resolved to uids by the backend on the target host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Windows security identifiers (HNS UserSID, a prefix match there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sids: Vec<String>,
}

impl Exclusions {
    pub fn is_empty(&self) -> bool {
        self.uids.is_empty()
            && self.gids.is_empty()
            && self.users.is_empty()
            && self.sids.is_empty()
    }
}

/// Restricts a policy to matching traffic. Local means this endpoint's side
/// of the connection, remote the peer's, whichever direction it goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_addresses: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_addresses: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_ports: Vec<PortRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ports: Vec<PortRange>,
}

impl Match {
    pub fn is_empty(&self) -> bool {
        self.local_addresses.is_empty()
            && self.remote_addresses.is_empty()
            && self.local_ports.is_empty()
            && self.remote_ports.is_empty()
    }
}

/// Traffic never redirected: for outbound, destination ports and addresses;
/// for inbound, the local (destination) ports and the peers' addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Exceptions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<IpNet>,
}

impl Exceptions {
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty() && self.cidrs.is_empty()
    }
}

/// Traffic to `destination` is sent to `proxy` instead (DNAT), e.g. the
/// metadata service 169.254.169.254:80 to an imds-proxy listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationProxy {
    pub destination: SocketAddr,
    pub proxy: SocketAddr,
}

/// An inclusive port range; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    pub fn overlaps(&self, other: &Self) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let port = |p: &str| -> Result<u16, String> {
            let n: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a port or a range like 1000-2000"))?;
            if n == 0 || n > 65535 {
                return Err(format!("port {n} is outside 1-65535"));
            }
            Ok(n as u16)
        };
        let range = match s.split_once('-') {
            Some((a, b)) => Self {
                start: port(a)?,
                end: port(b)?,
            },
            None => Self::single(port(s)?),
        };
        if range.start > range.end {
            return Err(format!("range `{s}` ends before it starts"));
        }
        Ok(range)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            serializer.serialize_u16(self.start)
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}
