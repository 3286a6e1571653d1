//! Listeners and lifecycle: the frontend (TCP+mTLS or UDS; gRPC or
//! HTTP-CONNECT), the agent listener (mTLS), the health and admin ports.

use proxyctl_listen::{AcceptBackoff, ConnLimit, ConnPermit};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::idle_flush::IdleFlush;
use crate::self_wake::absorb_self_wakes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
#[cfg(unix)]
use tokio::net::UnixListener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::connect::{HangupProbe, StreamEnd};
use super::state::{ProxyServer, ServerOptions, Shared};
use crate::http::{self, Reply};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendMode {
    Grpc,
    HttpConnect,
}

pub enum FrontendListen {
    /// TCP; TLS when a config is given (mTLS if it verifies clients).
    Tcp {
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    },
    /// Unix socket, plain; created with mode 0770 (upstream's umask 0007).
    Uds {
        path: PathBuf,
        delete_existing: bool,
    },
}

pub struct ServerLaunch {
    pub opts: ServerOptions,
    pub mode: FrontendMode,
    pub frontend: FrontendListen,
    pub agent_addr: SocketAddr,
    pub agent_tls: Arc<rustls::ServerConfig>,
    pub health_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// Server pings to agents (`--keepalive-time`).
    pub agent_keepalive: Duration,
    /// Extra, faster liveness pings to agents so a dead agent is dropped in
    /// seconds; zero leaves only `agent_keepalive`.
    pub agent_liveness: Duration,
    pub frontend_keepalive: Duration,
    /// Frontend connections open at once (`--max-frontend-connections`);
    /// one more is closed as soon as it is accepted. 0: no cap.
    pub max_frontend_connections: usize,
    /// Agent connections open at once (`--max-agent-connections`), TLS
    /// handshakes under way included. 0: no cap.
    pub max_agent_connections: usize,
}

/// A listener's connection cap and the count of connections refused at it
/// (`connections_refused_total{listener, reason="connection_cap"}`).
#[derive(Clone)]
struct Cap {
    limit: ConnLimit,
    refused: prometheus::IntCounter,
}

impl Cap {
    fn new(sh: &Shared, listener: &str, max: usize) -> Self {
        let max = if max == 0 {
            tokio::sync::Semaphore::MAX_PERMITS
        } else {
            max
        };
        Cap {
            limit: ConnLimit::new(max),
            refused: sh
                .metrics
                .connections_refused_total
                .with_label_values(&[listener, "connection_cap"]),
        }
    }

    /// A permit for one more connection, held for its life; None at the
    /// cap (counted: the caller closes the connection at once).
    fn admit(&self) -> Option<ConnPermit> {
        let permit = self.limit.try_acquire();
        if permit.is_none() {
            self.refused.inc();
        }
        permit
    }
}

pub struct RunningServer {
    pub server: ProxyServer,
    pub frontend_addr: Option<SocketAddr>,
    pub agent_addr: SocketAddr,
    pub health_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    uds_path: Option<PathBuf>,
}

