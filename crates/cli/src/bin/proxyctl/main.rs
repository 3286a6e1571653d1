//! `proxyctl`: steer a container's traffic through proxies.
//! A thin shell: flags are parsed here, all behaviour lives in the library crates.

mod certs;
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
    /// Write the Konnectivity test certificates (upstream's `make certs` layout).
    Certs(certs::CertsArgs),
    /// Print the version.
    Version,
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
        Command::Certs(args) => certs::run(&args)?,
        Command::Version => println!("proxyctl {}", env!("CARGO_PKG_VERSION")),
    }
    Ok(ExitCode::SUCCESS)
}
