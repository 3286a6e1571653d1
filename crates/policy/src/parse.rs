//! Parsing of CLI flag values and policy files. Each parser takes the CLI
//! name of the field it parses so its error names that field.
//!
//! List-valued flags accept comma-separated values as hcnproxyctl's do
//! (`--localports 80,443`), and may also be repeated.

use std::net::SocketAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

use crate::{Family, Policy, PolicyError, PortRange, Protocol};

fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// A proxy port: 1..=65535.
pub fn parse_port(field: &'static str, value: &str) -> Result<u16, PolicyError> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| PolicyError::invalid(field, format!("`{value}` is not a port number")))?;
    if n == 0 || n > 65535 {
        return Err(PolicyError::invalid(
            field,
            format!("port {n} is outside 1-65535"),
        ));
    }
    Ok(n as u16)
}

/// Ports and inclusive ranges: `80,443,1000-2000`.
pub fn parse_port_ranges(field: &'static str, value: &str) -> Result<Vec<PortRange>, PolicyError> {
    items(value)
        .map(|item| item.parse().map_err(|e| PolicyError::invalid(field, e)))
        .collect()
}

/// CIDRs or bare addresses (`10.0.0.0/8,fd00::/8,192.0.2.1`). A prefix with
/// host bits set is refused rather than silently widened or narrowed.
pub fn parse_cidrs(field: &'static str, value: &str) -> Result<Vec<IpNet>, PolicyError> {
    items(value)
        .map(|item| {
            let net: IpNet = match item.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => item
                    .parse::<std::net::IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| {
                        PolicyError::invalid(
                            field,
                            format!("`{item}` is not an IP address or CIDR"),
                        )
                    })?,
            };
            if net.trunc() != net {
                return Err(PolicyError::invalid(
                    field,
                    format!("`{item}` has host bits set; did you mean {}?", net.trunc()),
                ));
            }
            Ok(net)
        })
        .collect()
}

/// `tcp`, `udp`, `tcp,udp`, or the protocol numbers 6 and 17 (as HNS writes them).
pub fn parse_protocols(field: &'static str, value: &str) -> Result<Vec<Protocol>, PolicyError> {
    let protocols: Vec<Protocol> = items(value)
        .map(|item| match item.to_ascii_lowercase().as_str() {
            "tcp" | "6" => Ok(Protocol::Tcp),
            "udp" | "17" => Ok(Protocol::Udp),
            other => Err(PolicyError::invalid(
                field,
                format!("unknown protocol `{other}` (expected tcp, udp or tcp,udp)"),
            )),
        })
        .collect::<Result<_, _>>()?;
    if protocols.is_empty() {
        return Err(PolicyError::invalid(field, "no protocol given"));
    }
    Ok(protocols)
}

pub fn parse_family(field: &'static str, value: &str) -> Result<Family, PolicyError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "ipv4" | "4" | "ip" => Ok(Family::Ipv4),
        "ipv6" | "6" | "ip6" => Ok(Family::Ipv6),
        "both" | "inet" | "all" => Ok(Family::Both),
        other => Err(PolicyError::invalid(
            field,
            format!("unknown family `{other}` (expected ipv4, ipv6 or both)"),
        )),
    }
}

fn parse_ids(field: &'static str, value: &str) -> Result<Vec<u32>, PolicyError> {
    items(value)
        .map(|item| {
            item.parse::<u32>()
                .map_err(|_| PolicyError::invalid(field, format!("`{item}` is not a numeric id")))
        })
        .collect()
}

pub fn parse_uids(field: &'static str, value: &str) -> Result<Vec<u32>, PolicyError> {
    parse_ids(field, value)
}

pub fn parse_gids(field: &'static str, value: &str) -> Result<Vec<u32>, PolicyError> {
    parse_ids(field, value)
}

/// `ADDR:PORT`, with IPv6 in brackets (`[fd00::1]:8080`).
pub fn parse_socket_addr(field: &'static str, value: &str) -> Result<SocketAddr, PolicyError> {
    value.trim().parse().map_err(|_| {
        PolicyError::invalid(
            field,
            format!("`{value}` is not ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)"),
        )
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Json,
    Yaml,
}

impl FileFormat {
    fn of(path: &Path, text: &str) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::Json,
            Some("yaml" | "yml") => Self::Yaml,
            _ if text.trim_start().starts_with(['{', '[']) => Self::Json,
            _ => Self::Yaml,
        }
    }
}

/// Parses policies from JSON or YAML text; every policy is normalized and
/// validated, and the names must be unique.
pub fn policies_from_str(
    origin: &str,
    text: &str,
    format: FileFormat,
) -> Result<Vec<Policy>, PolicyError> {
    let file_error = |message: String| PolicyError::File {
        path: origin.to_owned(),
        message,
    };
    // A file holds one policy, a list, or `{policies: [...]}`. Parse into a
    // generic value first and dispatch by shape: serde's untagged enums would
    // hide the real error (a typo'd key surfaces as "did not match any variant").
    let value: serde_json::Value = match format {
        FileFormat::Json => serde_json::from_str(text).map_err(|e| file_error(e.to_string()))?,
        FileFormat::Yaml => serde_yaml::from_str(text).map_err(|e| file_error(e.to_string()))?,
    };
    let policies = match &value {
        serde_json::Value::Array(_) => {
            Vec::<Policy>::deserialize(&value).map_err(|e| file_error(e.to_string()))?
        }
        serde_json::Value::Object(map) if map.contains_key("policies") && map.len() == 1 => {
            Vec::<Policy>::deserialize(&map["policies"]).map_err(|e| file_error(e.to_string()))?
        }
        _ => vec![Policy::deserialize(&value).map_err(|e| file_error(e.to_string()))?],
    };
    let mut checked = Vec::with_capacity(policies.len());
    for policy in policies {
        let policy = policy.checked()?;
        if checked.iter().any(|p: &Policy| p.name == policy.name) {
            return Err(PolicyError::conflict(
                "name",
                format!("policy name `{}` appears twice in {origin}", policy.name),
            ));
        }
        checked.push(policy);
    }
    if checked.is_empty() {
        return Err(file_error("holds no policy".into()));
    }
    Ok(checked)
}

/// Reads policies from a `.json`, `.yaml` or `.yml` file (format guessed
/// from the content for other names).
pub fn policies_from_file(path: &Path) -> Result<Vec<Policy>, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    policies_from_str(
        &path.display().to_string(),
        &text,
        FileFormat::of(path, &text),
    )
}
