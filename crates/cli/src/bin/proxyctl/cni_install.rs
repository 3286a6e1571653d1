//! `proxyctl cni-install`: the node agent of the CNI DaemonSet. Flag
//! parsing and signals only; the work is in crates/cni-install.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use proxyctl_cni_install::{Installer, default_plugin};

#[derive(Debug, clap::Args)]
pub struct CniInstallArgs {
    /// The node's CNI bin dir, as mounted into this container.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI conf dir, as mounted into this container.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The plugin binary to install (its file name on the node is the
    /// plugin config's `type`).
    #[arg(long, default_value = "/usr/local/bin/proxyctl-cni")]
    plugin_binary: PathBuf,
    /// JSON file with the plugin's entry in the chain (`type`,
    /// `capabilities`, `rules`), e.g. from a ConfigMap. Default: type
    /// proxyctl-cni with the pod-annotations capability and no rules.
    #[arg(long)]
    plugin_config: Option<PathBuf>,
    /// Chain into this file of the conf dir instead of the first one.
    #[arg(long)]
    cni_conf_name: Option<String>,
    /// How often the chain is checked (re-chained if the file was rewritten).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

pub fn run(args: CniInstallArgs) -> anyhow::Result<ExitCode> {
    let plugin = match &args.plugin_config {
        None => default_plugin(),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?
        }
    };
    let installer = Installer {
        bin_dir: args.cni_bin_dir,
        conf_dir: args.cni_conf_dir,
        plugin_binary: args.plugin_binary,
        plugin,
        conf_name: args.cni_conf_name,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let flag = stop.clone();
        let work = tokio::task::spawn_blocking(move || {
            installer.run(Duration::from_millis(args.interval_ms.max(10)), || {
                flag.load(Ordering::SeqCst)
            })
        });
        tokio::pin!(work);
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
            res = &mut work => return Ok::<_, anyhow::Error>(res??),
        }
        // Stop asked for: the loop un-chains before it returns.
        stop.store(true, Ordering::SeqCst);
        Ok(work.await??)
    })?;
    Ok(ExitCode::SUCCESS)
}
