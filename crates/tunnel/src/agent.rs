//! The agent: dials back to the proxy server(s) over mTLS, keeps
//! `links_per_server` `AgentService/Connect` streams (one per connection)
//! per distinct serverID, one by default as upstream, and dials backends
//! for the server.
//!
//! - Several `--proxy-server-host` addresses are accepted (comma separated);
//!   they are tried round robin, and with more than one the agent wants at
//!   least one connection per address. One load-balanced address works as
//!   upstream: it is dialled again and again until the server count is met.
//! - The stream reader never waits on one endpoint: each has a bounded queue
//!   ([`PacketQueue`]); a backend too slow to take its data gets that one
//!   connection closed (CLOSE_RSP with an error), nothing else.
//! - Endpoint sockets are read with a stack buffer, so an idle connection
//!   holds no read buffer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::{CONTENT_TYPE, HeaderValue, TE};
use hyper::{Method, Request as HttpRequest};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::grpc_wire::{self, H2Body, StreamErrorCode, WireBuf};
use crate::http::{self, Reply};
use crate::idle_flush::IdleFlush;
use crate::keepalive::Keepalive;
use crate::metrics::{AgentMetrics, NO_PACKET, grpc_code_name};
use crate::proto::{Checked, Packet, headers};
use crate::queue::{Credit, FlowWindow, PacketQueue, PushError, QueuedBytes, on_data_ack};
use crate::read_chunk_of;
use crate::self_wake::absorb_self_wakes;
use crate::stream_sender::StreamSender;

/// A read this large says the backend streams: its reader moves into the
/// server connection's task (see [`endpoint_reader`]).
const BULK_READ: usize = crate::READ_CHUNK / 2;

/// Streaming readers that move into one server connection's task; later
/// ones stay in their dials' tasks. That task also encrypts and writes
/// every packet of the connection, so each reader moved there takes its
/// reads off the other CPU: with all of 16 streams there, the task was
/// the one thing running while the machine stood 12% idle, and 16 streams
/// moved 0.73x the TLS floor's bytes; with one, 0.83x (alternating runs,
/// docs/tunnel-benchmarks.md). One stream keeps what moving gains it.
const MAX_MOVED_READERS: usize = 1;

/// One endpoint's reader (backend -> server), run by its server
/// connection's task (see [`serve_server`]).
type EndpointReader = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The HTTP/2 connection to one server, with its TLS stream.
type H2Conn =
    ::h2::client::Connection<IdleFlush<tokio_rustls::client::TlsStream<TcpStream>>, WireBuf>;
/// How long a keepalive PING may wait for its answer (what the agent set on
/// hyper before, and grpc-go's default keepalive timeout).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Links kept to each of our servers (one to upstream's): two TLS streams
/// move sixteen streaming tunnels 0.92-0.96x as fast as sixteen bare
/// relays on 2 CPUs where one moves 0.77-0.84x, and dials, all on the
/// first, cost the same (docs/tunnel-benchmarks.md).
pub const DEFAULT_LINKS_PER_SERVER: usize = 2;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// host:port of each server (or of one load balancer).
    pub servers: Vec<(String, u16)>,
    pub tls: Arc<rustls::ClientConfig>,
    pub agent_id: String,
    pub agent_identifiers: String,
    pub sync_interval: Duration,
    pub sync_interval_cap: Duration,
    pub sync_forever: bool,
    /// HTTP/2 pings to the server; upstream servers refuse pings more often
    /// than every 30 s, so shorter values are raised to 30 s.
    pub keepalive_time: Duration,
    /// How often each server connection's HTTP/2 state is checked
    /// (`--probe-interval`); zero: never.
    pub probe_interval: Duration,
    pub dial_timeout: Duration,
    pub connection_queue_bytes: usize,
    pub max_pending_dials: usize,
    pub service_account_token_path: Option<PathBuf>,
    /// Per-connection window offered to the server for the flow-control
    /// extension (0: off). Upstream servers ignore the offer.
    pub flow_window: usize,
    /// The most that window may grow to on a connection whose reader keeps
    /// up while the window limits it (at or below `flow_window`: fixed);
    /// see [`crate::queue::Credit`].
    pub flow_window_max: usize,
    /// Bytes queued toward backends, summed over every connection; at this
    /// many, dial requests are answered with a dial error. 0: no cap.
    pub max_queued_bytes: usize,
    /// Connections (links) kept to each server, each with its own Connect
    /// stream. More than one is an extension: the server is told in the
    /// request (`proxyctl-links`), and one of ours spreads dials over them.
    /// A link is one TLS stream that one task encrypts or decrypts at a
    /// time; with several, many streams through one agent use more CPUs.
    /// A server keeps as many as it answers it will use (one of ours, at
    /// most 16); one that does not answer (upstream's, which would use only
    /// the first) gets one.
    pub links_per_server: usize,
}

impl AgentOptions {
    pub fn new(servers: Vec<(String, u16)>, tls: Arc<rustls::ClientConfig>) -> Self {
        AgentOptions {
            servers,
            tls,
            agent_id: uuid::Uuid::new_v4().to_string(),
            agent_identifiers: String::new(),
            sync_interval: Duration::from_secs(1),
            sync_interval_cap: Duration::from_secs(10),
            sync_forever: false,
            keepalive_time: Duration::from_secs(3600),
            probe_interval: Duration::from_secs(1),
            dial_timeout: Duration::from_secs(5),
            connection_queue_bytes: 4 << 20,
            max_pending_dials: 10_000,
            service_account_token_path: None,
            flow_window: 1 << 20,
            flow_window_max: crate::DEFAULT_FLOW_WINDOW_MAX,
            max_queued_bytes: crate::server::DEFAULT_MAX_QUEUED_BYTES,
            links_per_server: DEFAULT_LINKS_PER_SERVER,
        }
    }

    fn links(&self) -> usize {
        self.links_per_server.max(1)
    }

    fn offered_window(&self) -> FlowWindow {
        FlowWindow::growing(self.flow_window, self.flow_window_max)
    }
}

struct EndpointConn {
    queue: PacketQueue,
    /// Hard stop for both directions.
    kill: CancellationToken,
    /// Stops reading from the backend (child of `kill`).
    stop_read: CancellationToken,
    /// The backend's EOF (or a read error) was seen: the socket closes once
    /// its writer is done, with no shutdown of its own (see
    /// `write_endpoint`).
    read_eof: AtomicBool,
    /// Flow-control extension: credit for DATA toward the server, and the
    /// count of bytes delivered to the backend (acknowledged in batches).
    send_credit: Option<Credit>,
    delivered: Option<Credit>,
}

