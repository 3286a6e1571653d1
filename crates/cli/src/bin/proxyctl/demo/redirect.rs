//! `proxyctl demo redirect`: a pod's traffic into its sidecar proxy.
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use proxyctl_nft::{Target, probe};
use proxyctl_policy::{Policy, Protocol};

use super::{anonymous_netns, intro, join, ns_path, spawn_in, veth_between};

const PROXY_UID: u32 = 1337;
const APP_UID: u32 = 1000;
const PROXY_PORT: u16 = 15001;
const POD_V4: &str = "198.18.1.1";
const NET_V4: &str = "198.18.1.2";
const POD_V6: &str = "2001:db8:7e2::1";
const NET_V6: &str = "2001:db8:7e2::2";

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal"), port)
}

pub fn run() -> anyhow::Result<bool> {
    intro(
        "proxyctl demo redirect: a pod's traffic into its sidecar proxy (nftables)",
        &[
            "A pod and an \"internet\" in throw-away network namespaces. One policy sends",
            "the app's TCP and UDP to the sidecar on :15001; the sidecar's own traffic",
            "(its uid) goes out untouched. Watch the proxy learn each original",
            "destination, then the rules as the kernel holds them, then a verify run.",
        ],
    );
    let pod = anonymous_netns()?;
    let net = anonymous_netns()?;
    veth_between(
        (
            &pod,
            "eth0",
            &[&format!("{POD_V4}/30"), &format!("{POD_V6}/64")],
        ),
        (
            &net,
            "eth0",
            &[&format!("{NET_V4}/30"), &format!("{NET_V6}/64")],
        ),
    )?;
    println!(
        "pod      {POD_V4}, {POD_V6}   (app uid {APP_UID}, sidecar proxy uid {PROXY_UID} on :{PROXY_PORT})"
    );
    println!("internet {NET_V4}, {NET_V6}   (web server on :80, udp echo on :53)\n");

    let target = Target::Path(ns_path(&pod));
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
    match proxyctl_nft::render(&target) {
        Ok(text) => print!("{text}"),
        // nft is only a viewer here: the rules were written over netlink.
        Err(e) => {
            println!("   ({e}; apt-get install nftables shows them in nft's syntax)");
            println!("   the policy as proxyctl list reads it back from the kernel:\n");
            for p in proxyctl_nft::list(&target)? {
                print!("{}", serde_yaml::to_string(&p)?);
            }
        }
    }

    println!("\n-- proxyctl verify POD (the proxy is stopped, so verify can own its port):\n");
    let report = proxyctl_nft::verify(&target)?;
    print!("{}", report.table());

    let removed = proxyctl_nft::clear(&target, None)?;
    println!(
        "\n$ proxyctl clear POD\nremoved {removed} policy; the namespaces go away with this process."
    );
    drop(pod);
    drop(net);
    if !report.ok() {
        println!("verify found mismatches");
    }
    Ok(report.ok())
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
