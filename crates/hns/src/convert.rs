//! Policy <-> `L4WfpProxyPolicySetting`. Everything HNS cannot express is
//! refused here, before anything is sent, with a [`PolicyError`] naming the
//! CLI flag at fault and the HNS limit — a field is never silently dropped.
//!
//! Value formats follow hcsshim's fixture and hcnproxyctl: ports as decimal
//! strings, protocol numbers as strings ("6"), a single address written bare
//! ("10.0.0.4"), a wider prefix as CIDR, lists joined with commas in the
//! FilterTuple strings and one entry per element in the exception arrays,
//! port ranges as "1000-2000".

use std::net::IpAddr;

use ipnet::IpNet;
use proxyctl_policy::{
    DEFAULT_POLICY_NAME, Exceptions, Family, Policy, PolicyError, PortRange, Protocol,
};

use crate::schema::{FiveTuple, L4WfpProxyPolicySetting, ProxyExceptions};

/// What one HNS limit forbids, phrased once so every refusal reads alike.
fn refuse(field: &'static str, message: impl Into<String>) -> PolicyError {
    PolicyError::conflict(field, format!("not supported by HNS: {}", message.into()))
}

/// Checks that HNS can express `policy`; the first field it cannot is named.
pub fn check_expressible(policy: &Policy) -> Result<(), PolicyError> {
    if policy.name != DEFAULT_POLICY_NAME {
        return Err(refuse(
            "name",
            format!(
                "L4WFPPROXY policies carry no name (on HNS a policy is identified by its \
                 match and priority); leave --name unset (it reads back as \
                 `{DEFAULT_POLICY_NAME}`), not `{}`",
                policy.name
            ),
        ));
    }
    if policy.protocols != [Protocol::Tcp] {
        return Err(refuse(
            "protocol",
            "L4WFPPROXY redirects TCP only; use --protocol tcp",
        ));
    }
    if policy.family != Family::Ipv4 {
        return Err(refuse(
            "family",
            format!(
                "L4WFPPROXY redirects IPv4 only; use --family ipv4 (got {})",
                policy.family
            ),
        ));
    }
    let ex = &policy.exclude;
    if !ex.uids.is_empty() {
        return Err(refuse(
            "exclude-uid",
            "HNS excludes traffic by Windows SID, not by uid; use --usersid",
        ));
    }
    if !ex.gids.is_empty() {
        return Err(refuse(
            "exclude-gid",
            "HNS excludes traffic by Windows SID, not by gid; use --usersid",
        ));
    }
    if !ex.users.is_empty() {
        return Err(refuse(
            "exclude-user",
            "HNS excludes traffic by Windows SID, not by user name; use --usersid",
        ));
    }
    if ex.sids.len() > 1 {
        return Err(refuse(
            "usersid",
            format!(
                "UserSID holds one SID (a prefix match; use a group SID such as S-1-5-32-556 \
                 to cover several accounts), got {}",
                ex.sids.len()
            ),
        ));
    }
    if policy.destination_proxy.is_some() {
        return Err(refuse(
            "destination-proxy",
            "L4WFPPROXY has no destination NAT; use the nft backend for --destination-proxy",
        ));
    }
    if policy.dns_port.is_some() {
        return Err(refuse(
            "dns-port",
            "L4WFPPROXY has no NAT to a DNS port; use the nft backend for --dns-port",
        ));
    }
    if policy.outbound_port.is_none() && policy.inbound_port.is_none() {
        return Err(refuse(
            "outbound-port",
            "an L4WFPPROXY policy needs --outbound-port (--port) or --inbound-port",
        ));
    }
    Ok(())
}

/// The exact `L4WfpProxyPolicySetting` for `policy` (validated and checked first).
pub fn to_setting(policy: &Policy) -> Result<L4WfpProxyPolicySetting, PolicyError> {
    let policy = policy.clone().checked()?;
    check_expressible(&policy)?;
    let m = &policy.matching;
    Ok(L4WfpProxyPolicySetting {
        inbound_proxy_port: policy
            .inbound_port
            .map(|p| p.to_string())
            .unwrap_or_default(),
        outbound_proxy_port: policy
            .outbound_port
            .map(|p| p.to_string())
            .unwrap_or_default(),
        filter_tuple: FiveTuple {
            protocols: Protocol::Tcp.number().to_string(),
            local_addresses: join(m.local_addresses.iter().map(net_text)),
            remote_addresses: join(m.remote_addresses.iter().map(net_text)),
            local_ports: join(m.local_ports.iter().map(ToString::to_string)),
            remote_ports: join(m.remote_ports.iter().map(ToString::to_string)),
            priority: policy.priority,
        },
        user_sid: policy.exclude.sids.first().cloned().unwrap_or_default(),
        inbound_exceptions: exceptions_of(&policy.inbound_exceptions),
        outbound_exceptions: exceptions_of(&policy.outbound_exceptions),
    })
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(",")
}