struct ServerConn {
    server_id: String,
    /// Opens streams on the connection; kept to see whether it still
    /// would (the probe, readiness).
    h2: ::h2::client::SendRequest<WireBuf>,
    /// The Connect stream's sending half.
    out: Arc<StreamSender>,
    /// Endpoint readers, handed to the connection's task to run there.
    readers: mpsc::UnboundedSender<EndpointReader>,
    /// How many run there now (see [`MAX_MOVED_READERS`]).
    moved_readers: AtomicUsize,
    /// Links this agent keeps to the server: `links_per_server`, or fewer
    /// if the server answered that it uses fewer, or one if it did not
    /// answer the extension.
    links: usize,
    /// Moves extension agreed (`proxyctl-move-streams`): a streaming
    /// endpoint dialled over this link may send on another link to the
    /// same server (see [`endpoint_reader`]).
    moves: bool,
    /// Streaming endpoints whose packets go out on this link.
    streams: AtomicUsize,
    /// Endpoints dialled over this link: packets from the server for them
    /// come on it, wherever theirs go.
    conns: Mutex<HashMap<i64, Arc<EndpointConn>>>,
    dials: Mutex<HashMap<i64, AbortHandle>>,
    gone: CancellationToken,
    flow_window: FlowWindow,
}

impl ServerConn {
    /// No new stream can be opened: the connection has ended, or the
    /// server sent GOAWAY (h2 refuses to open streams after either).
    /// Streams already open may still run. grpc-go's connectivity state
    /// leaves READY on the same two events. Nothing reaches the wire.
    fn is_closed(&self) -> bool {
        let mut send = self.h2.clone();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(send.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
    }
}

struct Shared {
    opts: AgentOptions,
    metrics: AgentMetrics,
    /// Each server's links, in the order they connected.
    servers: Mutex<HashMap<String, Vec<Arc<ServerConn>>>>,
    server_count: AtomicUsize,
    /// Unexpired server Leases last counted (0: not counted / unknown).
    lease_count: AtomicUsize,
    /// --server-count-source=max: the larger of the lease and header counts.
    count_max: AtomicBool,
    draining: AtomicBool,
    /// The last connectID given out, by any link.
    next_id: AtomicI64,
    /// Bytes queued toward backends over all connections, and their cap.
    queued: Arc<QueuedBytes>,
    stop: CancellationToken,
}

impl Shared {
    /// Fewer than `target` servers held, or one of them with fewer links
    /// than it takes (see [`ServerConn::links`]).
    fn short_of(&self, target: usize) -> bool {
        let servers = self.servers.lock().unwrap();
        servers.len() < target
            || servers
                .values()
                .any(|l| l.first().is_some_and(|c| l.len() < c.links))
    }

    fn target_count(&self) -> usize {
        let header = self.server_count.load(Ordering::Relaxed);
        match self.lease_count.load(Ordering::Relaxed) {
            0 => header,
            l if self.count_max.load(Ordering::Relaxed) => l.max(header),
            l => l,
        }
    }
}

/// A running agent's handle.
#[derive(Clone)]
pub struct Agent {
    sh: Arc<Shared>,
}

enum Outcome {
    New,
    Duplicate,
}

fn go_io_error(e: &std::io::Error) -> String {
    let s = e.to_string();
    let s = match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    };
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
        None => s,
    }
}

