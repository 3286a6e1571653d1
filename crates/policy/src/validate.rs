//! Validation: everything that can be known wrong without touching a host is
//! refused here, before any backend sends anything, with the field named.

use ipnet::IpNet;

use crate::{Exceptions, Family, MAX_NAME_LEN, Policy, PolicyError, PortRange};

/// Destinations excepted from outbound redirection by default, so sidecars
/// in one pod keep talking to each other over loopback.
pub fn loopback_nets() -> [IpNet; 2] {
    [
        "127.0.0.0/8".parse().expect("valid literal"),
        "::1/128".parse().expect("valid literal"),
    ]
}

impl Policy {
    /// Checks every field and the relations between them.
    pub fn validate(&self) -> Result<(), PolicyError> {
        validate_name(&self.name)?;
        if self.outbound_port.is_none()
            && self.inbound_port.is_none()
            && self.destination_proxy.is_none()
            && self.dns_port.is_none()
        {
            return Err(PolicyError::conflict(
                "outbound-port",
                "a policy needs --outbound-port (--port), --inbound-port, --dns-port or \
                 --destination-proxy",
            ));
        }
        for (field, port) in [
            ("outbound-port", self.outbound_port),
            ("inbound-port", self.inbound_port),
            ("dns-port", self.dns_port),
        ] {
            if port == Some(0) {
                return Err(PolicyError::invalid(field, "port 0 is outside 1-65535"));
            }
        }
        if self.protocols.is_empty() {
            return Err(PolicyError::invalid("protocol", "no protocol given"));
        }
        for user in &self.exclude.users {
            validate_user_name(user)?;
        }
        for sid in &self.exclude.sids {
            validate_sid(sid)?;
        }

        let m = &self.matching;
        check_ranges("local-ports", &m.local_ports)?;
        check_ranges("remote-ports", &m.remote_ports)?;
        check_nets("local-address", &m.local_addresses, self.family)?;
        check_nets("remote-address", &m.remote_addresses, self.family)?;

        check_exceptions(
            &self.outbound_exceptions,
            self.outbound_port.is_some(),
            (
                "exclude-outbound-port",
                "exclude-outbound-cidr",
                "--outbound-port",
            ),
            self.family,
        )?;
        check_exceptions(
            &self.inbound_exceptions,
            self.inbound_port.is_some(),
            (
                "exclude-inbound-port",
                "exclude-inbound-cidr",
                "--inbound-port",
            ),
            self.family,
        )?;

        if let Some(dp) = &self.destination_proxy {
            let field = "destination-proxy";
            if dp.destination.port() == 0 || dp.proxy.port() == 0 {
                return Err(PolicyError::invalid(field, "port 0 is outside 1-65535"));
            }
            if dp.destination.is_ipv4() != dp.proxy.is_ipv4() {
                return Err(PolicyError::invalid(
                    field,
                    "the destination and the proxy must be of the same address family",
                ));
            }
            if !self.covers(&dp.destination.ip()) {
                return Err(PolicyError::conflict(
                    field,
                    format!(
                        "destination {} is outside --family {}",
                        dp.destination, self.family
                    ),
                ));
            }
            if dp.destination == dp.proxy {
                return Err(PolicyError::invalid(
                    field,
                    "the proxy cannot be the destination itself",
                ));
            }
        }
        // Last, so a malformed field is reported before the missing one.
        if self.redirects_outbound() && self.exclude.is_empty() && !self.allow_proxy_loop {
            let field = if self.outbound_port.is_some() {
                "outbound-port"
            } else {
                "dns-port"
            };
            return Err(PolicyError::conflict(
                field,
                "the proxy's own outbound connections would be redirected back into it (a \
                 loop); exclude its identity with --exclude-uid, --exclude-gid or \
                 --exclude-user (--usersid on Windows), or pass --allow-proxy-loop \
                 (allowProxyLoop: true in a file) if the proxy bypasses the redirect itself",
            ));
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), PolicyError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars {
        return Err(PolicyError::invalid(
            "name",
            format!("`{name}`: use 1-{MAX_NAME_LEN} characters of a-z, A-Z, 0-9, - and _"),
        ));
    }
    Ok(())
}

fn validate_user_name(user: &str) -> Result<(), PolicyError> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::invalid(
            "exclude-user",
            format!("`{user}` is not a valid user name"),
        ))
    }
}

/// `S-1-<authority>-<sub>...`, all decimal, as Windows writes SIDs.
fn validate_sid(sid: &str) -> Result<(), PolicyError> {
    let mut parts = sid.split('-');
    let ok =
        parts.next().is_some_and(|s| s.eq_ignore_ascii_case("S")) && parts.next() == Some("1") && {
            let rest: Vec<&str> = parts.collect();
            !rest.is_empty()
                && rest.len() <= 16
                && rest.iter().all(|p| {
                    !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit())
                })
        };
    if ok {
        Ok(())
    } else {
        Err(PolicyError::invalid(
            "usersid",
            format!("`{sid}` is not a SID like S-1-5-18"),
        ))
    }
}

fn check_ranges(field: &'static str, ranges: &[PortRange]) -> Result<(), PolicyError> {
    for r in ranges {
        if r.start == 0 || r.start > r.end {
            return Err(PolicyError::invalid(field, format!("bad port range {r}")));
        }
    }
    // In sorted order a range can overlap one that is not its neighbour
    // (1-1000, 2-3, 500), so compare with the furthest-reaching range so far.
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut widest: Option<PortRange> = None;
    for r in sorted {
        if let Some(w) = widest
            && w.overlaps(&r)
        {
            return Err(PolicyError::invalid(
                field,
                format!("{w} and {r} overlap; merge them into one range"),
            ));
        }
        if widest.is_none_or(|w| r.end > w.end) {
            widest = Some(r);
        }
    }
    Ok(())
}

fn check_nets(field: &'static str, nets: &[IpNet], family: Family) -> Result<(), PolicyError> {
    for net in nets {
        if net.trunc() != *net {
            return Err(PolicyError::invalid(
                field,
                format!("`{net}` has host bits set; did you mean {}?", net.trunc()),
            ));
        }
        let covered = match net {
            IpNet::V4(_) => family.has_ipv4(),
            IpNet::V6(_) => family.has_ipv6(),
        };
        if !covered {
            return Err(PolicyError::conflict(
                field,
                format!("{net} is outside --family {family}"),
            ));
        }
    }
    let mut sorted = nets.to_vec();
    sorted.sort();
    for (i, a) in sorted.iter().enumerate() {
        // A containing prefix sorts before what it contains, and everything it
        // contains follows it directly, so comparing with the next is enough.
        if let Some(b) = sorted.get(i + 1)
            && (a.contains(b) || b.contains(a))
        {
            return Err(PolicyError::invalid(
                field,
                format!("{a} and {b} overlap; keep only the wider one"),
            ));
        }
    }
    Ok(())
}

fn check_exceptions(
    exceptions: &Exceptions,
    has_port: bool,
    (port_field, cidr_field, needs): (&'static str, &'static str, &str),
    family: Family,
) -> Result<(), PolicyError> {
    if !exceptions.ports.is_empty() && !has_port {
        return Err(PolicyError::conflict(
            port_field,
            format!("port exceptions need {needs}"),
        ));
    }
    if !exceptions.cidrs.is_empty() && !has_port {
        return Err(PolicyError::conflict(
            cidr_field,
            format!("address exceptions need {needs}"),
        ));
    }
    check_ranges(port_field, &exceptions.ports)?;
    check_nets(cidr_field, &exceptions.cidrs, family)
}
