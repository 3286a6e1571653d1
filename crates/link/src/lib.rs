//! Links, addresses and routes over rtnetlink, in the network namespace of
//! the calling thread (a socket belongs to the namespace it was opened in).
//!
//! What `proxyctl demo` and `proxyctl verify` need to wire throw-away
//! namespaces: a veth pair (optionally with its peer end in another
//! namespace), a link moved into a namespace or deleted, links up,
//! addresses, routes through a link (in any table), source rules, and
//! whether a destination is routed. Messages
//! are built with netlink-packet-route and sent on a netlink-sys socket,
//! one request and its acknowledgement at a time; the kernel's error comes
//! back as [`LinkError::Kernel`] with the operation named. Doing this here
//! instead of running iproute2's `ip` means the demo needs nothing but the
//! kernel.

#![cfg(target_os = "linux")]

use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: the kernel refused: {source}")]
    Kernel {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: no link named {name:?} in this namespace")]
    NoSuchLink { op: String, name: String },
    #[error("{op}: unreadable answer from the kernel: {detail}")]
    Decode { op: String, detail: String },
}

/// A route netlink socket of the calling thread's namespace.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn new() -> Result<Rtnl, LinkError> {
        let io = |source| LinkError::Io {
            op: "opening a route netlink socket".into(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// `ip link add A type veth peer name B [netns FD]`.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), LinkError> {
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes.push(LinkAttribute::IfName(peer.into()));
        if let Some(fd) = peer_netns {
            peer_msg
                .attributes
                .push(LinkAttribute::NetNsFd(fd.as_raw_fd()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(
            &format!("adding veth pair {name}/{peer}"),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip link set NAME netns FD`.
    pub fn move_to_netns(&mut self, name: &str, netns: BorrowedFd<'_>) -> Result<(), LinkError> {
        let op = format!("moving {name} to another namespace");
        let mut msg = LinkMessage::default();
        msg.header.index = index(&op, name)?;
        msg.attributes
            .push(LinkAttribute::NetNsFd(netns.as_raw_fd()));
        self.request(&op, RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// `ip link set NAME up`.
    pub fn set_up(&mut self, name: &str) -> Result<(), LinkError> {
        let op = format!("setting {name} up");
        let mut msg = LinkMessage::default();
        msg.header.index = index(&op, name)?;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(&op, RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// `ip addr add ADDR/PREFIX dev NAME` (IPv6 addresses `nodad`: usable
    /// at once, no duplicate detection on a link nothing else shares).
    pub fn add_address(&mut self, name: &str, addr: IpNet) -> Result<(), LinkError> {
        let op = format!("adding {addr} to {name}");
        let mut msg = AddressMessage::default();
        msg.header.family = family(addr.addr());
        msg.header.prefix_len = addr.prefix_len();
        msg.header.index = index(&op, name)?;
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        if addr.addr().is_ipv6() {
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(
            &op,
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip route add DEST dev NAME` (DEST 0.0.0.0/0 or ::/0: the default route).
    pub fn add_route_via_link(&mut self, dest: IpNet, name: &str) -> Result<(), LinkError> {
        self.add_route_via_link_in(dest, name, u32::from(RouteHeader::RT_TABLE_MAIN))
    }

    /// `ip route add DEST dev NAME table TABLE`.
    pub fn add_route_via_link_in(
        &mut self,
        dest: IpNet,
        name: &str,
        table: u32,
    ) -> Result<(), LinkError> {
        let op = format!("adding a route to {dest} through {name} (table {table})");
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dest.addr());
        msg.header.destination_prefix_length = dest.prefix_len();
        // Tables above 255 travel in the attribute only, as iproute2 sends them.
        msg.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        msg.attributes.push(RouteAttribute::Table(table));
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Link;
        msg.header.kind = RouteType::Unicast;
        if dest.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dest.addr())));
        }
        msg.attributes.push(RouteAttribute::Oif(index(&op, name)?));
        self.request(
            &op,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Whether the calling thread's namespace has a route to `dest`
    /// (`ip route get DEST` succeeding).
    pub fn has_route(&mut self, dest: IpAddr) -> Result<bool, LinkError> {
        let op = format!("looking up the route to {dest}");
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dest);
        msg.header.destination_prefix_length = if dest.is_ipv4() { 32 } else { 128 };
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dest)));
        match self.request(&op, RouteNetlinkMessage::GetRoute(msg), 0) {
            Ok(()) => Ok(true),
            Err(LinkError::Kernel { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// `ip link del NAME` (a veth pair goes as a whole).
    pub fn delete_link(&mut self, name: &str) -> Result<(), LinkError> {
        let op = format!("deleting {name}");
        let mut msg = LinkMessage::default();
        msg.header.index = index(&op, name)?;
        self.request(&op, RouteNetlinkMessage::DelLink(msg), 0)
    }

    /// `ip rule add from SOURCE lookup TABLE pref PREF` (SOURCE a host address).
    pub fn add_source_rule(
        &mut self,
        source: IpAddr,
        table: u32,
        pref: u32,
    ) -> Result<(), LinkError> {
        let op = format!("adding the rule from {source} lookup {table}");
        self.request(
            &op,
            RouteNetlinkMessage::NewRule(source_rule(source, table, pref)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip rule del from SOURCE lookup TABLE pref PREF`.
    pub fn delete_source_rule(
        &mut self,
        source: IpAddr,
        table: u32,
        pref: u32,
    ) -> Result<(), LinkError> {
        let op = format!("deleting the rule from {source} lookup {table}");
        self.request(
            &op,
            RouteNetlinkMessage::DelRule(source_rule(source, table, pref)),
            0,
        )
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), LinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        let io = |source| LinkError::Io {
            op: op.to_owned(),
            source,
        };
        self.socket.send(&buf, 0).map_err(io)?;
        loop {
            let mut answer = Vec::with_capacity(8192);
            let n = self.socket.recv(&mut answer, 0).map_err(io)?;
            let mut offset = 0;
            while offset < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[offset..n])
                    .map_err(|e| LinkError::Decode {
                        op: op.to_owned(),
                        detail: e.to_string(),
                    })?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq
                    && let NetlinkPayload::Error(e) = reply.payload
                {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(LinkError::Kernel {
                            op: op.to_owned(),
                            source: std::io::Error::from_raw_os_error(-code.get()),
                        }),
                    };
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

fn source_rule(source: IpAddr, table: u32, pref: u32) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = family(source);
    msg.header.src_len = if source.is_ipv4() { 32 } else { 128 };
    msg.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    msg.header.action = RuleAction::ToTable;
    msg.attributes.push(RuleAttribute::Source(source));
    msg.attributes.push(RuleAttribute::Table(table));
    msg.attributes.push(RuleAttribute::Priority(pref));
    msg
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// The index of link `name` in the calling thread's namespace.
fn index(op: &str, name: &str) -> Result<u32, LinkError> {
    let c = std::ffi::CString::new(name).map_err(|_| LinkError::NoSuchLink {
        op: op.to_owned(),
        name: name.to_owned(),
    })?;
    // SAFETY: a NUL-terminated string; if_nametoindex only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(LinkError::NoSuchLink {
            op: op.to_owned(),
            name: name.to_owned(),
        }),
        i => Ok(i),
    }
}
