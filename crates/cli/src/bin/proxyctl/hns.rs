//! `add`, `list`, `clear` and `lookup` with the HNS backend, shaped like
//! hcnproxyctl's commands (same messages: "Successfully added the policy",
//! "Removed N policies"). The library is computenetwork.dll on Windows, or
//! the one named by PROXYCTL_HNS_LIBRARY anywhere.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use proxyctl_cli::{OutputFormat, print_structured};
use proxyctl_cri::{CriError, RuntimeEndpoint, container_network_namespace_blocking};
use proxyctl_hns::{Guid, Hcn, HnsError, dry_run};
use proxyctl_policy::{DEFAULT_POLICY_NAME, PolicyError};

use crate::target_args::{AddArgs, Backend, ClearArgs, ListArgs};

/// Arguments of `proxyctl lookup`.
#[derive(Debug, Clone, Args)]
pub struct LookupArgs {
    /// The container id to look up.
    pub container: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// CRI runtime endpoint to ask (hcnproxyctl: --runtimeendpoint).
    #[arg(long, alias = "runtimeendpoint", value_name = "ENDPOINT")]
    pub runtime_endpoint: Option<String>,
}

/// TARGET names nothing HNS can act on (not a GUID, and no such container):
/// the caller's input at fault, exit 2. Worded as the nft backend's target
/// error; its own type so this module builds where proxyctl-nft does not.
#[derive(Debug)]
pub struct BadTarget {
    target: String,
    message: String,
}

impl std::fmt::Display for BadTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "target `{}`: {}", self.target, self.message)
    }
}

impl std::error::Error for BadTarget {}

/// True when `err` is a TARGET that names nothing (exit 2).
pub fn is_bad_input(err: &anyhow::Error) -> bool {
    err.downcast_ref::<BadTarget>().is_some()
}

/// `lookup` is the one HNS command reached without an explicit backend check
/// in `main`; the Linux lookup (CRI -> netns) is a separate path.
fn require_hns(backend: Backend) -> anyhow::Result<()> {
    match backend.resolve() {
        Backend::Hns => Ok(()),
        _ => bail!("this lookup is the HNS one; use --backend hns"),
    }
}

/// Keeps refusals exiting with code 2: `main` recognises a bare `PolicyError`.
fn lift(err: HnsError) -> anyhow::Error {
    match err {
        HnsError::Policy(e) => e.into(),
        other => other.into(),
    }
}

/// The HNS network namespace of a container, from CRI (`ContainerStatus`
/// verbose -> info.runtimeSpec.windows.network.networkNamespace). An unknown
/// or ambiguous id, or an unusable endpoint, is the caller's input at fault
/// (exit 2, as for the nft backend); an unreachable runtime or an odd
/// answer is not (exit 1).
fn container_namespace(container: &str, runtime_endpoint: Option<&str>) -> anyhow::Result<String> {
    let result = RuntimeEndpoint::resolve(runtime_endpoint)
        .and_then(|endpoint| container_network_namespace_blocking(&endpoint, container));
    match result {
        Ok(found) => Ok(found.network_namespace),
        Err(
            e @ (CriError::NotFound(_)
            | CriError::Ambiguous { .. }
            | CriError::InvalidQuery(_)
            | CriError::Endpoint(_)),
        ) => Err(BadTarget {
            target: container.to_owned(),
            message: format!("not an HNS endpoint GUID, and as a container: {e}"),
        }
        .into()),
        Err(e) => Err(HnsError::Lookup {
            container: container.to_owned(),
            message: e.to_string(),
        }
        .into()),
    }
}

/// TARGET as HNS endpoint ids: a GUID is an endpoint, anything else a
/// container, looked up through CRI and then HNS (its namespace's endpoints).
fn endpoints(
    hcn: &Hcn,
    target: &str,
    runtime_endpoint: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    if target.parse::<Guid>().is_ok() {
        return Ok(vec![target.to_owned()]);
    }
    let namespace = container_namespace(target, runtime_endpoint)?;
    let cri = move |_: &str| Ok::<_, String>(namespace.clone());
    hcn.endpoint_from_container(target, &cri).map_err(lift)
}

