//! Shared server state and the packet handling of both stream kinds.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::grpc_wire;
use crate::metrics::ServerMetrics;
use crate::proto::headers;
use crate::proto::{Checked, Packet};
use crate::queue::{Credit, FlowWindow, PacketQueue, PushError, QueuedBytes, on_data_ack};
use crate::stream_sender::{Overflow, StreamSender};

#[doc(hidden)]
#[path = "fuzzing.rs"]
pub mod fuzzing;
#[doc(hidden)]
#[path = "pick_bench.rs"]
pub mod pick_bench;

/// Backend selection strategies (`--proxy-strategies`), tried in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Default,
    DestHost,
    DefaultRoute,
}

impl Strategy {
    /// Upstream's name (the `proxy_strategy` label).
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Default => "default",
            Strategy::DestHost => "destHost",
            Strategy::DefaultRoute => "defaultRoute",
        }
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "default" => Ok(Strategy::Default),
            "destHost" => Ok(Strategy::DestHost),
            "defaultRoute" => Ok(Strategy::DefaultRoute),
            other => Err(format!(
                "unknown proxy strategy {other:?} (default, destHost, defaultRoute)"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub server_id: String,
    pub server_count: u32,
    pub strategies: Vec<Strategy>,
    /// Zero: no limit on waiting for DIAL_RSP (upstream's default).
    pub backend_dial_timeout: Duration,
    /// Pending dials over all frontends; more are refused with a DIAL_RSP
    /// error (gRPC) or 503 (HTTP-CONNECT).
    pub max_pending_dials: usize,
    /// Bytes queued toward one client before that connection is closed.
    pub connection_queue_bytes: usize,
    /// Packets an in-process agent's channel holds (the fuzz harnesses'
    /// agents; a real agent's stream is bounded by HTTP/2 flow control).
    pub agent_channel_packets: usize,
    /// Dials one frontend stream may have open at once.
    pub max_dials_per_stream: usize,
    /// Streams (one per dial) one gRPC frontend connection may have open
    /// at once. konnectivity-client's reusable tunnel carries every dial of
    /// kube-apiserver on one connection, and grpc-go sets no limit; memory
    /// stays bounded per stream (`connection_queue_bytes`), by the
    /// connection's receive window and by `max_pending_dials`.
    pub max_concurrent_streams: usize,
    /// Per-connection window offered to agents that speak the flow-control
    /// extension (0: off). Kept at most half of `connection_queue_bytes`.
    pub flow_window: usize,
    /// The most that window may grow to on a connection whose reader keeps
    /// up while the window limits it (at or below `flow_window`: fixed). A
    /// queue under the extension holds at most the window, so its limit
    /// rises with it (to twice this, which only a peer ignoring its credit
    /// reaches).
    pub flow_window_max: usize,
    /// Bytes held for readers that have not taken them, summed over every
    /// connection (queues toward clients, gRPC receive buffers toward
    /// agents); at this many, new dials are refused. 0: no cap.
    pub max_queued_bytes: usize,
    /// Token authentication of agents (TokenReview); None: agents are
    /// trusted on their TLS connection alone.
    pub agent_auth: Option<Arc<crate::tokenreview::AgentTokenAuth>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            server_id: uuid::Uuid::new_v4().to_string(),
            server_count: 1,
            strategies: vec![Strategy::Default],
            backend_dial_timeout: Duration::ZERO,
            max_pending_dials: 10_000,
            connection_queue_bytes: 4 << 20,
            agent_channel_packets: 256,
            max_dials_per_stream: 64,
            max_concurrent_streams: 10_000,
            flow_window: 1 << 20,
            flow_window_max: crate::DEFAULT_FLOW_WINDOW_MAX,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            agent_auth: None,
        }
    }
}

/// Default of [`ServerOptions::max_queued_bytes`]: room for 512 tunnels
/// each holding a full 1 MiB flow-control window for a client that does
/// not read (or for several times as many partly stalled ones).
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 512 << 20;

/// The most links of one agent dials are spread over, whatever it
/// announces: more would only hold connections.
pub const MAX_AGENT_LINKS: usize = 16;

/// What an agent said about itself in `agentIdentifiers`.
#[derive(Debug, Default)]
pub(crate) struct Identifiers {
    hosts: Vec<String>,
    ipv4: Vec<String>,
    ipv6: Vec<String>,
    default_route: bool,
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1])
                .zip(hex(bytes[i + 2]))
                .map(|(h, l)| h * 16 + l),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 2;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

impl Identifiers {
    /// The values destHost matches a dial's host against.
    fn all_hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts
            .iter()
            .chain(&self.ipv4)
            .chain(&self.ipv6)
            .map(String::as_str)
    }

    /// Parses `host=a&ipv4=1.2.3.4&ipv6=..&default-route=true`; unknown keys
    /// are ignored, as upstream's server does. `default-route` takes its
    /// first value, read as Go's `strconv.ParseBool`.
    pub(crate) fn parse(s: &str) -> Self {
        let mut ids = Identifiers::default();
        let mut default_route_seen = false;
        for pair in s.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match percent_decode(k).as_str() {
                "host" => ids.hosts.push(v),
                "ipv4" => ids.ipv4.push(v),
                "ipv6" => ids.ipv6.push(v),
                "default-route" if !default_route_seen => {
                    default_route_seen = true;
                    ids.default_route = go_parse_bool(&v) == Some(true);
                }
                _ => {}
            }
        }
        ids
    }
}

/// A moved connection as the link it moved to holds it: its home link
/// and its client.
type Adopted = (Arc<Backend>, Arc<Frontend>);

/// One agent stream.
pub(crate) struct Backend {
    uid: u64,
    pub(crate) agent_id: String,
    idents: Identifiers,
    draining: AtomicBool,
    /// Links the agent keeps to this server, as it announced
    /// (`proxyctl-links`; 1 from upstream agents): dials go to its first
    /// `links` streams open (see [`Backends::link_of`]).
    links: usize,
    /// On the first stream, for agents without the moves extension: which
    /// usable link the agent's next dial tries
    /// first (turns break ties between equally loaded links).
    next_link: AtomicUsize,
    /// Dials sent on this stream and not yet answered (see [`Pending`]);
    /// with `conns`, the tunnels this link carries.
    pending_dials: AtomicUsize,
    /// Client readers handed to this stream's task to run there (see
    /// [`MovedClientReader`]); None for in-process backends.
    readers: Option<mpsc::UnboundedSender<ClientReader>>,
    /// How many run there now (at most [`MAX_MOVED_CLIENT_READERS`]).
    moved_readers: AtomicUsize,
    /// Moves extension agreed (`proxyctl-move-streams`): the agent may
    /// send a connection's packets on another of its links once it has
    /// marked the move (DATA_MOVED) on this one; its dials all take its
    /// first link (see [`Backends::link_of`]).
    moves: bool,
    to_agent: ToAgent,
    /// Connections dialled over this stream (their home link).
    conns: Mutex<HashMap<i64, Arc<Frontend>>>,
    /// Connections of the agent's other links whose packets come on this
    /// one since they moved, with their home link (see [`Shared::conn_of`]).
    adopted: Mutex<HashMap<i64, Adopted>>,
    pub(crate) gone: CancellationToken,
    /// Flow-control window agreed with this agent (off: upstream agent).
    flow_window: FlowWindow,
    /// This agent's `agent_bytes_total` counters, looked up once (they are
    /// counted per DATA packet).
    bytes_to_agent: prometheus::IntCounter,
    bytes_from_agent: prometheus::IntCounter,
}

impl Backend {
    /// Dials awaiting their answer and connections open on this stream:
    /// what dealing dials over an agent's links balances.
    fn tunnels(&self) -> usize {
        self.pending_dials.load(Ordering::Relaxed) + self.conns.lock().unwrap().len()
    }

    /// A backend whose packets go into a channel read in-process (the fuzz
    /// harnesses and unit tests stand in for the agent).
    pub(crate) fn new(
        sh: &Shared,
        agent_id: String,
        idents: Identifiers,
        tx: mpsc::Sender<Packet>,
        flow_window: usize,
    ) -> Self {
        let to_agent = ToAgent::Channel {
            tx,
            deferred: Default::default(),
        };
        Self::build(
            sh,
            agent_id,
            idents,
            to_agent,
            CancellationToken::new(),
            FlowWindow::fixed(flow_window),
        )
    }

    /// A backend on an agent's `Connect` stream (the response's sending
    /// half), written to by the tasks that have its packets.
    fn on_stream(
        sh: &Shared,
        agent_id: String,
        idents: Identifiers,
        stream: ::h2::SendStream<grpc_wire::WireBuf>,
        flow_window: FlowWindow,
        links: usize,
        readers: mpsc::UnboundedSender<ClientReader>,
    ) -> Self {
        let gone = CancellationToken::new();
        let sender = StreamSender::new(
            stream,
            gone.clone(),
            sh.metrics.stream_packets_total.clone(),
            "to_agent",
            MAX_DEFERRED_CONTROL,
        );
        Backend {
            links,
            readers: Some(readers),
            ..Self::build(
                sh,
                agent_id,
                idents,
                ToAgent::Stream(sender),
                gone,
                flow_window,
            )
        }
    }

    fn build(
        sh: &Shared,
        agent_id: String,
        idents: Identifiers,
        to_agent: ToAgent,
        gone: CancellationToken,
        flow_window: FlowWindow,
    ) -> Self {
        let bytes = |direction| {
            sh.metrics
                .agent_bytes_total
                .with_label_values(&[agent_id.as_str(), direction])
        };
        Backend {
            uid: sh.uid(),
            bytes_to_agent: bytes("to_agent"),
            bytes_from_agent: bytes("from_agent"),
            agent_id,
            idents,
            draining: AtomicBool::new(false),
            links: 1,
            next_link: AtomicUsize::new(0),
            pending_dials: AtomicUsize::new(0),
            readers: None,
            moved_readers: AtomicUsize::new(0),
            moves: false,
            to_agent,
            conns: Mutex::new(HashMap::new()),
            adopted: Mutex::new(HashMap::new()),
            gone,
            flow_window,
        }
    }
}

/// A client's reader (client -> agent), run by its agent stream's task: an
/// HTTP-CONNECT client's reads, or a whole gRPC frontend connection.
pub(crate) type ClientReader = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Uploading clients read in one agent stream's task; later ones stay in
/// their own. That task also decrypts and dispatches every packet from the
/// agent, as the agent's link task encrypts its moved reader's packets, so
/// one is moved, as there (`MAX_MOVED_READERS` in the agent).
pub(crate) const MAX_MOVED_CLIENT_READERS: usize = 1;

/// A place in an agent stream's task for one client reader, held while it
/// runs there.
pub(crate) struct MovedClientReader {
    backend: Arc<Backend>,
    gauge: prometheus::IntGauge,
}

