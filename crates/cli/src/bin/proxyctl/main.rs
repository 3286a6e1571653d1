//! `proxyctl`: steer a container's traffic through proxies.
//! A thin shell: flags are parsed here, all behaviour lives in the library crates.

mod certs;
#[cfg(target_os = "linux")]
mod cni_install;
mod cri;
// Linux-only: throw-away namespaces, nftables, setns.
#[cfg(target_os = "linux")]
mod demo;
mod hns;
#[cfg(target_os = "linux")]
mod linux;
mod policy_args;
// The shapes of add/list/clear, shared by the nft and HNS backends.
mod target_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proxyctl_cli::{OutputFormat, init_logging, print_structured};
use proxyctl_policy::PolicyError;

use policy_args::PolicyArgs;
#[cfg(target_os = "linux")]
use target_args::TargetArgs;
use target_args::{AddArgs, Backend, ClearArgs, ListArgs};

/// Exit code for bad input (as clap uses for bad flags): nothing was changed.
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "proxyctl",
    version,
    about = "Steer container traffic through proxies: layer-4 redirect policies on Linux (nftables) and Windows (HNS)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a policy and print it in normalized form; changes nothing.
    Check {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Validate for this backend, exactly as `add` would.
        #[arg(long, value_enum, default_value = "auto")]
        backend: Backend,
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: OutputFormat,
    },
    /// Install a redirect policy in a network namespace (HNS: an endpoint),
    /// or atomically replace the policy of the same --name.
    Add(AddArgs),
    /// Show the policies read back from the kernel.
    List(ListArgs),
    /// Remove our policies (all, or --name), and nothing else.
    Clear(ClearArgs),
    /// Prove the policies with real probe traffic; exits non-zero on any mismatch.
    #[cfg(target_os = "linux")]
    Verify(TargetArgs),
    /// Show the three systems at work in throw-away network namespaces
    /// (needs root; nothing is left behind, Ctrl-C included): the redirect
    /// policy, imds-proxy and the Konnectivity tunnel; or only the one named.
    #[cfg(target_os = "linux")]
    Demo {
        #[arg(value_enum)]
        part: Option<demo::Part>,
    },
    /// Apply policies to every pod whose labels match, now and as pods start (CRI).
    #[cfg(target_os = "linux")]
    Watch(cri::WatchArgs),
    /// Print a container's endpoint: its pod's network namespace (CRI) with
    /// nftables, its HNS endpoint id(s) with --backend hns.
    Lookup(cri::LookupArgs),
    /// Copy proxyctl-cni onto the node and keep it chained into the node's
    /// CNI config until stopped, then un-chain it (the CNI DaemonSet's job).
    #[cfg(target_os = "linux")]
    CniInstall(cni_install::CniInstallArgs),
    /// Write the Konnectivity test certificates (upstream's `make certs` layout).
    Certs(certs::CertsArgs),
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's own lines say what happens; the components' INFO logs
    // would bury them (RUST_LOG still wins).
    #[cfg(target_os = "linux")]
    let quiet = matches!(cli.command, Command::Demo { .. });
    #[cfg(not(target_os = "linux"))]
    let quiet = false;
    init_logging(if quiet { "warn" } else { "info" });
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("proxyctl: {err:#}");
            if is_bad_input(&err) {
                ExitCode::from(EXIT_BAD_INPUT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// True when `err` is the user's input at fault (exit 2, nothing changed).
fn is_bad_input(err: &anyhow::Error) -> bool {
    #[cfg(target_os = "linux")]
    if linux::is_bad_input(err) {
        return true;
    }
    err.downcast_ref::<PolicyError>().is_some() || hns::is_bad_input(err)
}

/// The nft backend where there is no nftables: say so (exit 2).
#[cfg(not(target_os = "linux"))]
fn nft_unavailable() -> anyhow::Result<ExitCode> {
    eprintln!("proxyctl: --backend nft exists only on Linux; use --backend hns (the default here)");
    Ok(ExitCode::from(EXIT_BAD_INPUT))
}

#[cfg(target_os = "linux")]
use linux::{add as nft_add, clear as nft_clear, list as nft_list};
#[cfg(not(target_os = "linux"))]
fn nft_add(_: AddArgs) -> anyhow::Result<ExitCode> {
    nft_unavailable()
}
#[cfg(not(target_os = "linux"))]
fn nft_list(_: ListArgs) -> anyhow::Result<ExitCode> {
    nft_unavailable()
}
#[cfg(not(target_os = "linux"))]
fn nft_clear(_: ClearArgs) -> anyhow::Result<ExitCode> {
    nft_unavailable()
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check {
            policy,
            backend,
            output,
        } => {
            let policies = match backend.resolve() {
                Backend::Hns => hns::checked_policies(&policy)?,
                #[cfg(target_os = "linux")]
                _ => linux::checked_policies(&policy)?,
                #[cfg(not(target_os = "linux"))]
                _ => return nft_unavailable(),
            };
            match output {
                OutputFormat::Table => {
                    for p in &policies {
                        println!("{}", serde_json::to_string(p)?);
                    }
                }
                format => print_structured(format, &policies)?,
            }
        }
        Command::Add(args) => match args.target.backend.resolve() {
            Backend::Hns => return hns::add(args),
            _ => return nft_add(args),
        },
        Command::List(args) => match args.target.backend.resolve() {
            Backend::Hns => return hns::list(args),
            _ => return nft_list(args),
        },
        Command::Clear(args) => match args.target.backend.resolve() {
            Backend::Hns => return hns::clear(args),
            _ => return nft_clear(args),
        },
        #[cfg(target_os = "linux")]
        Command::Verify(args) => return linux::verify(args),
        #[cfg(target_os = "linux")]
        Command::Watch(args) => return cri::watch(args),
        Command::Lookup(args) => return cri::lookup(args),
        #[cfg(target_os = "linux")]
        Command::CniInstall(args) => return cni_install::run(args),
        #[cfg(target_os = "linux")]
        Command::Demo { part } => return demo::run(part),
        Command::Certs(args) => certs::run(&args)?,
        Command::Version => println!("proxyctl {}", env!("CARGO_PKG_VERSION")),
    }
    Ok(ExitCode::SUCCESS)
}
