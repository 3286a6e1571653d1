//! Entry points for the cargo-fuzz targets in `crates/tunnel/fuzz` (not a
//! stable API). They drive the real server code in-process: no sockets, the
//! agent and frontend streams are replaced by direct calls to the same
//! per-packet handlers the gRPC services call.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Backend, Frontend, Identifiers, ServerOptions, Shared, dial_host};
use crate::proto::{Checked, Packet};
use crate::server::ProxyServer;

/// (a) The packet decoder plus the per-packet validation both stream
/// readers apply. Returns the packet type name when the packet is accepted.
pub fn decode_packet(data: &[u8]) -> Option<&'static str> {
    let packet = Packet::decode(data).ok()?;
    let weight = packet.weight();
    assert!(weight >= 64, "weight below the per-packet overhead");
    // Re-encoding a decoded packet and decoding it again is lossless.
    let again = Packet::decode(packet.encode_to_vec().as_slice()).expect("re-decode");
    assert_eq!(again, packet, "encode/decode round trip");
    let checked = packet.checked().ok()?;
    Some(checked.type_name())
}

/// (d) The agent-identifiers parser (`agentIdentifiers` header) and the
/// dial-address host extraction destHost routing compares it with.
/// Returns (hosts, ipv4, ipv6, default_route).
pub fn parse_identifiers(s: &str) -> (Vec<String>, Vec<String>, Vec<String>, bool) {
    let ids = Identifiers::parse(s);
    let pairs = s.split('&').filter(|p| !p.is_empty()).count();
    assert!(ids.hosts.len() + ids.ipv4.len() + ids.ipv6.len() <= pairs);
    let host = dial_host(s);
    assert!(host.len() <= s.len());
    (ids.hosts, ids.ipv4, ids.ipv6, ids.default_route)
}

/// A current-thread runtime: one input runs deterministically apart from
/// the (few-millisecond) dial timers.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Options for the harnesses: small limits so the fuzzer reaches them.
pub fn small_options(dial_timeout_ms: u64, flow_window: usize) -> ServerOptions {
    ServerOptions {
        server_id: "fuzz".into(),
        backend_dial_timeout: Duration::from_millis(dial_timeout_ms),
        max_pending_dials: 8,
        connection_queue_bytes: 4096,
        agent_channel_packets: 4096,
        max_dials_per_stream: 4,
        flow_window,
        ..ServerOptions::default()
    }
}

struct Agent {
    backend: Arc<Backend>,
    rx: mpsc::Receiver<Packet>,
    live: bool,
}

struct Front {
    fe: Arc<Frontend>,
    live: bool,
}

/// (b) The server's per-packet state machine: agent streams and frontend
/// streams fed packets in any order, opened and closed at any time.
pub struct StateMachine {
    rt: tokio::runtime::Runtime,
    sh: Arc<Shared>,
    agents: Vec<Agent>,
    fronts: Vec<Front>,
    /// DIAL_REQ randoms the agents received, for the fuzzer to answer.
    pub seen_randoms: Vec<i64>,
}

impl StateMachine {
    pub fn new(opts: ServerOptions) -> Self {
        StateMachine {
            rt: runtime(),
            sh: ProxyServer::new(opts).shared,
            agents: Vec::new(),
            fronts: Vec::new(),
            seen_randoms: Vec::new(),
        }
    }

    /// An agent stream connects (as `AgentService::connect` registers it).
    pub fn agent_connect(&mut self, identifiers: &str, flow_window: usize) {
        if self.agents.len() >= 8 {
            return;
        }
        let sh = &self.sh;
        let window = flow_window
            .min(sh.opts.flow_window)
            .min(sh.opts.connection_queue_bytes / 2);
        let (tx, rx) = mpsc::channel(sh.opts.agent_channel_packets.max(1));
        let backend = Arc::new(Backend::new(
            sh,
            format!("agent-{}", self.agents.len()),
            Identifiers::parse(identifiers),
            tx,
            window,
        ));
        sh.add_backend(backend.clone());
        self.agents.push(Agent {
            backend,
            rx,
            live: true,
        });
    }

    /// A frontend (gRPC Proxy stream) opens.
    pub fn frontend_open(&mut self) {
        if self.fronts.len() < 16 {
            self.fronts.push(Front {
                fe: self.sh.new_frontend(),
                live: true,
            });
        }
    }

    /// A packet from agent `i` (modulo the number of agents).
    pub fn agent_packet(&mut self, i: usize, packet: Packet) {
        let Some(a) = pick(&mut self.agents, i) else {
            return;
        };
        if !a.live {
            return;
        }
        let b = a.backend.clone();
        let sh = self.sh.clone();
        self.rt
            .block_on(async move { sh.handle_agent_packet(&b, packet) });
        self.settle();
    }