impl MovedClientReader {
    /// A place in `backend`'s task, if it has one free.
    pub(crate) fn claim(sh: &Shared, backend: &Arc<Backend>) -> Option<Self> {
        backend.readers.as_ref()?;
        // Asked at every bulk read of a client not moved: a taken place
        // costs a load, not a write to a line the stream's task uses.
        if backend.moved_readers.load(Ordering::Acquire) >= MAX_MOVED_CLIENT_READERS {
            return None;
        }
        if backend.moved_readers.fetch_add(1, Ordering::AcqRel) >= MAX_MOVED_CLIENT_READERS {
            backend.moved_readers.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        sh.metrics.link_task_readers.inc();
        Some(MovedClientReader {
            backend: backend.clone(),
            gauge: sh.metrics.link_task_readers.clone(),
        })
    }

    /// Runs the reader `make` builds (holding this place) in the stream's
    /// task; a task that has ended drops it unrun.
    pub(crate) fn run_there(self, make: impl FnOnce(Self) -> ClientReader) {
        if let Some(tx) = self.backend.readers.clone() {
            let _ = tx.send(make(self));
        }
    }
}

impl Drop for MovedClientReader {
    fn drop(&mut self) {
        self.backend.moved_readers.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// Where a backend's packets toward its agent go.
enum ToAgent {
    /// The agent's `Connect` stream. A packet goes from the task that has
    /// it into h2's send queue; only the connection's task writes after it
    /// (hyper's response body took two more task hand-offs per packet).
    Stream(Arc<StreamSender>),
    /// A channel read in-process. `deferred`: control packets waiting for
    /// room in it.
    Channel {
        tx: mpsc::Sender<Packet>,
        deferred: Arc<AtomicUsize>,
    },
}

impl ToAgent {
    /// Sends `packet` once there is room; false when the stream has gone.
    async fn send(&self, packet: Packet) -> bool {
        match self {
            ToAgent::Stream(s) => s.send(packet).await,
            ToAgent::Channel { tx, .. } => tx.send(packet).await.is_ok(),
        }
    }

    /// Sends a control packet without waiting (see [`StreamSender`]); too
    /// many waiting already is an overflow.
    fn send_control(&self, packet: Packet) -> Result<(), Overflow> {
        match self {
            ToAgent::Stream(s) => s.send_control(packet),
            ToAgent::Channel { tx, deferred } => match tx.try_send(packet) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
                Err(mpsc::error::TrySendError::Full(p)) => {
                    if deferred.fetch_add(1, Ordering::AcqRel) >= MAX_DEFERRED_CONTROL {
                        deferred.fetch_sub(1, Ordering::AcqRel);
                        return Err(Overflow);
                    }
                    let (tx, deferred) = (tx.clone(), deferred.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(p).await;
                        deferred.fetch_sub(1, Ordering::AcqRel);
                    });
                    Ok(())
                }
            },
        }
    }

    /// As [`send`](Self::send); `stalls` is counted when the send has to
    /// wait for room.
    async fn send_noting_stall(
        &self,
        packet: Packet,
        stalls: Option<&prometheus::IntCounter>,
    ) -> bool {
        match self {
            ToAgent::Stream(s) => s.send_noting_stall(packet, stalls).await,
            ToAgent::Channel { tx, .. } => {
                if tx.capacity() == 0
                    && let Some(s) = stalls
                {
                    s.inc();
                }
                tx.send(packet).await.is_ok()
            }
        }
    }
}

/// Control packets that may wait for a full agent or server stream.
pub(crate) const MAX_DEFERRED_CONTROL: usize = 4096;

/// A DATA packet from an agent that its client's queue had no room for,
/// held by the agent stream's reader until there is
/// ([`Shared::wait_for_client`]).
pub(crate) struct Held {
    /// The connection's home link (where it was dialled).
    home: Arc<Backend>,
    frontend: Arc<Frontend>,
    connect_id: i64,
    data: Packet,
}

/// Where a packet from an agent belongs (see [`Shared::conn_of`]).
enum Lookup {
    /// The connection's home link and its client.
    Found(Arc<Backend>, Arc<Frontend>),
    /// A connection of another link whose DATA_MOVED is still unread.
    NotYetMoved(Arc<Conn>),
    Unknown,
}

/// How long an agent stream's reader waits for a connection's DATA_MOVED
/// on its home link; the agent sends it before any packet on the new
/// link, so only a broken agent makes a reader wait this long.
const MOVE_MARK_LIMIT: Duration = Duration::from_secs(10);

/// What an agent stream's reader waits for before its next packet.
pub(crate) enum Wait {
    /// Room in a client's queue ([`Held`]).
    Client(Held),
    /// A connection's DATA_MOVED, still to be read on its home link, for
    /// a packet of it that came on another link first: the packet is
    /// handled once the home link's reader has handed over everything sent
    /// before it.
    Move(Arc<Conn>, Packet),
}

/// One established connection as its frontend sees it.
pub(crate) struct Conn {
    pub(crate) connect_id: i64,
    pub(crate) backend: Arc<Backend>,
    /// Extension credit, when the agent speaks it: `to_agent` bounds our
    /// DATA toward the agent; `from_agent` counts what we delivered.
    pub(crate) to_agent: Option<Arc<Credit>>,
    pub(crate) from_agent: Option<Arc<Credit>>,
    /// When DIAL_RSP established it (connection_duration_seconds).
    established: Instant,
    /// Cancelled when DATA_MOVED was read on the home link: the agent's
    /// later packets of it come on another link.
    moved: CancellationToken,
    /// The link those packets come on, which lists it in `adopted`.
    adopter: Mutex<Option<Arc<Backend>>>,
}

impl Conn {
    /// The connection has ended: a reader waiting for its DATA_MOVED goes
    /// on (and finds it gone), and the link it moved to forgets it.
    fn ended(&self) {
        self.moved.cancel();
        if let Some(b) = self.adopter.lock().unwrap().take() {
            b.adopted.lock().unwrap().remove(&self.connect_id);
        }
    }
}

#[derive(Default)]
struct FrontState {
    dials: Vec<i64>,
    conns: Vec<Arc<Conn>>,
    first_conn: Option<i64>,
    closing: bool,
}

/// One client stream (gRPC) or socket (HTTP-CONNECT).
pub(crate) struct Frontend {
    pub(crate) uid: u64,
    pub(crate) queue: PacketQueue,
    state: Mutex<FrontState>,
    /// Clones of the server's series, counted as packets are handed over.
    packets: prometheus::IntCounterVec,
    write_latency: prometheus::Histogram,
    conn_duration: prometheus::Histogram,
}

impl Frontend {
    /// Hands a control packet to the client's writer; counted
    /// (`to_client`) and timed (`frontend_write_duration_seconds`) as
    /// upstream counts its frontend sends.
    pub(crate) fn push_control(&self, packet: Packet) -> bool {
        let start = Instant::now();
        let kind = packet.kind_name();
        let ok = self.queue.push_control(packet).is_ok();
        self.observe_write(ok, &kind, start);
        ok
    }
    /// Hands a DATA packet to the client's writer unless its queue is
    /// full; a refused packet is given back. Counted and timed as
    /// [`push_control`](Self::push_control).
    pub(crate) fn try_push_data(&self, packet: Packet) -> Result<(), (PushError, Packet)> {
        let start = Instant::now();
        let r = self.queue.try_push_data(packet);
        self.observe_write(r.is_ok(), "DATA", start);
        r
    }
    fn observe_write(&self, ok: bool, kind: &str, start: Instant) {
        if ok {
            self.packets.with_label_values(&["to_client", kind]).inc();
            self.write_latency.observe(start.elapsed().as_secs_f64());
        }
    }
    fn live(st: &FrontState) -> usize {
        st.dials.len() + st.conns.len()
    }
    fn dial_failed(&self, random: i64, packet: Packet) {
        let mut st = self.state.lock().unwrap();
        st.dials.retain(|r| *r != random);
        self.push_control(packet);
        if Self::live(&st) == 0 {
            self.queue.close();
        }
    }
    fn establish(&self, random: i64, connect_id: i64, backend: &Arc<Backend>) -> bool {
        let mut st = self.state.lock().unwrap();
        if self.queue.is_closed() || !st.dials.contains(&random) {
            return false;
        }
        st.dials.retain(|r| *r != random);
        let window = backend.flow_window;
        if window.is_on() {
            self.queue.raise_limit(2 * window.max);
        }
        st.conns.push(Arc::new(Conn {
            connect_id,
            backend: backend.clone(),
            to_agent: window.credit().map(Arc::new),
            from_agent: window.credit().map(Arc::new),
            established: Instant::now(),
            moved: CancellationToken::new(),
            adopter: Mutex::new(None),
        }));
        st.first_conn.get_or_insert(connect_id);
        true
    }
    fn finish_conn(&self, connect_id: i64, backend_uid: u64, packet: Packet) {
        let mut st = self.state.lock().unwrap();
        st.conns.retain(|c| {
            let done = c.connect_id == connect_id && c.backend.uid == backend_uid;
            if done {
                c.ended();
                self.conn_duration
                    .observe(c.established.elapsed().as_secs_f64());
                if let Some(cr) = &c.to_agent {
                    cr.close();
                }
            }
            !done
        });
        self.push_control(packet);
        if Self::live(&st) == 0 {
            self.queue.close();
        }
    }
    /// The agent stream of this frontend's first tunnel open.
    pub(crate) fn backend(&self) -> Option<Arc<Backend>> {
        let st = self.state.lock().unwrap();
        st.conns.first().map(|c| c.backend.clone())
    }

    pub(crate) fn conn(&self, connect_id: i64) -> Option<Arc<Conn>> {
        let st = self.state.lock().unwrap();
        st.conns
            .iter()
            .find(|c| c.connect_id == connect_id)
            .cloned()
    }
}

struct Pending {
    frontend: Arc<Frontend>,
    backend: Arc<Backend>,
    start: Instant,
    timer: Option<AbortHandle>,
}

impl Pending {
    fn new(frontend: Arc<Frontend>, backend: Arc<Backend>) -> Self {
        backend.pending_dials.fetch_add(1, Ordering::Relaxed);
        Pending {
            frontend,
            backend,
            start: Instant::now(),
            timer: None,
        }
    }
}

impl Drop for Pending {
    /// However the dial ends (answered, failed, timed out, cancelled, its
    /// agent gone), it stops counting toward its link's load here.
    fn drop(&mut self) {
        self.backend.pending_dials.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a dial could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("No agent available")]
    NoAgent,
    #[error("too many pending dials")]
    Overloaded,
    #[error("too many dials on one stream")]
    TooManyOnStream,
    #[error("duplicate dial id")]
    Duplicate,
    #[error("timed out waiting for backend dial")]
    Timeout,
    #[error("backend connection closed")]
    BackendClosed,
    #[error("too many bytes queued for connections that do not read")]
    QueuedBytesCap,
}

pub(crate) struct Shared {
    pub(crate) opts: ServerOptions,
    pub(crate) metrics: ServerMetrics,
    backends: RwLock<Backends>,
    pending: Mutex<HashMap<i64, Pending>>,
    next_uid: AtomicU64,
    /// Bytes held for readers over all connections, and their cap.
    pub(crate) queued: Arc<QueuedBytes>,
    pub(crate) stop: CancellationToken,
}

/// The proxy server's state, shared by every listener.
#[derive(Clone)]
pub struct ProxyServer {
    pub(crate) shared: Arc<Shared>,
}

impl ProxyServer {
    pub fn new(opts: ServerOptions) -> Self {
        let metrics = ServerMetrics::default();
        // Shown from the start (0), not only after the first refusal.
        metrics
            .dials_refused_total
            .with_label_values(&["queued_bytes_cap"]);
        let server = ProxyServer {
            shared: Arc::new(Shared {
                queued: QueuedBytes::new(metrics.queued_bytes.clone(), opts.max_queued_bytes),
                opts,
                metrics,
                backends: RwLock::new(Backends::default()),
                pending: Mutex::new(HashMap::new()),
                next_uid: AtomicU64::new(1),
                stop: CancellationToken::new(),
            }),
        };
        server.shared.set_ready_backends(&Backends::default());
        server
    }
    /// Ready when at least one agent is connected (upstream's /readyz).
    pub fn ready(&self) -> bool {
        self.shared.backends.read().unwrap().streams > 0
    }
    /// Agent streams open (an agent with several links counts each).
    pub fn agent_count(&self) -> usize {
        self.shared.backends.read().unwrap().streams
    }
    pub fn pending_dials(&self) -> usize {
        self.shared.pending.lock().unwrap().len()
    }
    pub fn established(&self) -> usize {
        self.shared
            .backends
            .read()
            .unwrap()
            .all()
            .map(|b| b.conns.lock().unwrap().len())
            .sum()
    }
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }
    /// The lease garbage collector's series.
    pub fn lease_metrics(&self) -> crate::metrics::ServerLeaseMetrics {
        self.shared.metrics.lease.clone()
    }
    pub fn server_id(&self) -> &str {
        &self.shared.opts.server_id
    }
}

