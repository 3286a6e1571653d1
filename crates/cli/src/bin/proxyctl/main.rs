//! `proxyctl`: steer a container's traffic through proxies.
//! A thin shell: flags are parsed here, all behaviour lives in the library crates.

mod cri;
mod hns;
mod policy_args;
// The shapes of add/list/clear, shared by the nft and HNS backends; wired
// into `Command` as each backend lands.
#[allow(dead_code)]
mod target_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proxyctl_cli::{OutputFormat, init_logging, print_structured};
use proxyctl_policy::PolicyError;

use policy_args::PolicyArgs;

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
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: OutputFormat,
    },
    /// Print the version.
    Version,
    /// Add a redirect policy to a target (HNS: an endpoint or container).
    Add(target_args::AddArgs),
    /// List the redirect policies of a target, read back from the system.
    List(target_args::ListArgs),
    /// Remove the redirect policies of a target and report how many.
    Clear(target_args::ClearArgs),
    /// Print a container's endpoint: its pod's network namespace (CRI) with
    /// nftables, its HNS endpoint id(s) with --backend hns.
    Lookup(cri::LookupArgs),
}

fn main() -> ExitCode {
    init_logging("info");
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("proxyctl: {err:#}");
            if err.downcast_ref::<PolicyError>().is_some() {
                ExitCode::from(EXIT_BAD_INPUT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { policy, output } => {
            let policies = policy.policies()?;
            match output {
                OutputFormat::Table => {
                    for p in &policies {
                        println!("{}", serde_json::to_string(p)?);
                    }
                }
                format => print_structured(format, &policies)?,
            }
        }
        Command::Version => println!("proxyctl {}", env!("CARGO_PKG_VERSION")),
        Command::Add(args) => return hns::add(args),
        Command::List(args) => return hns::list(args),
        Command::Clear(args) => return hns::clear(args),
        Command::Lookup(args) => return cri::lookup(args),
    }
    Ok(ExitCode::SUCCESS)
}