    /// A packet from frontend `i`; a `false` from the handler ends its
    /// stream, as the gRPC reader loop does.
    pub fn frontend_packet(&mut self, i: usize, packet: Packet) {
        let Some(f) = pick(&mut self.fronts, i) else {
            return;
        };
        if !f.live {
            return;
        }
        let fe = f.fe.clone();
        let sh = self.sh.clone();
        let keep = self
            .rt
            .block_on(async move { sh.handle_frontend_packet(&fe, packet).await });
        if !keep {
            let _enter = self.rt.enter();
            f.live = false;
            self.sh.frontend_gone(&f.fe);
        }
        self.settle();
    }

    /// Frontend `i`'s stream ends.
    pub fn frontend_close(&mut self, i: usize) {
        let rt = self.rt.handle().clone();
        let _enter = rt.enter();
        if let Some(f) = pick(&mut self.fronts, i)
            && f.live
        {
            f.live = false;
            self.sh.frontend_gone(&f.fe);
        }
        self.settle();
    }

    /// Agent `i`'s stream ends.
    pub fn agent_close(&mut self, i: usize) {
        let rt = self.rt.handle().clone();
        let _enter = rt.enter();
        if let Some(a) = pick(&mut self.agents, i)
            && a.live
        {
            a.live = false;
            self.sh.remove_backend(&a.backend);
        }
        self.settle();
    }

    /// The client reads what is queued for frontend `i` (delivered bytes
    /// are acknowledged to the agent as the real stream does).
    pub fn frontend_read(&mut self, i: usize) {
        let Some(f) = pick(&mut self.fronts, i) else {
            return;
        };
        let fe = f.fe.clone();
        let sh = self.sh.clone();
        self.rt.block_on(async move {
            while let Some(Some(p)) = fe.queue.pop().now_or_never() {
                if let Some(crate::proto::Payload::Data(d)) = &p.payload {
                    sh.delivered(&fe, d.connect_id, d.data.len());
                }
            }
        });
        self.settle();
    }

    /// Time passes (dial timeouts may fire); at most a few milliseconds.
    pub fn advance(&mut self, ms: u64) {
        let ms = ms % 4;
        self.rt
            .block_on(async move { tokio::time::sleep(Duration::from_millis(ms)).await });
        self.settle();
    }

    /// Runs ready tasks, drains the agents' streams (remembering DIAL_REQ
    /// randoms), removes agents the server cut off, and checks invariants.
    fn settle(&mut self) {
        let rt = self.rt.handle().clone();
        let _enter = rt.enter();
        self.rt.block_on(async {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        });
        for a in &mut self.agents {
            while let Ok(p) = a.rx.try_recv() {
                if let Ok(Checked::DialReq(d)) = p.checked() {
                    self.seen_randoms.push(d.random);
                }
            }
            if a.live && a.backend.gone.is_cancelled() {
                a.live = false;
                self.sh.remove_backend(&a.backend);
            }
        }
        if self.seen_randoms.len() > 64 {
            self.seen_randoms.drain(..32);
        }
        self.check();
    }

    /// Accounting invariants that hold between packets.
    pub fn check(&self) {
        let pending = self.sh.pending.lock().unwrap().len();
        assert_eq!(
            self.sh.metrics.pending_backend_dials.get(),
            pending as i64,
            "pending gauge matches the pending map"
        );
        let mut established = 0;
        for a in &self.agents {
            let conns = a.backend.conns.lock().unwrap();
            if !a.live {
                assert!(conns.is_empty(), "a closed agent keeps connections");
            }
            for (id, fe) in conns.iter() {
                let st = fe.state.lock().unwrap();
                assert!(
                    st.conns
                        .iter()
                        .any(|c| c.connect_id == *id && c.backend.uid == a.backend.uid),
                    "agent-side connection {id} unknown to its frontend"
                );
            }
            established += conns.len();
        }
        assert_eq!(
            self.sh.metrics.established_connections.get(),
            established as i64,
            "established gauge matches the agents' maps"
        );
        for p in self.sh.pending.lock().unwrap().values() {
            assert!(
                self.agents
                    .iter()
                    .any(|a| a.live && a.backend.uid == p.backend.uid),
                "pending dial on a closed agent"
            );
        }
    }