fn dial_host(address: &str) -> &str {
    // "[::1]:80" -> "::1", "1.2.3.4:80" -> "1.2.3.4", "host" -> "host"
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((h, _)) if !h.contains(':') => h,
        _ => address,
    }
}

impl Shared {
    fn uid(&self) -> u64 {
        self.next_uid.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn new_frontend(&self) -> Arc<Frontend> {
        Arc::new(Frontend {
            uid: self.uid(),
            queue: PacketQueue::with_shared(self.opts.connection_queue_bytes, self.queued.clone()),
            state: Mutex::new(FrontState::default()),
            packets: self.metrics.stream_packets_total.clone(),
            write_latency: self.metrics.frontend_write_duration_seconds.clone(),
            conn_duration: self.metrics.connection_duration_seconds.clone(),
        })
    }

    pub(crate) fn select_backend(&self, address: &str) -> Option<Arc<Backend>> {
        let all = self.backends.read().unwrap();
        // One stream per agent: its first. An agent that finds it has
        // reached a server it already holds (through a load balancer, it
        // cannot tell before the response headers) closes the new stream
        // at once; a dial sent there fails with "backend connection
        // closed". Upstream's server never picks a later stream of an
        // agent for that reason. `Backends` indexes the first streams by
        // strategy, so a pick reads a few entries however many agents
        // there are, and allocates nothing.
        let host = dial_host(address);
        let mut rng = rand::thread_rng();
        for strategy in &self.opts.strategies {
            let candidates: &[Arc<Backend>] = match strategy {
                Strategy::Default => &all.firsts.list,
                Strategy::DestHost => all.by_host.get(host).map_or(&[], Vec::as_slice),
                Strategy::DefaultRoute => &all.default_route.list,
            };
            if let Some(b) = pick_ready(candidates, &mut rng) {
                return Some(all.link_of(b));
            }
        }
        None
    }

    /// Sends a control packet to an agent without making the caller wait:
    /// the stream readers must never block.
    /// An agent that stops reading its stream while control packets pile
    /// up (more than `MAX_DEFERRED_CONTROL` waiting) is disconnected.
    fn send_control(&self, backend: &Backend, packet: Packet) {
        if backend.to_agent.send_control(packet).is_err() {
            self.metrics.bad("agent_not_reading");
            tracing::warn!(agent_id = %backend.agent_id, "agent does not read its stream; disconnecting it");
            backend.gone.cancel();
        }
    }

    fn take_pending(&self, random: i64, backend_uid: Option<u64>) -> Option<Pending> {
        let mut pending = self.pending.lock().unwrap();
        if let Some(b) = backend_uid
            && pending.get(&random).is_some_and(|p| p.backend.uid != b)
        {
            return None;
        }
        let p = pending.remove(&random)?;
        drop(pending);
        self.metrics.pending_backend_dials.dec();
        if let Some(t) = &p.timer {
            t.abort();
        }
        Some(p)
    }

    /// Registers a dial and sends DIAL_REQ to a chosen agent.
    pub(crate) async fn start_dial(
        self: &Arc<Self>,
        frontend: &Arc<Frontend>,
        protocol: &str,
        address: &str,
        random: i64,
    ) -> Result<(), DialError> {
        // Connections that do not read already hold what the operator
        // allowed: a new one could only add to it.
        if self.queued.over_cap() {
            self.metrics
                .dials_refused_total
                .with_label_values(&["queued_bytes_cap"])
                .inc();
            return Err(DialError::QueuedBytesCap);
        }
        let Some(backend) = self.select_backend(address) else {
            self.metrics
                .dial_failure_count
                .with_label_values(&["no_agent"])
                .inc();
            return Err(DialError::NoAgent);
        };
        {
            let mut pending = self.pending.lock().unwrap();
            if pending.len() >= self.opts.max_pending_dials {
                self.metrics.bad("pending_dials_limit");
                return Err(DialError::Overloaded);
            }
            if pending.contains_key(&random) {
                self.metrics.bad("duplicate_dial_id");
                return Err(DialError::Duplicate);
            }
            let mut st = frontend.state.lock().unwrap();
            if Frontend::live(&st) >= self.opts.max_dials_per_stream || st.closing {
                self.metrics.bad("dials_per_stream_limit");
                return Err(DialError::TooManyOnStream);
            }
            st.dials.push(random);
            pending.insert(random, Pending::new(frontend.clone(), backend.clone()));
            self.metrics.pending_backend_dials.inc();
        }
        let packet = Packet::dial_req(protocol, address, random);
        let timeout = self.opts.backend_dial_timeout;
        let sent = if timeout.is_zero() {
            Ok(backend.to_agent.send(packet).await)
        } else {
            tokio::time::timeout(timeout, backend.to_agent.send(packet))
                .await
                .map_err(|_| DialError::Timeout)
        };
        let sent = match sent {
            Ok(true) => Ok(()),
            Ok(false) => Err(DialError::BackendClosed),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            if self.take_pending(random, None).is_some() {
                frontend
                    .state
                    .lock()
                    .unwrap()
                    .dials
                    .retain(|r| *r != random);
            }
            let reason = if matches!(e, DialError::Timeout) {
                // As upstream's retireBackend: an agent whose stream does
                // not take a DIAL_REQ within the timeout is stuck; it gets
                // no more dials and its stream ends (the agent reconnects).
                tracing::warn!(agent_id = %backend.agent_id, "retiring the agent: sending a dial request timed out");
                backend.draining.store(true, Ordering::Release);
                self.remove_backend(&backend);
                "backend_dial_timeout"
            } else {
                "backend_close"
            };
            self.metrics
                .dial_failure_count
                .with_label_values(&[reason])
                .inc();
            return Err(e);
        }
        if !timeout.is_zero() {
            let me = self.clone();
            let task = tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                let p = {
                    let mut pending = me.pending.lock().unwrap();
                    let p = pending.remove(&random);
                    if p.is_some() {
                        me.metrics.pending_backend_dials.dec();
                    }
                    p
                };
                if let Some(p) = p {
                    me.metrics
                        .dial_failure_count
                        .with_label_values(&["backend_dial_timeout"])
                        .inc();
                    p.frontend.dial_failed(
                        random,
                        Packet::dial_rsp(random, 0, DialError::Timeout.to_string()),
                    );
                    me.send_control(&p.backend, Packet::dial_cls(random));
                }
            });
            if let Some(p) = self.pending.lock().unwrap().get_mut(&random) {
                p.timer = Some(task.abort_handle());
            }
        }
        Ok(())
    }

    /// Sends client DATA toward the agent, first taking credit when the
    /// agent speaks the flow-control extension. Data larger than one piece
    /// ([`crate::MAX_DATA_PIECE`], and [`Credit::piece`] under credit) goes
    /// as several packets. False: the connection is gone.
    pub(crate) async fn send_data_to_agent(&self, c: &Conn, mut data: bytes::Bytes) -> bool {
        let piece = c
            .to_agent
            .as_ref()
            .map_or(crate::MAX_DATA_PIECE, |cr| cr.piece())
            .min(crate::MAX_DATA_PIECE);
        while !data.is_empty() {
            let chunk = data.split_to(piece.min(data.len()));
            if !self.send_piece_to_agent(c, chunk).await {
                return false;
            }
        }
        true
    }

    async fn send_piece_to_agent(&self, c: &Conn, data: bytes::Bytes) -> bool {
        let n = data.len();
        // One wait counted per piece: for credit, else for the stream.
        let credit_stall = c.to_agent.as_ref().is_some_and(|cr| cr.would_wait(n));
        if credit_stall {
            self.metrics.stalls_to_agent.inc();
            if c.to_agent.as_ref().is_some_and(|cr| cr.may_grow()) {
                // Out of credit: the agent may grow the window (see
                // `Credit`).
                self.send_control(&c.backend, Packet::data_ack(c.connect_id, 0));
            }
        }
        if let Some(cr) = &c.to_agent {
            let ok = tokio::select! {
                ok = cr.take(n) => ok,
                _ = c.backend.gone.cancelled() => false,
            };
            if !ok {
                return false;
            }
        }
        let stream_stalls = (!credit_stall).then_some(&self.metrics.stalls_to_agent);
        let ok = c
            .backend
            .to_agent
            .send_noting_stall(Packet::data(c.connect_id, data), stream_stalls)
            .await;
        if ok {
            c.backend.bytes_to_agent.inc_by(n as u64);
        }
        ok
    }

    /// Records `n` bytes handed to the client; acknowledges them to the agent
    /// under the flow-control extension.
    pub(crate) fn delivered(&self, fe: &Frontend, connect_id: i64, n: usize) {
        let Some(c) = fe.conn(connect_id) else { return };
        if let Some(cr) = &c.from_agent
            && let Some(bytes) = cr.delivered(n)
        {
            self.send_control(&c.backend, Packet::data_ack(connect_id, bytes));
        }
    }

    /// Everything a frontend had open is released (its stream or socket ended).
    pub(crate) fn frontend_gone(&self, frontend: &Frontend) {
        let (dials, conns) = {
            let mut st = frontend.state.lock().unwrap();
            st.closing = true;
            (std::mem::take(&mut st.dials), std::mem::take(&mut st.conns))
        };
        for random in dials {
            if let Some(p) = self.take_pending(random, None) {
                self.metrics
                    .dial_failure_count
                    .with_label_values(&["frontend_close"])
                    .inc();
                self.send_control(&p.backend, Packet::dial_cls(random));
            }
        }
        for c in conns {
            if let Some(cr) = &c.to_agent {
                cr.close();
            }
            c.ended();
            if c.backend
                .conns
                .lock()
                .unwrap()
                .remove(&c.connect_id)
                .is_some()
            {
                self.metrics.established_connections.dec();
                self.metrics
                    .connection_duration_seconds
                    .observe(c.established.elapsed().as_secs_f64());
                self.send_control(&c.backend, Packet::close_req(c.connect_id));
            }
        }
        frontend.queue.close();
    }

    pub(crate) fn add_backend(&self, backend: Arc<Backend>) {
        let mut b = self.backends.write().unwrap();
        b.add(backend);
        self.set_ready_backends(&b);
    }

    /// `ready_backends{proxy_strategy}`: the agents each configured
    /// strategy can pick, as upstream's per-strategy backend managers hold
    /// them; `ready_backend_connections`: the agents connected, one however
    /// many streams it holds (upstream's managers key their streams by
    /// agent; dashboards and e2e checks compare it with the node count).
    fn set_ready_backends(&self, backends: &Backends) {
        self.metrics
            .ready_backend_connections
            .set(backends.by_agent.len() as i64);
        for strategy in &self.opts.strategies {
            // Upstream's managers key their backends: by agent ID (default,
            // defaultRoute) or by identifier value (destHost); the gauge is
            // the number of keys.
            let n = match strategy {
                Strategy::Default => backends.firsts.list.len(),
                Strategy::DefaultRoute => backends.default_route.list.len(),
                Strategy::DestHost => backends.by_host.len(),
            };
            self.metrics
                .ready_backends
                .with_label_values(&[strategy.name()])
                .set(n as i64);
        }
    }

    fn remove_backend(&self, backend: &Arc<Backend>) {
        {
            let mut b = self.backends.write().unwrap();
            b.remove(backend);
            self.set_ready_backends(&b);
        }
        backend.gone.cancel();
        // Tunnels that moved here end: what the agent had sent of them on
        // this link may be lost. Their home links tell the agent (which
        // also ends them when it sees this link go, idle or not).
        let adopted: Vec<_> = backend.adopted.lock().unwrap().drain().collect();
        for (id, (home, _)) in adopted {
            self.end_conn(&home, id, "link to the agent lost");
        }
        let conns: Vec<_> = backend.conns.lock().unwrap().drain().collect();
        for (id, fe) in conns {
            self.metrics.established_connections.dec();
            fe.finish_conn(id, backend.uid, Packet::close_rsp(id, ""));
        }
        let randoms: Vec<i64> = {
            let pending = self.pending.lock().unwrap();
            pending
                .iter()
                .filter(|(_, p)| p.backend.uid == backend.uid)
                .map(|(r, _)| *r)
                .collect()
        };
        for random in randoms {
            if let Some(p) = self.take_pending(random, Some(backend.uid)) {
                self.metrics
                    .dial_failure_count
                    .with_label_values(&["backend_close"])
                    .inc();
                p.frontend.dial_failed(
                    random,
                    Packet::dial_rsp(random, 0, DialError::BackendClosed.to_string()),
                );
            }
        }
        tracing::info!(agent_id = %backend.agent_id, "agent disconnected");
    }

    /// One packet from an agent, never waiting: a DATA packet whose
    /// client's queue is full ends that connection at once. The in-process
    /// drivers (fuzz harnesses, unit tests) take this; the agent stream's
    /// reader takes [`handle_agent_packet_or_hold`](Self::handle_agent_packet_or_hold).
    pub(crate) fn handle_agent_packet(&self, backend: &Arc<Backend>, packet: Packet) {
        match self.handle_agent_packet_or_hold(backend, packet) {
            Some(Wait::Client(held)) => {
                self.end_for_a_full_queue(&held.home, held.connect_id, PushError::Overflow)
            }
            // In-process drivers have no second link to move to.
            Some(Wait::Move(..)) => self.metrics.bad("data_moved_missing"),
            None => {}
        }
    }

    /// Waits as the stream's reader must (see [`Wait`]) before its next
    /// packet.
    pub(crate) async fn wait(&self, backend: &Arc<Backend>, wait: Wait) {
        let (conn, packet) = match wait {
            Wait::Client(held) => return self.wait_for_client(held).await,
            Wait::Move(conn, packet) => (conn, packet),
        };
        let marked = tokio::select! {
            _ = conn.moved.cancelled() => true,
            _ = tokio::time::sleep(MOVE_MARK_LIMIT) => false,
            _ = backend.gone.cancelled() => return,
        };
        if !marked {
            // The agent broke the extension's order: the connection's
            // bytes cannot be put back in order, so it ends.
            self.metrics.bad("data_moved_missing");
            tracing::warn!(agent_id = %backend.agent_id, connect_id = conn.connect_id, "packets on a new link without DATA_MOVED on the old one; closing that connection");
            self.end_conn(
                &conn.backend,
                conn.connect_id,
                "agent moved the connection out of order",
            );
            return;
        }
        // Found now, or ended meanwhile; it cannot wait for the move again.
        if let Some(Wait::Client(held)) = self.handle_agent_packet_or_hold(backend, packet) {
            self.wait_for_client(held).await;
        }
    }

    /// Where a packet for `connect_id` that came on `via` belongs: its home
    /// link (where it was dialled) and its client. A connection of another
    /// link of the same agent is adopted here once its DATA_MOVED has been
    /// read there (so nothing it sent on the old link is still unread);
    /// before that, the caller waits.
    fn conn_of(&self, via: &Arc<Backend>, connect_id: i64) -> Lookup {
        if let Some(fe) = via.conns.lock().unwrap().get(&connect_id).cloned() {
            return Lookup::Found(via.clone(), fe);
        }
        if !via.moves {
            return Lookup::Unknown;
        }
        if let Some((home, fe)) = via.adopted.lock().unwrap().get(&connect_id).cloned() {
            return Lookup::Found(home, fe);
        }
        let fe = {
            let backends = self.backends.read().unwrap();
            backends.by_agent.get(&via.agent_id).and_then(|links| {
                links
                    .iter()
                    .filter(|b| b.uid != via.uid)
                    .find_map(|b| b.conns.lock().unwrap().get(&connect_id).cloned())
            })
        };
        let Some(fe) = fe else {
            return Lookup::Unknown;
        };
        // Under the client's lock, which ending the connection takes too:
        // it cannot end between the check and the adoption.
        let st = fe.state.lock().unwrap();
        let Some(c) = st
            .conns
            .iter()
            .find(|c| c.connect_id == connect_id && c.backend.agent_id == via.agent_id)
            .cloned()
        else {
            return Lookup::Unknown;
        };
        if !c.moved.is_cancelled() {
            return Lookup::NotYetMoved(c);
        }
        {
            // A connection moves once: a third link of the same agent ID
            // does not take over one that another link has adopted.
            let mut adopter = c.adopter.lock().unwrap();
            if adopter.is_some() {
                return Lookup::Unknown;
            }
            *adopter = Some(via.clone());
        }
        via.adopted
            .lock()
            .unwrap()
            .insert(connect_id, (c.backend.clone(), fe.clone()));
        drop(st);
        self.metrics.moved_connections_total.inc();
        Lookup::Found(c.backend.clone(), fe)
    }

    /// The stream's reader waits for room in a client's queue (see
    /// [`Held`]): while the client takes bytes the agent stream goes on at
    /// its pace; one that takes none for [`crate::READER_STALL_LIMIT`] has
    /// its connection closed, as a full queue closes it at once on a link
    /// with the extension.
    async fn wait_for_client(&self, held: Held) {
        self.metrics
            .flow_control_stalls_total
            .with_label_values(&["to_client"])
            .inc();
        let Held {
            home: backend,
            frontend: fe,
            connect_id,
            data,
        } = held;
        let pushed = tokio::select! {
            r = fe.queue.push_data_when_room(data, crate::READER_STALL_LIMIT, |p| fe.try_push_data(p)) => r,
            _ = backend.gone.cancelled() => return,
        };
        if let Err(e) = pushed {
            self.end_for_a_full_queue(&backend, connect_id, e);
        }
    }

    /// A DATA packet its client's queue refused: the connection ends
    /// (CLOSE_REQ to the agent, CLOSE_RSP to the client with why), counted
    /// when the queue was full.
    fn end_for_a_full_queue(&self, backend: &Arc<Backend>, connect_id: i64, e: PushError) {
        if e == PushError::Overflow {
            self.metrics
                .queue_overflow_total
                .with_label_values(&["to_client"])
                .inc();
            tracing::warn!(
                connect_id,
                "client too slow: its queue is full; closing that connection"
            );
        }
        self.end_conn(
            backend,
            connect_id,
            "receive queue overflow: client reads too slowly",
        );
    }

    /// Ends connection `connect_id` of its home link `backend` here, if
    /// that link still holds it (else it has ended already, and its ends
    /// were told then): the agent is told to close it, its client why.
    fn end_conn(&self, backend: &Backend, connect_id: i64, why: &str) {
        let Some(fe) = backend.conns.lock().unwrap().remove(&connect_id) else {
            return;
        };
        self.metrics.established_connections.dec();
        self.send_control(backend, Packet::close_req(connect_id));
        fe.finish_conn(connect_id, backend.uid, Packet::close_rsp(connect_id, why));
    }

    /// [`handle_agent_packet`](Self::handle_agent_packet), except that a
    /// DATA packet its client's queue has no room for, on a link without
    /// the flow-control extension, is handed back for the stream's reader
    /// to wait with ([`Shared::wait_for_client`]): without the extension
    /// the agent does not hold back for one connection, so the stream
    /// waits for it, as upstream's server does; the queue's limit is then
    /// reached by a client that is only scheduled late, not by one that
    /// does not read.
    pub(crate) fn handle_agent_packet_or_hold(
        &self,
        backend: &Arc<Backend>,
        packet: Packet,
    ) -> Option<Wait> {
        let checked = match packet.checked() {
            Ok(c) => c,
            Err(why) => {
                self.metrics.bad("malformed_agent_packet");
                tracing::warn!(agent_id = %backend.agent_id, why, "malformed packet from agent dropped");
                return None;
            }
        };
        self.metrics.packet("from_agent", checked.type_name());
        match checked {
            Checked::DialRsp(rsp) => {
                let Some(p) = self.take_pending(rsp.random, Some(backend.uid)) else {
                    tracing::debug!(random = rsp.random, "DIAL_RSP not recognized; dropped");
                    self.metrics
                        .dial_failure_count
                        .with_label_values(&["unrecognized_response"])
                        .inc();
                    if rsp.connect_id != 0 {
                        self.send_control(backend, Packet::close_req(rsp.connect_id));
                    }
                    return None;
                };
                let random = rsp.random;
                if !rsp.error.is_empty() {
                    self.metrics
                        .dial_failure_count
                        .with_label_values(&["error_response"])
                        .inc();
                    p.frontend
                        .dial_failed(random, Packet::dial_rsp(random, rsp.connect_id, rsp.error));
                } else if rsp.connect_id != 0
                    && backend.conns.lock().unwrap().contains_key(&rsp.connect_id)
                {
                    // The agent reused a connectID that names a live
                    // connection of this stream. Only this dial fails: no
                    // CLOSE_REQ (it would end the live connection, the only
                    // one the agent can still route under that ID) and no
                    // DIAL_CLS (the agent has answered this dial already).
                    // This reader is the only one adding to `conns`, so the
                    // check cannot go stale before the insert below.
                    self.metrics.bad("duplicate_connect_id");
                    self.metrics
                        .dial_failure_count
                        .with_label_values(&["error_response"])
                        .inc();
                    tracing::warn!(
                        agent_id = %backend.agent_id,
                        connect_id = rsp.connect_id,
                        "DIAL_RSP reuses a connectID in use; failing that dial"
                    );
                    p.frontend.dial_failed(
                        random,
                        Packet::dial_rsp(random, 0, "agent returned a connectID already in use"),
                    );
                } else if rsp.connect_id != 0
                    && p.frontend.establish(random, rsp.connect_id, backend)
                {
                    backend
                        .conns
                        .lock()
                        .unwrap()
                        .insert(rsp.connect_id, p.frontend.clone());
                    self.metrics.established_connections.inc();
                    // As upstream: only successful dials are timed.
                    self.metrics
                        .dial_duration_seconds
                        .observe(p.start.elapsed().as_secs_f64());
                    p.frontend
                        .push_control(Packet::dial_rsp(random, rsp.connect_id, ""));
                } else {
                    self.metrics
                        .dial_failure_count
                        .with_label_values(&["frontend_close"])
                        .inc();
                    if rsp.connect_id != 0 {
                        self.send_control(backend, Packet::close_req(rsp.connect_id));
                    } else {
                        p.frontend.dial_failed(
                            random,
                            Packet::dial_rsp(random, 0, "agent returned no connectID"),
                        );
                    }
                }
            }
            Checked::DialCls(c) => {
                if let Some(p) = self.take_pending(c.random, Some(backend.uid)) {
                    self.metrics
                        .dial_failure_count
                        .with_label_values(&["backend_close"])
                        .inc();
                    p.frontend.dial_failed(c.random, Packet::dial_cls(c.random));
                }
            }
            Checked::Data(d) => {
                if d.connect_id == 0 {
                    self.metrics.bad("data_without_connect_id");
                    return None;
                }
                let (home, fe) = match self.conn_of(backend, d.connect_id) {
                    Lookup::Found(home, fe) => (home, fe),
                    Lookup::NotYetMoved(c) => {
                        return Some(Wait::Move(c, Checked::Data(d).into_packet()));
                    }
                    Lookup::Unknown => {
                        tracing::debug!(
                            connect_id = d.connect_id,
                            "DATA for unknown connection; closing it at the agent"
                        );
                        self.send_control(backend, Packet::close_req(d.connect_id));
                        return None;
                    }
                };
                backend.bytes_from_agent.inc_by(d.data.len() as u64);
                match fe.try_push_data(Packet::data(d.connect_id, d.data)) {
                    Ok(()) => {}
                    Err((PushError::Overflow, data)) if !backend.flow_window.is_on() => {
                        return Some(Wait::Client(Held {
                            home,
                            frontend: fe,
                            connect_id: d.connect_id,
                            data,
                        }));
                    }
                    Err((e, _)) => self.end_for_a_full_queue(&home, d.connect_id, e),
                }
            }
            Checked::CloseRsp(c) => {
                let home = match self.conn_of(backend, c.connect_id) {
                    Lookup::Found(home, _) => home,
                    Lookup::NotYetMoved(conn) => {
                        return Some(Wait::Move(conn, Checked::CloseRsp(c).into_packet()));
                    }
                    Lookup::Unknown => return None,
                };
                let fe = home.conns.lock().unwrap().remove(&c.connect_id);
                if let Some(fe) = fe {
                    self.metrics.established_connections.dec();
                    fe.finish_conn(
                        c.connect_id,
                        home.uid,
                        Packet::close_rsp(c.connect_id, c.error),
                    );
                }
            }
            Checked::DataMoved(m) => {
                if !backend.moves {
                    self.metrics.bad("unexpected_agent_packet");
                    return None;
                }
                let fe = backend.conns.lock().unwrap().get(&m.connect_id).cloned();
                if let Some(c) = fe.and_then(|fe| fe.conn(m.connect_id))
                    && c.backend.uid == backend.uid
                {
                    c.moved.cancel();
                }
            }
            Checked::DataAck(ack) => {
                let (home, fe) = match self.conn_of(backend, ack.connect_id) {
                    Lookup::Found(home, fe) => (home, fe),
                    Lookup::NotYetMoved(conn) => {
                        return Some(Wait::Move(conn, Checked::DataAck(ack).into_packet()));
                    }
                    Lookup::Unknown => return None,
                };
                let conn = fe.conn(ack.connect_id).map(|c| (c, fe));
                let Some((c, fe)) = conn else {
                    // Acks for a connection closed meanwhile: nothing owed.
                    return None;
                };
                let (sending, receiving) = (c.to_agent.as_deref(), c.from_agent.as_deref());
                if let Some(grow) =
                    on_data_ack(ack.bytes, sending, receiving, || fe.queue.queued_bytes())
                {
                    // The agent ran out of credit toward a client that
                    // keeps up: the window grows.
                    self.metrics.flow_window_growths_total.inc();
                    self.send_control(&home, Packet::data_ack(ack.connect_id, grow));
                }
            }
            Checked::Drain => {
                tracing::info!(agent_id = %backend.agent_id, "agent is draining");
                backend.draining.store(true, Ordering::Relaxed);
            }
            Checked::DialReq(_) | Checked::CloseReq(_) => {
                self.metrics.bad("unexpected_agent_packet");
            }
        }
        None
    }

    /// One packet from a gRPC frontend; false ends the stream.
    pub(crate) async fn handle_frontend_packet(
        self: &Arc<Self>,
        fe: &Arc<Frontend>,
        packet: Packet,
    ) -> bool {
        let checked = match packet.checked() {
            Ok(c) => c,
            Err(why) => {
                self.metrics.bad("malformed_client_packet");
                tracing::warn!(why, "malformed packet from client; closing its stream");
                return false;
            }
        };
        self.metrics.packet("from_client", checked.type_name());
        if fe.state.lock().unwrap().closing {
            return true;
        }
        match checked {
            Checked::DialReq(d) => {
                match self.start_dial(fe, &d.protocol, &d.address, d.random).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::info!(address = %d.address, error = %e, "dial refused");
                        let _ = fe
                            .queue
                            .push_control(Packet::dial_rsp(d.random, 0, e.to_string()));
                        false
                    }
                }
            }
            Checked::Data(d) => {
                let first = fe.state.lock().unwrap().first_conn;
                match first {
                    None => {
                        self.metrics.bad("data_before_dial_response");
                        fe.push_control(Packet::close_rsp(d.connect_id, "backend not initialized"));
                        false
                    }
                    Some(id) if id != d.connect_id => {
                        self.metrics.bad("data_foreign_connection");
                        fe.push_control(Packet::close_rsp(
                            d.connect_id,
                            "mismatched connection IDs",
                        ));
                        false
                    }
                    Some(id) => match fe.conn(id) {
                        Some(c) => self.send_data_to_agent(&c, d.data).await,
                        // Already closed by the agent: late data is dropped.
                        None => true,
                    },
                }
            }
            Checked::CloseReq(c) => {
                match fe.conn(c.connect_id) {
                    Some(conn) => {
                        fe.state.lock().unwrap().closing = true;
                        let _ = conn
                            .backend
                            .to_agent
                            .send(Packet::close_req(c.connect_id))
                            .await;
                    }
                    None => {
                        fe.push_control(Packet::close_rsp(c.connect_id, "backend uninitialized"));
                    }
                }
                true
            }
            Checked::DialCls(c) => {
                let ours = fe.state.lock().unwrap().dials.contains(&c.random);
                if ours && let Some(p) = self.take_pending(c.random, None) {
                    fe.state.lock().unwrap().dials.retain(|r| *r != c.random);
                    self.metrics
                        .dial_failure_count
                        .with_label_values(&["frontend_close"])
                        .inc();
                    self.send_control(&p.backend, Packet::dial_cls(c.random));
                }
                true
            }
            Checked::DialRsp(_)
            | Checked::CloseRsp(_)
            | Checked::Drain
            | Checked::DataAck(_)
            | Checked::DataMoved(_) => {
                self.metrics.bad("unexpected_client_packet");
                true
            }
        }
    }
}