impl RunningServer {
    /// Stops accepting; with `grace` > 0 waits up to that long for open
    /// connections and pending dials to finish (`--graceful-shutdown-timeout`);
    /// then ends every stream.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop.cancel();
        if !grace.is_zero() {
            let server = self.server.clone();
            let _ = tokio::time::timeout(grace, async move {
                while server.established() > 0 || server.pending_dials() > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await;
        }
        self.server.shared.stop.cancel();
        let _ = tokio::time::timeout(grace.max(Duration::from_millis(100)), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        if let Some(p) = &self.uds_path {
            let _ = std::fs::remove_file(p);
        }
    }
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }
}

/// An accepted connection with its listener's cap permit: the permit goes
/// when the connection does, whoever ends it.
pub(crate) struct Admitted<S> {
    io: S,
    _permit: ConnPermit,
}

/// A TLS connection on the agent or frontend port.
pub(crate) type TlsConn = Admitted<tokio_rustls::server::TlsStream<TcpStream>>;

/// The socket under a frontend connection: its [`HangupProbe`], and how a
/// stream on it is ended.
trait ClientSocket {
    const END: StreamEnd;
    fn probe(&self) -> HangupProbe;
}
impl ClientSocket for TcpStream {
    const END: StreamEnd = StreamEnd::Close;
    fn probe(&self) -> HangupProbe {
        HangupProbe::of(self)
    }
}
#[cfg(unix)]
impl ClientSocket for tokio::net::UnixStream {
    const END: StreamEnd = StreamEnd::Close;
    fn probe(&self) -> HangupProbe {
        HangupProbe::of(self)
    }
}
impl ClientSocket for tokio_rustls::server::TlsStream<TcpStream> {
    const END: StreamEnd = StreamEnd::Shutdown;
    fn probe(&self) -> HangupProbe {
        HangupProbe::of(self.get_ref().0)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}
impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What serves an accepted frontend connection.
#[derive(Clone)]
struct Front {
    sh: Arc<Shared>,
    mode: FrontendMode,
    keepalive: Duration,
}

impl Front {
    /// Serves one client connection to its end (its permit goes with it).
    fn serve<S>(&self, conn: Admitted<S>)
    where
        S: ClientSocket + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let sh = self.sh.clone();
        match self.mode {
            // gRPC sees its client leave at the connection's end itself.
            FrontendMode::Grpc => {
                tokio::spawn(absorb_self_wakes(super::grpc_front::serve(
                    sh,
                    conn,
                    self.keepalive,
                    S::END,
                )));
            }
            // HTTP/1.1 only, also over TLS, as upstream.
            FrontendMode::HttpConnect => {
                let client = conn.io.probe();
                tokio::spawn(absorb_self_wakes(super::connect::serve(
                    sh,
                    conn,
                    client,
                    S::END,
                )));
            }
        }
    }
}

/// Accepts TCP, completes TLS handshakes off the accept loop, and hands
/// finished streams to `out`. Failed handshakes (no or wrong client
/// certificate, garbage) are logged and counted, then dropped. A connection
/// past `cap` is closed at once; handshakes under way count toward it.
async fn tls_accept_loop(
    sh: Arc<Shared>,
    listener: TcpListener,
    cap: Cap,
    acceptor: TlsAcceptor,
    which: &'static str,
    out: mpsc::Sender<TlsConn>,
    stop: CancellationToken,
) {
    let mut backoff = AcceptBackoff::new(which);
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match r {
            Ok(x) => {
                backoff.succeeded();
                x
            }
            Err(e) => {
                backoff.pause_after(&e).await;
                continue;
            }
        };
        let Some(permit) = cap.admit() else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let out = out.clone();
        let sh = sh.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = out
                        .send(Admitted {
                            io: tls,
                            _permit: permit,
                        })
                        .await;
                }
                Ok(Err(e)) => {
                    sh.metrics.bad(&format!("tls_handshake_{which}"));
                    tracing::warn!(%peer, error = %e, which, "TLS handshake failed");
                }
                Err(_) => {
                    sh.metrics.bad(&format!("tls_handshake_{which}"));
                    tracing::warn!(%peer, which, "TLS handshake timed out");
                }
            }
        });
    }
}

/// How the agent listener keeps its connections alive: a PING every
/// `every` (zero: none), the connection given up when one is not answered
/// within `timeout`.
#[derive(Clone, Copy)]
struct AgentKeepalive {
    every: Duration,
    timeout: Duration,
}

