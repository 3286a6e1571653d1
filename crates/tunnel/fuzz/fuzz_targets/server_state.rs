//! (b) The server's per-packet state machine: random sequences of packets
//! on frontend and agent streams, streams opening and closing, time
//! passing. The harness checks the accounting invariants after every step
//! and that closing everything leaves no pending dial or connection.
#![no_main]

use arbitrary::Arbitrary;
use konnectivity::proto::Packet;
use konnectivity::server::fuzzing::{StateMachine, small_options};
use libfuzzer_sys::fuzz_target;

/// Small id spaces so packets refer to each other.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Id {
    Seen(u8),
    Small(u8),
    Raw(i64),
}

#[derive(Arbitrary, Debug)]
enum Pkt {
    DialReq {
        random: Id,
        host: u8,
    },
    DialRsp {
        random: Id,
        connect_id: Id,
        fail: bool,
    },
    Data {
        connect_id: Id,
        len: u16,
    },
    CloseReq {
        connect_id: Id,
    },
    CloseRsp {
        connect_id: Id,
    },
    DialCls {
        random: Id,
    },
    DataAck {
        connect_id: Id,
        bytes: i64,
    },
    Drain,
    /// Type and payload disagree, or unknown type.
    Raw {
        kind: i32,
        payload: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum Op {
    AgentConnect {
        host: u8,
        default_route: bool,
        window: u16,
    },
    FrontendOpen,
    Agent(u8, Pkt),
    Frontend(u8, Pkt),
    AgentClose(u8),
    FrontendClose(u8),
    FrontendRead(u8),
    Advance(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    dial_timeout_ms: u8,
    flow_window: u16,
    ops: Vec<Op>,
}

const HOSTS: [&str; 3] = ["10.0.0.1:80", "node-a:443", "[::1]:22"];

fn id(sm: &StateMachine, i: Id) -> i64 {
    match i {
        Id::Seen(n) if !sm.seen_randoms.is_empty() => {
            sm.seen_randoms[n as usize % sm.seen_randoms.len()]
        }
        Id::Seen(n) | Id::Small(n) => i64::from(n % 8),
        Id::Raw(v) => v,
    }
}

fn packet(sm: &StateMachine, p: &Pkt) -> Packet {
    match *p {
        Pkt::DialReq { random, host } => {
            Packet::dial_req("tcp", HOSTS[host as usize % HOSTS.len()], id(sm, random))
        }
        Pkt::DialRsp {
            random,
            connect_id,
            fail,
        } => Packet::dial_rsp(
            id(sm, random),
            id(sm, connect_id),
            if fail {
                "dial tcp: connection refused"
            } else {
                ""
            },
        ),
        Pkt::Data { connect_id, len } => {
            Packet::data(id(sm, connect_id), vec![0x5a; len as usize % 3000].into())
        }
        Pkt::CloseReq { connect_id } => Packet::close_req(id(sm, connect_id)),
        Pkt::CloseRsp { connect_id } => Packet::close_rsp(id(sm, connect_id), ""),
        Pkt::DialCls { random } => Packet::dial_cls(id(sm, random)),
        Pkt::DataAck { connect_id, bytes } => {
            let mut p = Packet::data_ack(id(sm, connect_id), 0);
            if let Some(konnectivity::proto::Payload::DataAck(a)) = &mut p.payload {
                a.bytes = bytes;
            }
            p
        }
        Pkt::Drain => Packet::drain(),
        Pkt::Raw { kind, payload } => {
            let mut p = match payload % 3 {
                0 => Packet::drain(),
                1 => Packet::close_req(1),
                _ => Packet::dial_cls(1),
            };
            p.r#type = kind;
            if payload > 200 {
                p.payload = None;
            }
            p
        }
    }
}

fuzz_target!(|input: Input| {
    let timeout = u64::from(input.dial_timeout_ms % 4);
    let mut sm = StateMachine::new(small_options(timeout, usize::from(input.flow_window)));
    for op in input.ops.iter().take(200) {
        match op {
            Op::AgentConnect {
                host,
                default_route,
                window,
            } => {
                let ids = format!(
                    "host=node-a&ipv4=10.0.0.{}&default-route={}",
                    host % 3,
                    default_route
                );
                sm.agent_connect(&ids, usize::from(*window));
            }
            Op::FrontendOpen => sm.frontend_open(),
            Op::Agent(i, p) => {
                let p = packet(&sm, p);
                sm.agent_packet(usize::from(*i), p)
            }
            Op::Frontend(i, p) => {
                let p = packet(&sm, p);
                sm.frontend_packet(usize::from(*i), p)
            }
            Op::AgentClose(i) => sm.agent_close(usize::from(*i)),
            Op::FrontendClose(i) => sm.frontend_close(usize::from(*i)),
            Op::FrontendRead(i) => sm.frontend_read(usize::from(*i)),
            Op::Advance(ms) => sm.advance(u64::from(*ms)),
        }
    }
    sm.finish();
});