/// The sending half of an agent-listener stream.
pub(crate) type AgentRespond = ::h2::server::SendResponse<grpc_wire::WireBuf>;

/// One stream on the agent listener, until it ends. Only
/// `AgentService/Connect` exists; anything else is answered UNIMPLEMENTED,
/// as gRPC servers do.
pub(crate) async fn agent_call(
    sh: &Arc<Shared>,
    request: hyper::Request<::h2::RecvStream>,
    mut respond: AgentRespond,
) {
    let status_only = |status| {
        let mut r = hyper::Response::new(());
        *r.status_mut() = status;
        r
    };
    let grpc = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let refusal = if request.uri().path() != crate::proto::AGENT_CONNECT_PATH {
        trailers_only(
            grpc_wire::status::UNIMPLEMENTED,
            &format!("unknown method {}", request.uri().path()),
        )
    } else if request.method() != hyper::Method::POST {
        status_only(hyper::StatusCode::METHOD_NOT_ALLOWED)
    } else if !grpc {
        status_only(hyper::StatusCode::UNSUPPORTED_MEDIA_TYPE)
    } else {
        match agent_connect(sh, request, &mut respond).await {
            Ok(()) => return,
            // Upstream returns plain Go errors: gRPC code Unknown.
            Err(message) => trailers_only(grpc_wire::status::UNKNOWN, &message),
        }
    };
    let _ = respond.send_response(refusal, true);
}

