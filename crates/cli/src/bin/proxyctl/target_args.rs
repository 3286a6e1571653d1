//! Arguments shared by the commands that act on one target (`add`, `list`,
//! `clear`, `verify`), so every backend sees the same flags.
//!
//! TARGET is a netns path (`/proc/123/ns/net`, `/run/netns/x`), `netns:NAME`,
//! `pid:N`, a container id or unique prefix, or `pod:NAMESPACE/NAME` on Linux;
//! an HNS endpoint GUID or a container id with the HNS backend.

use clap::{Args, ValueEnum};
use proxyctl_cli::OutputFormat;

use crate::policy_args::PolicyArgs;

/// Which system programs the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Backend {
    /// nftables on Linux, HNS on Windows.
    #[default]
    Auto,
    /// nftables rules in the target's network namespace (Linux).
    Nft,
    /// HNS L4WFPPROXY endpoint policies through computenetwork.dll (Windows;
    /// elsewhere the library named by PROXYCTL_HNS_LIBRARY).
    Hns,
}

impl Backend {
    pub fn resolve(self) -> Backend {
        match self {
            Backend::Auto if cfg!(windows) => Backend::Hns,
            Backend::Auto => Backend::Nft,
            other => other,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// The network namespace or endpoint to act on (see `proxyctl --help`).
    pub target: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Where container ids and pod:NS/NAME targets are looked up (CRI).
    #[command(flatten)]
    pub runtime: crate::cri::RuntimeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Print what would be programmed (HNS: the exact request JSON) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// nft: after the change, delete the conntrack entries of connections
    /// the replaced policy redirected, so they stop reaching its old proxy
    /// (TCP ones are reset and reconnect under the new policy).
    #[arg(long)]
    pub flush_conntrack: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ClearArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Remove only this policy (default: all of ours).
    #[arg(long)]
    pub name: Option<String>,
    /// nft: also delete the conntrack entries of connections the removed
    /// policies redirected, so they stop reaching the proxy.
    #[arg(long)]
    pub flush_conntrack: bool,
}