/// The policies the flags describe, validated as `add` validates them for
/// HNS (`check --backend hns` shares it); changes nothing.
pub fn checked_policies(
    args: &crate::policy_args::PolicyArgs,
) -> anyhow::Result<Vec<proxyctl_policy::Policy>> {
    let mut policy_args = args.clone();
    // HNS redirects IPv4 only, and hcnproxyctl has no --family: when neither
    // --family nor --file is given, the HNS backend means ipv4. An explicit
    // `--family both` is still refused, naming --family.
    if policy_args.family.is_none() && policy_args.file.is_none() {
        policy_args.family = Some("ipv4".into());
    }
    let policies = policy_args.policies()?;
    dry_run(&policies)?;
    Ok(policies)
}

pub fn add(args: AddArgs) -> anyhow::Result<ExitCode> {
    if args.flush_conntrack {
        return Err(PolicyError::conflict(
            "flush-conntrack",
            "HNS keeps no conntrack entries; this flag is for the nft backend",
        )
        .into());
    }
    let policies = checked_policies(&args.policy)?;
    let request = dry_run(&policies)?;
    if args.dry_run {
        println!("{request}");
        return Ok(ExitCode::SUCCESS);
    }
    let hcn = Hcn::load().map_err(lift)?;
    for endpoint in endpoints(
        &hcn,
        &args.target.target,
        args.target.runtime.runtime_endpoint.as_deref(),
    )? {
        hcn.add_policies(&endpoint, &policies)
            .map_err(lift)
            .with_context(|| format!("endpoint {endpoint}"))?;
    }
    println!("Successfully added the policy");
    Ok(ExitCode::SUCCESS)
}

pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let hcn = Hcn::load().map_err(lift)?;
    let mut policies = Vec::new();
    for endpoint in endpoints(
        &hcn,
        &args.target.target,
        args.target.runtime.runtime_endpoint.as_deref(),
    )? {
        policies.extend(hcn.list_policies(&endpoint).map_err(lift)?);
    }
    match args.output {
        OutputFormat::Table => {
            for p in &policies {
                println!("{}", serde_json::to_string(p)?);
            }
        }
        format => print_structured(format, &policies)?,
    }
    Ok(ExitCode::SUCCESS)
}

pub fn clear(args: ClearArgs) -> anyhow::Result<ExitCode> {
    if args.flush_conntrack {
        return Err(PolicyError::conflict(
            "flush-conntrack",
            "HNS keeps no conntrack entries; this flag is for the nft backend",
        )
        .into());
    }
    if let Some(name) = args.name.as_deref().filter(|n| *n != DEFAULT_POLICY_NAME) {
        return Err(PolicyError::invalid(
            "name",
            format!(
                "HNS L4WFPPROXY policies carry no name (all read back as `{DEFAULT_POLICY_NAME}`, identified by match and priority); clear removes them all, so leave --name unset, not `{name}`"
            ),
        )
        .into());
    }
    let hcn = Hcn::load().map_err(lift)?;
    let mut removed = 0;
    for endpoint in endpoints(
        &hcn,
        &args.target.target,
        args.target.runtime.runtime_endpoint.as_deref(),
    )? {
        removed += hcn.clear_policies(&endpoint).map_err(lift)?;
    }
    println!("Removed {removed} policies");
    Ok(ExitCode::SUCCESS)
}

pub fn lookup(args: LookupArgs) -> anyhow::Result<ExitCode> {
    require_hns(args.backend)?;
    let hcn = Hcn::load().map_err(lift)?;
    let ids = endpoints(&hcn, &args.container, args.runtime_endpoint.as_deref())?;
    println!("{}", ids.join(","));
    Ok(ExitCode::SUCCESS)
}