/// A call answered with its status alone (gRPC's Trailers-Only response).
fn trailers_only(code: u32, message: &str) -> hyper::Response<()> {
    let mut r = hyper::Response::new(());
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    h.extend(grpc_wire::grpc_status_trailers(code, message));
    r
}

/// The agent streams, indexed for the per-dial pick as upstream's backend
/// managers keep theirs in maps: a pick reads a few entries, and a stream
/// comes or goes in time linear in its agent's streams and, when it was the
/// agent's first, in the candidates of each strategy it was indexed under
/// (a scan for its pointer). Scanning every stream per dial cost 16 us at
/// 1,000 agents and 0.2 ms at 10,000 (`benches/pick.rs`).
#[derive(Default)]
pub(crate) struct Backends {
    /// Each agent's streams, in connection order: the first is the one a
    /// pick among agents sees, the first `links` take its dials.
    by_agent: HashMap<String, Vec<Arc<Backend>>>,
    /// Every agent's first stream, in no order: the default strategy's
    /// candidates.
    firsts: Candidates,
    /// First streams of agents that announced the default route.
    default_route: Candidates,
    /// destHost: first streams by each host, IPv4 and IPv6 identifier their
    /// agents announced.
    by_host: HashMap<String, Vec<Arc<Backend>>>,
    /// Streams over all agents.
    streams: usize,
}

impl Backends {
    fn add(&mut self, backend: Arc<Backend>) {
        self.streams += 1;
        let streams = self.by_agent.entry(backend.agent_id.clone()).or_default();
        streams.push(backend.clone());
        if streams.len() == 1 {
            self.index_first(backend);
        }
    }

    fn remove(&mut self, backend: &Backend) {
        let Some(streams) = self.by_agent.get_mut(&backend.agent_id) else {
            return;
        };
        let Some(at) = streams.iter().position(|b| b.uid == backend.uid) else {
            return;
        };
        streams.remove(at);
        self.streams -= 1;
        // The agent's next streams, in connection order, take over.
        let next_first = streams.first().cloned();
        if streams.is_empty() {
            self.by_agent.remove(&backend.agent_id);
        }
        if at == 0 {
            self.unindex_first(backend);
            if let Some(next) = next_first {
                self.index_first(next);
            }
        }
    }

    fn index_first(&mut self, first: Arc<Backend>) {
        for host in first.idents.all_hosts() {
            let agents = self.by_host.entry(host.to_owned()).or_default();
            if !agents.iter().any(|b| b.uid == first.uid) {
                agents.push(first.clone());
            }
        }
        if first.idents.default_route {
            self.default_route.insert(first.clone());
        }
        self.firsts.insert(first);
    }

    fn unindex_first(&mut self, first: &Backend) {
        self.firsts.remove(first.uid);
        if first.idents.default_route {
            self.default_route.remove(first.uid);
        }
        for host in first.idents.all_hosts() {
            if let Some(agents) = self.by_host.get_mut(host) {
                // A host's list holds its few agents: a scan is enough.
                if let Some(i) = agents.iter().position(|b| b.uid == first.uid) {
                    agents.swap_remove(i);
                }
                if agents.is_empty() {
                    self.by_host.remove(host);
                }
            }
        }
    }

    /// `backend`'s place among its agent's streams (0: the first).
    #[cfg(test)]
    fn rank(&self, backend: &Backend) -> usize {
        self.by_agent[&backend.agent_id]
            .iter()
            .position(|b| b.uid == backend.uid)
            .unwrap()
    }

    /// Every stream.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.by_agent.values().flatten()
    }

    /// The stream a dial to `first`'s agent takes: `first` for an agent
    /// with one link or that moves its streams itself (moves extension);
    /// else, of the agent's first `links` streams, the one
    /// carrying the fewest tunnels (dials awaiting their answer and open
    /// connections), ties taken in turn, so dials at once alternate. Turns
    /// alone put every long stream on one link when each was followed by
    /// a short dial. An agent closes at once a stream that reached a
    /// server it already holds that many links to; it decides only after
    /// the server's answer and dials one at a time, so the streams it
    /// keeps are the earliest here, and one past its `links` is never
    /// dealt a dial while the agent closes it.
    fn link_of(&self, first: &Arc<Backend>) -> Arc<Backend> {
        // An agent that moves streams spreads them itself: its dials stay
        // on one link, whose task gathers more of their packets per wake.
        if first.links < 2 || first.moves {
            return first.clone();
        }
        let Some(streams) = self.by_agent.get(&first.agent_id) else {
            return first.clone();
        };
        let usable = &streams[..streams.len().min(first.links)];
        let turn = first.next_link.fetch_add(1, Ordering::Relaxed);
        (0..usable.len())
            .map(|k| &usable[(turn + k) % usable.len()])
            .min_by_key(|b| b.tunnels())
            .unwrap_or(first)
            .clone()
    }
}

/// A strategy's candidates over every agent, in no order, with each one's
/// place: an agent leaving is taken out in constant time (a swap with the
/// last), not found by a scan of ten thousand.
#[derive(Default)]
struct Candidates {
    list: Vec<Arc<Backend>>,
    /// Place in `list` by `Backend::uid`.
    at: HashMap<u64, usize>,
}

impl Candidates {
    fn insert(&mut self, b: Arc<Backend>) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.at.entry(b.uid) {
            e.insert(self.list.len());
            self.list.push(b);
        }
    }

    fn remove(&mut self, uid: u64) {
        let Some(i) = self.at.remove(&uid) else {
            return;
        };
        self.list.swap_remove(i);
        if let Some(moved) = self.list.get(i) {
            self.at.insert(moved.uid, i);
        }
    }
}

/// Random draws before a pick falls back to one pass over the candidates.
const PICK_DRAWS: usize = 8;

