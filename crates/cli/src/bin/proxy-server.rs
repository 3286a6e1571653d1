//! `proxy-server`: the Konnectivity proxy server, flag-compatible with
//! upstream's. A thin shell over `konnectivity::server`.

mod tunnel_common;

use std::time::Duration;

use clap::Parser;
use konnectivity::server::{
    self, FrontendListen, FrontendMode, ServerLaunch, ServerOptions, Strategy,
};
use konnectivity::tls::{self, TlsOptions};
use tunnel_common::{KlogArgs, bad_flag, bind, go_duration};

fn default_server_id() -> String {
    std::env::var("PROXY_SERVER_ID")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(uuid_v4)
}
fn uuid_v4() -> String {
    ServerOptions::default().server_id
}

#[derive(Parser, Debug)]
#[command(
    name = "proxy-server",
    version,
    // Like Go's pflag: a repeated flag takes its last value.
    args_override_self = true,
    about = "Konnectivity proxy server (apiserver-network-proxy compatible)."
)]
struct Args {
    /// Frontend certificate; required for the TCP frontend (with
    /// --server-key and --server-ca-cert), refused with --uds-name.
    #[arg(long = "server-cert", default_value = "")]
    server_cert: String,
    /// Frontend key; required for the TCP frontend, refused with --uds-name.
    #[arg(long = "server-key", default_value = "")]
    server_key: String,
    /// The CA we use to validate KAS clients; required for the TCP frontend,
    /// refused with --uds-name.
    #[arg(long = "server-ca-cert", default_value = "")]
    server_ca_cert: String,
    /// If non-empty secure communication with this cert.
    #[arg(long = "cluster-cert", default_value = "")]
    cluster_cert: String,
    /// If non-empty secure communication with this key.
    #[arg(long = "cluster-key", default_value = "")]
    cluster_key: String,
    /// If non-empty the CA we use to validate Agent clients.
    #[arg(long = "cluster-ca-cert", default_value = "")]
    cluster_ca_cert: String,
    /// mode can be either 'grpc' or 'http-connect'.
    #[arg(long, default_value = "grpc")]
    mode: String,
    /// uds-name should be empty for TCP traffic. For UDS set to its name.
    #[arg(long = "uds-name", default_value = "")]
    uds_name: String,
    /// If true and if file UdsName already exists, delete the file before listen on that UDS file.
    #[arg(long = "delete-existing-uds-file", default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    delete_existing_uds_file: bool,
    /// Port we listen for server connections on. Set to 0 for UDS.
    #[arg(long = "server-port", default_value_t = 8090)]
    server_port: u16,
    /// Bind address for server connections. If empty, we will bind to all interfaces.
    #[arg(long = "server-bind-address", default_value = "")]
    server_bind_address: String,
    /// Port we listen for agent connections on.
    #[arg(long = "agent-port", default_value_t = 8091)]
    agent_port: u16,
    /// Bind address for agent connections. If empty, we will bind to all interfaces.
    #[arg(long = "agent-bind-address", default_value = "")]
    agent_bind_address: String,
    /// Port we listen for admin connections on.
    #[arg(long = "admin-port", default_value_t = 8095)]
    admin_port: u16,
    /// Bind address for admin connections. If empty, we will bind to all interfaces.
    #[arg(long = "admin-bind-address", default_value = "127.0.0.1")]
    admin_bind_address: String,
    /// Port we listen for health connections on.
    #[arg(long = "health-port", default_value_t = 8092)]
    health_port: u16,
    /// Bind address for health connections. If empty, we will bind to all interfaces.
    #[arg(long = "health-bind-address", default_value = "")]
    health_bind_address: String,
    /// Time for gRPC agent server keepalive.
    #[arg(long = "keepalive-time", default_value = "1h", value_parser = go_duration)]
    keepalive_time: Duration,
    /// Time for gRPC frontend server keepalive.
    #[arg(long = "frontend-keepalive-time", default_value = "1h", value_parser = go_duration)]
    frontend_keepalive_time: Duration,
    /// Extra: HTTP/2 ping interval (and timeout) toward agents so a dead agent is
    /// dropped within twice this time. 0 leaves only --keepalive-time.
    #[arg(long = "agent-liveness-interval", default_value = "5s", value_parser = go_duration)]
    agent_liveness_interval: Duration,
    /// Accepted for compatibility, no effect: there is no pprof (use perf).
    #[arg(long = "enable-profiling", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    enable_profiling: bool,
    /// Accepted for compatibility, no effect (needs --enable-profiling, as upstream).
    #[arg(long = "enable-contention-profiling", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    enable_contention_profiling: bool,
    /// The unique ID of this server. Can also be set by the 'PROXY_SERVER_ID' environment variable.
    #[arg(long = "server-id", default_value_t = default_server_id())]
    server_id: String,
    /// The number of proxy server instances, should be 1 unless it is an HA server.
    #[arg(long = "server-count", default_value_t = 1)]
    server_count: u32,
    /// Expected agent's namespace during agent authentication (used with
    /// agent-service-account, authentication-audience, kubeconfig): agents
    /// must send a service-account token that a TokenReview accepts.
    #[arg(long = "agent-namespace", default_value = "")]
    agent_namespace: String,
    /// Expected agent's service account during agent authentication (used with
    /// agent-namespace, authentication-audience, kubeconfig).
    #[arg(long = "agent-service-account", default_value = "")]
    agent_service_account: String,
    /// absolute path to the kubeconfig file (for agent authentication and the
    /// lease controller); empty: the pod's service account (in-cluster).
    #[arg(long, default_value = "")]
    kubeconfig: String,
    /// Maximum client QPS toward the Kubernetes API (0: 5, as client-go).
    #[arg(long = "kubeconfig-qps", default_value_t = 0.0)]
    kubeconfig_qps: f32,
    /// Maximum client burst toward the Kubernetes API (0: 10, as client-go).
    #[arg(long = "kubeconfig-burst", default_value_t = 0)]
    kubeconfig_burst: i32,
    /// Accepted for compatibility, no effect: the Kubernetes client speaks JSON.
    #[arg(
        long = "kube-api-content-type",
        default_value = "application/vnd.kubernetes.protobuf"
    )]
    kube_api_content_type: String,
    /// Expected agent's token authentication audience (used with
    /// agent-namespace, agent-service-account, kubeconfig).
    #[arg(long = "authentication-audience", default_value = "")]
    authentication_audience: String,
    /// The list of proxy strategies: default, destHost, defaultRoute.
    #[arg(long = "proxy-strategies", default_value = "default")]
    proxy_strategies: String,
    /// The comma separated list of allowed cipher suites. Has no effect on TLS1.3.
    #[arg(long = "cipher-suites", default_value = "", value_delimiter = ',')]
    cipher_suites: Vec<String>,
    /// Minimum TLS version: VersionTLS10..VersionTLS13. Empty defaults to VersionTLS12.
    #[arg(long = "tls-min-version", default_value = "")]
    tls_min_version: String,
    /// Accepted for upstream's manifests and ignored: packets toward an
    /// agent go straight into its HTTP/2 stream, whose flow control (not a
    /// packet channel) bounds what waits.
    #[arg(long = "xfr-channel-size", default_value_t = 10)]
    xfr_channel_size: usize,
    #[arg(long = "enable-lease-controller", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    enable_lease_controller: bool,
    #[arg(long = "lease-namespace", default_value = "kube-system")]
    lease_namespace: String,
    #[arg(long = "lease-label", default_value = "k8s-app=konnectivity-server")]
    lease_label: String,
    /// Extra: lease duration (upstream fixes 30s).
    #[arg(long = "lease-duration", default_value = "30s", value_parser = go_duration, hide = true)]
    lease_duration: Duration,
    /// Extra: lease renewal interval (upstream fixes 15s).
    #[arg(long = "lease-renewal-interval", default_value = "15s", value_parser = go_duration, hide = true)]
    lease_renewal_interval: Duration,
    /// Extra: interval of the expired-lease garbage collection (upstream fixes 15s).
    #[arg(long = "lease-gc-interval", default_value = "15s", value_parser = go_duration, hide = true)]
    lease_gc_interval: Duration,
    /// Timeout for graceful shutdown (0: stop at once).
    #[arg(long = "graceful-shutdown-timeout", default_value = "0", value_parser = go_duration)]
    graceful_shutdown_timeout: Duration,
    /// Timeout for sending DIAL_REQ to an agent and waiting for DIAL_RSP (0: none).
    #[arg(long = "backend-dial-timeout", default_value = "0", value_parser = go_duration)]
    backend_dial_timeout: Duration,
    /// Deprecated upstream. Accepted for compatibility, no effect.
    #[arg(long = "warn-on-channel-limit", default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    warn_on_channel_limit: bool,
    /// Extra: bytes queued toward one client before that connection is closed.
    #[arg(long = "max-connection-queue-bytes", default_value_t = 4 << 20)]
    max_connection_queue_bytes: usize,
    /// Extra: bytes held for readers that have not taken them, summed over
    /// every connection (queues toward clients that do not read, gRPC
    /// receive buffers toward agents or backends that do not); at this many
    /// new dials are refused (DIAL_RSP error, HTTP-CONNECT 503) and counted
    /// in dials_refused_total{reason="queued_bytes_cap"}. 0: no cap.
    #[arg(long = "max-queued-bytes", default_value_t = konnectivity::server::DEFAULT_MAX_QUEUED_BYTES)]
    max_queued_bytes: usize,
    /// Extra: frontend connections open at once; one more is closed as soon
    /// as it is accepted and counted in
    /// connections_refused_total{listener="frontend",reason="connection_cap"}.
    /// Default: 50000, or three quarters of the open-file limit if lower.
    /// 0: no cap.
    #[arg(long = "max-frontend-connections")]
    max_frontend_connections: Option<usize>,
    /// Extra: agent connections open at once (TLS handshakes under way
    /// included); more are closed at once and counted in
    /// connections_refused_total{listener="agent",reason="connection_cap"}.
    /// Default: 10000, or three quarters of the open-file limit if lower.
    /// 0: no cap.
    #[arg(long = "max-agent-connections")]
    max_agent_connections: Option<usize>,
    /// Extra: pending dials over all clients; more are refused.
    #[arg(long = "max-pending-dials", default_value_t = 10_000)]
    max_pending_dials: usize,
    /// Extra: concurrent streams (dials) on one gRPC frontend connection
    /// (grpc-go sets no limit; konnectivity-client's reusable tunnel puts
    /// every dial on one connection).
    #[arg(long = "max-concurrent-streams", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_streams: u32,
    /// Extra: per-connection flow-control window (bytes) used with peers that
    /// speak the proxyctl extension, at most half of
    /// --max-connection-queue-bytes; 0 turns it off. Upstream peers never
    /// see it.
    #[arg(long = "flow-window-bytes", default_value_t = 1 << 20)]
    flow_window_bytes: usize,
    /// Extra: the most (bytes) that window grows to, doubling each time the
    /// sender runs out of credit while the reader keeps up; at or below
    /// --flow-window-bytes the window stays fixed. A connection's queue
    /// holds at most its window.
    #[arg(long = "flow-window-max-bytes", default_value_t = konnectivity::DEFAULT_FLOW_WINDOW_MAX)]
    flow_window_max_bytes: usize,
    #[command(flatten)]
    klog: KlogArgs,
}

