//! `proxy-agent`: the Konnectivity agent, flag-compatible with upstream's.
//! A thin shell over `konnectivity::agent`.

mod tunnel_common;

use std::time::Duration;

use clap::Parser;
use konnectivity::agent::{self, AgentLaunch, AgentOptions};
use konnectivity::tls::{self, TlsOptions};
use tunnel_common::{KlogArgs, bad_flag, bind, go_duration};

fn default_agent_id() -> String {
    std::env::var("PROXY_AGENT_ID")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| konnectivity::server::ServerOptions::default().server_id)
}

#[derive(Parser, Debug)]
#[command(
    name = "proxy-agent",
    version,
    // Like Go's pflag: a repeated flag takes its last value.
    args_override_self = true,
    about = "Konnectivity proxy agent (apiserver-network-proxy compatible)."
)]
struct Args {
    /// If non-empty secure communication with this cert.
    #[arg(long = "agent-cert", default_value = "")]
    agent_cert: String,
    /// If non-empty secure communication with this key.
    #[arg(long = "agent-key", default_value = "")]
    agent_key: String,
    /// If non-empty the CAs we use to validate clients.
    #[arg(long = "ca-cert", default_value = "")]
    ca_cert: String,
    /// The hostname to use to connect to the proxy-server. Extra: a comma
    /// separated list of host or host:port connects to each server directly.
    #[arg(long = "proxy-server-host", default_value = "127.0.0.1")]
    proxy_server_host: String,
    /// The port the proxy server is listening on.
    #[arg(long = "proxy-server-port", default_value_t = 8091)]
    proxy_server_port: u16,
    /// Additional ALPN protocols to be presented when connecting to the server.
    #[arg(long = "alpn-proto", value_delimiter = ',', default_value = "[]")]
    alpn_proto: Vec<String>,
    /// The host address to listen on, without port.
    #[arg(long = "health-server-host", default_value = "")]
    health_server_host: String,
    /// The port the health server is listening on.
    #[arg(long = "health-server-port", default_value_t = 8093)]
    health_server_port: u16,
    /// The port the admin server is listening on.
    #[arg(long = "admin-server-port", default_value_t = 8094)]
    admin_server_port: u16,
    /// Bind address for admin connections.
    #[arg(long = "admin-bind-address", default_value = "127.0.0.1")]
    admin_bind_address: String,
    /// Accepted for compatibility, no effect: there is no pprof (use perf).
    #[arg(long = "enable-profiling", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    enable_profiling: bool,
    /// Accepted for compatibility, no effect (needs --enable-profiling, as upstream).
    #[arg(long = "enable-contention-profiling", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    enable_contention_profiling: bool,
    /// The unique ID of this agent (also $PROXY_AGENT_ID; default a uuid).
    #[arg(long = "agent-id", default_value_t = default_agent_id())]
    agent_id: String,
    /// Identifiers of the agent, URL encoded (host=..&ipv4=..&default-route=true).
    #[arg(long = "agent-identifiers", default_value = "")]
    agent_identifiers: String,
    /// The initial interval for checking connections to every server.
    #[arg(long = "sync-interval", default_value = "1s", value_parser = go_duration)]
    sync_interval: Duration,
    /// Interval between checks of each server connection: one that no longer takes new streams (closed,
    /// or GOAWAY from the server) is dropped and dialled again by the sync loop; 0 disables the checks.
    #[arg(long = "probe-interval", default_value = "1s", value_parser = go_duration)]
    probe_interval: Duration,
    /// The maximum interval for the sync backoff.
    #[arg(long = "sync-interval-cap", default_value = "10s", value_parser = go_duration)]
    sync_interval_cap: Duration,
    /// Time for gRPC agent keepalive (at least 30 s: servers refuse faster pings).
    #[arg(long = "keepalive-time", default_value = "1h", value_parser = go_duration)]
    keepalive_time: Duration,
    /// If non-empty the agent sends this token (Authorization: Bearer).
    #[arg(long = "service-account-token-path", default_value = "")]
    service_account_token_path: String,
    /// Deprecated upstream. Accepted for compatibility, no effect.
    #[arg(long = "warn-on-channel-limit", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    warn_on_channel_limit: bool,
    /// If true, the agent continues syncing, in order to support server count changes.
    #[arg(long = "sync-forever", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    sync_forever: bool,
    /// Accepted for upstream's manifests and ignored: packets toward a
    /// server go straight into its HTTP/2 stream, whose flow control (not
    /// a packet channel) bounds what waits.
    #[arg(long = "xfr-channel-size", default_value_t = 150)]
    xfr_channel_size: usize,
    #[arg(long = "count-server-leases", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    count_server_leases: bool,
    #[arg(long = "lease-namespace", default_value = "kube-system")]
    lease_namespace: String,
    /// Label selector for leases (hidden alias --lease-label).
    #[arg(
        long = "lease-label-selector",
        alias = "lease-label",
        default_value = "k8s-app=konnectivity-server"
    )]
    lease_label_selector: String,
    /// default or max.
    #[arg(long = "server-count-source", default_value = "default")]
    server_count_source: String,
    /// Extra: how often server Leases are counted.
    #[arg(long = "lease-poll-interval", default_value = "10s", value_parser = go_duration, hide = true)]
    lease_poll_interval: Duration,
    /// absolute path to the kubeconfig file (lease counting); empty: the
    /// pod's service account (in-cluster).
    #[arg(long, default_value = "")]
    kubeconfig: String,
    /// Accepted for compatibility, no effect: the Kubernetes client speaks JSON.
    #[arg(
        long = "kube-api-content-type",
        default_value = "application/vnd.kubernetes.protobuf"
    )]
    kube_api_content_type: String,
    /// Extra: bytes queued toward one backend before that connection is closed.
    #[arg(long = "max-connection-queue-bytes", default_value_t = 4 << 20)]
    max_connection_queue_bytes: usize,
    /// Extra: bytes queued toward backends that have not taken them, summed
    /// over every connection; at this many, dial requests are answered with
    /// a dial error and counted in dials_refused_total{reason="queued_bytes_cap"}.
    /// 0: no cap.
    #[arg(long = "max-queued-bytes", default_value_t = konnectivity::server::DEFAULT_MAX_QUEUED_BYTES)]
    max_queued_bytes: usize,
    /// Extra: per-connection flow-control window (bytes) used with peers that
    /// speak the proxyctl extension; 0 turns it off. Upstream peers never see it.
    #[arg(long = "flow-window-bytes", default_value_t = 1 << 20)]
    flow_window_bytes: usize,
    /// Extra: the most (bytes) that window grows to, doubling each time the
    /// sender runs out of credit while the reader keeps up; at or below
    /// --flow-window-bytes the window stays fixed. A connection's queue
    /// holds at most its window.
    #[arg(long = "flow-window-max-bytes", default_value_t = konnectivity::DEFAULT_FLOW_WINDOW_MAX)]
    flow_window_max_bytes: usize,
    /// Extra: connections (links) kept to each server, each with its own
    /// stream. A link is one TLS stream, encrypted and decrypted one record
    /// at a time; with more than one, many tunnels through this agent use
    /// more CPUs. Our server answers that it takes them: dials all go over
    /// the first link, and the agent moves each streaming tunnel's traffic
    /// toward the server to the link carrying the fewest streams. To a
    /// server that does not answer (upstream's, which would use only the
    /// first) the agent keeps one link.
    #[arg(long = "links-per-server", default_value_t = konnectivity::agent::DEFAULT_LINKS_PER_SERVER as u16, value_parser = clap::value_parser!(u16).range(1..=16))]
    links_per_server: u16,
    #[command(flatten)]
    klog: KlogArgs,
}