/// A uniform pick among `candidates` not draining, or among all of them
/// when every one is draining. Draws that land on a draining one are
/// redrawn (rejection keeps the pick uniform); when most are draining, one
/// pass with a reservoir of one decides.
fn pick_ready<'a>(candidates: &'a [Arc<Backend>], rng: &mut impl Rng) -> Option<&'a Arc<Backend>> {
    if candidates.is_empty() {
        return None;
    }
    let ready = |b: &Backend| !b.draining.load(Ordering::Relaxed);
    for _ in 0..PICK_DRAWS {
        let b = &candidates[rng.gen_range(0..candidates.len())];
        if ready(b) {
            return Some(b);
        }
    }
    let (mut pick, mut seen) = (None, 0u32);
    for b in candidates.iter().filter(|b| ready(b)) {
        seen += 1;
        if rng.gen_range(0..seen) == 0 {
            pick = Some(b);
        }
    }
    pick.or_else(|| Some(&candidates[rng.gen_range(0..candidates.len())]))
}

/// `AgentService/Connect`: checks the agent, makes it a backend and reads
/// its packets until the stream or the backend ends; then the response
/// ends with grpc-status 0. Err: the refusal's message, nothing answered.
async fn agent_connect(
    sh: &Arc<Shared>,
    request: hyper::Request<::h2::RecvStream>,
    respond: &mut AgentRespond,
) -> Result<(), String> {
    let md = request.headers();
    let ids: Vec<_> = md
        .get_all(headers::AGENT_ID)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if ids.len() != 1 || ids[0].is_empty() {
        sh.metrics.bad("agent_without_id");
        tracing::warn!(
            count = ids.len(),
            "agent refused: needs exactly one agentID"
        );
        return Err(format!(
            "expected one agent ID in the context, got {}",
            ids.len()
        ));
    }
    let agent_id = ids[0].to_string();
    let idents: Vec<_> = md
        .get_all(headers::AGENT_IDENTIFIERS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if idents.len() > 1 {
        sh.metrics.bad("agent_identifiers");
        return Err(format!(
            "expected at most one set of agent identifiers in the context, got {}",
            idents.len()
        ));
    }
    let idents = Identifiers::parse(idents.first().copied().unwrap_or(""));
    // Before the agent becomes a backend and before serverID/serverCount
    // are answered: a refused agent never sees a successful Connect.
    if let Some(auth) = &sh.opts.agent_auth {
        let authorization: Vec<String> = md
            .get_all(headers::AUTHORIZATION)
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_string())
            .collect();
        match auth.authenticate(&authorization).await {
            Ok(username) => {
                tracing::debug!(%agent_id, %username, "agent authenticated via token");
            }
            Err(e) => {
                sh.metrics.bad(e.metric_kind());
                tracing::warn!(%agent_id, error = %e, "agent refused: token authentication failed");
                return Err(e.to_string());
            }
        }
    }
    // Flow-control extension: on when the agent offers it.
    let flow_window = FlowWindow::growing(
        sh.opts.flow_window.min(sh.opts.connection_queue_bytes / 2),
        sh.opts.flow_window_max,
    )
    .agree(md);
    // Links extension: unreadable or absent is one link, as upstream; an
    // agent that asked is told how many its dials are spread over.
    let asked_links = md.get(headers::LINKS);
    let links = asked_links
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, MAX_AGENT_LINKS);
    let server_id = hyper::header::HeaderValue::from_str(&sh.opts.server_id)
        .map_err(|_| "server id is not a valid header value".to_string())?;
    let (readers, mut new_readers) = mpsc::unbounded_channel();
    let mut response = hyper::Response::new(());
    let h = response.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    h.insert(headers::SERVER_ID, server_id);
    h.insert(headers::SERVER_COUNT, sh.opts.server_count.into());
    flow_window.offer(h);
    if asked_links.is_some() {
        h.insert(headers::LINKS, links.into());
    }
    // Moves extension: with several links and credit (which bounds what a
    // reader may wait with), when the agent offers it.
    let moves = links > 1
        && flow_window.is_on()
        && md
            .get(headers::MOVE_STREAMS)
            .is_some_and(|v| v.as_bytes() == b"1");
    if moves {
        h.insert(
            headers::MOVE_STREAMS,
            hyper::header::HeaderValue::from_static("1"),
        );
    }
    let Ok(stream) = respond.send_response(response, false) else {
        // The stream was reset before it was answered: nothing to serve.
        return Ok(());
    };
    let mut backend = Backend::on_stream(sh, agent_id, idents, stream, flow_window, links, readers);
    backend.moves = moves;
    let backend = Arc::new(backend);
    tracing::info!(agent_id = %backend.agent_id, server_id = %sh.opts.server_id, "agent connected");
    sh.add_backend(backend.clone());
    let connections = sh
        .metrics
        .grpc_connections
        .with_label_values(&["/AgentService/Connect"]);
    connections.inc();
    let inbound = grpc_wire::H2Body::new(request.into_body());
    // Uploading clients' readers run here beside the stream's reader
    // (see `MovedClientReader`); they end with it.
    let mut moved = futures_util::stream::FuturesUnordered::new();
    let reading = read_agent_stream(sh, &backend, inbound);
    let stopped = sh.stop.cancelled();
    let gone = backend.gone.cancelled();
    tokio::pin!(reading, stopped, gone);
    let ended = loop {
        tokio::select! {
            biased;
            r = &mut reading => break r,
            _ = &mut stopped => break Ok(()),
            _ = &mut gone => break Ok(()),
            Some(reader) = new_readers.recv() => moved.push(reader),
            Some(()) = futures_util::StreamExt::next(&mut moved), if !moved.is_empty() => {}
        }
    };
    drop(moved);
    if let Err((code, why)) = ended {
        tracing::info!(agent_id = %backend.agent_id, code = crate::metrics::grpc_code_name(code), %why, "agent stream ended");
        sh.metrics
            .stream_errors_total
            .with_label_values(&[
                "from_agent",
                crate::metrics::grpc_code_name(code),
                crate::metrics::NO_PACKET,
            ])
            .inc();
    }
    sh.remove_backend(&backend);
    connections.dec();
    if let ToAgent::Stream(sender) = &backend.to_agent {
        sender
            .finish_with_trailers(grpc_wire::grpc_status_trailers(grpc_wire::status::OK, ""))
            .await;
    }
    Ok(())
}

