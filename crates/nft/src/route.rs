//! Policy routing for UDP tproxy, over raw rtnetlink.
//!
//! Outbound UDP that a policy redirects is marked in the `mark-output` route
//! chain; these rules send marked packets to a table whose only route is
//! `local default dev lo`, so they loop back into prerouting where the
//! tproxy rule hands them to the proxy socket with the destination intact:
//!
//! ```text
//! ip rule add fwmark 0x07e10000/0xffff0000 lookup 2017 pref 1300   (and -6)
//! ip route add local default dev lo table 2017                     (and -6)
//! ```
//!
//! Four fixed messages do not justify the netlink-packet-route/rtnetlink
//! crates (and their version skew); the same builder as nf_tables is used.

use std::io;

use crate::netlink::{
    MsgBuf, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, Socket, errno_of,
};
use crate::ruleset::{MARK_BASE, MARK_MASK};

pub const ROUTE_TABLE: u32 = 2017;
pub const RULE_PRIORITY: u32 = 1300;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const LOOPBACK_IFINDEX: u32 = 1;

fn rule_msg(ty: u16, flags: u16, family: u8) -> MsgBuf {
    let mut m = MsgBuf::default();
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
    let hdr = [family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    let s = m.begin(ty, NLM_F_REQUEST | NLM_F_ACK | flags, 1, &hdr);
    m.attr_ne32(FRA_FWMARK, MARK_BASE);
    m.attr_ne32(FRA_FWMASK, MARK_MASK);
    m.attr_ne32(FRA_TABLE, ROUTE_TABLE);
    m.attr_ne32(FRA_PRIORITY, RULE_PRIORITY);
    m.end(s);
    m
}

fn route_msg(ty: u16, flags: u16, family: u8) -> MsgBuf {
    let mut m = MsgBuf::default();
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    let hdr = [
        family,
        0,
        0,
        0,
        0,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    let s = m.begin(ty, NLM_F_REQUEST | NLM_F_ACK | flags, 1, &hdr);
    m.attr_ne32(RTA_TABLE, ROUTE_TABLE);
    m.attr_ne32(RTA_OIF, LOOPBACK_IFINDEX);
    m.end(s);
    m
}

const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];

/// Installs the rules and routes; what exists already is left as it is.
pub fn ensure(sock: &Socket) -> io::Result<()> {
    for family in FAMILIES {
        for m in [
            route_msg(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, family),
            rule_msg(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, family),
        ] {
            match sock.request(&m) {
                Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                other => {
                    other?;
                }
            }
        }
    }
    Ok(())
}

/// Removes the rules and routes; what is already gone is fine.
pub fn remove(sock: &Socket) -> io::Result<()> {
    for family in FAMILIES {
        for m in [
            rule_msg(RTM_DELRULE, 0, family),
            route_msg(RTM_DELROUTE, 0, family),
        ] {
            // Deleting what is not there (ENOENT/ESRCH) is the goal reached.
            match sock.request(&m) {
                Ok(_) => {}
                Err(e) if matches!(errno_of(&e), Some(libc::ENOENT | libc::ESRCH)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