/// Time an agent has to send the HTTP/2 preface and SETTINGS.
const AGENT_H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the last frames get to leave once the server stops.
const AGENT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent listener's HTTP/2 settings: what it had as a tonic and then
/// a hyper server (4/8 MiB windows, large frames, no stream cap, fixed
/// windows, a 16 KiB header list). h2's limits on reset streams stay on (a
/// peer that resets streams faster than it opens them is let go, the
/// "rapid reset" defence; an agent opens one stream per connection).
fn agent_h2() -> ::h2::server::Builder {
    let mut b = ::h2::server::Builder::new();
    b.initial_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(crate::H2_MAX_FRAME)
        .max_header_list_size(16 << 10);
    b
}

/// Serves agent connections as they come out of the TLS handshakes, until
/// the accept loop is gone; then waits for them to end.
async fn serve_agents(
    sh: Arc<Shared>,
    mut incoming: mpsc::Receiver<TlsConn>,
    keepalive: AgentKeepalive,
) {
    let mut conns = JoinSet::new();
    loop {
        let conn = tokio::select! {
            c = incoming.recv() => c,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Some(conn) = conn else { break };
        conns.spawn(absorb_self_wakes(serve_agent_conn(
            sh.clone(),
            conn,
            keepalive,
        )));
    }
    while conns.join_next().await.is_some() {}
}

/// One agent connection, on the h2 crate directly, until it ends: its
/// streams are served in this task too (an agent opens one), so a packet
/// from the agent reaches its client's queue with no task hand-off, and
/// packets toward the agent go into the stream from the tasks that have
/// them ([`StreamSender`](crate::stream_sender::StreamSender)). When the
/// server really stops: GOAWAY, the streams end with grpc-status 0, and
/// the connection gets `AGENT_CLOSE_TIMEOUT` for its last frames.
async fn serve_agent_conn<S>(sh: Arc<Shared>, io: S, keepalive: AgentKeepalive)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::StreamExt;
    let handshake = agent_h2().handshake::<_, crate::grpc_wire::WireBuf>(IdleFlush::new(io));
    let mut conn = match tokio::time::timeout(AGENT_H2_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            sh.metrics.bad("h2_agent_handshake");
            tracing::debug!(error = %e, "agent connection: HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            sh.metrics.bad("h2_agent_handshake");
            tracing::debug!("agent connection: HTTP/2 handshake timed out");
            return;
        }
    };
    let mut pings =
        crate::keepalive::Keepalive::new(conn.ping_pong(), keepalive.every, keepalive.timeout);
    let mut streams = futures_util::stream::FuturesUnordered::new();
    let mut close_by: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    streams.push(super::state::agent_call(&sh, request, respond));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "agent connection ended");
                    break;
                }
                None => break,
            },
            Some(()) = streams.next(), if !streams.is_empty() => {}
            _ = sh.stop.cancelled(), if close_by.is_none() => {
                conn.graceful_shutdown();
                close_by = Some(Box::pin(tokio::time::sleep(AGENT_CLOSE_TIMEOUT)));
            }
            _ = async { close_by.as_mut().unwrap().await }, if close_by.is_some() => break,
            why = async { pings.as_mut().unwrap().failed().await }, if pings.is_some() => {
                tracing::info!(why, "agent connection ended");
                break;
            }
        }
    }
    // Dropping the connection fails what its streams still wait for (h2
    // ends them as at EOF), so they finish at once.
    drop(conn);
    while streams.next().await.is_some() {}
}