/// Reads an agent's messages until its stream ends: Ok when the agent
/// ends it (END_STREAM, or a reset with CANCEL, as a tonic server took
/// it), else the gRPC code and why.
async fn read_agent_stream(
    sh: &Arc<Shared>,
    backend: &Arc<Backend>,
    inbound: grpc_wire::H2Body,
) -> Result<(), (tonic::Code, String)> {
    let read = grpc_wire::read_packets_then(inbound, |p| {
        sh.handle_agent_packet_or_hold(backend, p)
            .map(|wait| sh.wait(backend, wait))
    });
    match read.await {
        Ok(_) | Err((tonic::Code::Cancelled, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A dial id (`random`): a positive int63, like Go's rand.Int63.
pub fn random_dial_id() -> i64 {
    random_id()
}

pub(crate) fn random_id() -> i64 {
    rand::thread_rng().gen_range(1..i64::MAX)
}

/// An agent stream for unit tests: registered with `sh`, its packets
/// toward the agent in the receiver.
#[cfg(test)]
pub(crate) fn test_backend(sh: &Shared) -> (Arc<Backend>, mpsc::Receiver<Packet>) {
    let (tx, rx) = mpsc::channel(64);
    let backend = Arc::new(Backend::new(
        sh,
        "agent".into(),
        Identifiers::default(),
        tx,
        0,
    ));
    sh.add_backend(backend.clone());
    (backend, rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn queued(fe: &Frontend) -> Vec<Checked> {
        std::iter::from_fn(|| fe.queue.pop().now_or_never().flatten())
            .map(|p| p.checked().unwrap())
            .collect()
    }

    /// An agent that answers two dials with the same connectID: the second
    /// dial fails toward its client; the first connection keeps working and
    /// the established gauge counts it once.
    #[tokio::test]
    async fn dial_response_reusing_a_live_connect_id_is_refused() {
        let sh = ProxyServer::new(ServerOptions::default()).shared;
        let (backend, mut to_agent) = test_backend(&sh);
        let (first, second) = (sh.new_frontend(), sh.new_frontend());
        sh.start_dial(&first, "tcp", "127.0.0.1:80", 11)
            .await
            .unwrap();
        sh.start_dial(&second, "tcp", "127.0.0.1:80", 22)
            .await
            .unwrap();
        while to_agent.try_recv().is_ok() {}

        sh.handle_agent_packet(&backend, Packet::dial_rsp(11, 7, ""));
        sh.handle_agent_packet(&backend, Packet::dial_rsp(22, 7, ""));

        assert_eq!(sh.metrics.established_connections.get(), 1);
        assert_eq!(
            sh.metrics
                .bad_input_total
                .with_label_values(&["duplicate_connect_id"])
                .get(),
            1
        );
        assert!(
            matches!(&queued(&first)[..], [Checked::DialRsp(r)] if r.random == 11 && r.connect_id == 7 && r.error.is_empty())
        );
        assert!(
            matches!(&queued(&second)[..], [Checked::DialRsp(r)] if r.random == 22 && r.connect_id == 0 && !r.error.is_empty())
        );
        assert!(second.queue.is_closed() && second.conn(7).is_none());
        // Nothing toward the agent: a CLOSE_REQ for 7 would end the live one.
        assert!(to_agent.try_recv().is_err());
        assert_eq!(sh.pending.lock().unwrap().len(), 0);

        // The first connection still carries data, then closes cleanly.
        sh.handle_agent_packet(&backend, Packet::data(7, "hello".into()));
        assert!(matches!(&queued(&first)[..], [Checked::Data(d)] if &d.data[..] == b"hello"));
        sh.handle_agent_packet(&backend, Packet::close_rsp(7, ""));
        assert!(matches!(&queued(&first)[..], [Checked::CloseRsp(c)] if c.connect_id == 7));
        assert_eq!(sh.metrics.established_connections.get(), 0);
        assert!(backend.conns.lock().unwrap().is_empty());
    }

    /// With --backend-dial-timeout, an agent whose stream does not take a
    /// DIAL_REQ in time is retired: out of the backend list, its stream
    /// ended, later dials go elsewhere or fail with no_agent.
    #[tokio::test(start_paused = true)]
    async fn dial_request_send_timeout_retires_the_agent() {
        let sh = ProxyServer::new(ServerOptions {
            backend_dial_timeout: Duration::from_secs(1),
            ..ServerOptions::default()
        })
        .shared;
        let (tx, _never_read) = mpsc::channel(1);
        let stuck = Arc::new(Backend::new(
            &sh,
            "stuck".into(),
            Identifiers::default(),
            tx,
            0,
        ));
        sh.add_backend(stuck.clone());
        let fe = sh.new_frontend();
        // The first DIAL_REQ fills the stream; the second cannot be sent.
        sh.start_dial(&fe, "tcp", "127.0.0.1:80", 1).await.unwrap();
        let r = sh.start_dial(&fe, "tcp", "127.0.0.1:80", 2).await;
        assert!(matches!(r, Err(DialError::Timeout)), "{r:?}");
        assert!(stuck.gone.is_cancelled());
        assert_eq!(sh.backends.read().unwrap().streams, 0);
        assert_eq!(sh.metrics.ready_backend_connections.get(), 0);
        assert!(matches!(
            sh.start_dial(&fe, "tcp", "127.0.0.1:80", 3).await,
            Err(DialError::NoAgent)
        ));
    }

    /// An agent that reaches a server it already holds (a second stream
    /// through a load balancer) closes the new stream as soon as it reads
    /// the server's ID. Dials go to each agent's first stream only, so none
    /// is lost with the duplicate; a second agent still gets its share.
    /// An agent stream of `id` that announced `links`, added to `sh`; its
    /// packets toward the agent arrive in the receiver.
    fn agent_stream(
        sh: &Arc<Shared>,
        id: &str,
        links: usize,
    ) -> (Arc<Backend>, mpsc::Receiver<Packet>) {
        let (tx, rx) = mpsc::channel(256);
        let mut b = Backend::new(sh, id.into(), Identifiers::default(), tx, 0);
        b.links = links;
        let b = Arc::new(b);
        sh.add_backend(b.clone());
        (b, rx)
    }

    /// Dials `randoms` from one frontend, each answered at once (so the
    /// stream's dial limit is no bound).
    async fn dial_all(sh: &Arc<Shared>, fe: &Arc<Frontend>, randoms: std::ops::Range<i64>) {
        for random in randoms {
            sh.start_dial(fe, "tcp", "127.0.0.1:80", random)
                .await
                .unwrap();
            fe.state.lock().unwrap().dials.clear();
        }
    }

    /// Packets waiting in `rx`, taken.
    fn count(rx: &mut mpsc::Receiver<Packet>) -> usize {
        std::iter::from_fn(|| rx.try_recv().ok()).count()
    }

    #[tokio::test]
    async fn dials_go_to_an_agents_first_stream_not_to_a_duplicate() {
        let sh = ProxyServer::new(ServerOptions::default()).shared;
        let stream = |id: &str| agent_stream(&sh, id, 1);
        let (first, mut first_rx) = stream("agent-a");
        let (duplicate, mut duplicate_rx) = stream("agent-a");
        let (_other, mut other_rx) = stream("agent-b");
        let fe = sh.new_frontend();
        let dials = 60;
        dial_all(&sh, &fe, 1..dials + 1).await;
        let (a, dup, b) = (
            count(&mut first_rx),
            count(&mut duplicate_rx),
            count(&mut other_rx),
        );
        assert_eq!(dup, 0, "dials sent to the duplicate stream");
        assert_eq!(a + b, dials as usize);
        assert!(a > 0 && b > 0, "one agent got every dial: {a} and {b}");
        // The agent closes the duplicate: no pending dial fails with it.
        sh.remove_backend(&duplicate);
        assert_eq!(sh.pending.lock().unwrap().len(), dials as usize);
        assert!(queued(&fe).is_empty());
        // With its first stream gone, the agent's next stream takes the
        // dials.
        let (_late, mut late_rx) = stream("agent-a");
        sh.remove_backend(&first);
        dial_all(&sh, &fe, dials + 1..2 * dials + 1).await;
        let (late, b) = (count(&mut late_rx), count(&mut other_rx));
        assert_eq!(late + b, dials as usize);
        assert!(
            late > 0 && b > 0,
            "one agent got every dial: {late} and {b}"
        );
    }

    /// An agent that announced two links (`proxyctl-links`) gets its dials
    /// spread over its first two streams evenly; a third stream (one it
    /// closes as a duplicate) gets none. Agents are still picked evenly: a
    /// one-link agent beside it keeps its share. When a link goes, the
    /// agent's next stream takes its place, and new dials go to it until
    /// it carries as many as the other.
    #[tokio::test]
    async fn dials_alternate_over_an_agents_announced_links() {
        let sh = ProxyServer::new(ServerOptions::default()).shared;
        let stream = |id: &str, links: usize| agent_stream(&sh, id, links);
        let (first, mut first_rx) = stream("agent-a", 2);
        let (second, mut second_rx) = stream("agent-a", 2);
        let (third, mut third_rx) = stream("agent-a", 2);
        let (_other, mut other_rx) = stream("agent-b", 1);
        let rank = |b: &Backend| sh.backends.read().unwrap().rank(b);
        assert_eq!((rank(&first), rank(&second), rank(&third)), (0, 1, 2));
        let fe = sh.new_frontend();
        let dials = 200;
        dial_all(&sh, &fe, 1..dials + 1).await;
        let (a1, a2, a3, b) = (
            count(&mut first_rx),
            count(&mut second_rx),
            count(&mut third_rx),
            count(&mut other_rx),
        );
        assert_eq!(a3, 0, "dials sent past the announced links");
        assert_eq!(a1 + a2 + b, dials as usize);
        // Round robin: the agent's two links differ by at most one dial.
        assert!(a1.abs_diff(a2) <= 1, "links got {a1} and {a2}");
        // Agents, not streams, are picked evenly: agent-a's share is near
        // a half (200 fair coin flips fall within 60..=140 but for odds
        // below 1e-8), not two thirds.
        assert!((60..=140).contains(&b), "one-link agent got {b} of {dials}");
        // The first link goes: the second becomes first, the third usable.
        sh.remove_backend(&first);
        assert_eq!((rank(&second), rank(&third)), (0, 1));
        dial_all(&sh, &fe, dials + 1..2 * dials + 1).await;
        let (a2, a3, b) = (
            count(&mut second_rx),
            count(&mut third_rx),
            count(&mut other_rx),
        );
        assert_eq!(count(&mut first_rx), 0);
        assert_eq!(a2 + a3 + b, dials as usize);
        let (t2, t3) = (second.tunnels(), third.tunnels());
        assert!(
            t2.abs_diff(t3) <= 1,
            "links carry {t2} and {t3} dials (got {a2} and {a3} of the new ones)"
        );
    }

    /// Dials go to the agent link carrying the fewest tunnels: long
    /// connections, each followed by a short dial (answered, then closed),
    /// end up half on each link, where turns alone put every long one on
    /// the same link.
    /// Two links of one agent that agreed the moves extension (and credit).
    fn moving_links(sh: &Arc<Shared>) -> [(Arc<Backend>, mpsc::Receiver<Packet>); 2] {
        std::array::from_fn(|_| {
            let (tx, rx) = mpsc::channel(256);
            let mut b = Backend::new(sh, "agent-a".into(), Identifiers::default(), tx, 1 << 20);
            b.links = 2;
            b.moves = true;
            let b = Arc::new(b);
            sh.add_backend(b.clone());
            (b, rx)
        })
    }

    /// What a client's queue holds: DATA as text, other packets by type.
    fn delivered_text(fe: &Frontend) -> Vec<String> {
        queued(fe)
            .into_iter()
            .map(|c| match c {
                Checked::Data(d) => String::from_utf8_lossy(&d.data).into_owned(),
                other => other.type_name().to_string(),
            })
            .collect()
    }

    /// A client of `home`'s agent with one connection, `connect_id`,
    /// dialled and answered over `home`.
    async fn dialled(
        sh: &Arc<Shared>,
        home: &Arc<Backend>,
        random: i64,
        connect_id: i64,
    ) -> Arc<Frontend> {
        let fe = sh.new_frontend();
        sh.start_dial(&fe, "tcp", "127.0.0.1:80", random)
            .await
            .unwrap();
        sh.handle_agent_packet(home, Packet::dial_rsp(random, connect_id, ""));
        fe
    }

    /// The moves extension: dials take the agent's first link; a
    /// connection's packets that come on its second link before the first
    /// link's DATA_MOVED was read wait for it, and reach the client after
    /// everything sent before the mark (with turns alone, "c" would come
    /// before "b"); the end that comes on the new link ends it on both.
    #[tokio::test(start_paused = true)]
    async fn packets_moved_to_another_link_wait_for_the_mark_and_keep_their_order() {
        let sh = ProxyServer::new(ServerOptions::default()).shared;
        let [(home, mut home_rx), (other, mut other_rx)] = moving_links(&sh);
        let fe = sh.new_frontend();
        dial_all(&sh, &fe, 1..5).await;
        assert_eq!(
            (count(&mut home_rx), count(&mut other_rx)),
            (4, 0),
            "dials to an agent that moves streams take its first link"
        );
        for random in 1..5 {
            sh.pending.lock().unwrap().remove(&random);
        }
        let fe = dialled(&sh, &home, 5, 7).await;
        sh.handle_agent_packet(&home, Packet::data(7, "a".into()));
        let wait = sh
            .handle_agent_packet_or_hold(&other, Packet::data(7, "c".into()))
            .expect("a packet on the new link before the mark was taken at once");
        let (sh2, other2) = (sh.clone(), other.clone());
        let waiting = tokio::spawn(async move { sh2.wait(&other2, wait).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the reader went on before the mark");
        sh.handle_agent_packet(&home, Packet::data(7, "b".into()));
        sh.handle_agent_packet(&home, Packet::data_moved(7));
        waiting.await.unwrap();
        assert!(
            sh.handle_agent_packet_or_hold(&other, Packet::data(7, "d".into()))
                .is_none(),
            "a moved connection's packets still wait"
        );
        // A third stream under the same agent ID cannot take it over.
        let (tx, _third_rx) = mpsc::channel(256);
        let mut third = Backend::new(&sh, "agent-a".into(), Identifiers::default(), tx, 1 << 20);
        third.moves = true;
        let third = Arc::new(third);
        sh.handle_agent_packet(&third, Packet::data(7, "stolen".into()));
        assert_eq!(sh.metrics.moved_connections_total.get(), 1);
        sh.handle_agent_packet(&other, Packet::close_rsp(7, ""));
        assert_eq!(
            delivered_text(&fe),
            ["DIAL_RSP", "a", "b", "c", "d", "CLOSE_RSP"]
        );
        assert!(home.conns.lock().unwrap().is_empty());
        assert!(other.adopted.lock().unwrap().is_empty());
        assert_eq!(sh.metrics.established_connections.get(), 0);

        // An agent that sends on the new link and never marks the move:
        // after MOVE_MARK_LIMIT the connection ends (its bytes cannot be
        // put in order), and the reader goes on.
        let fe = dialled(&sh, &home, 6, 8).await;
        let wait = sh
            .handle_agent_packet_or_hold(&other, Packet::data(8, "x".into()))
            .expect("an unmarked move was taken at once");
        sh.wait(&other, wait).await;
        assert_eq!(delivered_text(&fe), ["DIAL_RSP", "CLOSE_RSP"]);
        assert!(home.conns.lock().unwrap().is_empty());
        assert_eq!(sh.metrics.established_connections.get(), 0);
        let close = std::iter::from_fn(|| home_rx.try_recv().ok())
            .filter_map(|p| p.checked().ok())
            .any(|c| matches!(c, Checked::CloseReq(r) if r.connect_id == 8));
        assert!(close, "the agent was not told to close the connection");

        // A connection that ends on its home link while a packet of it
        // waits for the mark: the wait ends at once, the packet is dropped.
        let fe = dialled(&sh, &home, 9, 10).await;
        let wait = sh
            .handle_agent_packet_or_hold(&other, Packet::data(10, "y".into()))
            .expect("taken at once");
        let started = tokio::time::Instant::now();
        let (sh2, other2) = (sh.clone(), other.clone());
        let waiting = tokio::spawn(async move { sh2.wait(&other2, wait).await });
        tokio::task::yield_now().await;
        sh.handle_agent_packet(&home, Packet::close_rsp(10, ""));
        waiting.await.unwrap();
        assert!(started.elapsed() < MOVE_MARK_LIMIT);
        assert_eq!(delivered_text(&fe), ["DIAL_RSP", "CLOSE_RSP"]);
        assert!(other.adopted.lock().unwrap().is_empty());

        // The link a connection moved to goes: the connection ends (what
        // the agent sent of it there may be lost), its client is told and
        // the agent is told on the home link; the agent's own word of it,
        // coming later on the home link, finds nothing left to end.
        let fe = dialled(&sh, &home, 11, 12).await;
        sh.handle_agent_packet(&home, Packet::data_moved(12));
        sh.handle_agent_packet(&other, Packet::data(12, "z".into()));
        assert_eq!(other.adopted.lock().unwrap().len(), 1);
        while home_rx.try_recv().is_ok() {}
        sh.remove_backend(&other);
        assert!(other.adopted.lock().unwrap().is_empty());
        assert!(
            fe.conn(12).is_none(),
            "the moved connection outlived its link"
        );
        assert_eq!(delivered_text(&fe), ["DIAL_RSP", "z", "CLOSE_RSP"]);
        assert_eq!(sh.metrics.established_connections.get(), 0);
        let told = std::iter::from_fn(|| home_rx.try_recv().ok())
            .filter_map(|p| p.checked().ok())
            .any(|c| matches!(c, Checked::CloseReq(r) if r.connect_id == 12));
        assert!(told, "the agent was not told on the home link");
        sh.handle_agent_packet(&home, Packet::close_rsp(12, "link to the server lost"));
        assert!(delivered_text(&fe).is_empty());
        assert_eq!(sh.metrics.established_connections.get(), 0);
    }

    #[tokio::test]
    async fn dials_go_to_the_agent_link_with_the_fewest_tunnels() {
        let sh = ProxyServer::new(ServerOptions::default()).shared;
        let mut links = [
            agent_stream(&sh, "agent-a", 2),
            agent_stream(&sh, "agent-a", 2),
        ];
        // Dials `random` (the connectID the agent answers with, too);
        // returns the index of the link it reached, and its frontend.
        let dial = async |links: &mut [(Arc<Backend>, mpsc::Receiver<Packet>); 2], random| {
            let fe = sh.new_frontend();
            sh.start_dial(&fe, "tcp", "127.0.0.1:80", random)
                .await
                .unwrap();
            let at = links
                .iter_mut()
                .position(|(_, rx)| rx.try_recv().is_ok())
                .expect("the dial reached a link");
            (at, fe)
        };
        let mut long = Vec::new();
        for i in 0..20 {
            let (random, short) = (2 * i + 1, 2 * i + 2);
            let (at, fe) = dial(&mut links, random).await;
            sh.handle_agent_packet(&links[at].0, Packet::dial_rsp(random, random, ""));
            long.push((at, fe));
            let (at, _fe) = dial(&mut links, short).await;
            sh.handle_agent_packet(&links[at].0, Packet::dial_rsp(short, short, ""));
            sh.handle_agent_packet(&links[at].0, Packet::close_rsp(short, ""));
        }
        let on_first = long.iter().filter(|(at, _)| *at == 0).count();
        assert_eq!(
            on_first, 10,
            "{on_first} of 20 long connections on the first link"
        );
        assert_eq!(
            (links[0].0.tunnels(), links[1].0.tunnels()),
            (10, 10),
            "short dials left behind"
        );
        // A dial the agent refuses stops counting too.
        let (at, _fe) = dial(&mut links, 100).await;
        assert_eq!(links[at].0.tunnels(), 11);
        sh.handle_agent_packet(&links[at].0, Packet::dial_rsp(100, 0, "refused"));
        assert_eq!((links[0].0.tunnels(), links[1].0.tunnels()), (10, 10));
    }

    /// Agents leave a strategy's candidates from any place, and every
    /// place left behind still names its agent (a stale place would take
    /// the wrong agent out, or none).
    #[test]
    fn candidates_keep_their_places_through_removals() {
        let sh = ProxyServer::new(ServerOptions::default()).shared;
        let streams: Vec<_> = (0..6)
            .map(|i| {
                let (tx, _rx) = mpsc::channel(1);
                Arc::new(Backend::new(
                    &sh,
                    format!("agent-{i}"),
                    Identifiers::parse(""),
                    tx,
                    0,
                ))
            })
            .collect();
        let mut c = Candidates::default();
        for b in &streams {
            c.insert(b.clone());
        }
        c.insert(streams[2].clone());
        assert_eq!(c.list.len(), 6, "an agent already in is not added twice");
        let consistent = |c: &Candidates| {
            c.at.len() == c.list.len() && c.list.iter().enumerate().all(|(i, b)| c.at[&b.uid] == i)
        };
        for gone in [1, 5, 0, 42, 3] {
            let uid = streams.get(gone).map_or(u64::MAX, |b| b.uid);
            c.remove(uid);
            assert!(consistent(&c), "after removing {gone}");
            assert!(c.list.iter().all(|b| b.uid != uid));
        }
        let mut left: Vec<_> = c.list.iter().map(|b| b.agent_id.clone()).collect();
        left.sort();
        assert_eq!(left, ["agent-2", "agent-4"]);
    }

    /// The strategies' indexes as agents come and go: destHost finds an
    /// agent by any identifier it announced and only that agent, and a
    /// dial whose host none announced falls to the next strategy;
    /// defaultRoute takes only agents that announced it; a draining agent
    /// gets no dial while another fits, and every dial when all that fit
    /// are draining; an agent's second stream is indexed when its first
    /// goes; an agent gone leaves no key behind (`ready_backends`); an
    /// identifier named twice by one agent counts it once.
    #[tokio::test]
    async fn picks_follow_the_strategy_indexes_as_agents_come_and_go() {
        let sh = ProxyServer::new(ServerOptions {
            strategies: vec![Strategy::DestHost, Strategy::DefaultRoute],
            ..ServerOptions::default()
        })
        .shared;
        let stream = |id: &str, idents: &str| {
            let (tx, rx) = mpsc::channel(1024);
            let b = Arc::new(Backend::new(
                &sh,
                id.into(),
                Identifiers::parse(idents),
                tx,
                0,
            ));
            sh.add_backend(b.clone());
            (b, rx)
        };
        let keys = |strategy: &str| {
            sh.metrics
                .ready_backends
                .with_label_values(&[strategy])
                .get()
        };
        let (a, mut a_rx) = stream("a", "host=node-a&ipv4=10.0.0.1&host=node-a");
        let (a_dup, mut a_dup_rx) = stream("a", "host=node-a&ipv4=10.0.0.1&host=node-a");
        let (route1, mut route1_rx) = stream("r1", "default-route=true");
        let (_route2, mut route2_rx) = stream("r2", "default-route=true&host=node-r2");
        assert_eq!((keys("destHost"), keys("defaultRoute")), (3, 2));
        let fe = sh.new_frontend();
        let mut random = 0;
        let mut dial = async |address: &str, n: usize| {
            for _ in 0..n {
                random += 1;
                sh.start_dial(&fe, "tcp", address, random).await.unwrap();
                fe.state.lock().unwrap().dials.clear();
            }
        };
        dial("node-a:443", 20).await;
        dial("10.0.0.1:80", 20).await;
        assert_eq!(count(&mut a_rx), 40, "destHost missed agent a");
        // No agent announced this host: defaultRoute takes it, never `a`.
        dial("elsewhere:80", 200).await;
        let (r1, r2) = (count(&mut route1_rx), count(&mut route2_rx));
        assert_eq!(r1 + r2, 200);
        assert!(
            (60..=140).contains(&r1),
            "default-route agents got {r1} and {r2}"
        );
        assert_eq!(count(&mut a_rx) + count(&mut a_dup_rx), 0);
        // Draining: the other default-route agent takes every dial...
        route1.draining.store(true, Ordering::Relaxed);
        dial("elsewhere:80", 100).await;
        assert_eq!((count(&mut route1_rx), count(&mut route2_rx)), (0, 100));
        // ...and when all that fit drain, they still take dials.
        a.draining.store(true, Ordering::Relaxed);
        dial("node-a:443", 10).await;
        assert_eq!(count(&mut a_rx), 10);
        // The first stream goes: the agent's next one is found by host.
        sh.remove_backend(&a);
        assert_eq!(keys("destHost"), 3);
        dial("10.0.0.1:80", 10).await;
        assert_eq!(
            count(&mut a_dup_rx),
            10,
            "the promoted stream was not indexed"
        );
        sh.remove_backend(&a_dup);
        assert_eq!((keys("destHost"), keys("defaultRoute")), (1, 2));
        // Its host is gone from the index: defaultRoute takes the dial.
        dial("node-a:443", 10).await;
        assert_eq!(count(&mut route1_rx) + count(&mut route2_rx), 10);
        assert_eq!(sh.backends.read().unwrap().streams, 2);
        // An agent that names a host three times is one candidate for it:
        // of 400 dials it gets about half (outside 140..=260 with odds
        // below 1e-8), not three quarters.
        let (_c, mut c_rx) = stream("c", "host=shared&host=shared&host=shared");
        let (_d, mut d_rx) = stream("d", "host=shared");
        dial("shared:80", 400).await;
        let (c, d) = (count(&mut c_rx), count(&mut d_rx));
        assert_eq!(c + d, 400);
        assert!((140..=260).contains(&c), "agents got {c} and {d}");
    }

    /// A client write as large as the flow window, after a small one: the
    /// agent acknowledges in quarter-window batches, so the 71 bytes of the
    /// first write stay unacknowledged while the connection waits. Taken
    /// whole, the 1 MiB write needed the full window and waited forever;
    /// in pieces of at most a quarter window it goes through. Time is
    /// paused: a stall makes the runtime idle and the timeout fire at once.
    #[tokio::test(start_paused = true)]
    async fn a_write_as_large_as_the_flow_window_is_sent_in_pieces() {
        const WINDOW: usize = 1 << 20;
        const CONNECT_ID: i64 = 9;
        let sh = ProxyServer::new(ServerOptions::default()).shared;
        let (tx, mut to_agent) = mpsc::channel(64);
        let backend = Arc::new(Backend::new(
            &sh,
            "agent".into(),
            Identifiers::default(),
            tx,
            WINDOW,
        ));
        sh.add_backend(backend.clone());
        let fe = sh.new_frontend();
        sh.start_dial(&fe, "tcp", "127.0.0.1:80", 5).await.unwrap();
        assert!(matches!(
            to_agent.recv().await.unwrap().checked(),
            Ok(Checked::DialReq(_))
        ));
        sh.handle_agent_packet(&backend, Packet::dial_rsp(5, CONNECT_ID, ""));
        let writes = [71, WINDOW, WINDOW, 3 * WINDOW + 5];
        let total: usize = writes.iter().sum();
        // The agent's side: every DATA is delivered at once and counted
        // toward acknowledgements as the agent's writer counts them.
        let agent = {
            let (sh, backend) = (sh.clone(), backend.clone());
            tokio::spawn(async move {
                let acks = Credit::new(FlowWindow::fixed(WINDOW));
                let mut pieces = Vec::new();
                while pieces.iter().sum::<usize>() < total {
                    let Some(p) = to_agent.recv().await else {
                        break;
                    };
                    if let Ok(Checked::Data(d)) = p.checked() {
                        pieces.push(d.data.len());
                        if let Some(n) = acks.delivered(d.data.len()) {
                            sh.handle_agent_packet(&backend, Packet::data_ack(CONNECT_ID, n));
                        }
                    }
                }
                pieces
            })
        };
        for n in writes {
            let write = sh.handle_frontend_packet(&fe, Packet::data(CONNECT_ID, vec![7; n].into()));
            let done = tokio::time::timeout(Duration::from_secs(60), write).await;
            assert_eq!(done, Ok(true), "a {n}-byte write never reached the agent");
        }
        let pieces = agent.await.unwrap();
        assert_eq!(pieces.iter().sum::<usize>(), total);
        assert!(pieces.iter().all(|n| *n <= WINDOW / 4), "{pieces:?}");
    }

    #[test]
    fn identifiers_and_hosts() {
        let ids =
            Identifiers::parse("host=node1&ipv4=1.2.3.4&ipv6=%3A%3A1&default-route=true&bogus=1");
        assert_eq!(ids.hosts, vec!["node1"]);
        assert_eq!(ids.ipv4, vec!["1.2.3.4"]);
        assert_eq!(ids.ipv6, vec!["::1"]);
        assert!(ids.default_route);
        // strconv.ParseBool spellings; the first value counts.
        for (v, want) in [
            ("1", true),
            ("T", true),
            ("True", true),
            ("0", false),
            ("yes", false),
        ] {
            assert_eq!(
                Identifiers::parse(&format!("default-route={v}")).default_route,
                want,
                "{v}"
            );
        }
        assert!(!Identifiers::parse("default-route=false&default-route=true").default_route);
        assert_eq!(dial_host("[::1]:80"), "::1");
        assert_eq!(dial_host("1.2.3.4:80"), "1.2.3.4");
        assert_eq!(dial_host("node1"), "node1");
    }
}
