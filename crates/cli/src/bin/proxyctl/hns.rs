//! `add`, `list`, `clear` and `lookup` with the HNS backend, shaped like
//! hcnproxyctl's commands (same messages: "Successfully added the policy",
//! "Removed N policies"). The library is computenetwork.dll on Windows, or
//! the one named by PROXYCTL_HNS_LIBRARY anywhere.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use proxyctl_cli::{OutputFormat, print_structured};
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

/// `lookup` is the one HNS command reached without an explicit backend check
/// in `main`; the Linux lookup (CRI -> netns) is a separate path.
fn require_hns(backend: Backend) -> anyhow::Result<()> {
    match backend.resolve() {
        Backend::Hns => Ok(()),
        _ => bail!(
            "lookup on Linux needs the CRI client, which is not in this build yet; use --backend hns"
        ),
    }
}

/// Keeps refusals exiting with code 2: `main` recognises a bare `PolicyError`.
fn lift(err: HnsError) -> anyhow::Error {
    match err {
        HnsError::Policy(e) => e.into(),
        other => other.into(),
    }
}

/// The network namespace of a container, from CRI (`ContainerStatus`
/// verbose -> info.runtimeSpec.windows.network.networkNamespace).
fn container_namespace(container: &str, runtime_endpoint: Option<&str>) -> Result<String, String> {
    let _ = runtime_endpoint;
    Err(format!(
        "looking up container {container} needs the CRI client, which is not in this build; \
         pass the HNS endpoint GUID instead"
    ))
}

/// TARGET as HNS endpoint ids: a GUID is an endpoint, anything else a container.
fn endpoints(hcn: &Hcn, target: &str) -> anyhow::Result<Vec<String>> {
    if target.parse::<Guid>().is_ok() {
        return Ok(vec![target.to_owned()]);
    }
    let cri = |c: &str| container_namespace(c, None);
    hcn.endpoint_from_container(target, &cri).map_err(lift)
}

pub fn add(args: AddArgs) -> anyhow::Result<ExitCode> {
    let mut policy_args = args.policy.clone();
    // HNS redirects IPv4 only, and hcnproxyctl has no --family: when neither
    // --family nor --file is given, the HNS backend means ipv4. An explicit
    // `--family both` is still refused, naming --family.
    if policy_args.family.is_none() && policy_args.file.is_none() {
        policy_args.family = Some("ipv4".into());
    }
    let policies = policy_args.policies()?;
    let request = dry_run(&policies)?;
    if args.dry_run {
        println!("{request}");
        return Ok(ExitCode::SUCCESS);
    }
    let hcn = Hcn::load().map_err(lift)?;
    for endpoint in endpoints(&hcn, &args.target.target)? {
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
    for endpoint in endpoints(&hcn, &args.target.target)? {
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
    if let Some(name) = args.name.as_deref().filter(|n| *n != DEFAULT_POLICY_NAME) {
        return Err(PolicyError::invalid(
            "name",
            format!(
                "HNS L4WFPPROXY policies carry no name: an endpoint holds one, `{DEFAULT_POLICY_NAME}`, not `{name}`"
            ),
        )
        .into());
    }
    let hcn = Hcn::load().map_err(lift)?;
    let mut removed = 0;
    for endpoint in endpoints(&hcn, &args.target.target)? {
        removed += hcn.clear_policies(&endpoint).map_err(lift)?;
    }
    println!("Removed {removed} policies");
    Ok(ExitCode::SUCCESS)
}

pub fn lookup(args: LookupArgs) -> anyhow::Result<ExitCode> {
    require_hns(args.backend)?;
    let hcn = Hcn::load().map_err(lift)?;
    let runtime = args.runtime_endpoint.as_deref();
    let cri = |c: &str| container_namespace(c, runtime);
    let ids = hcn
        .endpoint_from_container(&args.container, &cri)
        .map_err(lift)?;
    println!("{}", ids.join(","));
    Ok(ExitCode::SUCCESS)
}
