//! Container-runtime commands (`lookup`) and the container-id TARGET
//! fallback, over proxyctl-cri.

#[cfg(target_os = "linux")]
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use proxyctl_cli::{OutputFormat, print_structured};
use proxyctl_cri::{CriError, RUNTIME_ENDPOINT_ENV, RuntimeEndpoint, lookup_blocking};

#[cfg(target_os = "linux")]
use proxyctl_nft::{NftError, Target};

use crate::target_args::Backend;

/// Where the CRI runtime listens.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// CRI runtime endpoint, as crictl spells it [default: unix:///run/containerd/containerd.sock;
    /// on Windows npipe:////./pipe/containerd-containerd] (hcnproxyctl: --runtimeendpoint).
    #[arg(long, alias = "runtimeendpoint", value_name = "ENDPOINT", env = RUNTIME_ENDPOINT_ENV)]
    pub runtime_endpoint: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct LookupArgs {
    /// A container id or unique prefix, a pod sandbox id, or pod:NAMESPACE/NAME.
    pub container: String,
    /// table prints the network namespace path only (for scripts); json and
    /// yaml print the whole record (container, pod, IPs, labels, annotations).
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// nft (Linux): the pod's network namespace; hns: its HNS endpoint id(s).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Errors that are the caller's input (bad endpoint, unknown or ambiguous
/// id) exit 2 like bad flags; an unreachable runtime exits 1.
fn exit_code(err: &CriError) -> ExitCode {
    match err {
        CriError::Endpoint(_)
        | CriError::InvalidQuery(_)
        | CriError::NotFound(_)
        | CriError::Ambiguous { .. } => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

pub fn lookup(args: LookupArgs) -> anyhow::Result<ExitCode> {
    if args.backend.resolve() == Backend::Hns {
        return crate::hns::lookup(crate::hns::LookupArgs {
            container: args.container,
            backend: args.backend,
            runtime_endpoint: args.runtime.runtime_endpoint,
        });
    }
    let result = RuntimeEndpoint::resolve(args.runtime.runtime_endpoint.as_deref())
        .and_then(|endpoint| lookup_blocking(&endpoint, &args.container));
    let record = match result {
        Ok(r) => r,
        Err(err) => {
            eprintln!("proxyctl: lookup: {err}");
            return Ok(exit_code(&err));
        }
    };
    match args.output {
        OutputFormat::Table => match record.netns() {
            Ok(path) => println!("{}", path.display()),
            Err(err) => {
                eprintln!("proxyctl: lookup: {err}");
                return Ok(ExitCode::FAILURE);
            }
        },
        format => print_structured(format, &record)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The TARGET fallback for commands acting on a namespace: a container id,
/// unique prefix or `pod:NS/NAME` -> the pod's network namespace. Unknown
/// and ambiguous ids, and ids with no runtime to ask, are the caller's
/// input at fault (exit 2, as a bad namespace path is).
#[cfg(target_os = "linux")]
pub fn container_target(
    target: &str,
    runtime: &RuntimeArgs,
    not_a_namespace: NftError,
) -> anyhow::Result<Target> {
    let bad = |message: String| NftError::Target {
        target: target.to_owned(),
        message,
    };
    match proxyctl_cri::resolve_target(target, runtime.runtime_endpoint.as_deref()) {
        Ok(path) => Ok(Target::Path(path)),
        // Neither a namespace form nor an id: the namespace parser says why.
        Err(CriError::InvalidQuery(_)) => Err(not_a_namespace.into()),
        // Unknown, ambiguous, or no runtime to ask: TARGET names nothing we
        // can act on, which is the caller's input at fault (exit 2).
        Err(CriError::Connect { path, reason }) => Err(bad(format!(
            "not a netns path, netns:NAME or pid:N, and no container runtime at {} to look it up as a container ({reason})",
            path.display()
        ))
        .into()),
        Err(
            e @ (CriError::NotFound(_)
            | CriError::Ambiguous { .. }
            | CriError::NoNetns { .. }
            | CriError::Endpoint(_)),
        ) => Err(bad(format!(
            "not a netns path, netns:NAME or pid:N, and as a container: {e}"
        ))
        .into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "target `{target}` is not a netns path, netns:NAME or pid:N; looking it up as a container"
        ))),
    }
}

#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Pods whose labels carry all of these get --policy.
    #[arg(
        long,
        value_name = "KEY=VALUE[,KEY=VALUE..]",
        requires = "policy",
        conflicts_with = "config"
    )]
    pub selector: Option<String>,
    /// The policy file (JSON or YAML) for pods matching --selector.
    #[arg(long, value_name = "FILE", requires = "selector")]
    pub policy: Option<PathBuf>,
    /// Several selector/policy pairs in one YAML file (see README).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus /metrics and /healthz here.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9469")]
    pub metrics_addr: std::net::SocketAddr,
    /// What makes the watcher list pods. containerd 1.6's CRI has no event
    /// stream, so `containerd` subscribes to containerd's own event service on
    /// the same socket and lists pods through CRI on each task start;
    /// `poll` lists on a timer only (any CRI runtime); `auto` uses containerd's
    /// events when the runtime serves them and polls otherwise (CRI-O). With
    /// `containerd`, a runtime without the event service is an error.
    #[arg(long, value_enum, default_value = "auto")]
    pub events: EventsArg,
    /// How often pods are listed on a timer: while no event stream is live
    /// [default: 50], and as a safety net while one is [default: 5000].
    /// Given explicitly, it is used in both cases.
    #[arg(long, value_name = "MILLISECONDS", value_parser = clap::value_parser!(u64).range(10..=600000))]
    pub poll_interval_ms: Option<u64>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[cfg(target_os = "linux")]
pub fn watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    use std::sync::Arc;

    let rules = match (&args.selector, &args.policy, &args.config) {
        (Some(sel), Some(file), None) => {
            let selector = match proxyctl_watch::parse_selector(sel) {
                Ok(s) => s,
                Err(e) => return bad_input(&e),
            };
            let policies = match proxyctl_policy::policies_from_file(file) {
                Ok(p) => p,
                Err(e) => return bad_input(&format!("--policy: {e}")),
            };
            vec![proxyctl_watch::WatchRule { selector, policies }]
        }
        (None, None, Some(config)) => match proxyctl_watch::load_config(config) {
            Ok(r) => r,
            Err(e) => return bad_input(&e),
        },
        _ => return bad_input(&"give --selector with --policy, or --config"),
    };
    let endpoint = match RuntimeEndpoint::resolve(args.runtime.runtime_endpoint.as_deref()) {
        Ok(e) => e,
        Err(e) => return bad_input(&e),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let metrics = Arc::new(proxyctl_watch::Metrics::default());
        let (addr, _server) = proxyctl_watch::serve(args.metrics_addr, metrics.clone())
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-addr {}: {e}", args.metrics_addr))?;
        tracing::info!("metrics and health on http://{addr}/metrics and /healthz");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            tracing::info!("shutting down");
        };
        let options = watch_options(&args);
        match proxyctl_watch::run(endpoint, Arc::new(rules), options, metrics, shutdown).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("proxyctl: watch: {e}");
                Ok(ExitCode::FAILURE)
            }
        }
    })
}

