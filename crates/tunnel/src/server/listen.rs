//! Listeners and lifecycle: the frontend (TCP+mTLS or UDS; gRPC or
//! HTTP-CONNECT), the agent listener (mTLS), the health and admin ports.

use proxyctl_listen::{AcceptBackoff, ConnLimit, ConnPermit};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
#[cfg(unix)]
use tokio::net::UnixListener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::connect::HangupProbe;
use super::state::{AgentSvc, ProxyServer, ServerOptions, Shared};
use crate::http::{self, Reply};
use crate::proto::agent_service_server::AgentServiceServer;

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
/// when the connection does, whoever ends it (tonic, a frontend task, a
/// failed handshake).
pub(crate) struct Admitted<S> {
    io: S,
    _permit: ConnPermit,
}

/// A TLS connection on the agent or frontend port (tonic serves it through
/// `Connected`, which its own impl has only with its TLS feature).
pub(crate) type TlsConn = Admitted<tokio_rustls::server::TlsStream<TcpStream>>;

impl Connected for TlsConn {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.get_ref().0.peer_addr().ok()
    }
}

/// The socket under a frontend connection, for [`HangupProbe`].
trait ClientSocket {
    fn probe(&self) -> HangupProbe;
}
impl ClientSocket for TcpStream {
    fn probe(&self) -> HangupProbe {
        HangupProbe::of(self)
    }
}
#[cfg(unix)]
impl ClientSocket for tokio::net::UnixStream {
    fn probe(&self) -> HangupProbe {
        HangupProbe::of(self)
    }
}
impl ClientSocket for tokio_rustls::server::TlsStream<TcpStream> {
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
                tokio::spawn(super::grpc_front::serve(sh, conn, self.keepalive));
            }
            // HTTP/1.1 only, also over TLS, as upstream.
            FrontendMode::HttpConnect => {
                let client = conn.io.probe();
                tokio::spawn(super::connect::serve(sh, conn, client));
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

fn h2_server(keepalive: Duration, timeout: Duration) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(if keepalive.is_zero() {
            None
        } else {
            Some(keepalive)
        })
        .http2_keepalive_timeout(Some(timeout))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .max_frame_size(Some(crate::H2_MAX_FRAME))
        .tcp_nodelay(true)
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
    // tonic starts its graceful shutdown (GOAWAY) when the incoming stream
    // ends; the accept loop ends with `stop`, so this keeps the stream open
    // until the real stop (see below).
    let incoming_open = tx.clone();
    let real_stop = sh.stop.clone();
    tasks.spawn(async move {
        real_stop.cancelled().await;
        drop(incoming_open);
    });
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
    let agent_svc = AgentServiceServer::new(AgentSvc(sh.clone()))
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
    // Agent connections get their GOAWAY only when the server really stops
    // (after the graceful wait), not at its start as upstream's
    // GracefulStop does: agents drop a connection that has had GOAWAY
    // (`--probe-interval`, ours and upstream's), and with it every tunnel
    // the graceful wait is there to let finish. New agents are refused from
    // the start (the accept loop ends with `stop`).
    let stop2 = sh.stop.clone();
    tasks.spawn(async move {
        let r = h2_server(ping, ping_timeout)
            .add_service(agent_svc)
            .serve_with_incoming_shutdown(
                ReceiverStream::new(rx).map(Ok::<_, std::io::Error>),
                stop2.cancelled_owned(),
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "agent server failed");
        }
    });

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

use futures_util::StreamExt as _;
