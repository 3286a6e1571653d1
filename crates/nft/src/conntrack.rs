//! Deleting the conntrack entries of connections our NAT rules redirected,
//! over ctnetlink, inside the target namespace.
//!
//! NAT is decided once per connection, on its first packet; conntrack then
//! keeps rewriting that connection the same way whatever the ruleset says
//! later. So after a policy is replaced or removed, a connection opened
//! under it still reaches the old proxy until it closes. Deleting its entry
//! makes the next packet a new conntrack entry evaluated under the current
//! rules: a TCP connection is then reset (the new target has no socket for
//! it) and the client's reconnect follows the new policy; a UDP flow simply
//! moves.
//!
//! Encoded by hand for the same reasons as the nf_tables messages (see the
//! crate docs); ctnetlink needs only a dump and a delete by tuple, and the
//! tuple is copied back to the kernel exactly as it was dumped.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::netlink::{self, MsgBuf, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, Socket, attr, be32};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// The connection's destination was rewritten (redirect or DNAT).
const IPS_DST_NAT: u32 = 1 << 5;

/// One dumped entry, as much of it as deciding and deleting needs.
#[derive(Debug, Clone)]
struct Entry {
    family: u8,
    status: u32,
    protocol: u8,
    /// The reply's source port: for a NATed connection, the port its
    /// destination was rewritten to (the proxy's).
    reply_src_port: Option<u16>,
    orig_tuple: Vec<u8>,
    zone: Option<Vec<u8>>,
}

fn dump(sock: &Socket) -> io::Result<Vec<Entry>> {
    let mut req = MsgBuf::default();
    // AF_UNSPEC dumps every family.
    let start = req.begin(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        &[libc::AF_UNSPEC as u8, 0, 0, 0],
    );
    req.end(start);
    let messages = sock.dump(&req)?;
    Ok(messages
        .iter()
        .filter_map(|m| {
            let family = *m.payload.first()?;
            let attrs = m.payload.get(4..)?;
            let orig = attr(attrs, CTA_TUPLE_ORIG)?;
            let proto = attr(orig, CTA_TUPLE_PROTO)?;
            let reply_src_port = attr(attrs, CTA_TUPLE_REPLY)
                .and_then(|r| attr(r, CTA_TUPLE_PROTO))
                .and_then(|p| attr(p, CTA_PROTO_SRC_PORT))
                .and_then(|v| Some(u16::from_be_bytes(v.get(0..2)?.try_into().ok()?)));
            Some(Entry {
                family,
                status: attr(attrs, CTA_STATUS).and_then(be32).unwrap_or(0),
                protocol: *attr(proto, CTA_PROTO_NUM)?.first()?,
                reply_src_port,
                orig_tuple: orig.to_vec(),
                zone: attr(attrs, CTA_ZONE).map(<[u8]>::to_vec),
            })
        })
        .collect())
}

fn delete(sock: &Socket, e: &Entry) -> io::Result<bool> {
    let mut req = MsgBuf::default();
    let start = req.begin(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        &[e.family, 0, 0, 0],
    );
    let t = req.nest_begin(CTA_TUPLE_ORIG);
    req.buf.extend_from_slice(&e.orig_tuple);
    req.nest_end(t);
    if let Some(zone) = &e.zone {
        req.attr(CTA_ZONE, zone);
    }
    req.end(start);
    match sock.request(&req) {
        Ok(_) => Ok(true),
        // Gone since the dump (closed or timed out): nothing to do.
        Err(err) if netlink::errno_of(&err) == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

/// The (source, destination) of a tuple attribute.
fn tuple_addrs(tuple: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let ip = attr(tuple, CTA_TUPLE_IP)?;
    let proto = attr(tuple, CTA_TUPLE_PROTO)?;
    let port = |ty| -> Option<u16> {
        Some(u16::from_be_bytes(
            attr(proto, ty)?.get(0..2)?.try_into().ok()?,
        ))
    };
    let addr = |ty| -> Option<IpAddr> {
        let v = attr(ip, ty)?;
        match v.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
            _ => None,
        }
    };
    let (src, dst) = match (addr(CTA_IP_V4_SRC), addr(CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (s, d),
        _ => (addr(CTA_IP_V6_SRC)?, addr(CTA_IP_V6_DST)?),
    };
    Some((
        SocketAddr::new(src, port(CTA_PROTO_SRC_PORT)?),
        SocketAddr::new(dst, port(CTA_PROTO_DST_PORT)?),
    ))
}

/// What conntrack decided for the connection `protocol` from `source`: its
/// original destination, and the port NAT rewrote it to (None: not NATed).
pub(crate) fn nat_of(
    sock: &Socket,
    protocol: u8,
    source: SocketAddr,
) -> io::Result<Option<(SocketAddr, Option<u16>)>> {
    Ok(dump(sock)?.into_iter().find_map(|e| {
        if e.protocol != protocol {
            return None;
        }
        let (src, dst) = tuple_addrs(&e.orig_tuple)?;
        (src == source).then_some((
            dst,
            e.reply_src_port.filter(|_| e.status & IPS_DST_NAT != 0),
        ))
    }))
}

/// Deletes the entries of TCP and UDP connections whose destination was
/// rewritten (redirect, DNAT) to any port but those in `spared`; returns
/// how many were deleted. In a pod's namespace our table is what NATs.
pub(crate) fn flush_nat_except(sock: &Socket, spared: &BTreeSet<u16>) -> io::Result<usize> {
    let mut deleted = 0;
    for e in dump(sock)? {
        let ours = e.status & IPS_DST_NAT != 0
            && matches!(e.protocol, 6 | 17)
            && e.reply_src_port.is_some_and(|p| !spared.contains(&p));
        if ours && delete(sock, &e)? {
            deleted += 1;
        }
    }
    Ok(deleted)
}