impl Agent {
    pub fn new(opts: AgentOptions) -> Self {
        let metrics = AgentMetrics::default();
        // Shown from the start (0), not only after the first refusal.
        metrics
            .dials_refused_total
            .with_label_values(&["queued_bytes_cap"]);
        Agent {
            sh: Arc::new(Shared {
                queued: QueuedBytes::new(metrics.queued_bytes.clone(), opts.max_queued_bytes),
                opts,
                metrics,
                servers: Mutex::new(HashMap::new()),
                server_count: AtomicUsize::new(1),
                lease_count: AtomicUsize::new(0),
                count_max: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                next_id: AtomicI64::new(0),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Lease-based server counting: `n` unexpired Leases (0 when the count
    /// is unknown: the servers' header count is used). With `use_max` the
    /// larger of the two counts is the target (--server-count-source=max).
    pub fn set_lease_count(&self, n: usize, use_max: bool) {
        self.sh.count_max.store(use_max, Ordering::Relaxed);
        self.sh.lease_count.store(n, Ordering::Relaxed);
    }

    /// The number of servers the sync loop aims to hold.
    pub fn target_server_count(&self) -> usize {
        self.sh.target_count()
    }

    /// Connected to at least one server whose connection still takes new
    /// streams (upstream counts only READY connections here too).
    pub fn ready(&self) -> bool {
        self.sh
            .servers
            .lock()
            .unwrap()
            .values()
            .flatten()
            .any(|s| !s.is_closed())
    }
    pub fn connected_servers(&self) -> Vec<String> {
        self.sh.servers.lock().unwrap().keys().cloned().collect()
    }
    pub fn metrics_text(&self) -> String {
        self.sh.metrics.render()
    }
    /// The lease counting series (the binary counts the Leases).
    pub fn lease_metrics(&self) -> crate::metrics::AgentLeaseMetrics {
        self.sh.metrics.lease.clone()
    }
    pub fn open_endpoints(&self) -> usize {
        self.sh
            .servers
            .lock()
            .unwrap()
            .values()
            .flatten()
            .map(|s| s.conns.lock().unwrap().len())
            .sum()
    }

    /// First SIGTERM: tell every server we are leaving; open no new streams.
    pub fn drain(&self) {
        if self.sh.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!("draining: sending DRAIN to every server");
        for s in self.sh.servers.lock().unwrap().values().flatten() {
            send_control(s, Packet::drain());
        }
    }

    pub fn stop(&self) {
        self.sh.stop.cancel();
    }

    /// The sync loop: connects until the server count is met (forever with
    /// `sync_forever`), with upstream's backoff. Returns once stopped.
    pub async fn run(&self) {
        let sh = &self.sh;
        let o = &sh.opts;
        let mut backoff = o.sync_interval;
        let mut next = 0usize;
        loop {
            if sh.stop.is_cancelled() {
                break;
            }
            let addrs = o.servers.len().max(1);
            let target = sh.target_count().max(if addrs > 1 { addrs } else { 1 });
            // As upstream: the count the agent works toward, leases included.
            sh.metrics.known_server_count.set(target as i64);
            let short = sh.short_of(target);
            let mut pause = o.sync_interval;
            if !sh.draining.load(Ordering::Relaxed)
                && (short || o.sync_forever)
                && !o.servers.is_empty()
            {
                let (host, port) = o.servers[next % o.servers.len()].clone();
                next += 1;
                match tokio::select! { _ = sh.stop.cancelled() => break, r = connect_once(sh, &host, port) => r }
                {
                    Ok(Outcome::New) => {
                        backoff = o.sync_interval;
                        // Still short of the count: try again right away.
                        if sh.short_of(target) {
                            pause = Duration::from_millis(10);
                        }
                    }
                    Ok(Outcome::Duplicate) => backoff = o.sync_interval,
                    Err(e) => {
                        tracing::warn!(server = %format!("{host}:{port}"), error = %e, "cannot connect to proxy server");
                        pause = backoff;
                        backoff = Duration::from_secs_f64(
                            (backoff.as_secs_f64() * 1.5).min(o.sync_interval_cap.as_secs_f64()),
                        );
                    }
                }
            }
            let jitter = 1.0 + rand::thread_rng().gen_range(0.0..0.1);
            tokio::select! {
                _ = sh.stop.cancelled() => break,
                _ = tokio::time::sleep(pause.mul_f64(jitter)) => {}
            }
        }
        let servers: Vec<_> = sh.servers.lock().unwrap().drain().collect();
        for s in servers.into_iter().flat_map(|(_, links)| links) {
            s.gone.cancel();
        }
    }
}

/// Never waits; a server that stops reading while control packets pile up
/// (more than `MAX_DEFERRED_CONTROL`) gets its stream closed.
fn send_control(conn: &ServerConn, packet: Packet) {
    if conn.out.send_control(packet).is_err() {
        tracing::warn!(server_id = %conn.server_id, "server does not read its stream; disconnecting");
        conn.gone.cancel();
    }
}

/// One HTTP/2 connection to a server, on the h2 crate directly: the
/// Connect stream's packets are written into it by the tasks that have them
/// ([`StreamSender`]), and the connection is driven by the same task that
/// reads the server's packets ([`drive_conn`] in [`serve_server`]), so a
/// packet crosses no task hand-off the protocol does not need.
async fn open_conn(
    opts: &AgentOptions,
    host: &str,
    port: u16,
) -> anyhow::Result<(::h2::client::SendRequest<WireBuf>, H2Conn)> {
    let tls = TlsConnector::from(opts.tls.clone());
    let name = crate::tls::server_name(host)?;
    let authority = authority(host, port);
    tokio::time::timeout(Duration::from_secs(10), async {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let io = tls.connect(name, tcp).await?;
        let r = ::h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .max_frame_size(crate::H2_MAX_FRAME)
            .handshake(IdleFlush::new(io))
            .await?;
        anyhow::Ok(r)
    })
    .await
    .map_err(|_| anyhow::anyhow!("connecting to {authority}: timed out"))?
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Drives one server connection: its reads and writes, and keepalive PINGs
/// every `keepalive` (an unanswered one ends it, UNAVAILABLE as grpc-go
/// says). After `gone` the stream gets END_STREAM (the server sees the
/// agent leave) and the connection a few seconds for what is queued.
async fn drive_conn(
    mut conn: H2Conn,
    keepalive: Duration,
    gone: CancellationToken,
    out: Arc<StreamSender>,
) -> Result<(), (tonic::Code, String)> {
    let mut ka = Keepalive::new(conn.ping_pong(), keepalive, KEEPALIVE_TIMEOUT);
    tokio::pin!(conn);
    tokio::select! {
        r = &mut conn => return r.map_err(|e| (e.grpc_code(), e.to_string())),
        _ = gone.cancelled() => {}
        why = async { ka.as_mut().unwrap().failed().await }, if ka.is_some() => {
            return Err((tonic::Code::Unavailable, why.into()));
        }
    }
    out.finish().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    Ok(())
}

/// Upstream's probe: every `probe_interval` the connection's state is
/// checked (see [`ServerConn::is_closed`]), and one that is no longer ready is dropped so the sync loop
/// dials again. "Not ready" is what grpc-go's connectivity state means by
/// it: the connection has ended, or the server sent GOAWAY (a server
/// shutting down or ending the connection's life) while our stream may
/// still run. The check is passive on purpose, as upstream's: an active
/// HTTP/2 PING per interval would trip grpc-go servers' ping policy
/// (upstream's agent port allows one per 30 s; faster ones earn GOAWAY
/// ENHANCE_YOUR_CALM), and a server that is alive on TCP but silent is
/// found by keepalive (`--keepalive-time`), as upstream.
fn spawn_probe(sh: &Arc<Shared>, conn: &Arc<ServerConn>) {
    let every = sh.opts.probe_interval;
    if every.is_zero() {
        return;
    }
    let (sh, conn) = (sh.clone(), conn.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = conn.gone.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if !conn.is_closed() {
                sh.metrics
                    .server_probes_total
                    .with_label_values(&["ready"])
                    .inc();
                continue;
            }
            sh.metrics
                .server_probes_total
                .with_label_values(&["not_ready"])
                .inc();
            tracing::info!(server_id = %conn.server_id, "server connection no longer ready (closed or GOAWAY): removing it");
            conn.gone.cancel();
            return;
        }
    });
}

async fn connect_once(sh: &Arc<Shared>, host: &str, port: u16) -> anyhow::Result<Outcome> {
    let o = &sh.opts;
    let gone = CancellationToken::new();
    let (mut h2, h2_conn) = open_conn(o, host, port).await?;
    let mut req = HttpRequest::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = format!(
        "http://{}{}",
        authority(host, port),
        crate::proto::AGENT_CONNECT_PATH
    )
    .parse()?;
    let md = req.headers_mut();
    md.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    md.insert(TE, HeaderValue::from_static("trailers"));
    md.insert(headers::AGENT_ID, o.agent_id.parse()?);
    md.insert(headers::AGENT_IDENTIFIERS, o.agent_identifiers.parse()?);
    o.offered_window().offer(md);
    if o.links() > 1 {
        md.insert(headers::LINKS, o.links().into());
        md.insert(headers::MOVE_STREAMS, HeaderValue::from_static("1"));
    }
    if let Some(path) = &o.service_account_token_path {
        let token = std::fs::read_to_string(path)?;
        md.insert(
            headers::AUTHORIZATION,
            format!("Bearer {}", token.trim()).parse()?,
        );
    }
    // A new connection takes a stream at once (no SETTINGS needed first).
    let (response, stream) = h2.send_request(req, false)?;
    // Every packet sent to the server is counted as it leaves, as
    // upstream's Send does (segment from_agent).
    let out = StreamSender::new(
        stream,
        gone.clone(),
        sh.metrics.stream_packets_total.clone(),
        "from_agent",
        crate::server::MAX_DEFERRED_CONTROL,
    );
    let keepalive = o.keepalive_time.max(Duration::from_secs(30));
    // Every early return below drops the connection with this future.
    let mut driver = Box::pin(drive_conn(h2_conn, keepalive, gone.clone(), out.clone()));
    let resp = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(30), response) => r??,
        r = &mut driver => anyhow::bail!("connection ended before the server answered: {:?}", r.err()),
    };
    let (parts, inbound) = resp.into_parts();
    let inbound = H2Body::new(inbound);
    if let Some(code) = grpc_wire::grpc_status(&parts.headers) {
        // Trailers-Only: the server refused the stream.
        anyhow::bail!(
            "server refused the stream: gRPC status {} ({:?}): {}",
            grpc_code_name(code),
            code,
            grpc_wire::grpc_message(&parts.headers)
        );
    }
    if parts.status != hyper::StatusCode::OK {
        anyhow::bail!("server answered HTTP status {}", parts.status);
    }
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/grpc") {
        anyhow::bail!("server answered content-type {content_type:?}, not gRPC");
    }
    let md = &parts.headers;
    let ids: Vec<_> = md
        .get_all(headers::SERVER_ID)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if ids.len() != 1 {
        anyhow::bail!(
            "expected one server ID in the response headers, got {}",
            ids.len()
        );
    }
    let counts: Vec<_> = md
        .get_all(headers::SERVER_COUNT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if counts.len() != 1 {
        anyhow::bail!(
            "expected one server count in the response headers, got {}",
            counts.len()
        );
    }
    let count: usize = counts[0]
        .parse()
        .map_err(|_| anyhow::anyhow!("bad server count {:?}", counts[0]))?;
    let server_id = ids[0].to_string();
    let flow_window = o.offered_window().agree(md);
    let links = md
        .get(headers::LINKS)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map_or(1, |n| n.clamp(1, o.links()));
    let moves = links > 1
        && flow_window.is_on()
        && md
            .get(headers::MOVE_STREAMS)
            .is_some_and(|v| v.as_bytes() == b"1");
    let (readers, new_readers) = mpsc::unbounded_channel();
    let conn = Arc::new(ServerConn {
        server_id: server_id.clone(),
        h2,
        out,
        readers,
        moved_readers: AtomicUsize::new(0),
        links,
        moves,
        streams: AtomicUsize::new(0),
        conns: Mutex::new(HashMap::new()),
        dials: Mutex::new(HashMap::new()),
        gone,
        flow_window,
    });
    {
        let mut servers = sh.servers.lock().unwrap();
        let links = servers.entry(server_id.clone()).or_default();
        // Decided after the server's answer and before the next dial (the
        // sync loop dials one at a time): a server that spreads dials
        // over the first streams of this agent (as many as it answered),
        // in the order they reached it, never picks one closed here.
        if links.len() >= conn.links {
            tracing::debug!(%server_id, "already connected to this server");
            conn.gone.cancel();
            // Its END_STREAM and the connection's close still go out.
            tokio::spawn(driver);
            return Ok(Outcome::Duplicate);
        }
        let unique = links.is_empty();
        links.push(conn.clone());
        sh.metrics.open_server_connections.set(servers.len() as i64);
        sh.metrics
            .server_links
            .set(servers.values().map(Vec::len).sum::<usize>() as i64);
        // Only a new, unique server's count is taken: during a rollout a
        // second connection to an old server must not bring back its
        // stale count (as upstream since its fix for this).
        if unique {
            sh.server_count.store(count.max(1), Ordering::Relaxed);
        }
    }
    tracing::info!(%server_id, server = %format!("{host}:{port}"), count, "connected to proxy server");
    if sh.draining.load(Ordering::Relaxed) {
        send_control(&conn, Packet::drain());
    }
    spawn_probe(sh, &conn);
    let sh2 = sh.clone();
    tokio::spawn(absorb_self_wakes(serve_server(
        sh2,
        conn,
        inbound,
        driver,
        new_readers,
    )));
    Ok(Outcome::New)
}

/// Reads the server's packets, drives the connection and reads the
/// backends of streaming endpoints (see [`endpoint_reader`]), all in one
/// task: a packet read from the server is handled, and one read from a
/// streaming backend is encrypted and written to the server, without a
/// hand-off to another task (on 2 CPUs a hand-off is a wake-up and, often,
/// the data cold in another CPU's cache). The endpoints' writers (server ->
/// backend) run in their dials' tasks, as a backend that reads slowly must
/// not hold this one up.
async fn serve_server(
    sh: Arc<Shared>,
    conn: Arc<ServerConn>,
    inbound: H2Body,
    mut driver: std::pin::Pin<Box<impl Future<Output = Result<(), (tonic::Code, String)>>>>,
    mut new_readers: mpsc::UnboundedReceiver<EndpointReader>,
) {
    let mut driven = false;
    let mut readers = futures_util::stream::FuturesUnordered::new();
    let reading = read_server_stream(&sh, &conn, inbound);
    // Made once: this loop turns once per wake-up, i.e. per backend read
    // of a streaming endpoint, and a fresh `cancelled()` future registers
    // and unregisters a waiter each time.
    let stopped = sh.stop.cancelled();
    let gone = conn.gone.cancelled();
    tokio::pin!(reading, stopped, gone);
    let ended = loop {
        tokio::select! {
            biased;
            r = &mut reading => break r,
            r = &mut driver => {
                driven = true;
                break r;
            }
            _ = &mut stopped => break Ok(()),
            _ = &mut gone => break Ok(()),
            Some(reader) = new_readers.recv() => readers.push(reader),
            Some(()) = futures_util::StreamExt::next(&mut readers), if !readers.is_empty() => {}
        }
    };
    drop(readers);
    if let Err((code, why)) = ended {
        tracing::warn!(server_id = %conn.server_id, code = grpc_code_name(code), %why, "server stream ended");
        sh.metrics
            .stream_errors_total
            .with_label_values(&["to_agent", grpc_code_name(code), NO_PACKET])
            .inc();
        sh.metrics
            .server_connection_failure_count
            .with_label_values(&["from_server"])
            .inc();
    }
    {
        let mut servers = sh.servers.lock().unwrap();
        if let Some(links) = servers.get_mut(&conn.server_id) {
            links.retain(|c| !Arc::ptr_eq(c, &conn));
            if links.is_empty() {
                servers.remove(&conn.server_id);
            }
        }
        sh.metrics.open_server_connections.set(servers.len() as i64);
        sh.metrics
            .server_links
            .set(servers.values().map(Vec::len).sum::<usize>() as i64);
    }
    conn.gone.cancel();
    for (_, h) in conn.dials.lock().unwrap().drain() {
        h.abort();
    }
    let eps: Vec<_> = conn.conns.lock().unwrap().drain().map(|(_, e)| e).collect();
    for ep in eps {
        sh.metrics.open_endpoint_connections.dec();
        ep.kill.cancel();
    }
    tracing::info!(server_id = %conn.server_id, "disconnected from proxy server");
    if !driven {
        let _ = driver.await;
    }
}

/// Reads the server's messages until its stream ends: Ok when it ends with
/// grpc-status 0, else the gRPC code and why (a tonic client's choices).
async fn read_server_stream(
    sh: &Arc<Shared>,
    conn: &Arc<ServerConn>,
    inbound: H2Body,
) -> Result<(), (tonic::Code, String)> {
    let trailers = grpc_wire::read_packets_then(inbound, |p| {
        handle_packet(sh, conn, p).map(|(ep, id, data)| wait_for_backend(sh, conn, ep, id, data))
    })
    .await?;
    // A clean end without a status: tonic and grpc-go call it Unknown (the
    // stream may have been cut by a proxy).
    let Some(trailers) = trailers else {
        return Err((
            tonic::Code::Unknown,
            "stream ended without a grpc-status trailer".into(),
        ));
    };
    match grpc_wire::grpc_status(&trailers) {
        Some(tonic::Code::Ok) => Ok(()),
        Some(code) => Err((code, grpc_wire::grpc_message(&trailers))),
        None => Err((tonic::Code::Unknown, "trailers without grpc-status".into())),
    }
}

/// Handles one packet from the server. Some: a DATA packet that does not
/// fit its connection's queue on a link without the flow-control
/// extension; the stream's reader waits for room ([`wait_for_backend`]).
fn handle_packet(
    sh: &Arc<Shared>,
    conn: &Arc<ServerConn>,
    packet: Packet,
) -> Option<(Arc<EndpointConn>, i64, Packet)> {
    let checked = match packet.checked() {
        Ok(c) => c,
        Err(why) => {
            sh.metrics.bad("malformed_server_packet");
            tracing::warn!(why, "malformed packet from server dropped");
            return None;
        }
    };
    sh.metrics.packet("to_agent", checked.type_name());
    match checked {
        Checked::DialReq(d) => {
            if d.protocol != "tcp" {
                sh.metrics.bad("dial_protocol");
                send_control(
                    conn,
                    Packet::dial_rsp(
                        d.random,
                        0,
                        format!("unsupported protocol {:?}", d.protocol),
                    ),
                );
                return None;
            }
            // Backends that do not read already hold what the operator
            // allowed: a new connection could only add to it. Answered as
            // a failed dial, which upstream servers pass on to the client.
            if sh.queued.over_cap() {
                sh.metrics
                    .dials_refused_total
                    .with_label_values(&["queued_bytes_cap"])
                    .inc();
                send_control(
                    conn,
                    Packet::dial_rsp(
                        d.random,
                        0,
                        format!(
                            "dial tcp {}: too many bytes queued for backends that do not read",
                            d.address
                        ),
                    ),
                );
                return None;
            }
            let mut dials = conn.dials.lock().unwrap();
            if dials.len() >= sh.opts.max_pending_dials || dials.contains_key(&d.random) {
                sh.metrics.bad("pending_dials_limit");
                send_control(
                    conn,
                    Packet::dial_rsp(d.random, 0, "too many pending dials"),
                );
                return None;
            }
            // Unique over all links: a connection's packets may move to
            // another link to the same server, which must not know the ID.
            let connect_id = sh.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            let task = tokio::spawn(dial(
                sh.clone(),
                conn.clone(),
                d.address,
                d.random,
                connect_id,
            ));
            dials.insert(d.random, task.abort_handle());
        }
        Checked::Data(d) => {
            let ep = conn.conns.lock().unwrap().get(&d.connect_id).cloned();
            let Some(ep) = ep else {
                send_control(
                    conn,
                    Packet::close_rsp(d.connect_id, "unrecognized connectID"),
                );
                return None;
            };
            match ep.queue.try_push_data(Packet::data(d.connect_id, d.data)) {
                Ok(()) => {}
                // Without the extension the server does not hold back for
                // this connection: the stream waits for it, as upstream's
                // agent does (the queue's limit is then reached by a
                // backend that is only scheduled late, not by one that
                // does not read).
                Err((PushError::Overflow, data)) if !conn.flow_window.is_on() => {
                    return Some((ep, d.connect_id, data));
                }
                Err((e, _)) => end_for_a_full_queue(sh, conn, &ep, d.connect_id, e),
            }
        }
        Checked::CloseReq(c) => {
            let ep = conn.conns.lock().unwrap().remove(&c.connect_id);
            match ep {
                Some(ep) => {
                    sh.metrics.open_endpoint_connections.dec();
                    // Deliver what is queued, then FIN; stop reading now.
                    ep.queue.close();
                    ep.stop_read.cancel();
                    send_control(conn, Packet::close_rsp(c.connect_id, ""));
                }
                None => send_control(conn, Packet::close_rsp(c.connect_id, "Unknown connectID")),
            }
        }
        Checked::DialCls(c) => {
            if let Some(h) = conn.dials.lock().unwrap().remove(&c.random) {
                h.abort();
            }
        }
        Checked::DataAck(ack) => {
            let ep = conn.conns.lock().unwrap().get(&ack.connect_id).cloned();
            let Some(ep) = ep else {
                // Acks for a connection closed meanwhile: nothing owed.
                return None;
            };
            let (sending, receiving) = (ep.send_credit.as_ref(), ep.delivered.as_ref());
            if let Some(grow) =
                on_data_ack(ack.bytes, sending, receiving, || ep.queue.queued_bytes())
            {
                // The server ran out of credit toward a backend that keeps
                // up: the window grows.
                sh.metrics.flow_window_growths_total.inc();
                send_control(conn, Packet::data_ack(ack.connect_id, grow));
            }
        }
        Checked::DialRsp(_) | Checked::CloseRsp(_) | Checked::Drain | Checked::DataMoved(_) => {
            sh.metrics.bad("unexpected_server_packet")
        }
    }
    None
}

/// The server stream's reader waits for room in `ep`'s queue for `data`
/// (see [`handle_packet`]): while the backend takes bytes the stream goes
/// on at its pace; one that takes none for [`crate::READER_STALL_LIMIT`] has its
/// connection closed, as a full queue closes it on a link with the
/// extension.
async fn wait_for_backend(
    sh: &Arc<Shared>,
    conn: &Arc<ServerConn>,
    ep: Arc<EndpointConn>,
    connect_id: i64,
    data: Packet,
) {
    sh.metrics
        .flow_control_stalls_total
        .with_label_values(&["to_endpoint"])
        .inc();
    let pushed = tokio::select! {
        r = ep.queue.push_data_when_room(data, crate::READER_STALL_LIMIT, |p| ep.queue.try_push_data(p)) => r,
        _ = ep.kill.cancelled() => return,
    };
    if let Err(e) = pushed {
        end_for_a_full_queue(sh, conn, &ep, connect_id, e);
    }
}

/// A DATA packet its connection's queue refused: the connection ends
/// (CLOSE_RSP with why), counted when the queue was full.
fn end_for_a_full_queue(
    sh: &Arc<Shared>,
    conn: &Arc<ServerConn>,
    ep: &EndpointConn,
    connect_id: i64,
    e: PushError,
) {
    if e == PushError::Overflow {
        sh.metrics
            .queue_overflow_total
            .with_label_values(&["to_endpoint"])
            .inc();
        tracing::warn!(
            connect_id,
            "backend too slow: its queue is full; closing that connection"
        );
    }
    if conn.conns.lock().unwrap().remove(&connect_id).is_some() {
        sh.metrics.open_endpoint_connections.dec();
        ep.kill.cancel();
        send_control(
            conn,
            Packet::close_rsp(connect_id, "send queue overflow: backend reads too slowly"),
        );
    }
}

async fn dial(
    sh: Arc<Shared>,
    conn: Arc<ServerConn>,
    address: String,
    random: i64,
    connect_id: i64,
) {
    let start = Instant::now();
    let result =
        tokio::time::timeout(sh.opts.dial_timeout, TcpStream::connect(address.as_str())).await;
    // Claim the dial; a DIAL_CLS that got here first has removed it.
    if conn.dials.lock().unwrap().remove(&random).is_none() {
        return;
    }
    let stream = match result {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            sh.metrics
                .endpoint_dial_failure_total
                .with_label_values(&["unknown"])
                .inc();
            let msg = format!("dial tcp {address}: connect: {}", go_io_error(&e));
            tracing::info!(%address, error = %msg, "backend dial failed");
            conn.out.send(Packet::dial_rsp(random, 0, msg)).await;
            return;
        }
        Err(_) => {
            sh.metrics
                .endpoint_dial_failure_total
                .with_label_values(&["timeout"])
                .inc();
            conn.out
                .send(Packet::dial_rsp(
                    random,
                    0,
                    format!("dial tcp {address}: i/o timeout"),
                ))
                .await;
            return;
        }
    };
    sh.metrics
        .dial_duration_seconds
        .observe(start.elapsed().as_secs_f64());
    let _ = stream.set_nodelay(true);
    let kill = conn.gone.child_token();
    let queue = PacketQueue::with_shared(sh.opts.connection_queue_bytes, sh.queued.clone());
    if conn.flow_window.is_on() {
        queue.raise_limit(2 * conn.flow_window.max);
    }
    let ep = Arc::new(EndpointConn {
        queue,
        stop_read: kill.child_token(),
        read_eof: AtomicBool::new(false),
        kill,
        send_credit: conn.flow_window.credit(),
        delivered: conn.flow_window.credit(),
    });
    conn.conns.lock().unwrap().insert(connect_id, ep.clone());
    sh.metrics.open_endpoint_connections.inc();
    if !conn
        .out
        .send(Packet::dial_rsp(random, connect_id, ""))
        .await
    {
        if conn.conns.lock().unwrap().remove(&connect_id).is_some() {
            sh.metrics.open_endpoint_connections.dec();
        }
        return;
    }
    // This task now lives as long as the connection: the address is not
    // kept for it.
    drop(address);
    let (rd, wr) = stream.into_split();
    // Both directions in this task: two more tasks per dial were two more
    // spawns, and the second spawn found the first in the worker's LIFO
    // slot and woke the other worker for it when that one was parked.
    tokio::join!(
        write_endpoint(&sh, &conn, &ep, wr, connect_id),
        endpoint_reader(&sh, &conn, &ep, rd, connect_id),
    );
}

/// Server -> backend for one endpoint connection: the queue's packets, in
/// order, until CLOSE_REQ (then FIN) or the connection's end.
async fn write_endpoint(
    sh: &Arc<Shared>,
    conn: &Arc<ServerConn>,
    ep: &Arc<EndpointConn>,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    connect_id: i64,
) {
    loop {
        let p = tokio::select! {
            _ = ep.kill.cancelled() => return,
            p = ep.queue.pop_charged() => p,
        };
        // The charge is held through the write: see `pop_charged`.
        let Some((p, _charge)) = p else { break };
        let Ok(Checked::Data(d)) = p.checked() else {
            continue;
        };
        // After CLOSE_REQ the rest is delivered, but a backend that
        // stopped reading gets DRAIN_AFTER_CLOSE per write, not forever.
        let draining = ep.queue.is_closed();
        let write = async {
            if draining {
                match tokio::time::timeout(crate::DRAIN_AFTER_CLOSE, wr.write_all(&d.data)).await {
                    Ok(r) => r.is_ok(),
                    Err(_) => {
                        sh.metrics.drain_timeouts_total.inc();
                        false
                    }
                }
            } else {
                wr.write_all(&d.data).await.is_ok()
            }
        };
        // A write already under way when CLOSE_REQ (which stops the
        // reading side) arrives gets the same time from then: else a
        // backend that never reads keeps the connection, and its queued
        // bytes, for good after the client has gone.
        let closed_then_drain = async {
            ep.stop_read.cancelled().await;
            tokio::time::sleep(crate::DRAIN_AFTER_CLOSE).await;
            sh.metrics.drain_timeouts_total.inc();
        };
        let ok = tokio::select! {
            _ = ep.kill.cancelled() => return,
            ok = write => ok,
            _ = closed_then_drain, if !draining => false,
        };
        if ok
            && let Some(bytes) = ep
                .delivered
                .as_ref()
                .and_then(|c| c.delivered(d.data.len()))
        {
            send_control(conn, Packet::data_ack(connect_id, bytes));
        }
        if !ok {
            if conn.conns.lock().unwrap().remove(&connect_id).is_some() {
                sh.metrics.open_endpoint_connections.dec();
                send_control(
                    conn,
                    Packet::close_rsp(connect_id, "write to backend failed"),
                );
            }
            ep.kill.cancel();
            return;
        }
    }
    if ep.read_eof.load(Ordering::Acquire) {
        // Read to its end, the socket closes when the reading half goes
        // (now or already), and its close sends the FIN: a shutdown first
        // would be one more system call per dial.
        wr.forget();
    } else {
        let _ = wr.shutdown().await;
    }
}

/// Backend -> server for one endpoint connection. It starts in the dial's
/// task, beside the writer; once its backend streams (a read of at least
/// `BULK_READ` bytes) it moves into the server connection's task
/// (see [`serve_server`]), where each read is encrypted and
/// sent without a hand-off, unless [`MAX_MOVED_READERS`] are there already.
/// Short exchanges (most dials) stay out of that
/// task, which would otherwise poll the HTTP/2 connection for every one of
/// their reads: on 2 CPUs that cost dials/s.
async fn endpoint_reader(
    sh: &Arc<Shared>,
    conn: &Arc<ServerConn>,
    ep: &Arc<EndpointConn>,
    rd: tokio::net::tcp::OwnedReadHalf,
    connect_id: i64,
) {
    let Some(rd) = read_endpoint(sh, conn, conn, ep, rd, connect_id, Place::Dial).await else {
        return;
    };
    // Counted out however the reader ends: also when the connection's
    // task drops it, run or not. Claimed and counted as a stream under the
    // servers lock, as the pick of a link is: a reader that starts
    // streaming at the same moment sees this one on `conn`.
    let claimed = {
        let _servers = conn.moves.then(|| sh.servers.lock().unwrap());
        MovedReader::claim(sh, conn).map(|c| (c, Streaming::on(conn.clone())))
    };
    let Some((counted, streaming)) = claimed else {
        let streaming = Streaming::on_the_quietest_link(sh, conn);
        let link = &streaming.link;
        if !Arc::ptr_eq(link, conn) {
            // Everything this endpoint sent so far went out on `conn`, in
            // order, before this mark; the server takes its next packets
            // from `link` only after it has read the mark.
            if !conn.out.send(Packet::data_moved(connect_id)).await {
                ep.kill.cancel();
                return;
            }
            sh.metrics.moved_streams_total.inc();
        }
        read_endpoint(sh, conn, link, ep, rd, connect_id, Place::Own).await;
        return;
    };
    let (sh, moved_conn, ep) = (sh.clone(), conn.clone(), ep.clone());
    let rest = async move {
        let _counted = (counted, streaming);
        read_endpoint(
            &sh,
            &moved_conn,
            &moved_conn,
            &ep,
            rd,
            connect_id,
            Place::Moved,
        )
        .await;
    };
    let _ = conn.readers.send(Box::pin(rest));
}

/// A streaming endpoint whose packets go out on `link`, counted there
/// until it is dropped.
struct Streaming {
    link: Arc<ServerConn>,
}

impl Streaming {
    fn on(link: Arc<ServerConn>) -> Self {
        link.streams.fetch_add(1, Ordering::AcqRel);
        Streaming { link }
    }