    /// Closes everything and asserts nothing is left behind.
    pub fn finish(mut self) {
        for i in 0..self.fronts.len() {
            self.frontend_close(i);
        }
        for i in 0..self.agents.len() {
            self.agent_close(i);
        }
        self.advance(3);
        assert!(
            self.sh.pending.lock().unwrap().is_empty(),
            "leaked pending dial"
        );
        for a in &self.agents {
            assert!(
                a.backend.conns.lock().unwrap().is_empty(),
                "leaked connection"
            );
        }
        for f in &self.fronts {
            let st = f.fe.state.lock().unwrap();
            assert!(
                st.dials.is_empty() && st.conns.is_empty(),
                "frontend keeps state"
            );
        }
        assert_eq!(self.sh.backends.read().unwrap().streams, 0);
        assert_eq!(self.sh.metrics.pending_backend_dials.get(), 0);
        assert_eq!(self.sh.metrics.established_connections.get(), 0);
    }
}

fn pick<T>(v: &mut [T], i: usize) -> Option<&mut T> {
    if v.is_empty() {
        None
    } else {
        let n = v.len();
        v.get_mut(i % n)
    }
}

/// (c) The HTTP-CONNECT request reader: `request` is written by a client to
/// the real HTTP-CONNECT handler over an in-memory pipe, then the client
/// half-closes and reads the answer. With `with_agent`, one agent is
/// connected and answers each DIAL_REQ with `dial_error` (empty: success,
/// then a few bytes of DATA and CLOSE_RSP). Returns the response bytes.
pub fn http_connect(request: &[u8], with_agent: bool, dial_error: &str) -> Vec<u8> {
    exchange(request, with_agent, dial_error, |sh, server| {
        tokio::spawn(super::super::connect::serve(
            sh,
            server,
            super::super::connect::HangupProbe::none(),
            super::super::connect::StreamEnd::Shutdown,
        ))
    })
}

/// (e) The gRPC frontend's HTTP/2 server (`grpc_front`): arbitrary client
/// bytes, after [`grpc_call_start`] when `valid_start` (so the fuzzer
/// starts inside a Proxy call), with an agent that answers dials. Returns
/// what the server wrote; checks that it is a sequence of whole frames
/// starting with SETTINGS.
pub fn grpc_frontend(input: &[u8], valid_start: bool, dial_error: &str) -> Vec<u8> {
    let mut request = if valid_start {
        grpc_call_start(1)
    } else {
        Vec::new()
    };
    request.extend_from_slice(input);
    let out = exchange(&request, true, dial_error, |sh, server| {
        tokio::spawn(super::super::grpc_front::serve(
            sh,
            server,
            Duration::from_secs(3600),
            super::super::connect::StreamEnd::Shutdown,
        ))
    });
    let mut rest = &out[..];
    let mut first = true;
    while !rest.is_empty() {
        let head = crate::h2::Head::parse(rest).expect("a whole frame head");
        assert!(
            !first || head.kind == crate::h2::kind::SETTINGS,
            "first frame {head:?}"
        );
        assert!(
            rest.len() >= crate::h2::HEAD_LEN + head.len,
            "a whole frame"
        );
        rest = &rest[crate::h2::HEAD_LEN + head.len..];
        first = false;
    }
    out
}

/// A client's preface, empty SETTINGS and the HEADERS of a Proxy call on
/// stream `id`.
pub fn grpc_call_start(id: u32) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(crate::h2::PREFACE);
    crate::h2::settings(&mut out, &[]);
    let block = crate::h2::request_block(b"/ProxyService/Proxy");
    crate::h2::Head {
        len: block.len(),
        kind: crate::h2::kind::HEADERS,
        flags: crate::h2::flag::END_HEADERS,
        stream: id,
    }
    .write(&mut out);
    out.extend_from_slice(&block);
    out.to_vec()
}

