//! The policy flags shared by `add` and `check`, documented once here.
//! hcnproxyctl's spellings (`--port`, `--usersid`, `--localaddr`, ...) are
//! accepted as aliases so its commands work unchanged.

use std::path::PathBuf;

use clap::Args;
use proxyctl_policy::{
    DestinationProxy, Policy, PolicyError, parse_cidrs, parse_family, parse_gids, parse_port,
    parse_port_ranges, parse_protocols, parse_socket_addr, parse_uids, policies_from_file,
};

#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Policy")]
pub struct PolicyArgs {
    /// Read the whole policy (or several) from a JSON or YAML file; other
    /// policy flags are then refused.
    #[arg(long, value_name = "policy.yaml|json")]
    pub file: Option<PathBuf>,
    /// Policy name; adding a name that exists replaces that policy atomically.
    #[arg(long)]
    pub name: Option<String>,
    /// Proxy port for outbound traffic (hcnproxyctl: --port).
    #[arg(long, alias = "port", value_name = "PORT")]
    pub outbound_port: Option<String>,
    /// Proxy port for inbound traffic.
    #[arg(long, value_name = "PORT")]
    pub inbound_port: Option<String>,
    /// Send traffic for ADDR:PORT to the proxy at PROXY_ADDR:PORT instead (DNAT),
    /// written DEST=PROXY, e.g. 169.254.169.254:80=10.0.0.2:8080.
    #[arg(long, value_name = "DEST=PROXY")]
    pub destination_proxy: Option<String>,
    /// Protocols to redirect: tcp, udp or tcp,udp.
    #[arg(long, value_name = "tcp|udp|tcp,udp")]
    pub protocol: Option<String>,
    /// Address families: ipv4, ipv6 or both.
    #[arg(long, value_name = "ipv4|ipv6|both")]
    pub family: Option<String>,
    /// Order among policies: the higher value is evaluated first.
    #[arg(long)]
    pub priority: Option<String>,
    /// Redirect DNS (UDP and TCP to port 53, IPv4 and IPv6) to this local
    /// port with NAT, so any DNS server or forwarder can serve it.
    #[arg(long, value_name = "PORT")]
    pub dns_port: Option<String>,
    /// Accept an outbound (or DNS) redirect that excludes no identity: the
    /// proxy's own connections then loop back into it unless it bypasses
    /// the redirect itself. Without this flag such a policy is refused.
    #[arg(long)]
    pub allow_proxy_loop: bool,
    /// Never redirect traffic of these uids (the proxy's own user).
    #[arg(long, value_name = "UID[,UID..]")]
    pub exclude_uid: Vec<String>,
    /// Never redirect traffic of these gids.
    #[arg(long, value_name = "GID[,GID..]")]
    pub exclude_gid: Vec<String>,
    /// Never redirect traffic of this user (resolved to a uid on the host).
    #[arg(long, value_name = "NAME")]
    pub exclude_user: Vec<String>,
    /// Windows only (HNS UserSID; `system` = S-1-5-18).
    #[arg(long, value_name = "SID")]
    pub usersid: Option<String>,
    /// Outbound destination ports never redirected (ranges as 1000-2000).
    #[arg(long, value_name = "PORTS")]
    pub exclude_outbound_port: Vec<String>,
    /// Inbound (local) ports never redirected.
    #[arg(long, value_name = "PORTS")]
    pub exclude_inbound_port: Vec<String>,
    /// Outbound destinations never redirected.
    #[arg(long, value_name = "CIDRS")]
    pub exclude_outbound_cidr: Vec<String>,
    /// Inbound sources never redirected.
    #[arg(long, value_name = "CIDRS")]
    pub exclude_inbound_cidr: Vec<String>,
    /// Only redirect traffic whose local address is in these CIDRs (hcnproxyctl: --localaddr).
    #[arg(long, alias = "localaddr", value_name = "CIDRS")]
    pub local_address: Vec<String>,
    /// Only redirect traffic whose remote address is in these CIDRs (hcnproxyctl: --remoteaddr).
    #[arg(long, alias = "remoteaddr", value_name = "CIDRS")]
    pub remote_address: Vec<String>,
    /// Only redirect traffic on these local ports (hcnproxyctl: --localports).
    #[arg(long, alias = "localports", value_name = "PORTS")]
    pub local_ports: Vec<String>,
    /// Only redirect traffic to these remote ports (hcnproxyctl: --remoteports).
    #[arg(long, alias = "remoteports", value_name = "PORTS")]
    pub remote_ports: Vec<String>,
}

