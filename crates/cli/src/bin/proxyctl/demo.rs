//! `proxyctl demo`: the whole idea in one run, on built-in defaults.
//!
//! A throw-away "pod" namespace and an "internet" namespace joined by a
//! veth pair; a sidecar proxy in the pod running as uid 1337; an app as uid
//! 1000. A policy sends the app's traffic to the proxy; the proxy's own
//! traffic (uid 1337) bypasses it. Both namespaces are anonymous: they exist
//! only while this process holds them, so nothing is left behind however
//! the demo ends (success, error, Ctrl-C or kill).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};
use proxyctl_nft::{Target, probe};
use proxyctl_policy::{Policy, Protocol};

const PROXY_UID: u32 = 1337;
const APP_UID: u32 = 1000;
const PROXY_PORT: u16 = 15001;
const POD_V4: &str = "198.18.1.1";
const NET_V4: &str = "198.18.1.2";
const POD_V6: &str = "2001:db8:7e2::1";
const NET_V6: &str = "2001:db8:7e2::2";

fn ns_path(file: &File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd())
}

/// Runs `f` on a thread that lives in the namespace of `file`.
fn spawn_in<T: Send + 'static>(
    file: &File,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<JoinHandle<anyhow::Result<T>>> {
    let file = file.try_clone()?;
    Ok(std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        f()
    }))
}

fn join<T>(h: JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("a demo thread panicked"))?
}

fn ip(ns: &File, args: &[&str]) -> anyhow::Result<()> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    join(spawn_in(ns, move || {
        let out = Command::new("ip")
            .args(&args)
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    })?)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal"), port)
}

pub fn run() -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("demo needs root (it creates network namespaces and nftables rules)");
    }
    println!("== proxyctl demo: a pod with a sidecar proxy, in throw-away namespaces\n");
    let pod = probe::anonymous_netns().context("creating the pod namespace")?;
    let net = probe::anonymous_netns().context("creating the internet namespace")?;
    let n = std::process::id() % 100_000;
    let (a, b) = (format!("pxd{n}a"), format!("pxd{n}b"));
    ip(
        &pod,
        &["link", "add", &a, "type", "veth", "peer", "name", &b],
    )?;
    ip(&pod, &["link", "set", &b, "netns", &ns_path(&net)])?;
    ip(&pod, &["addr", "add", &format!("{POD_V4}/30"), "dev", &a])?;
    ip(
        &pod,
        &[
            "-6",
            "addr",
            "add",
            &format!("{POD_V6}/64"),
            "dev",
            &a,
            "nodad",
        ],
    )?;
    ip(&pod, &["link", "set", &a, "up"])?;
    ip(&net, &["addr", "add", &format!("{NET_V4}/30"), "dev", &b])?;
    ip(
        &net,
        &[
            "-6",
            "addr",
            "add",
            &format!("{NET_V6}/64"),
            "dev",
            &b,
            "nodad",
        ],
    )?;
    ip(&net, &["link", "set", &b, "up"])?;
    println!(
        "pod      {POD_V4}, {POD_V6}   (app uid {APP_UID}, sidecar proxy uid {PROXY_UID} on :{PROXY_PORT})"
    );
    println!("internet {NET_V4}, {NET_V6}   (web server on :80, udp echo on :53)\n");

    let target = Target::Path(ns_path(&pod).into());
    let policy = Policy {
        name: "sidecar".into(),
        outbound_port: Some(PROXY_PORT),
        protocols: vec![Protocol::Tcp, Protocol::Udp],
        exclude: proxyctl_policy::Exclusions {
            uids: vec![PROXY_UID],
            ..Default::default()
        },
        ..Policy::default()
    }
    .checked()?;
    println!(
        "$ proxyctl add POD --name sidecar --outbound-port {PROXY_PORT} --protocol tcp,udp --exclude-uid {PROXY_UID}"
    );
    proxyctl_nft::add(&target, &policy)?;
    println!("added policy sidecar\n");

    let stop = Arc::new(AtomicBool::new(false));
    let servers = start_internet(&net, stop.clone())?;
    let proxy = start_proxy(&pod, stop.clone())?;

    for (dest, label) in [(sa(NET_V4, 80), "IPv4"), (sa(NET_V6, 80), "IPv6")] {
        println!("-- app (uid {APP_UID}) opens a TCP connection to {dest} ({label})");
        let reply = join(spawn_in(&pod, move || {
            probe::set_thread_fs_ids(APP_UID, APP_UID)?;
            let mut s = TcpStream::connect_timeout(&dest, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })?)?;
        let body = reply.rsplit("\r\n\r\n").next().unwrap_or(&reply);
        println!("   app received the reply: {body:?}");
    }
    let dest = sa(NET_V4, 53);
    println!("-- app (uid {APP_UID}) sends a UDP datagram to {dest}");
    join(spawn_in(&pod, move || {
        probe::set_thread_fs_ids(APP_UID, APP_UID)?;
        let s = probe::udp_client(sa("0.0.0.0", 0))?;
        s.send_to(b"who is example.test?", dest)?;
        Ok(())
    })?)?;
    std::thread::sleep(Duration::from_millis(300));

    stop.store(true, Ordering::Relaxed);
    join(proxy)?;
    for s in servers {
        join(s)?;
    }

    println!("\n-- the rules (nft list table inet proxyctl, in the pod):\n");
    print!("{}", proxyctl_nft::render(&target)?);

    println!("\n-- proxyctl verify POD (the proxy is stopped, so verify can own its port):\n");
    let report = proxyctl_nft::verify(&target)?;
    print!("{}", report.table());

    let removed = proxyctl_nft::clear(&target, None)?;
    println!(
        "\n$ proxyctl clear POD\nremoved {removed} policy; the namespaces go away with this process."
    );
    drop(pod);
    drop(net);
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        println!("verify found mismatches");
        ExitCode::FAILURE
    })
}

