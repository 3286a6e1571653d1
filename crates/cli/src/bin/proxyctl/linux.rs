//! `add`, `list`, `clear`, `verify` on Linux: flags to proxyctl-nft calls.

use std::process::ExitCode;

use anyhow::{Context, bail};
use proxyctl_cli::{OutputFormat, print_structured};
use proxyctl_nft::{NftError, Target};
use proxyctl_policy::{Policy, PolicyError};

use crate::target_args::{AddArgs, Backend, ClearArgs, ListArgs, TargetArgs};

/// True when `err` is the user's input at fault (exit 2, nothing changed).
pub fn is_bad_input(err: &anyhow::Error) -> bool {
    err.downcast_ref::<PolicyError>().is_some()
        || err
            .downcast_ref::<NftError>()
            .is_some_and(NftError::is_bad_input)
}

/// Turns TARGET into a namespace. Paths, `netns:NAME` and `pid:N` are
/// handled by proxyctl-nft; anything else is a container id, unique prefix
/// or `pod:NS/NAME`, looked up through CRI.
fn resolve(args: &TargetArgs) -> anyhow::Result<Target> {
    match args.backend.resolve() {
        Backend::Nft => {}
        Backend::Hns => bail!("--backend hns: this command exists only for the nft backend"),
        Backend::Auto => unreachable!("resolve() picks a backend"),
    }
    match Target::parse(&args.target) {
        Ok(target) => Ok(target),
        Err(not_a_namespace) => {
            crate::cri::container_target(&args.target, &args.runtime, not_a_namespace)
        }
    }
}

/// The policies the flags describe, validated as `add` validates them for
/// this backend (`check` and `add --dry-run` share it); changes nothing.
pub fn checked_policies(args: &crate::policy_args::PolicyArgs) -> anyhow::Result<Vec<Policy>> {
    let policies = args.policies()?;
    for p in &policies {
        proxyctl_nft::validate(p)?;
    }
    Ok(policies)
}

pub fn add(args: AddArgs) -> anyhow::Result<ExitCode> {
    let policies = checked_policies(&args.policy)?;
    let target = resolve(&args.target)?;
    if args.dry_run {
        println!("would add to {target}:");
        print_structured(OutputFormat::Yaml, &policies)?;
        return Ok(ExitCode::SUCCESS);
    }
    let options = proxyctl_nft::Options {
        flush_conntrack: args.flush_conntrack,
    };
    let report = proxyctl_nft::add_with(&target, &policies, options)?;
    for p in &policies {
        if report.replaced.contains(&p.name) {
            println!("replaced policy {} in {target}", p.name);
        } else {
            println!("added policy {} to {target}", p.name);
        }
    }
    if args.flush_conntrack {
        println!("flushed {}", entries(report.flushed));
    }
    Ok(ExitCode::SUCCESS)
}

fn entries(n: usize) -> String {
    format!(
        "{n} conntrack entr{} of redirected connections",
        if n == 1 { "y" } else { "ies" }
    )
}

pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let target = resolve(&args.target)?;
    let policies = proxyctl_nft::list(&target)?;
    match args.output {
        OutputFormat::Table => print!("{}", policy_table(&policies)),
        format => print_structured(format, &policies)?,
    }
    Ok(ExitCode::SUCCESS)
}

pub fn clear(args: ClearArgs) -> anyhow::Result<ExitCode> {
    let target = resolve(&args.target)?;
    let options = proxyctl_nft::Options {
        flush_conntrack: args.flush_conntrack,
    };
    let (removed, flushed) = proxyctl_nft::clear_with(&target, args.name.as_deref(), options)?;
    println!(
        "removed {removed} polic{} from {target}",
        if removed == 1 { "y" } else { "ies" }
    );
    if args.flush_conntrack {
        println!("flushed {}", entries(flushed));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: TargetArgs) -> anyhow::Result<ExitCode> {
    let target = resolve(&args)?;
    let report = proxyctl_nft::verify(&target).context("verify")?;
    if report.rows.is_empty() {
        println!("no proxyctl policies in {target}: nothing to verify");
        return Ok(ExitCode::FAILURE);
    }
    print!("{}", report.table());
    let unverified = report.unverified();
    if unverified > 0 {
        println!(
            "verify: {unverified} probe(s) could not be observed (NOT VERIFIED: a UDP port in use)"
        );
    }
    if report.ok() {
        println!(
            "verify: all {} observed probes behaved as the policies say",
            report.rows.len() - unverified
        );
        Ok(ExitCode::SUCCESS)
    } else {
        let bad = report.rows.iter().filter(|r| !r.ok).count();
        println!(
            "verify: {bad} of {} probes did NOT behave as the policies say",
            report.rows.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

fn join<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
    }
}

/// One line per policy, the main fields; `-o yaml` shows everything.
pub fn policy_table(policies: &[Policy]) -> String {
    let headers = [
        "NAME",
        "PRIORITY",
        "OUTBOUND",
        "INBOUND",
        "PROTOCOLS",
        "FAMILY",
        "EXCLUDE",
        "EXCEPTIONS",
        "DEST-PROXY",
    ];
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|p| {
            let port = |p: Option<u16>| p.map_or("-".into(), |p| p.to_string());
            let mut exclude: Vec<String> =
                p.exclude.uids.iter().map(|u| format!("uid:{u}")).collect();
            exclude.extend(p.exclude.gids.iter().map(|g| format!("gid:{g}")));
            exclude.extend(p.exclude.users.iter().map(|u| format!("user:{u}")));
            let ex = |e: &proxyctl_policy::Exceptions, tag: &str| {
                let mut v: Vec<String> = e.ports.iter().map(|r| format!("{tag}:{r}")).collect();
                v.extend(e.cidrs.iter().map(|c| format!("{tag}:{c}")));
                v
            };
            let mut exceptions = ex(&p.outbound_exceptions, "out");
            exceptions.extend(ex(&p.inbound_exceptions, "in"));
            vec![
                p.name.clone(),
                p.priority.to_string(),
                port(p.outbound_port),
                port(p.inbound_port),
                join(&p.protocols),
                p.family.to_string(),
                join(&exclude),
                join(&exceptions),
                p.destination_proxy
                    .map_or("-".into(), |d| format!("{}->{}", d.destination, d.proxy)),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        parts.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in &rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}
