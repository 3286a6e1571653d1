//! `imds-proxy`: the metadata-service proxy for pods, and a strict local
//! fake of Azure IMDS / AWS IMDSv2 / the GCP metadata server. A thin shell over the `imds-proxy` crate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imds_proxy::audit::Audit;
use imds_proxy::mock::{self, MockState};
use imds_proxy::proxy::{self, Limits, ProxyConfig, ProxyHandle};
use imds_proxy::{CriPodSource, FilePodSource, Rules};
use proxyctl_cli::init_logging;
use proxyctl_cri::RuntimeEndpoint;

const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "imds-proxy",
    version,
    about = "Metadata-service proxy for pods: knows which pod asks (a listener inside each pod's network namespace), enforces who may ask for what, forwards to the real service."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a strict local fake of Azure IMDS, AWS IMDSv2, the GCP
    /// metadata server and GCP IAM Credentials (under /v1/projects/).
    Mock {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:16990")]
        listen: SocketAddr,
        /// Lifetime of issued Azure tokens in seconds (IMDS: about a day);
        /// shorter makes SDKs refresh sooner.
        #[arg(long, default_value_t = 86_399, value_parser = clap::value_parser!(u64).range(60..=86_399))]
        token_lifetime_secs: u64,
        /// Lifetime of the GCP metadata server's tokens in seconds (real:
        /// 3599, handed out counting down); IAM Credentials tokens live
        /// as long as asked, at most 3600.
        #[arg(long, default_value_t = 3599, value_parser = clap::value_parser!(u64).range(60..=3600))]
        gcp_token_lifetime_secs: u64,
    },
    /// Proxy pods' metadata requests to the real service under access rules.
    Serve {
        /// The real service, http://HOST[:PORT] (e.g. http://169.254.169.254).
        #[arg(long, value_parser = parse_upstream)]
        upstream: String,
        /// Access rules (YAML): which pods may use which paths and methods.
        #[arg(long)]
        rules: PathBuf,
        /// Pods (YAML: pods: [{name, namespace, labels, netns, ip}]); read
        /// again every --reconcile-secs. Without it pods come from the
        /// container runtime (--runtime-endpoint).
        #[arg(long)]
        pods: Option<PathBuf>,
        /// The CRI runtime to list pods from (ready sandboxes: labels,
        /// namespace, name, network namespace, IPs), e.g.
        /// unix:///run/containerd/containerd.sock. Default:
        /// $CONTAINER_RUNTIME_ENDPOINT, else containerd's socket. Not with --pods.
        #[arg(long, conflicts_with = "pods")]
        runtime_endpoint: Option<String>,
        /// Address bound inside every pod's network namespace; the pod's
        /// DNAT of 169.254.169.254:80 points here.
        #[arg(long, default_value = proxy::DEFAULT_POD_LISTEN)]
        pod_listen: SocketAddr,
        /// Fallback listener in this namespace that identifies callers by
        /// source IP (each checked to be the live owner of the address).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// /healthz, /readyz and /metrics.
        #[arg(long, default_value = "127.0.0.1:15991")]
        admin_listen: SocketAddr,
        /// Audit log (JSON lines); `-` for stdout.
        #[arg(long, default_value = "-")]
        audit_log: String,
        /// Requests per second each pod may send, refused ones included
        /// (0: unlimited). Past it: 429 with Retry-After.
        #[arg(long, default_value_t = 20.0)]
        rate_limit: f64,
        /// Burst allowed above --rate-limit.
        #[arg(long, default_value_t = 40)]
        burst: u32,
        /// Time a client has to send its whole request head (from the
        /// connection's start, or from the first byte of a later request;
        /// one deadline, never extended by a read). Also the admin
        /// listener's head timeout. Past it: the connection closes.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
        header_timeout_ms: u64,
        /// Time a kept-alive connection may wait for its next request
        /// before it is closed.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
        idle_timeout_ms: u64,
        /// Time a client has to take each answer (or each piece of a
        /// streamed one); a client that sends requests and does not read
        /// is disconnected.
        #[arg(long, default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
        write_timeout_ms: u64,
        /// Connections open at once from one pod (unknown callers of
        /// --listen share one such allowance). One more gets 503 and is
        /// closed.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        max_connections_per_pod: u64,
        /// Connections open at once on the pod listeners and --listen
        /// together. One more gets 503 and is closed.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
        max_connections: u64,
        /// Connections open at once on --admin-listen. One more is closed.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
        admin_max_connections: u64,
        /// Longest life of one connection to --admin-listen (a scraper
        /// reconnects on its next scrape).
        #[arg(long, default_value_t = 60000, value_parser = clap::value_parser!(u64).range(1..))]
        admin_connection_lifetime_ms: u64,
        /// Audit lines of refused requests and connections each pod may
        /// cause per second (0: every line is written). Past it lines are
        /// dropped, counted in imds_proxy_audit_lines_dropped_total{pod},
        /// and summed up in one line (decision audit_lines_dropped) at most
        /// every 10 s. Lines of allowed requests are never dropped.
        #[arg(long, default_value_t = 20.0)]
        audit_refused_per_sec: f64,
        /// Burst allowed above --audit-refused-per-sec.
        #[arg(long, default_value_t = 100)]
        audit_refused_burst: u32,
        /// Time the upstream has to answer.
        #[arg(long, default_value_t = 10000)]
        upstream_timeout_ms: u64,
        /// How often the pods (--pods or the runtime) are read again.
        #[arg(long, default_value_t = 5)]
        reconcile_secs: u64,
        /// Threads serving connections, each with its own event loop
        /// (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
    },
}