/// `--events`.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventsArg {
    Auto,
    Containerd,
    Poll,
}

#[cfg(target_os = "linux")]
impl From<EventsArg> for proxyctl_cri::EventSource {
    fn from(a: EventsArg) -> Self {
        match a {
            EventsArg::Auto => Self::Auto,
            EventsArg::Containerd => Self::Containerd,
            EventsArg::Poll => Self::Poll,
        }
    }
}

/// List interval without a live event stream, and with one (a safety net).
#[cfg(target_os = "linux")]
const DEFAULT_POLL_MS: u64 = 50;
#[cfg(target_os = "linux")]
const DEFAULT_LIVE_POLL_MS: u64 = 5000;

#[cfg(target_os = "linux")]
fn watch_options(args: &WatchArgs) -> proxyctl_cri::WatchOptions {
    use std::time::Duration;
    let ms = |given: Option<u64>, default| Duration::from_millis(given.unwrap_or(default));
    let events = proxyctl_cri::EventSource::from(args.events);
    let mut options = proxyctl_cri::WatchOptions::poll(ms(args.poll_interval_ms, DEFAULT_POLL_MS));
    options.events = events;
    options.live_interval = ms(args.poll_interval_ms, DEFAULT_LIVE_POLL_MS);
    options
}

#[cfg(target_os = "linux")]
fn bad_input(err: &dyn std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("proxyctl: watch: {err}");
    Ok(ExitCode::from(2))
}