impl PolicyArgs {
    fn has_inline_flags(&self) -> bool {
        let Self {
            file: _,
            name,
            outbound_port,
            inbound_port,
            destination_proxy,
            dns_port,
            allow_proxy_loop,
            protocol,
            family,
            priority,
            exclude_uid,
            exclude_gid,
            exclude_user,
            usersid,
            exclude_outbound_port,
            exclude_inbound_port,
            exclude_outbound_cidr,
            exclude_inbound_cidr,
            local_address,
            remote_address,
            local_ports,
            remote_ports,
        } = self;
        [
            name,
            outbound_port,
            inbound_port,
            destination_proxy,
            dns_port,
            protocol,
            family,
            priority,
            usersid,
        ]
        .iter()
        .any(|o| o.is_some())
            || *allow_proxy_loop
            || [
                exclude_uid,
                exclude_gid,
                exclude_user,
                exclude_outbound_port,
                exclude_inbound_port,
                exclude_outbound_cidr,
                exclude_inbound_cidr,
                local_address,
                remote_address,
                local_ports,
                remote_ports,
            ]
            .iter()
            .any(|v| !v.is_empty())
    }

    /// The policies these flags describe, normalized and validated.
    pub fn policies(&self) -> Result<Vec<Policy>, PolicyError> {
        if let Some(path) = &self.file {
            if self.has_inline_flags() {
                return Err(PolicyError::conflict(
                    "file",
                    "give the policy either in --file or as flags, not both",
                ));
            }
            return policies_from_file(path);
        }
        Ok(vec![self.policy()?])
    }

    fn policy(&self) -> Result<Policy, PolicyError> {
        let mut p = Policy::default();
        if let Some(name) = &self.name {
            p.name = name.clone();
        }
        if let Some(v) = &self.outbound_port {
            p.outbound_port = Some(parse_port("outbound-port", v)?);
        }
        if let Some(v) = &self.inbound_port {
            p.inbound_port = Some(parse_port("inbound-port", v)?);
        }
        if let Some(v) = &self.dns_port {
            p.dns_port = Some(parse_port("dns-port", v)?);
        }
        p.allow_proxy_loop = self.allow_proxy_loop;
        if let Some(v) = &self.destination_proxy {
            let (dest, proxy) = v.split_once('=').ok_or_else(|| {
                PolicyError::invalid("destination-proxy", format!("`{v}` is not DEST=PROXY"))
            })?;
            p.destination_proxy = Some(DestinationProxy {
                destination: parse_socket_addr("destination-proxy", dest)?,
                proxy: parse_socket_addr("destination-proxy", proxy)?,
            });
        }
        if let Some(v) = &self.protocol {
            p.protocols = parse_protocols("protocol", v)?;
        }
        if let Some(v) = &self.family {
            p.family = parse_family("family", v)?;
        }
        if let Some(v) = &self.priority {
            p.priority = v.trim().parse().map_err(|_| {
                PolicyError::invalid("priority", format!("`{v}` is not a number in 0-65535"))
            })?;
        }
        for v in &self.exclude_uid {
            p.exclude.uids.extend(parse_uids("exclude-uid", v)?);
        }
        for v in &self.exclude_gid {
            p.exclude.gids.extend(parse_gids("exclude-gid", v)?);
        }
        p.exclude.users.extend(self.exclude_user.iter().cloned());
        if let Some(sid) = &self.usersid {
            p.exclude.sids.push(expand_sid(sid));
        }
        for v in &self.exclude_outbound_port {
            p.outbound_exceptions
                .ports
                .extend(parse_port_ranges("exclude-outbound-port", v)?);
        }
        for v in &self.exclude_inbound_port {
            p.inbound_exceptions
                .ports
                .extend(parse_port_ranges("exclude-inbound-port", v)?);
        }
        for v in &self.exclude_outbound_cidr {
            p.outbound_exceptions
                .cidrs
                .extend(parse_cidrs("exclude-outbound-cidr", v)?);
        }
        for v in &self.exclude_inbound_cidr {
            p.inbound_exceptions
                .cidrs
                .extend(parse_cidrs("exclude-inbound-cidr", v)?);
        }
        for v in &self.local_address {
            p.matching
                .local_addresses
                .extend(parse_cidrs("local-address", v)?);
        }
        for v in &self.remote_address {
            p.matching
                .remote_addresses
                .extend(parse_cidrs("remote-address", v)?);
        }
        for v in &self.local_ports {
            p.matching
                .local_ports
                .extend(parse_port_ranges("local-ports", v)?);
        }
        for v in &self.remote_ports {
            p.matching
                .remote_ports
                .extend(parse_port_ranges("remote-ports", v)?);
        }
        p.checked()
    }
}

/// hcnproxyctl's shorthand: `--usersid system` means LocalSystem.
fn expand_sid(sid: &str) -> String {
    if sid.eq_ignore_ascii_case("system") {
        "S-1-5-18".to_owned()
    } else {
        sid.to_owned()
    }
}