/// One gRPC message (uncompressed) carrying `packet`.
pub fn grpc_message(packet: &Packet) -> Vec<u8> {
    let body = packet.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Runs one client connection against `serve` with an in-process server
/// (and, `with_agent`, an agent that answers every dial with `dial_error`,
/// or with "hello" and a close when that is empty). Returns what the
/// server wrote; checks that the connection left nothing behind.
fn exchange(
    request: &[u8],
    with_agent: bool,
    dial_error: &str,
    serve: impl FnOnce(Arc<Shared>, tokio::io::DuplexStream) -> tokio::task::JoinHandle<()>,
) -> Vec<u8> {
    let rt = runtime();
    let sh = ProxyServer::new(small_options(0, 0)).shared;
    let agent = with_agent.then(|| {
        let (tx, rx) = mpsc::channel(64);
        let backend = Arc::new(Backend::new(
            &sh,
            "agent".into(),
            Identifiers::default(),
            tx,
            0,
        ));
        sh.add_backend(backend.clone());
        (backend, rx)
    });
    let out = rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serve = serve(sh.clone(), server);
        let agent_task = agent.map(|(backend, mut rx)| {
            let sh = sh.clone();
            let dial_error = dial_error.to_string();
            tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    if let Ok(Checked::DialReq(d)) = p.checked() {
                        sh.handle_agent_packet(
                            &backend,
                            Packet::dial_rsp(d.random, 7, &*dial_error),
                        );
                        if dial_error.is_empty() {
                            sh.handle_agent_packet(&backend, Packet::data(7, "hello".into()));
                            sh.handle_agent_packet(&backend, Packet::close_rsp(7, ""));
                        }
                    }
                }
                backend
            })
        });
        let _ = client.write_all(request).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out)).await;
        drop(client);
        serve.await.expect("serve panicked");
        // A packet in flight when the connection ended finishes in a task
        // of its own (then releases its stream): let those run.
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        if let Some(t) = agent_task {
            // The agent stream ends; its state must go with it.
            let backends: Vec<_> = sh.backends.read().unwrap().all().cloned().collect();
            for b in backends {
                sh.remove_backend(&b);
            }
            t.abort();
        }
        out
    });
    assert!(sh.pending.lock().unwrap().is_empty(), "leaked pending dial");
    assert_eq!(sh.metrics.pending_backend_dials.get(), 0);
    assert_eq!(sh.metrics.established_connections.get(), 0);
    assert_eq!(sh.metrics.http_connections.get(), 0);
    let proxy_streams = sh
        .metrics
        .grpc_connections
        .with_label_values(&["/ProxyService/Proxy"])
        .get();
    assert_eq!(proxy_streams, 0, "leaked Proxy stream");
    out
}

/// (f) The agent link's message decoder (`grpc_wire`): a byte stream cut
/// into chunks at the sizes `cuts` gives (cycled), as HTTP/2 frames would
/// bring it. Checks that the chunking changes nothing (the same packets,
/// then the same error or the same leftover as one whole chunk gives) and
/// that every decoded packet re-encodes to prost's bytes. Returns the
/// packets decoded.
pub fn grpc_wire_stream(cuts: &[u8], input: &[u8]) -> usize {
    use crate::grpc_wire::{Decoder, encode};
    use bytes::Bytes;
    fn run(chunks: impl Iterator<Item = Bytes>) -> (Vec<Packet>, Option<String>, bool) {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for c in chunks {
            d.push(c);
            loop {
                match d.next_packet() {
                    Ok(Some(p)) => out.push(p),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e.to_string()), false),
                }
            }
        }
        let clean = d.finish().is_ok();
        (out, None, clean)
    }
    let whole = run(std::iter::once(Bytes::copy_from_slice(input)));
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut sizes = cuts.iter().map(|c| *c as usize + 1).cycle();
    while at < input.len() {
        let n = if cuts.is_empty() {
            input.len()
        } else {
            sizes.next().expect("cycled")
        };
        let end = (at + n).min(input.len());
        pieces.push(Bytes::copy_from_slice(&input[at..end]));
        at = end;
    }
    let chunked = run(pieces.into_iter());
    assert_eq!(chunked, whole, "chunking changed the decoding");
    for p in &whole.0 {
        let e = encode(p);
        let mut ours = e.head.to_vec();
        ours.extend_from_slice(&e.payload);
        let theirs = p.encode_to_vec();
        assert_eq!(&ours[5..], &theirs[..], "hand framing differs from prost");
    }
    whole.0.len()
}

#[cfg(test)]
mod grpc_wire_tests {
    use super::*;

    #[test]
    fn the_grpc_wire_harness_runs_on_real_and_broken_streams() {
        let mut stream = Vec::new();
        for p in [
            Packet::dial_req("tcp", "a:1", 1),
            Packet::data(2, bytes::Bytes::from(vec![3u8; 5000])),
            Packet::close_rsp(2, "x"),
        ] {
            let e = crate::grpc_wire::encode(&p);
            stream.extend_from_slice(&e.head);
            stream.extend_from_slice(&e.payload);
        }
        assert_eq!(grpc_wire_stream(&[0, 6, 200], &stream), 3);
        assert_eq!(grpc_wire_stream(&[], &stream), 3);
        assert_eq!(grpc_wire_stream(&[3], &stream[..stream.len() - 1]), 2);
        let mut compressed = stream.clone();
        compressed[0] = 1;
        assert_eq!(grpc_wire_stream(&[1, 2], &compressed), 0);
        assert_eq!(
            grpc_wire_stream(&[9], &[0, 0, 0, 0, 3, 0xff, 0xff, 0xff]),
            0
        );
    }
}