/// Web and UDP echo servers in the "internet" namespace.
fn start_internet(
    net: &File,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<()>>>> {
    let mut handles = Vec::new();
    for addr in [sa(NET_V4, 80), sa(NET_V6, 80)] {
        let stop = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        handles.push(spawn_in(net, move || {
            let listener = probe::tcp_listener(addr);
            let ready = listener.is_ok();
            let _ = tx.send(ready);
            let listener = listener?;
            while !stop.load(Ordering::Relaxed) {
                if let Some(mut s) = probe::accept_within(&listener, Duration::from_millis(50))? {
                    let peer = s.peer_addr()?;
                    let mut line = String::new();
                    BufReader::new(s.try_clone()?).read_line(&mut line)?;
                    println!("   server {addr}: connection from {peer}");
                    write!(s, "HTTP/1.0 200 OK\r\n\r\nhello from {addr}")?;
                }
            }
            Ok(())
        })?);
        if !rx.recv().unwrap_or(false) {
            bail!("web server could not listen on {addr}");
        }
    }
    let stop2 = stop.clone();
    handles.push(spawn_in(net, move || {
        let sock = probe::udp_server(sa(NET_V4, 53))?;
        while !stop2.load(Ordering::Relaxed) {
            if let Some(d) = probe::recv_within(&sock, Duration::from_millis(50))? {
                println!("   udp server {NET_V4}:53: datagram from {}", d.peer);
                sock.send_to(&d.payload, d.peer)?;
            }
        }
        Ok(())
    })?);
    Ok(handles)
}

/// The sidecar: takes redirected connections, finds where they were going
/// (SO_ORIGINAL_DST / IP_RECVORIGDSTADDR) and goes there itself as uid 1337.
fn start_proxy(
    pod: &File,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = spawn_in(pod, move || {
        probe::set_thread_fs_ids(PROXY_UID, PROXY_UID)?;
        let listeners = (|| -> anyhow::Result<_> {
            Ok((
                probe::tcp_listener(sa("0.0.0.0", PROXY_PORT))?,
                probe::tcp_listener(sa("::", PROXY_PORT))?,
                probe::udp_tproxy_socket(sa("0.0.0.0", PROXY_PORT))?,
            ))
        })();
        let _ = tx.send(listeners.is_ok());
        let (v4, v6, udp) = listeners?;
        while !stop.load(Ordering::Relaxed) {
            for l in [&v4, &v6] {
                let Some(mut app) = probe::accept_within(l, Duration::from_millis(20))? else {
                    continue;
                };
                let orig = probe::original_dst(&app)?;
                println!(
                    "   proxy :{PROXY_PORT} (uid {PROXY_UID}): accepted {} -> original destination {orig} (SO_ORIGINAL_DST)",
                    app.peer_addr()?
                );
                let mut req = [0u8; 512];
                let n = app.read(&mut req)?;
                // The proxy's own connection: uid 1337, so it bypasses the redirect.
                let mut up = TcpStream::connect_timeout(&orig, Duration::from_secs(2))?;
                println!(
                    "   proxy connects to {orig} itself as uid {PROXY_UID}: bypasses the redirect"
                );
                up.write_all(&req[..n])?;
                let mut reply = Vec::new();
                up.read_to_end(&mut reply)?;
                app.write_all(&reply)?;
            }
            if let Some(d) = probe::recv_datagram(&udp)? {
                let orig = d.original_dst.context("no original destination")?;
                println!(
                    "   proxy :{PROXY_PORT}/udp: datagram from {} -> original destination {orig} (IP_RECVORIGDSTADDR)",
                    d.peer
                );
                let up = probe::udp_client(sa("0.0.0.0", 0))?;
                up.send_to(&d.payload, orig)?;
                if let Some(r) = probe::recv_within(&up, Duration::from_secs(1))? {
                    println!(
                        "   proxy forwarded it as uid {PROXY_UID} and got {} bytes back from {}",
                        r.payload.len(),
                        r.peer
                    );
                }
            }
        }
        Ok(())
    })?;
    if !rx.recv().unwrap_or(false) {
        return join(handle).and_then(|_| bail!("the proxy could not listen"));
    }
    Ok(handle)
}