fn main() {
    konnectivity::tune_allocator();
    let args = Args::parse();
    args.klog.init("proxy-server", 4);
    proxyctl_cli::raise_fd_limit();
    let runtime = konnectivity::runtime().expect("tokio runtime");
    let code = runtime.block_on(run(args));
    std::process::exit(code);
}

fn port_ok(flag: &str, port: u16, allow_zero: bool) {
    if (allow_zero && port == 0) || (1024..=49151).contains(&port) {
        return;
    }
    bad_flag(flag, format!("port {port} must be within 1024-49151"));
}

async fn run(a: Args) -> i32 {
    if a.enable_contention_profiling && !a.enable_profiling {
        bad_flag(
            "--enable-contention-profiling",
            "if --enable-contention-profiling is set, --enable-profiling must also be set",
        );
    }
    let mode = match a.mode.as_str() {
        "grpc" => FrontendMode::Grpc,
        "http-connect" => FrontendMode::HttpConnect,
        other => bad_flag("--mode", format!("{other:?}: must be grpc or http-connect")),
    };
    let strategies: Vec<Strategy> = a
        .proxy_strategies
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e: String| bad_flag("--proxy-strategies", e))
        })
        .collect();
    if strategies.is_empty() {
        bad_flag("--proxy-strategies", "empty");
    }
    if !a.uds_name.is_empty() && a.server_port != 0 {
        bad_flag("--server-port", "must be 0 when --uds-name is set");
    }
    port_ok("--server-port", a.server_port, !a.uds_name.is_empty());
    port_ok("--agent-port", a.agent_port, false);
    port_ok("--admin-port", a.admin_port, false);
    port_ok("--health-port", a.health_port, false);
    // Secure by default, as upstream: a TCP frontend is mTLS only (an
    // unauthenticated proxy into the cluster network is never served), and
    // a unix socket, protected by its file mode, takes no certificates.
    if a.uds_name.is_empty() {
        for (flag, value) in [
            ("--server-cert", &a.server_cert),
            ("--server-key", &a.server_key),
            ("--server-ca-cert", &a.server_ca_cert),
        ] {
            if value.is_empty() {
                bad_flag(
                    flag,
                    "required for the TCP frontend (--uds-name is empty): --server-cert, --server-key and --server-ca-cert (clients are verified); or serve a unix socket with --uds-name and --server-port=0",
                );
            }
        }
    } else {
        for (flag, value) in [
            ("--server-cert", &a.server_cert),
            ("--server-key", &a.server_key),
            ("--server-ca-cert", &a.server_ca_cert),
        ] {
            if !value.is_empty() {
                bad_flag(
                    flag,
                    "should not be set with --uds-name (the unix socket is plain)",
                );
            }
        }
    }
    if a.cluster_cert.is_empty() || a.cluster_key.is_empty() {
        bad_flag(
            "--cluster-cert",
            "--cluster-cert and --cluster-key are required (agents connect over TLS)",
        );
    }
    // Upstream's rules and order. One Kubernetes client serves token
    // reviews and leases: from --kubeconfig, else the pod's service account.
    let token_auth = !a.agent_namespace.is_empty()
        || !a.agent_service_account.is_empty()
        || !a.authentication_audience.is_empty();
    let kube = if token_auth || a.enable_lease_controller {
        Some(
            konnectivity::kube::KubeClient::from_flags(&a.kubeconfig)
                .unwrap_or_else(|e| bad_flag("--kubeconfig", format!("{e:#}")))
                .with_rate_limit(a.kubeconfig_qps, a.kubeconfig_burst.max(0) as u32),
        )
    } else {
        None
    };
    let agent_auth = if token_auth {
        if !a.cluster_ca_cert.is_empty() {
            bad_flag(
                "--cluster-ca-cert",
                "can not be used when agent authentication is enabled (--agent-namespace, --agent-service-account, --authentication-audience)",
            );
        }
        for (flag, value) in [
            ("--agent-namespace", &a.agent_namespace),
            ("--agent-service-account", &a.agent_service_account),
            ("--authentication-audience", &a.authentication_audience),
        ] {
            if value.is_empty() {
                bad_flag(flag, "cannot be empty when agent authentication is enabled");
            }
        }
        Some(std::sync::Arc::new(
            konnectivity::tokenreview::AgentTokenAuth {
                client: kube.clone().expect("client made above"),
                namespace: a.agent_namespace.clone(),
                service_account: a.agent_service_account.clone(),
                audience: a.authentication_audience.clone(),
            },
        ))
    } else {
        None
    };
    let lease_controller = if a.enable_lease_controller {
        if a.lease_renewal_interval.is_zero() || a.lease_gc_interval.is_zero() {
            bad_flag("--lease-renewal-interval", "must be positive");
        }
        let labels = konnectivity::lease::parse_labels(&a.lease_label)
            .unwrap_or_else(|e| bad_flag("--lease-label", format!("{e:#}")));
        Some(konnectivity::lease::LeaseController {
            client: kube.clone().expect("client made above"),
            metrics: None,
            server_id: a.server_id.clone(),
            namespace: a.lease_namespace.clone(),
            labels,
            duration: a.lease_duration,
            renew: a.lease_renewal_interval,
            gc: a.lease_gc_interval,
        })
    } else {
        None
    };
    let tls_opts = TlsOptions {
        min_version: Some(a.tls_min_version.clone()).filter(|s| !s.is_empty()),
        cipher_suites: a
            .cipher_suites
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect(),
    };
    let agent_tls = tls::server_config(
        a.cluster_cert.as_ref(),
        a.cluster_key.as_ref(),
        Some(a.cluster_ca_cert.as_str())
            .filter(|s| !s.is_empty())
            .map(AsRef::as_ref),
        &tls_opts,
        &[b"h2"],
    )
    .unwrap_or_else(|e| bad_flag("--cluster-cert", e));
    let frontend = if !a.uds_name.is_empty() {
        FrontendListen::Uds {
            path: a.uds_name.clone().into(),
            delete_existing: a.delete_existing_uds_file,
        }
    } else {
        let addr = bind(&a.server_bind_address, a.server_port)
            .unwrap_or_else(|e| bad_flag("--server-bind-address", e));
        let tls = {
            let alpn: &[&[u8]] = if mode == FrontendMode::Grpc {
                &[b"h2"]
            } else {
                &[b"http/1.1"]
            };
            Some(
                tls::server_config(
                    a.server_cert.as_ref(),
                    a.server_key.as_ref(),
                    Some(a.server_ca_cert.as_ref()),
                    &tls_opts,
                    alpn,
                )
                .unwrap_or_else(|e| bad_flag("--server-cert", e)),
            )
        };
        FrontendListen::Tcp { addr, tls }
    };
    let opts = ServerOptions {
        server_id: a.server_id.clone(),
        server_count: a.server_count,
        strategies,
        backend_dial_timeout: a.backend_dial_timeout,
        max_pending_dials: a.max_pending_dials,
        max_concurrent_streams: a.max_concurrent_streams as usize,
        flow_window: a.flow_window_bytes,
        flow_window_max: a.flow_window_max_bytes,
        connection_queue_bytes: a.max_connection_queue_bytes,
        max_queued_bytes: a.max_queued_bytes,
        agent_auth,
        ..ServerOptions::default()
    };
    let _ = a.xfr_channel_size;
    let launch = ServerLaunch {
        opts,
        mode,
        frontend,
        agent_addr: bind(&a.agent_bind_address, a.agent_port)
            .unwrap_or_else(|e| bad_flag("--agent-bind-address", e)),
        agent_tls,
        health_addr: Some(
            bind(&a.health_bind_address, a.health_port)
                .unwrap_or_else(|e| bad_flag("--health-bind-address", e)),
        ),
        // Empty: every interface, as upstream (its flag text says localhost).
        admin_addr: Some(
            bind(&a.admin_bind_address, a.admin_port)
                .unwrap_or_else(|e| bad_flag("--admin-bind-address", e)),
        ),
        agent_keepalive: a.keepalive_time,
        agent_liveness: a.agent_liveness_interval,
        frontend_keepalive: a.frontend_keepalive_time,
        max_frontend_connections: a
            .max_frontend_connections
            .unwrap_or_else(|| proxyctl_listen::cap_within_nofile_limit(50_000)),
        max_agent_connections: a
            .max_agent_connections
            .unwrap_or_else(|| proxyctl_listen::cap_within_nofile_limit(10_000)),
    };
    let running = match server::launch(launch).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proxy-server: {e:#}");
            return 1;
        }
    };
    let (lease_stop, lease_stopped) = tokio::sync::oneshot::channel::<()>();
    let lease_task = lease_controller.map(|mut c| {
        c.metrics = Some(running.server.lease_metrics());
        tokio::spawn(c.run(async move {
            let _ = lease_stopped.await;
        }))
    });
    let mut signals = Signals::new();
    signals.next().await;
    tracing::info!("shutting down");
    let stop = async {
        let _ = lease_stop.send(());
        if let Some(t) = lease_task {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        running.shutdown(a.graceful_shutdown_timeout).await;
    };
    // As upstream: a second SIGTERM or SIGINT during the graceful shutdown
    // exits at once, with status 1.
    tokio::select! {
        _ = stop => 0,
        _ = signals.next() => {
            eprintln!("proxy-server: second signal during shutdown: exiting");
            1
        }
    }
}

/// SIGTERM and SIGINT (Ctrl-C elsewhere), one at a time.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                term: signal(SignalKind::terminate()).expect("signal"),
                int: signal(SignalKind::interrupt()).expect("signal"),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        // No SIGTERM elsewhere: Ctrl-C (CTRL_C_EVENT) only.
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await.expect("signal");
    }
}