fn parse_upstream(s: &str) -> Result<String, String> {
    proxy::parse_upstream(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// Bad flags or files: exit code 2, nothing started.
#[derive(Debug)]
struct BadInput(String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn bad_input(msg: String) -> anyhow::Error {
    anyhow::Error::new(BadInput(msg))
}

pub fn main() -> ExitCode {
    init_logging("info");
    proxyctl_cli::raise_fd_limit();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imds-proxy: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(BadInput(msg)) = err.downcast_ref::<BadInput>() {
                eprintln!("imds-proxy: {msg}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
            eprintln!("imds-proxy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mock {
            listen,
            token_lifetime_secs,
            gcp_token_lifetime_secs,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding --listen {listen}"))?;
            tracing::info!(
                "metadata-service fake listening on {}",
                listener.local_addr()?
            );
            let state = MockState::with_identities(
                (1..=3).map(mock::MockIdentity::user_assigned).collect(),
                std::time::Duration::from_secs(token_lifetime_secs),
            )
            .with_gcp_token_lifetime(Duration::from_secs(gcp_token_lifetime_secs));
            for id in state.identities() {
                tracing::info!(
                    client_id = %id.client_id,
                    object_id = %id.object_id,
                    msi_res_id = id.msi_res_id.as_deref().unwrap_or("(system-assigned)"),
                    "managed identity"
                );
            }
            let gcp = state.gcp();
            for account in gcp.accounts() {
                let role = if account == gcp.node_account() {
                    "the node's (metadata server default)"
                } else if gcp.grants().contains(account) {
                    "the node may mint its tokens"
                } else {
                    "the node may not mint its tokens"
                };
                tracing::info!(email = %account, access = role, "GCP service account");
            }
            mock::serve(listener, std::sync::Arc::new(state)).await;
            Ok(())
        }
        Command::Serve {
            upstream,
            rules,
            pods,
            runtime_endpoint,
            pod_listen,
            listen,
            admin_listen,
            audit_log,
            rate_limit,
            burst,
            header_timeout_ms,
            idle_timeout_ms,
            write_timeout_ms,
            max_connections_per_pod,
            max_connections,
            admin_max_connections,
            admin_connection_lifetime_ms,
            audit_refused_per_sec,
            audit_refused_burst,
            upstream_timeout_ms,
            reconcile_secs,
            workers,
        } => {
            let rules = Rules::load(&rules).map_err(|e| bad_input(format!("--rules: {e}")))?;
            if !(rate_limit.is_finite() && rate_limit >= 0.0) {
                return Err(bad_input(format!("--rate-limit: {rate_limit} is not >= 0")));
            }
            if !(audit_refused_per_sec.is_finite() && audit_refused_per_sec >= 0.0) {
                return Err(bad_input(format!(
                    "--audit-refused-per-sec: {audit_refused_per_sec} is not >= 0"
                )));
            }
            let source = match &pods {
                Some(path) => {
                    let source = FilePodSource::new(path);
                    imds_proxy::PodSource::pods(&source)
                        .map_err(|e| bad_input(format!("--pods: {e}")))?;
                    Arc::new(source) as Arc<dyn imds_proxy::PodSource>
                }
                None => {
                    let endpoint = RuntimeEndpoint::resolve(runtime_endpoint.as_deref())
                        .map_err(|e| bad_input(e.to_string()))?;
                    tracing::info!(endpoint = %endpoint, "pods from the container runtime");
                    Arc::new(CriPodSource::new(endpoint)) as Arc<dyn imds_proxy::PodSource>
                }
            };
            let audit = if audit_log == "-" {
                Audit::stdout()
            } else {
                Audit::to_file(std::path::Path::new(&audit_log))
                    .with_context(|| format!("opening --audit-log {audit_log}"))?
            };
            let config = ProxyConfig {
                upstream: proxy::parse_upstream(&upstream)?,
                rules,
                pod_listen: Some(pod_listen),
                source_ip_listen: listen,
                admin_listen: Some(admin_listen),
                audit,
                limits: Limits {
                    header_read_timeout: Duration::from_millis(header_timeout_ms),
                    idle_timeout: Duration::from_millis(idle_timeout_ms),
                    write_timeout: Duration::from_millis(write_timeout_ms),
                    upstream_timeout: Duration::from_millis(upstream_timeout_ms),
                    rate_per_sec: rate_limit,
                    burst,
                    max_connections_per_pod: max_connections_per_pod as usize,
                    max_connections: max_connections as usize,
                    admin_max_connections: admin_max_connections as usize,
                    admin_connection_lifetime: Duration::from_millis(admin_connection_lifetime_ms),
                    audit_refused_per_sec,
                    audit_refused_burst,
                    ..Limits::default()
                },
                reconcile_every: Duration::from_secs(reconcile_secs),
                workers: workers
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            };
            let handle = ProxyHandle::start(config, source).await?;
            tracing::info!(
                admin = ?handle.admin_addr,
                source_ip = ?handle.source_ip_addr,
                "imds-proxy serving"
            );
            tokio::signal::ctrl_c().await?;
            drop(handle);
            Ok(())
        }
    }
}