/// Binds every listener and starts serving.
pub async fn launch(cfg: ServerLaunch) -> anyhow::Result<RunningServer> {
    let server = ProxyServer::new(cfg.opts);
    let sh = server.shared.clone();
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();

    // Agent listener.
    let agent_listener = crate::net::listen(cfg.agent_addr)?;
    let agent_addr = agent_listener.local_addr()?;
    let (tx, rx) = mpsc::channel::<TlsConn>(64);
    tasks.spawn(tls_accept_loop(
        sh.clone(),
        agent_listener,
        Cap::new(&sh, "agent", cfg.max_agent_connections),
        TlsAcceptor::from(cfg.agent_tls),
        "agent",
        tx,
        stop.clone(),
    ));
    let ping = match (cfg.agent_keepalive.is_zero(), cfg.agent_liveness.is_zero()) {
        (_, false) if cfg.agent_keepalive.is_zero() || cfg.agent_liveness < cfg.agent_keepalive => {
            cfg.agent_liveness
        }
        _ => cfg.agent_keepalive,
    };
    let ping_timeout = if cfg.agent_liveness.is_zero() {
        Duration::from_secs(20)
    } else {
        cfg.agent_liveness
    };
    // Agent connections get their GOAWAY only when the server really stops
    // (after the graceful wait), not at its start as upstream's
    // GracefulStop does: agents drop a connection that has had GOAWAY
    // (`--probe-interval`, ours and upstream's), and with it every tunnel
    // the graceful wait is there to let finish. New agents are refused from
    // the start (the accept loop ends with `stop`).
    tasks.spawn(serve_agents(
        sh.clone(),
        rx,
        AgentKeepalive {
            every: ping,
            timeout: ping_timeout,
        },
    ));

    // Frontend: one task per client connection, gRPC or HTTP-CONNECT.
    // Without unix sockets the only other arm diverges: not an error there.
    #[cfg_attr(not(unix), allow(unused_assignments))]
    let mut frontend_addr = None;
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut uds_path = None;
    let front = Front {
        sh: sh.clone(),
        mode: cfg.mode,
        keepalive: cfg.frontend_keepalive,
    };
    let front_cap = Cap::new(&sh, "frontend", cfg.max_frontend_connections);
    match cfg.frontend {
        FrontendListen::Tcp { addr, tls } => {
            let listener = crate::net::listen(addr)?;
            frontend_addr = Some(listener.local_addr()?);
            match tls {
                Some(tls) => {
                    let (tx, mut rx) = mpsc::channel::<TlsConn>(64);
                    tasks.spawn(tls_accept_loop(
                        sh.clone(),
                        listener,
                        front_cap,
                        TlsAcceptor::from(tls),
                        "frontend",
                        tx,
                        stop.clone(),
                    ));
                    let stop2 = stop.clone();
                    tasks.spawn(async move {
                        loop {
                            let conn = tokio::select! { _ = stop2.cancelled() => return, c = rx.recv() => c };
                            let Some(conn) = conn else { return };
                            front.serve(conn);
                        }
                    });
                }
                None => {
                    let stop2 = stop.clone();
                    tasks.spawn(async move {
                        let mut backoff = AcceptBackoff::new("frontend");
                        loop {
                            let r = tokio::select! { _ = stop2.cancelled() => return, r = listener.accept() => r };
                            match r {
                                Ok((s, _)) => {
                                    backoff.succeeded();
                                    let Some(permit) = front_cap.admit() else { continue };
                                    let _ = s.set_nodelay(true);
                                    front.serve(Admitted { io: s, _permit: permit });
                                }
                                Err(e) => backoff.pause_after(&e).await,
                            }
                        }
                    });
                }
            }
        }
        // Unix sockets exist on unix only (tokio has no AF_UNIX on Windows).
        #[cfg(not(unix))]
        FrontendListen::Uds { path, .. } => {
            anyhow::bail!(
                "--uds-name {}: unix sockets are not supported on this platform",
                path.display()
            )
        }
        #[cfg(unix)]
        FrontendListen::Uds {
            path,
            delete_existing,
        } => {
            if delete_existing && path.exists() {
                std::fs::remove_file(&path)?;
            }
            let listener = UnixListener::bind(&path)?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o770))?;
            }
            uds_path = Some(path);
            let stop2 = stop.clone();
            tasks.spawn(async move {
                let mut backoff = AcceptBackoff::new("frontend_uds");
                loop {
                    let r = tokio::select! { _ = stop2.cancelled() => return, r = listener.accept() => r };
                    match r {
                        Ok((s, _)) => {
                            backoff.succeeded();
                            let Some(permit) = front_cap.admit() else { continue };
                            front.serve(Admitted { io: s, _permit: permit });
                        }
                        Err(e) => backoff.pause_after(&e).await,
                    }
                }
            });
        }
    }

    // Health: /healthz, /readyz (/ready), /metrics. Admin: /metrics.
    let mut health_addr = None;
    if let Some(addr) = cfg.health_addr {
        let listener = crate::net::listen(addr)?;
        health_addr = Some(listener.local_addr()?);
        let srv = server.clone();
        let handler: http::Handler = Arc::new(move |path, _q| match path {
            "/healthz" => Reply::text(200, "ok"),
            "/readyz" | "/ready" => {
                if srv.ready() {
                    Reply::text(200, "ok")
                } else {
                    Reply::text(500, "no connection to any proxy agent")
                }
            }
            "/metrics" => Reply::metrics(srv.metrics_text()),
            _ => Reply::not_found(),
        });
        tasks.spawn(http::serve(
            listener,
            handler,
            stop.clone(),
            "health",
            server.shared.metrics.connections_refused_total.clone(),
        ));
    }
    let mut admin_addr = None;
    if let Some(addr) = cfg.admin_addr {
        let listener = crate::net::listen(addr)?;
        admin_addr = Some(listener.local_addr()?);
        let srv = server.clone();
        let handler: http::Handler = Arc::new(move |path, _q| match path {
            "/metrics" => Reply::metrics(srv.metrics_text()),
            _ => Reply::not_found(),
        });
        tasks.spawn(http::serve(
            listener,
            handler,
            stop.clone(),
            "admin",
            server.shared.metrics.connections_refused_total.clone(),
        ));
    }
    tracing::info!(server_id = %server.server_id(), ?frontend_addr, %agent_addr, "proxy server started");
    Ok(RunningServer {
        server,
        frontend_addr,
        agent_addr,
        health_addr,
        admin_addr,
        stop,
        tasks,
        uds_path,
    })
}