fn main() {
    konnectivity::tune_allocator();
    let args = Args::parse();
    args.klog.init("proxy-agent", 4);
    proxyctl_cli::raise_fd_limit();
    let runtime = konnectivity::runtime().expect("tokio runtime");
    std::process::exit(runtime.block_on(run(args)));
}

async fn run(a: Args) -> i32 {
    if a.enable_contention_profiling && !a.enable_profiling {
        bad_flag(
            "--enable-contention-profiling",
            "if --enable-contention-profiling is set, --enable-profiling must also be set",
        );
    }
    if a.ca_cert.is_empty() {
        bad_flag("--ca-cert", "required (the server is verified)");
    }
    if a.agent_cert.is_empty() != a.agent_key.is_empty() {
        bad_flag("--agent-cert", "--agent-cert and --agent-key go together");
    }
    if a.sync_interval > a.sync_interval_cap {
        bad_flag(
            "--sync-interval",
            format!(
                "sync interval {:?} must be less than sync interval cap {:?} (--sync-interval-cap)",
                a.sync_interval, a.sync_interval_cap
            ),
        );
    }
    if let Err(e) = agent::validate_agent_identifiers(&a.agent_identifiers) {
        bad_flag(
            "--agent-identifiers",
            format!("agent address is invalid: {e}"),
        );
    }
    if !matches!(a.server_count_source.as_str(), "default" | "max") {
        bad_flag("--server-count-source", "must be default or max");
    }
    let lease_client = if a.count_server_leases {
        if a.lease_poll_interval.is_zero() {
            bad_flag("--lease-poll-interval", "must be positive");
        }
        Some(
            konnectivity::kube::KubeClient::from_flags(&a.kubeconfig)
                .unwrap_or_else(|e| bad_flag("--kubeconfig", format!("{e:#}"))),
        )
    } else {
        None
    };
    let mut alpn: Vec<Vec<u8>> = a
        .alpn_proto
        .iter()
        .map(|s| {
            s.trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .map(|s| s.into_bytes())
        .collect();
    // gRPC needs h2; upstream's list is "additional" protocols.
    alpn.push(b"h2".to_vec());
    let identity = if a.agent_cert.is_empty() {
        None
    } else {
        Some((a.agent_cert.as_ref(), a.agent_key.as_ref()))
    };
    let tls = tls::client_config(a.ca_cert.as_ref(), identity, &TlsOptions::default(), &alpn)
        .unwrap_or_else(|e| bad_flag("--ca-cert", e));
    let servers: Vec<(String, u16)> = a
        .proxy_server_host
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|h| match h.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => (
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port.parse().unwrap_or_else(|_| {
                    bad_flag("--proxy-server-host", format!("bad port in {h:?}"))
                }),
            ),
            _ => (h.to_string(), a.proxy_server_port),
        })
        .collect();
    if servers.is_empty() {
        bad_flag("--proxy-server-host", "empty");
    }
    for (h, _) in &servers {
        if let Err(e) = tls::server_name(h) {
            bad_flag("--proxy-server-host", e);
        }
    }
    let mut opts = AgentOptions::new(servers, tls);
    opts.agent_id = a.agent_id.clone();
    opts.agent_identifiers = a.agent_identifiers.clone();
    opts.sync_interval = a.sync_interval.max(Duration::from_millis(10));
    opts.sync_interval_cap = a.sync_interval_cap.max(opts.sync_interval);
    opts.sync_forever = a.sync_forever;
    opts.keepalive_time = a.keepalive_time;
    opts.probe_interval = a.probe_interval;
    let _ = a.xfr_channel_size;
    opts.connection_queue_bytes = a.max_connection_queue_bytes;
    opts.flow_window = a.flow_window_bytes;
    opts.flow_window_max = a.flow_window_max_bytes;
    opts.max_queued_bytes = a.max_queued_bytes;
    opts.links_per_server = a.links_per_server.into();
    if !a.service_account_token_path.is_empty() {
        opts.service_account_token_path = Some(a.service_account_token_path.clone().into());
    }
    let health = bind(&a.health_server_host, a.health_server_port)
        .unwrap_or_else(|e| bad_flag("--health-server-host", e));
    let admin = bind(&a.admin_bind_address, a.admin_server_port)
        .unwrap_or_else(|e| bad_flag("--admin-bind-address", e));
    let running = match agent::launch(AgentLaunch {
        opts,
        health_addr: Some(health),
        admin_addr: Some(admin),
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proxy-agent: {e:#}");
            return 1;
        }
    };
    if let Some(client) = lease_client {
        let agent = running.agent.clone();
        let (ns, sel, every) = (
            a.lease_namespace.clone(),
            a.lease_label_selector.clone(),
            a.lease_poll_interval,
        );
        let use_max = a.server_count_source == "max";
        let lease_metrics = agent.lease_metrics();
        tokio::spawn(async move {
            loop {
                match konnectivity::lease::count_leases(&client, &ns, &sel, Some(&lease_metrics))
                    .await
                {
                    Ok(n) => {
                        tracing::debug!(leases = n, "server leases counted");
                        agent.set_lease_count(n, use_max);
                    }
                    Err(e) => {
                        // Unknown: fall back to the servers' header count.
                        tracing::warn!(error = %e, "counting server leases failed");
                        agent.set_lease_count(0, use_max);
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal");
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .expect("signal");
        // First signal: DRAIN; second: exit.
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        running.agent.drain();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    }
    // No SIGTERM elsewhere: Ctrl-C (CTRL_C_EVENT) drains, the second exits.
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.expect("signal");
        running.agent.drain();
        tokio::signal::ctrl_c().await.expect("signal");
    }
    tracing::info!("second signal: exiting");
    running.shutdown().await;
    0
}