    /// Of `home`'s server's links this agent keeps (only `home` unless
    /// the moves extension is on), the one with the fewest streams, `home`
    /// on a tie: one TLS stream is encrypted by one task at a time, so
    /// streams spread over links use more CPUs, while dials (short, most
    /// of them) stay on one link, whose task gathers more of their packets
    /// per wake-up than two would.
    fn on_the_quietest_link(sh: &Shared, home: &Arc<ServerConn>) -> Self {
        if !home.moves {
            return Self::on(home.clone());
        }
        // Chosen and counted under the lock: readers that start streaming
        // together see each other's choices.
        let servers = sh.servers.lock().unwrap();
        let quietest = servers.get(&home.server_id).and_then(|links| {
            links
                .iter()
                .take(home.links)
                .filter(|l| l.moves && !l.gone.is_cancelled())
                .min_by_key(|l| (l.streams.load(Ordering::Acquire), !Arc::ptr_eq(l, home)))
        });
        Self::on(quietest.unwrap_or(home).clone())
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.link.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One reader in a connection's task, counted until it is dropped.
struct MovedReader {
    sh: Arc<Shared>,
    conn: Arc<ServerConn>,
}

impl MovedReader {
    /// A place in `conn`'s task, if fewer than [`MAX_MOVED_READERS`] hold one.
    fn claim(sh: &Arc<Shared>, conn: &Arc<ServerConn>) -> Option<Self> {
        if conn.moved_readers.fetch_add(1, Ordering::AcqRel) >= MAX_MOVED_READERS {
            conn.moved_readers.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        sh.metrics.link_task_readers.inc();
        Some(MovedReader {
            sh: sh.clone(),
            conn: conn.clone(),
        })
    }
}

impl Drop for MovedReader {
    fn drop(&mut self) {
        self.conn.moved_readers.fetch_sub(1, Ordering::AcqRel);
        self.sh.metrics.link_task_readers.dec();
    }
}

/// Where an endpoint's reader runs (see [`endpoint_reader`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In its dial's task, until its backend streams.
    Dial,
    /// In the server connection's task.
    Moved,
    /// Streaming, in its dial's task still.
    Own,
}

/// Reads the backend and sends what it reads, until either side ends; in
/// `Place::Dial`, returns the socket after the first read of at least
/// `BULK_READ` bytes has been sent.
async fn read_endpoint(
    sh: &Arc<Shared>,
    conn: &Arc<ServerConn>,
    link: &Arc<ServerConn>,
    ep: &Arc<EndpointConn>,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    connect_id: i64,
    place: Place,
) -> Option<tokio::net::tcp::OwnedReadHalf> {
    let may_move = place == Place::Dial;
    let out = &link.out;
    let moved = !Arc::ptr_eq(link, conn);
    // Made once: a fresh `cancelled()` future registers and unregisters a
    // waiter, and this loop turns once per backend read. A reader moved to
    // another link also stops when that link goes, though its backend is
    // idle: whatever it had sent there may be lost, so its tunnel ends.
    let stop = async {
        if moved {
            tokio::select! {
                _ = ep.stop_read.cancelled() => {}
                _ = link.gone.cancelled() => moved_link_lost(sh, conn, ep, connect_id),
            }
        } else {
            ep.stop_read.cancelled().await;
        }
    };
    tokio::pin!(stop);
    let mut size = crate::READ_CHUNK;
    loop {
        let chunk = tokio::select! {
            biased;
            _ = &mut stop => return None,
            c = read_chunk_of(&mut rd, size) => c,
        };
        let bulk = may_move && chunk.as_ref().is_ok_and(|c| c.len() >= BULK_READ);
        match chunk {
            Ok(mut c) if !c.is_empty() => {
                // A moved reader whose reads fill their buffer reads as
                // much as the floor's relays; one that trickles goes back
                // to small buffers (each packet keeps its read's buffer).
                if !may_move {
                    size = if c.len() >= size / 2 {
                        crate::BULK_READ_CHUNK
                    } else {
                        crate::READ_CHUNK
                    };
                }
                // Under credit, a read larger than one piece goes as
                // several packets (see `Credit::piece`).
                let piece = ep.send_credit.as_ref().map_or(c.len(), |cr| cr.piece());
                while !c.is_empty() {
                    let chunk = c.split_to(piece.min(c.len()));
                    if let Some(cr) = &ep.send_credit {
                        if cr.would_wait(chunk.len()) {
                            sh.metrics.stalls_to_server.inc();
                            if cr.may_grow() {
                                // Out of credit: the server may grow the
                                // window (see `Credit`).
                                send_control(conn, Packet::data_ack(connect_id, 0));
                            }
                        }
                        let ok = tokio::select! {
                            biased;
                            _ = &mut stop => return None,
                            ok = cr.take(chunk.len()) => ok,
                        };
                        if !ok {
                            return None;
                        }
                    }
                    let sent = tokio::select! {
                        biased;
                        _ = &mut stop => return None,
                        sent = out.send(Packet::data(connect_id, chunk)) => sent,
                    };
                    if !sent {
                        if moved {
                            moved_link_lost(sh, conn, ep, connect_id);
                        }
                        ep.kill.cancel();
                        return None;
                    }
                }
                if bulk {
                    return Some(rd);
                }
                // A moved reader runs in the connection's task: let that
                // task write this read before the next one, while the
                // bytes are still in cache (as a relay writes each read
                // before it reads again). Else it reads ahead up to the
                // stream's window, and the write finds them cold. Not
                // tokio's yield_now: the task would go back to the
                // scheduler and wake the other worker (see self_wake.rs).
                if place == Place::Moved {
                    crate::self_wake::repoll_task().await;
                }
            }
            _ => {
                // Backend EOF or error: unsolicited CLOSE_RSP, as upstream.
                ep.read_eof.store(true, Ordering::Release);
                if conn.conns.lock().unwrap().remove(&connect_id).is_some() {
                    sh.metrics.open_endpoint_connections.dec();
                    if !out.send(Packet::close_rsp(connect_id, "")).await && moved {
                        send_control(conn, Packet::close_rsp(connect_id, MOVED_LINK_LOST));
                    }
                }
                ep.queue.close();
                return None;
            }
        }
    }
}

const MOVED_LINK_LOST: &str = "link to the server lost";

/// An endpoint moved to a link that has gone ends: the server hears of it
/// on the link it was dialled over (`home`).
fn moved_link_lost(sh: &Shared, home: &ServerConn, ep: &EndpointConn, connect_id: i64) {
    if home.conns.lock().unwrap().remove(&connect_id).is_some() {
        sh.metrics.open_endpoint_connections.dec();
        send_control(home, Packet::close_rsp(connect_id, MOVED_LINK_LOST));
    }
    ep.kill.cancel();
}

pub struct AgentLaunch {
    pub opts: AgentOptions,
    pub health_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

pub struct RunningAgent {
    pub agent: Agent,
    pub health_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
    stop: CancellationToken,
}

impl RunningAgent {
    pub async fn shutdown(mut self) {
        self.agent.stop();
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

/// Upstream agent's check of `--agent-identifiers`: a URL query (Go's
/// `url.ParseQuery`: no `;`, valid `%` escapes) whose keys are all known
/// identifier types.
pub fn validate_agent_identifiers(s: &str) -> Result<(), String> {
    fn decode(part: &str) -> Result<String, String> {
        let b = part.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    let hex = b
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| format!("invalid URL escape in {part:?}"))?;
                    out.push(hex);
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        if pair.contains(';') {
            return Err("invalid semicolon separator in query".into());
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k)?;
        decode(v)?;
        if !matches!(
            key.as_str(),
            "ipv4" | "ipv6" | "cidr" | "host" | "default-route"
        ) {
            return Err(format!(
                "unknown address type: {key} (known: ipv4, ipv6, cidr, host, default-route)"
            ));
        }
    }
    Ok(())
}

/// Where the admin port's /metrics sends the client: `host` (from the
/// request, its port dropped) with the health port, scheme-relative as Go's
/// `http.Redirect` of a server-side URL writes it.
fn redirect_target(host: &str, port: u16, path: &str, query: Option<&str>) -> String {
    let bare = match host.rsplit_once(':') {
        // "[v6]:port" or "name:port"; a bare v6 literal has more colons.
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && (h.ends_with(']') || !h.contains(':')) =>
        {
            h
        }
        _ => host,
    };
    let bare = bare.trim_start_matches('[').trim_end_matches(']');
    let host = if bare.contains(':') {
        format!("[{bare}]")
    } else {
        bare.to_string()
    };
    match query {
        Some(q) => format!("//{host}:{port}{path}?{q}"),
        None => format!("//{host}:{port}{path}"),
    }
}

/// Starts the agent's sync loop and its health and admin ports.
pub async fn launch(cfg: AgentLaunch) -> anyhow::Result<RunningAgent> {
    let agent = Agent::new(cfg.opts);
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut health_addr = None;
    if let Some(addr) = cfg.health_addr {
        let listener = crate::net::listen(addr)?;
        health_addr = Some(listener.local_addr()?);
        let a = agent.clone();
        let handler: http::Handler = Arc::new(move |path, query| match path {
            "/healthz" => Reply::text(200, "ok"),
            // "/ready": upstream's deprecated spelling, still served.
            "/readyz" | "/ready" => {
                let verbose = query.is_some_and(|q| {
                    q.split('&')
                        .any(|k| k == "verbose" || k.starts_with("verbose="))
                });
                if a.ready() {
                    if verbose {
                        Reply::text(
                            200,
                            "[+]ping ok\n[+]server-connected ok\nreadyz check passed\n",
                        )
                    } else {
                        Reply::text(200, "ok")
                    }
                } else {
                    Reply::text(
                        503,
                        "[+]ping ok\n[-]server-connected failed: no servers connected\nreadyz check failed\n",
                    )
                }
            }
            "/metrics" => Reply::metrics(a.metrics_text()),
            _ => Reply::not_found(),
        });
        tasks.spawn(http::serve(
            listener,
            handler,
            stop.clone(),
            "health",
            agent.sh.metrics.connections_refused_total.clone(),
        ));
    }
    let mut admin_addr = None;
    if let Some(addr) = cfg.admin_addr {
        let listener = crate::net::listen(addr)?;
        admin_addr = Some(listener.local_addr()?);
        let health_port = health_addr.map(|h| h.port());
        let a = agent.clone();
        // As upstream: a 301 to the health port on the host the client
        // used, so the redirect works behind any address the admin port
        // is reached by (the health listener's own may be `[::]`).
        let handler: http::HostHandler =
            Arc::new(move |path, query, host| match (path, health_port) {
                ("/metrics", Some(port)) => Reply {
                    status: 301,
                    content_type: "text/plain; charset=utf-8",
                    body: String::new(),
                    location: Some(redirect_target(host.unwrap_or(""), port, path, query)),
                },
                ("/metrics", None) => Reply::metrics(a.metrics_text()),
                _ => Reply::not_found(),
            });
        tasks.spawn(http::serve_with_host(
            listener,
            handler,
            stop.clone(),
            "admin",
            agent.sh.metrics.connections_refused_total.clone(),
        ));
    }
    let a = agent.clone();
    tasks.spawn(async move { a.run().await });
    Ok(RunningAgent {
        agent,
        health_addr,
        admin_addr,
        tasks,
        stop,
    })
}

#[cfg(test)]
mod tests {
    use super::{redirect_target, validate_agent_identifiers};

    #[test]
    fn agent_identifiers_validated_as_upstream() {
        for ok in [
            "",
            "host=node-a&ipv4=10.0.0.1",
            "ipv6=fd00%3A%3A1&cidr=10.0.0.0%2F8&default-route=1",
        ] {
            assert_eq!(validate_agent_identifiers(ok), Ok(()), "{ok}");
        }
        for bad in ["uid=1", "hostname=a", "host=a;ipv4=b", "host=%zz", "%4=a"] {
            assert!(validate_agent_identifiers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn admin_redirect_keeps_the_request_host() {
        assert_eq!(
            redirect_target("10.0.0.5:8094", 8093, "/metrics", None),
            "//10.0.0.5:8093/metrics"
        );
        assert_eq!(
            redirect_target("[::1]:8094", 8093, "/metrics", Some("a=b")),
            "//[::1]:8093/metrics?a=b"
        );
        assert_eq!(
            redirect_target("node-a", 8093, "/metrics", None),
            "//node-a:8093/metrics"
        );
    }
}