#[cfg(test)]
mod agent_link_tests {
    use super::*;
    use crate::grpc_wire::{self, Decoder, PacketBody};
    use crate::proto::{Checked, Packet, headers};
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::{Frame, Incoming};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::convert::Infallible;

    /// A request body of raw bytes, sent as they are given.
    type RawBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
    use tokio_stream::wrappers::ReceiverStream;

    /// Our agent listener's connection code on one end of a pipe, a
    /// hyper HTTP/2 client on the other.
    async fn connect<B>(sh: &Arc<Shared>) -> hyper::client::conn::http2::SendRequest<B>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve_agent_conn(
            sh.clone(),
            ours,
            AgentKeepalive {
                every: Duration::ZERO,
                timeout: Duration::from_secs(20),
            },
        ));
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(theirs))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }

    fn call<B>(path: &str, agent_id: Option<&str>, body: B) -> hyper::Request<B> {
        let mut req = hyper::Request::new(body);
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = format!("http://agent.test{path}").parse().unwrap();
        req.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        if let Some(id) = agent_id {
            req.headers_mut()
                .insert(headers::AGENT_ID, id.parse().unwrap());
        }
        req
    }

    fn raw_body() -> (mpsc::Sender<Result<Frame<Bytes>, Infallible>>, RawBody) {
        let (tx, rx) = mpsc::channel(8);
        (tx, StreamBody::new(ReceiverStream::new(rx)))
    }

    fn wire(p: &Packet) -> Bytes {
        let e = grpc_wire::encode(p);
        [e.head, e.payload].concat().into()
    }

    /// The next packet of a response; None when it ends (with grpc-status 0).
    async fn next_packet(body: &mut Incoming, d: &mut Decoder) -> Option<Packet> {
        loop {
            if let Some(p) = d.next_packet().unwrap() {
                return Some(p);
            }
            let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("a frame in time")?
                .unwrap();
            match f.into_data() {
                Ok(data) => d.push(data),
                Err(f) => {
                    let t = f.into_trailers().unwrap();
                    assert_eq!(grpc_wire::grpc_status(&t), Some(tonic::Code::Ok));
                    return None;
                }
            }
        }
    }

    fn sh() -> Arc<Shared> {
        ProxyServer::new(ServerOptions::default()).shared
    }

    fn stream_errors(sh: &Shared, code: &str) -> u64 {
        sh.metrics
            .stream_errors_total
            .with_label_values(&["from_agent", code, crate::metrics::NO_PACKET])
            .get()
    }

    async fn wait_backends(sh: &Shared, n: i64) {
        for _ in 0..1000 {
            if sh.metrics.ready_backend_connections.get() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("backends never became {n}");
    }

    /// A peer that connects and never sends the HTTP/2 preface is let go
    /// after the handshake timeout, counted as bad input. Time is paused.
    #[tokio::test(start_paused = true)]
    async fn a_peer_without_a_preface_is_dropped_after_the_handshake_timeout() {
        let sh = sh();
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let start = tokio::time::Instant::now();
        let served = tokio::spawn(serve_agent_conn(
            sh.clone(),
            ours,
            AgentKeepalive {
                every: Duration::ZERO,
                timeout: Duration::from_secs(20),
            },
        ));
        served.await.unwrap();
        assert_eq!(start.elapsed(), AGENT_H2_HANDSHAKE_TIMEOUT);
        assert_eq!(
            sh.metrics
                .bad_input_total
                .with_label_values(&["h2_agent_handshake"])
                .get(),
            1
        );
        // Our side is closed: the peer reads the SETTINGS we sent, then EOF.
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut theirs, &mut got)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn requests_that_are_not_grpc_posts_get_http_errors_and_no_backend() {
        let sh = sh();
        let mut c = connect::<PacketBody>(&sh).await;
        let mut get = call(
            crate::proto::AGENT_CONNECT_PATH,
            Some("a"),
            PacketBody::default(),
        );
        *get.method_mut() = hyper::Method::GET;
        let r = c.send_request(get).await.unwrap();
        assert_eq!(r.status(), 405);

        let mut json = call(
            crate::proto::AGENT_CONNECT_PATH,
            Some("a"),
            PacketBody::default(),
        );
        json.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        let r = c.send_request(json).await.unwrap();
        assert_eq!(r.status(), 415);
        assert_eq!(sh.metrics.ready_backend_connections.get(), 0);
    }

    #[tokio::test]
    async fn unknown_methods_and_agents_without_id_get_trailers_only_answers() {
        let sh = sh();
        let mut c = connect::<PacketBody>(&sh).await;
        let r = c
            .send_request(call(
                "/AgentService/Other",
                Some("a"),
                PacketBody::default(),
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(
            grpc_wire::grpc_status(r.headers()),
            Some(tonic::Code::Unimplemented)
        );
        assert!(hyper::body::Body::is_end_stream(&r.into_body()));

        let r = c
            .send_request(call(
                crate::proto::AGENT_CONNECT_PATH,
                None,
                PacketBody::default(),
            ))
            .await
            .unwrap();
        assert_eq!(
            grpc_wire::grpc_status(r.headers()),
            Some(tonic::Code::Unknown)
        );
        assert_eq!(
            grpc_wire::grpc_message(r.headers()),
            "expected one agent ID in the context, got 0"
        );
        assert_eq!(
            sh.metrics
                .bad_input_total
                .with_label_values(&["agent_without_id"])
                .get(),
            1
        );
        assert_eq!(sh.metrics.ready_backend_connections.get(), 0);
    }

    #[tokio::test]
    async fn an_agent_stream_carries_packets_both_ways_until_the_agent_ends_it() {
        let sh = sh();
        let mut c = connect::<PacketBody>(&sh).await;
        let (tx, rx) = mpsc::channel(8);
        let body = PacketBody::new(
            rx,
            CancellationToken::new(),
            sh.metrics.stream_packets_total.clone(),
            "test",
            false,
        );
        let r = c
            .send_request(call(
                crate::proto::AGENT_CONNECT_PATH,
                Some("agent-1"),
                body,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[headers::SERVER_ID], sh.opts.server_id.as_str());
        assert_eq!(r.headers()[headers::SERVER_COUNT], "1");
        assert!(grpc_wire::grpc_status(r.headers()).is_none());
        wait_backends(&sh, 1).await;
        let mut body = r.into_body();
        let mut d = Decoder::default();
        // DATA for a connection the server does not know: CLOSE_REQ back.
        tx.send(Packet::data(999, Bytes::from(vec![1u8; 5000])))
            .await
            .unwrap();
        let p = next_packet(&mut body, &mut d).await.expect("a packet");
        assert!(
            matches!(p.clone().checked(), Ok(Checked::CloseReq(ref c)) if c.connect_id == 999),
            "{p:?}"
        );
        assert_eq!(
            sh.metrics
                .stream_packets_total
                .with_label_values(&["to_agent", "CLOSE_REQ"])
                .get(),
            1
        );
        // The agent ends its side: the backend goes, the response ends
        // with grpc-status 0, and no stream error is counted.
        drop(tx);
        assert!(next_packet(&mut body, &mut d).await.is_none());
        wait_backends(&sh, 0).await;
        assert_eq!(
            sh.metrics
                .stream_errors_total
                .with_label_values(&["from_agent", "Internal", crate::metrics::NO_PACKET])
                .get(),
            0
        );
    }

    #[tokio::test]
    async fn broken_agent_messages_end_the_stream_with_their_code() {
        let sh = sh();
        let mut c = connect::<RawBody>(&sh).await;
        // A compressed message (none is accepted), after a good packet
        // split over two frames.
        let (tx, body) = raw_body();
        let r = c
            .send_request(call(crate::proto::AGENT_CONNECT_PATH, Some("a"), body))
            .await
            .unwrap();
        let mut resp = r.into_body();
        let mut d = Decoder::default();
        let m = wire(&Packet::data(5, Bytes::from(vec![2u8; 3000])));
        tx.send(Ok(Frame::data(m.slice(..7)))).await.unwrap();
        tx.send(Ok(Frame::data(m.slice(7..)))).await.unwrap();
        let p = next_packet(&mut resp, &mut d).await.expect("CLOSE_REQ");
        assert!(
            matches!(p.clone().checked(), Ok(Checked::CloseReq(_))),
            "{p:?}"
        );
        tx.send(Ok(Frame::data(Bytes::from_static(&[1, 0, 0, 0, 1, 0]))))
            .await
            .unwrap();
        assert!(next_packet(&mut resp, &mut d).await.is_none());
        assert_eq!(stream_errors(&sh, "Unimplemented"), 1);

        // A message over the size limit.
        let (tx, body) = raw_body();
        let r = c
            .send_request(call(crate::proto::AGENT_CONNECT_PATH, Some("b"), body))
            .await
            .unwrap();
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&((crate::MAX_MESSAGE_BYTES + 1) as u32).to_be_bytes());
        tx.send(Ok(Frame::data(prefix.into()))).await.unwrap();
        assert!(next_packet(&mut r.into_body(), &mut d).await.is_none());
        assert_eq!(stream_errors(&sh, "ResourceExhausted"), 1);

        // The agent's side ends inside a message.
        let (tx, body) = raw_body();
        let r = c
            .send_request(call(crate::proto::AGENT_CONNECT_PATH, Some("c"), body))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(m.slice(..100)))).await.unwrap();
        drop(tx);
        assert!(next_packet(&mut r.into_body(), &mut d).await.is_none());
        assert_eq!(stream_errors(&sh, "Internal"), 1);
        wait_backends(&sh, 0).await;
    }
}