/// A host prefix is written as a bare address, as HNS documents show it.
fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn exceptions_of(ex: &Exceptions) -> ProxyExceptions {
    ProxyExceptions {
        ip_address_exceptions: ex.cidrs.iter().map(net_text).collect(),
        port_exceptions: ex.ports.iter().map(ToString::to_string).collect(),
    }
}

/// Why a policy read back from HNS could not be turned into a [`Policy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HNS returned an L4WFPPROXY policy proxyctl cannot read: {field} = `{value}`: {reason}")]
pub struct ReadBackError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

fn bad(field: &'static str, value: &str, reason: impl Into<String>) -> ReadBackError {
    ReadBackError {
        field,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// The [`Policy`] an `L4WfpProxyPolicySetting` read from HNS means
/// (name `default`, family ipv4, normalized).
pub fn from_setting(setting: &L4WfpProxyPolicySetting) -> Result<Policy, ReadBackError> {
    let port = |field: &'static str, text: &str| -> Result<Option<u16>, ReadBackError> {
        if text.is_empty() {
            return Ok(None);
        }
        match text.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(bad(field, text, "not a port in 1-65535")),
            Ok(p) => Ok(Some(p)),
        }
    };
    let ft = &setting.filter_tuple;
    let protocols = if ft.protocols.trim().is_empty() {
        // hcnproxyctl documents TCP as the default when Protocols is blank.
        vec![Protocol::Tcp]
    } else {
        split(&ft.protocols)
            .map(|p| {
                p.parse::<u8>()
                    .ok()
                    .and_then(Protocol::from_number)
                    .ok_or_else(|| bad("Protocols", &ft.protocols, "not 6 (TCP) or 17 (UDP)"))
            })
            .collect::<Result<_, _>>()?
    };
    let mut policy = Policy {
        name: DEFAULT_POLICY_NAME.to_owned(),
        priority: ft.priority,
        outbound_port: port("OutboundProxyPort", &setting.outbound_proxy_port)?,
        inbound_port: port("InboundProxyPort", &setting.inbound_proxy_port)?,
        protocols,
        family: Family::Ipv4,
        ..Policy::default()
    };
    if !setting.user_sid.is_empty() {
        policy.exclude.sids.push(setting.user_sid.clone());
    }
    // What HNS holds is enforced: a policy without UserSID was accepted as
    // it is (normalize keeps the flag only where a loop is possible).
    policy.allow_proxy_loop = true;
    policy.matching.local_addresses = nets("LocalAddresses", split(&ft.local_addresses))?;
    policy.matching.remote_addresses = nets("RemoteAddresses", split(&ft.remote_addresses))?;
    policy.matching.local_ports = ports("LocalPorts", split(&ft.local_ports))?;
    policy.matching.remote_ports = ports("RemotePorts", split(&ft.remote_ports))?;
    for (field_ip, field_port, from, to) in [
        (
            "InboundExceptions.IpAddressExceptions",
            "InboundExceptions.PortExceptions",
            &setting.inbound_exceptions,
            &mut policy.inbound_exceptions,
        ),
        (
            "OutboundExceptions.IpAddressExceptions",
            "OutboundExceptions.PortExceptions",
            &setting.outbound_exceptions,
            &mut policy.outbound_exceptions,
        ),
    ] {
        to.cidrs = nets(
            field_ip,
            from.ip_address_exceptions.iter().map(String::as_str),
        )?;
        to.ports = ports(field_port, from.port_exceptions.iter().map(String::as_str))?;
    }
    policy.normalize();
    Ok(policy)
}

fn split(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn nets<'a>(
    field: &'static str,
    items: impl Iterator<Item = &'a str>,
) -> Result<Vec<IpNet>, ReadBackError> {
    items
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| bad(field, item, "not an IP address or CIDR"))
        })
        .collect()
}

fn ports<'a>(
    field: &'static str,
    items: impl Iterator<Item = &'a str>,
) -> Result<Vec<PortRange>, ReadBackError> {
    items
        .map(|item| item.parse::<PortRange>().map_err(|e| bad(field, item, e)))
        .collect()
}
