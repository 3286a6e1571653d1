//! `proxyctl demo [redirect|imds|tunnel]`: the three systems, each run on
//! built-in defaults in throw-away network namespaces, with a few lines
//! saying what the reader is looking at.
//!
//! This module owns what the parts share, and makes the kernel clean up
//! after them however the demo ends (finished, Ctrl-C, kill -9):
//! - network namespaces are anonymous: they exist only while this process
//!   holds them, so what a part adds to them (links, addresses, nftables
//!   rules, sockets) goes with the process;
//! - temp files live on a tmpfs mounted over the temp dir in a mount
//!   namespace of the demo's own: the host's temp dir never sees them, and
//!   the tmpfs goes with the process;
//! - child processes (curl) get SIGKILL when the thread that started
//!   them ends (PR_SET_PDEATHSIG).
//!
//! Doing it in a signal handler instead would race with the threads still
//! running (a handler that removes a temp dir while a part writes into it).

mod imds;
mod redirect;
mod tunnel;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};
use proxyctl_link::Rtnl;

/// One part of the demo (no part: all three, one after the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// A pod's traffic into its sidecar proxy with an nftables policy.
    Redirect,
    /// imds-proxy: two pods, one metadata service, different answers.
    Imds,
    /// The Konnectivity tunnel: a backend reached through server and agent.
    Tunnel,
}

pub fn run(part: Option<Part>) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("demo needs root (it creates network namespaces and nftables rules)");
    }
    private_temp_dir()?;
    say_goodbye_on_interrupt()?;
    let parts = match part {
        Some(p) => vec![p],
        None => vec![Part::Redirect, Part::Imds, Part::Tunnel],
    };
    let mut ok = true;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            println!("\n{}\n", "=".repeat(78));
        }
        ok &= match part {
            Part::Redirect => redirect::run()?,
            Part::Imds => imds::run()?,
            Part::Tunnel => tunnel::run()?,
        };
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Enters a mount namespace of this process's own and mounts a tmpfs
/// over the temp dir there. Called before any thread starts: threads and
/// children inherit the mount namespace of the thread that makes them.
fn private_temp_dir() -> anyhow::Result<()> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    // Mounts made here must not propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the demo's mounts private")?;
    let tmp = std::env::temp_dir();
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700,size=64m"),
    )
    .with_context(|| format!("mounting a tmpfs over {}", tmp.display()))?;
    Ok(())
}

/// Ctrl-C, SIGTERM, SIGHUP: a line saying what is left (nothing), exit
/// 130. The signals are blocked in every thread (threads started later
/// inherit the mask; std gives children an empty one) and taken by a
/// thread of their own.
fn say_goodbye_on_interrupt() -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!(
                "\n{sig}: demo stopped; its namespaces, rules, processes and temp files go with it"
            );
            std::process::exit(130);
        }
    });
    Ok(())
}

/// A temp dir for one part (on the demo's private tmpfs).
pub struct DemoDir(tempfile::TempDir);

impl DemoDir {
    pub fn new(what: &str) -> anyhow::Result<DemoDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("proxyctl-demo-{what}-"))
            .tempdir()
            .context("creating a temp dir")?;
        Ok(DemoDir(dir))
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Runs `cmd` to completion; it is killed if the thread that started it
/// ends first (the demo stopped).
pub fn output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The demo may have ended before the prctl.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.stdin(std::process::Stdio::null()).output()
}

/// A new network namespace that no name or mount refers to: it lives as
/// long as this process holds the returned file (or a thread is inside it).
pub fn anonymous_netns() -> anyhow::Result<File> {
    let ns = proxyctl_nft::probe::anonymous_netns().context("creating a network namespace")?;
    // For the tests that interrupt the demo: they check afterwards that
    // nothing refers to these namespaces any more.
    if let Some(path) = std::env::var_os("PROXYCTL_DEMO_RECORD") {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let inode = ns.metadata()?.ino();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "netns {inode}")?;
    }
    Ok(ns)
}

/// The path another component can open to enter `ns`.
pub fn ns_path(ns: &File) -> PathBuf {
    format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd()).into()
}

/// Runs `f` on a thread that lives in the namespace of `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<JoinHandle<anyhow::Result<T>>> {
    let ns = ns.try_clone()?;
    Ok(std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
        f()
    }))
}

pub fn join<T>(h: JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("a demo thread panicked"))?
}

/// Runs `f` inside `ns` and waits for it.
pub fn in_ns<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    join(spawn_in(ns, f)?)
}

/// Runs `f` with a route netlink socket of namespace `ns` (links,
/// addresses, routes: what `ip` would do, without needing iproute2).
pub fn links(
    ns: &File,
    f: impl FnOnce(&mut Rtnl) -> Result<(), proxyctl_link::LinkError> + Send + 'static,
) -> anyhow::Result<()> {
    in_ns(ns, move || {
        let mut rt = Rtnl::new()?;
        f(&mut rt)?;
        Ok(())
    })
}

/// Joins two namespaces with a veth pair: `a_name` in `a` with `a_addrs`,
/// `b_name` in `b` with `b_addrs`; both ends and both loopbacks up.
pub fn veth_between(
    (a, a_name, a_addrs): (&File, &str, &[&str]),
    (b, b_name, b_addrs): (&File, &str, &[&str]),
) -> anyhow::Result<()> {
    let parse = |addrs: &[&str]| -> anyhow::Result<Vec<ipnet::IpNet>> {
        addrs.iter().map(|s| Ok(s.parse()?)).collect()
    };
    let (a_addrs, b_addrs) = (parse(a_addrs)?, parse(b_addrs)?);
    let (a_name, b_name) = (a_name.to_owned(), b_name.to_owned());
    let peer_ns = b.try_clone()?;
    let peer = b_name.clone();
    links(a, move |rt| {
        rt.add_veth(&a_name, &peer, Some(peer_ns.as_fd()))?;
        rt.set_up("lo")?;
        for addr in a_addrs {
            rt.add_address(&a_name, addr)?;
        }
        rt.set_up(&a_name)
    })?;
    links(b, move |rt| {
        rt.set_up("lo")?;
        for addr in b_addrs {
            rt.add_address(&b_name, addr)?;
        }
        rt.set_up(&b_name)
    })
}

/// A tokio runtime whose threads live in `ns` (sockets it opens are
/// there); `threads` workers.
pub fn runtime_in(ns: &File, threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    in_ns(ns, move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .context("starting a runtime")
    })
}

/// Prints a headline and the lines that say what the reader sees.
pub fn intro(title: &str, lines: &[&str]) {
    println!("== {title}\n");
    for l in lines {
        println!("   {l}");
    }
    println!();
}

/// Runs `fut` on the runtime's workers (inside the runtime's namespace,
/// never on the calling thread).
pub fn on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> anyhow::Result<T> {
    rt.block_on(rt.spawn(fut)).context("a demo task panicked")
}
