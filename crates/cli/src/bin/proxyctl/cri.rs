//! Container-runtime commands (`lookup`) and the container-id TARGET
//! fallback, over proxyctl-cri.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use proxyctl_cli::{OutputFormat, print_structured};
use proxyctl_cri::{CriError, RUNTIME_ENDPOINT_ENV, RuntimeEndpoint, lookup_blocking};

use crate::target_args::Backend;

/// Where the CRI runtime listens.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// CRI runtime endpoint, as crictl spells it [default: unix:///run/containerd/containerd.sock]
    /// (hcnproxyctl: --runtimeendpoint).
    #[arg(long, alias = "runtimeendpoint", value_name = "unix:///PATH", env = RUNTIME_ENDPOINT_ENV)]
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
/// unique prefix or `pod:NS/NAME` -> the pod's network namespace path.
#[allow(dead_code)] // wired in by the commands that take a TARGET
pub fn target_netns(target: &str, runtime: &RuntimeArgs) -> anyhow::Result<PathBuf> {
    Ok(proxyctl_cri::resolve_target(
        target,
        runtime.runtime_endpoint.as_deref(),
    )?)
}
