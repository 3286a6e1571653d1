//! Every redirect path end to end with real sockets, in namespaces the
//! tests create: a "pod" (where the policy is) and a "peer" (the remote
//! side), joined by a veth pair.

mod common;

use common::*;
use proxyctl_nft as nft;
use proxyctl_nft::probe;
use proxyctl_policy::{DestinationProxy, Exclusions, Family, Policy, Protocol};
use proxyctl_testkit::require_root;

const APP: Option<(u32, u32)> = Some((1000, 1000));

/// A policy excluding the proxies' uid (1337), as every real one must; the
/// test apps run as uid 1000.
fn policy(name: &str) -> Policy {
    Policy {
        name: name.into(),
        exclude: Exclusions {
            uids: vec![1337],
            ..Default::default()
        },
        ..Policy::default()
    }
}

#[test]
fn outbound_tcp_v4_and_v6_reach_the_proxy_with_original_destination() {
    if !require_root("outbound_tcp") {
        return;
    }
    let pair = Pair::new("otcp");
    let p = Policy {
        outbound_port: Some(15001),
        ..policy("out")
    };
    nft::add(&pair.target, &p).unwrap();
    let proxy = tcp_listeners(&pair.pod, &[sa("0.0.0.0", 15001), sa("::", 15001)]);
    let server = tcp_listeners(&pair.peer, &[sa(PEER_V4, 80), sa(PEER_V6, 80)]);
    for (v4, src, dst) in [(true, POD_V4, PEER_V4), (false, POD_V6, PEER_V6)] {
        let dest = sa(dst, 80);
        let _c = tcp_send(&pair.pod, APP, sa(src, 0), dest, "hello");
        let all = [&proxy[0], &proxy[1], &server[0], &server[1]];
        let (at, orig) = tcp_arrival(&all, "hello").expect("connection arrived nowhere");
        assert_eq!(
            at,
            if v4 { 0 } else { 1 },
            "must reach the proxy, not the server"
        );
        assert_eq!(
            orig, dest,
            "SO_ORIGINAL_DST must give the intended destination"
        );
    }
    // Without the policy the same connection reaches the server.
    nft::clear(&pair.target, None).unwrap();
    let _c = tcp_send(&pair.pod, APP, sa(POD_V4, 0), sa(PEER_V4, 80), "direct");
    let (at, _) = tcp_arrival(&[&proxy[0], &server[0]], "direct").unwrap();
    assert_eq!(at, 1);
}

#[test]
fn inbound_tcp_is_redirected_to_the_inbound_port() {
    if !require_root("inbound_tcp") {
        return;
    }
    let pair = Pair::new("itcp");
    let p = Policy {
        inbound_port: Some(15006),
        inbound_exceptions: proxyctl_policy::Exceptions {
            ports: vec!["15020".parse().unwrap()],
            cidrs: vec![format!("{PEER3_V4}/32").parse().unwrap()],
        },
        exclude: Exclusions::default(),
        ..policy("in")
    };
    nft::add(&pair.target, &p).unwrap();
    let proxy = tcp_listeners(&pair.pod, &[sa("0.0.0.0", 15006), sa("::", 15006)]);
    let apps = tcp_listeners(
        &pair.pod,
        &[sa(POD_V4, 8080), sa(POD_V6, 8080), sa(POD_V4, 15020)],
    );
    for (i, (src, dst)) in [(PEER_V4, POD_V4), (PEER_V6, POD_V6)]
        .into_iter()
        .enumerate()
    {
        let dest = sa(dst, 8080);
        let _c = tcp_send(&pair.peer, None, sa(src, 0), dest, "in");
        let all = [&proxy[0], &proxy[1], &apps[0], &apps[1]];
        let (at, orig) = tcp_arrival(&all, "in").expect("arrived nowhere");
        assert_eq!(at, i, "inbound connection must reach the inbound proxy");
        assert_eq!(orig, dest);
    }
    // Inbound exceptions: the local port, and the peer's address.
    let _c = tcp_send(
        &pair.peer,
        None,
        sa(PEER_V4, 0),
        sa(POD_V4, 15020),
        "export",
    );
    let (at, _) = tcp_arrival(&[&proxy[0], &apps[2]], "export").unwrap();
    assert_eq!(at, 1, "excepted inbound port must bypass");
    let _c = tcp_send(
        &pair.peer,
        None,
        sa(PEER3_V4, 0),
        sa(POD_V4, 8080),
        "excidr",
    );
    let (at, _) = tcp_arrival(&[&proxy[0], &apps[0]], "excidr").unwrap();
    assert_eq!(at, 1, "excepted peer address must bypass");
}

#[test]
fn udp_outbound_and_inbound_go_through_tproxy_with_original_destination() {
    if !require_root("udp_tproxy") {
        return;
    }
    let pair = Pair::new("udp");
    let p = Policy {
        outbound_port: Some(15001),
        inbound_port: Some(15006),
        protocols: vec![Protocol::Udp],
        exclude: Exclusions {
            uids: vec![1337],
            ..Default::default()
        },
        ..policy("udp")
    };
    nft::add(&pair.target, &p).unwrap();
    let out_proxy = udp_tproxy(&pair.pod, &[sa("0.0.0.0", 15001), sa("::", 15001)]);
    let in_proxy = udp_tproxy(&pair.pod, &[sa("0.0.0.0", 15006), sa("::", 15006)]);
    let server = udp_servers(&pair.peer, &[sa(PEER_V4, 53), sa(PEER_V6, 53)]);
    let app_srv = udp_servers(&pair.pod, &[sa(POD_V4, 5353), sa(POD_V6, 5353)]);
    for (i, (src, dst)) in [(POD_V4, PEER_V4), (POD_V6, PEER_V6)]
        .into_iter()
        .enumerate()
    {
        let dest = sa(dst, 53);
        udp_send(&pair.pod, APP, sa(src, 0), dest, "q");
        let all = [&out_proxy[0], &out_proxy[1], &server[0], &server[1]];
        let (at, orig) = udp_arrival(&all, "q").expect("datagram arrived nowhere");
        assert_eq!(at, i, "outbound UDP must reach the proxy");
        assert_eq!(
            orig,
            Some(dest),
            "IP_RECVORIGDSTADDR must give the intended destination"
        );
        // The proxy's own uid bypasses.
        udp_send(&pair.pod, Some((1337, 1337)), sa(src, 0), dest, "own");
        let (at, _) = udp_arrival(&all, "own").unwrap();
        assert_eq!(at, 2 + i, "excluded uid must reach the server directly");
    }
    for (i, (src, dst)) in [(PEER_V4, POD_V4), (PEER_V6, POD_V6)]
        .into_iter()
        .enumerate()
    {
        let dest = sa(dst, 5353);
        udp_send(&pair.peer, None, sa(src, 0), dest, "inq");
        let all = [&in_proxy[0], &in_proxy[1], &app_srv[0], &app_srv[1]];
        let (at, orig) = udp_arrival(&all, "inq").expect("arrived nowhere");
        assert_eq!(at, i, "inbound UDP must reach the inbound proxy");
        assert_eq!(orig, Some(dest));
    }
    nft::clear(&pair.target, None).unwrap();
    let rules = pair.pod.run(&["ip", "rule"]);
    assert!(
        !rules.contains("fwmark"),
        "clear must remove the UDP policy routing: {rules}"
    );
}

#[test]
fn excluded_uid_gid_and_user_bypass_while_others_are_redirected() {
    if !require_root("exclusions") {
        return;
    }
    let pair = Pair::new("excl");
    let p = Policy {
        outbound_port: Some(15001),
        exclude: Exclusions {
            uids: vec![1337],
            gids: vec![1338],
            users: vec!["nobody".into()],
            sids: vec![],
        },
        ..policy("ex")
    };
    nft::add(&pair.target, &p).unwrap();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let proxy = tcp_listeners(&pair.pod, &[sa("0.0.0.0", 15001)]);
    let server = tcp_listeners(&pair.peer, &[sa(PEER_V4, 80)]);
    for (ids, redirected) in [
        ((1000, 1000), true),
        ((1337, 1000), false),
        ((1000, 1338), false),
        ((nobody, 1000), false),
        ((1339, 1339), true),
    ] {
        let token = format!("id-{}-{}", ids.0, ids.1);
        let _c = tcp_send(&pair.pod, Some(ids), sa(POD_V4, 0), sa(PEER_V4, 80), &token);
        let (at, _) = tcp_arrival(&[&proxy[0], &server[0]], &token).unwrap();
        assert_eq!(at == 0, redirected, "uid/gid {ids:?}");
    }
}

#[test]
fn each_outbound_exception_and_loopback_bypass() {
    if !require_root("exceptions") {
        return;
    }
    let pair = Pair::new("exc");
    let p = Policy {
        outbound_port: Some(15001),
        outbound_exceptions: proxyctl_policy::Exceptions {
            ports: vec!["5432".parse().unwrap(), "6000-6010".parse().unwrap()],
            cidrs: vec![
                format!("{PEER2_V4}/32").parse().unwrap(),
                format!("{PEER2_V6}/128").parse().unwrap(),
            ],
        },
        ..policy("exc")
    };
    nft::add(&pair.target, &p).unwrap();
    let proxy = tcp_listeners(&pair.pod, &[sa("0.0.0.0", 15001), sa("::", 15001)]);
    let server = tcp_listeners(
        &pair.peer,
        &[
            sa(PEER_V4, 5432),
            sa(PEER_V4, 6005),
            sa(PEER2_V4, 80),
            sa(PEER2_V6, 80),
            sa(PEER_V4, 6011),
        ],
    );
    let local = tcp_listeners(&pair.pod, &[sa("127.0.0.1", 9000), sa("::1", 9000)]);
    let cases = [
        (POD_V4, sa(PEER_V4, 5432), "port", false),
        (POD_V4, sa(PEER_V4, 6005), "range", false),
        (POD_V4, sa(PEER2_V4, 80), "cidr4", false),
        (POD_V6, sa(PEER2_V6, 80), "cidr6", false),
        (POD_V4, sa(PEER_V4, 6011), "past-range", true),
        ("127.0.0.1", sa("127.0.0.1", 9000), "lo4", false),
        ("::1", sa("::1", 9000), "lo6", false),
    ];
    for (src, dst, token, redirected) in cases {
        let _c = tcp_send(&pair.pod, APP, sa(src, 0), dst, token);
        let all = [
            &proxy[0], &proxy[1], &server[0], &server[1], &server[2], &server[3], &server[4],
            &local[0], &local[1],
        ];
        let (at, _) =
            tcp_arrival(&all, token).unwrap_or_else(|| panic!("{token}: arrived nowhere"));
        assert_eq!(at < 2, redirected, "{token}: arrived at listener {at}");
    }
}

#[test]
fn two_proxies_with_priorities_each_get_their_traffic() {
    if !require_root("priorities") {
        return;
    }
    let pair = Pair::new("prio");
    let web = Policy {
        outbound_port: Some(15001),
        priority: 10,
        matching: proxyctl_policy::Match {
            remote_ports: vec!["80".parse().unwrap()],
            ..Default::default()
        },
        ..policy("web")
    };
    let all = Policy {
        outbound_port: Some(15002),
        priority: 5,
        ..policy("all")
    };
    nft::apply(&pair.target, &[all.clone(), web.clone()]).unwrap();
    let proxies = tcp_listeners(&pair.pod, &[sa("0.0.0.0", 15001), sa("0.0.0.0", 15002)]);
    let server = tcp_listeners(&pair.peer, &[sa(PEER_V4, 80), sa(PEER_V4, 443)]);
    let send = |port: u16, token: &str| {
        let _c = tcp_send(&pair.pod, APP, sa(POD_V4, 0), sa(PEER_V4, port), token);
        tcp_arrival(&[&proxies[0], &proxies[1], &server[0], &server[1]], token)
            .unwrap()
            .0
    };
    assert_eq!(
        send(80, "a"),
        0,
        ":80 goes to the higher-priority web proxy"
    );
    assert_eq!(
        send(443, "b"),
        1,
        ":443 falls through to the catch-all proxy"
    );
    // Swap the priorities: the catch-all now takes everything.
    nft::add(
        &pair.target,
        &Policy {
            priority: 20,
            ..all
        },
    )
    .unwrap();
    assert_eq!(send(80, "c"), 1);
    let listed: Vec<String> = nft::list(&pair.target)
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(listed, ["all", "web"], "list gives evaluation order");
}

#[test]
fn destination_proxy_dnats_one_destination_and_family_limits_apply() {
    if !require_root("dnat") {
        return;
    }
    let pair = Pair::new("dnat");
    // A route for the metadata address inside the test namespace only.
    pair.pod
        .run(&["ip", "route", "add", "169.254.169.254/32", "dev", "v0"]);
    let imds = Policy {
        destination_proxy: Some(DestinationProxy {
            destination: "169.254.169.254:80".parse().unwrap(),
            proxy: "127.0.0.1:18080".parse().unwrap(),
        }),
        exclude: Exclusions {
            uids: vec![1337],
            ..Default::default()
        },
        ..policy("imds")
    };
    let v4only = Policy {
        outbound_port: Some(15001),
        family: Family::Ipv4,
        ..policy("v4only")
    };
    nft::apply(&pair.target, &[imds, v4only]).unwrap();
    let imds_l = tcp_listeners(&pair.pod, &[sa("127.0.0.1", 18080)]);
    let proxy = tcp_listeners(&pair.pod, &[sa("0.0.0.0", 15001), sa("::", 15001)]);
    let server = tcp_listeners(&pair.peer, &[sa(PEER_V6, 80)]);
    let _c = tcp_send(
        &pair.pod,
        APP,
        sa("0.0.0.0", 0),
        sa("169.254.169.254", 80),
        "md",
    );
    let (at, orig) = tcp_arrival(&[&imds_l[0], &proxy[0]], "md").unwrap();
    assert_eq!(at, 0, "metadata traffic goes to the imds proxy");
    assert_eq!(orig, sa("169.254.169.254", 80));
    // family ipv4: IPv6 traffic is not redirected.
    let _c = tcp_send(&pair.pod, APP, sa(POD_V6, 0), sa(PEER_V6, 80), "v6");
    let (at, _) = tcp_arrival(&[&proxy[0], &proxy[1], &server[0]], "v6").unwrap();
    assert_eq!(at, 2, "an ipv4-only policy leaves IPv6 alone");
}

#[test]
fn udp_replies_are_not_tproxied() {
    if !require_root("udp_replies") {
        return;
    }
    // UDP has no NAT state: only datagrams in a flow's original direction
    // may be redirected, never the replies.
    let pair = Pair::new("udpr");
    let p = Policy {
        outbound_port: Some(15001),
        inbound_port: Some(15006),
        protocols: vec![Protocol::Udp],
        inbound_exceptions: proxyctl_policy::Exceptions {
            ports: vec!["5353".parse().unwrap()],
            cidrs: vec![],
        },
        outbound_exceptions: proxyctl_policy::Exceptions {
            ports: vec!["53".parse().unwrap()],
            cidrs: vec![],
        },
        ..policy("udpr")
    };
    nft::add(&pair.target, &p).unwrap();
    let proxies = udp_tproxy(&pair.pod, &[sa("0.0.0.0", 15001), sa("0.0.0.0", 15006)]);
    // 1. A peer queries an app server on an excepted inbound port; the
    //    app's reply must reach the peer, not the outbound proxy.
    let app = udp_servers(&pair.pod, &[sa(POD_V4, 5353)]).remove(0);
    let peer = udp_servers(&pair.peer, &[sa(PEER_V4, 40000)]).remove(0);
    let peer_c = pair.peer.enter(|| {
        let s = proxyctl_nft::probe::udp_client(sa(PEER_V4, 40001)).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    });
    peer_c.send_to(b"ask", sa(POD_V4, 5353)).unwrap();
    let (at, _) = udp_arrival(&[&proxies[0], &proxies[1], &app], "ask").unwrap();
    assert_eq!(at, 2, "excepted inbound port reaches the app");
    pair.pod.enter(move || {
        probe::set_thread_fs_ids(1000, 1000).unwrap();
        app.send_to(b"answer", sa(PEER_V4, 40001)).unwrap();
    });
    let got = udp_arrival(&[&proxies[0], &proxies[1]], "answer");
    assert!(got.is_none(), "the app's reply was tproxied: {got:?}");
    let mut buf = [0u8; 16];
    std::thread::sleep(WAIT / 3);
    let (n, _) = peer_c
        .recv_from(&mut buf)
        .expect("the peer got the app's reply");
    assert_eq!(&buf[..n], b"answer");
    // 2. The app queries the peer on an excepted outbound port; the peer's
    //    reply must reach the app, not the inbound proxy.
    let (app_c, peer_s) = (
        pair.pod.enter(|| {
            let s = proxyctl_nft::probe::udp_client(sa(POD_V4, 40002)).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        }),
        udp_servers(&pair.peer, &[sa(PEER_V4, 53)]).remove(0),
    );
    app_c.send_to(b"q2", sa(PEER_V4, 53)).unwrap();
    let (_, _) = udp_arrival(&[&peer_s], "q2").expect("excepted outbound port reaches the peer");
    peer_s.send_to(b"r2", sa(POD_V4, 40002)).unwrap();
    let got = udp_arrival(&[&proxies[0], &proxies[1]], "r2");
    assert!(got.is_none(), "the peer's reply was tproxied: {got:?}");
    std::thread::sleep(WAIT / 3);
    let (n, _) = app_c
        .recv_from(&mut buf)
        .expect("the app got the peer's reply");
    assert_eq!(&buf[..n], b"r2");
    drop(peer);
}

/// Reads `token` from an accepted proxy-side stream, within WAIT.
fn reads(s: &mut std::net::TcpStream, token: &str) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = vec![0u8; token.len()];
    s.read_exact(&mut buf).is_ok() && buf == token.as_bytes()
}

#[test]
fn replacing_a_policy_moves_kept_alive_connections_only_with_flush_conntrack() {
    if !require_root("flush_conntrack") {
        return;
    }
    use std::io::{Read, Write};
    let pair = Pair::new("ctf");
    let at = |port| Policy {
        outbound_port: Some(port),
        ..policy("mesh")
    };
    // An untouched policy's redirected connection must survive the flush.
    let other = Policy {
        outbound_port: Some(15009),
        matching: proxyctl_policy::Match {
            remote_ports: vec!["81".parse().unwrap()],
            ..Default::default()
        },
        priority: 9,
        ..policy("other")
    };
    nft::apply(&pair.target, &[at(15001), other]).unwrap();
    let proxies = tcp_listeners(
        &pair.pod,
        &[
            sa("0.0.0.0", 15001),
            sa("0.0.0.0", 15002),
            sa("0.0.0.0", 15003),
            sa("0.0.0.0", 15009),
        ],
    );
    let _server = tcp_listeners(&pair.peer, &[sa(PEER_V4, 80), sa(PEER_V4, 81)]);
    let accept = |i: usize| {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Ok((s, _)) = proxies[i].accept() {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "nothing at proxy {i}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    let mut client = tcp_send(&pair.pod, APP, sa(POD_V4, 0), sa(PEER_V4, 80), "one");
    let mut old_side = accept(0);
    assert!(reads(&mut old_side, "one"));
    let mut other_client = tcp_send(&pair.pod, APP, sa(POD_V4, 0), sa(PEER_V4, 81), "o1");
    let mut other_side = accept(3);
    assert!(reads(&mut other_side, "o1"));

    // Without the flush, conntrack keeps the open connection on the old proxy.
    let report = nft::add_with(&pair.target, &[at(15002)], nft::Options::default()).unwrap();
    assert_eq!(report.replaced, ["mesh"]);
    assert_eq!(report.flushed, 0);
    client.write_all(b"two").unwrap();
    assert!(
        reads(&mut old_side, "two"),
        "a kept-alive connection stays with the old proxy after a plain replace"
    );

    // With it, the connection is re-evaluated: the new proxy has no socket
    // for it, so the client is reset and its reconnect follows the policy.
    let flush = nft::Options {
        flush_conntrack: true,
    };
    let report = nft::add_with(&pair.target, &[at(15003)], flush).unwrap();
    assert!(report.flushed >= 1, "{report:?}");
    let _ = client.write_all(b"three");
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 8];
    let outcome = client.read(&mut buf);
    assert!(
        matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the old connection must be reset, got {outcome:?}"
    );
    assert!(!reads(&mut old_side, "three"), "the old proxy got new data");
    let _again = tcp_send(&pair.pod, APP, sa(POD_V4, 0), sa(PEER_V4, 80), "four");
    assert!(
        reads(&mut accept(2), "four"),
        "a new connection goes to the new proxy"
    );
    // The untouched policy's connection went on.
    other_client.write_all(b"o2").unwrap();
    assert!(
        reads(&mut other_side, "o2"),
        "an untouched policy's connection was cut"
    );

    // clear --flush-conntrack cuts what the removed policy redirected.
    let (removed, flushed) = nft::clear_with(&pair.target, Some("other"), flush).unwrap();
    assert_eq!((removed, flushed), (1, 1));
    let _ = other_client.write_all(b"o3");
    other_client.set_read_timeout(Some(WAIT)).unwrap();
    assert!(other_client.read(&mut buf).is_err());
}

#[test]
fn udp_destination_proxy_is_natted_and_replies_come_from_the_destination() {
    if !require_root("udp_dnat") {
        return;
    }
    let pair = Pair::new("udnat");
    pair.pod
        .run(&["ip", "route", "add", "169.254.169.254/32", "dev", "v0"]);
    let p = Policy {
        destination_proxy: Some(DestinationProxy {
            destination: "169.254.169.254:53".parse().unwrap(),
            proxy: "127.0.0.1:5353".parse().unwrap(),
        }),
        protocols: vec![Protocol::Udp],
        ..policy("udnat")
    };
    nft::add(&pair.target, &p).unwrap();
    assert_eq!(nft::list(&pair.target).unwrap(), vec![p.checked().unwrap()]);
    // An ordinary UDP server (no tproxy): NAT delivers to it, conntrack
    // rewrites its reply's source back to the destination the app asked.
    let server = udp_servers(&pair.pod, &[sa("127.0.0.1", 5353)]).remove(0);
    server.set_nonblocking(false).unwrap();
    let echo = std::thread::spawn(move || {
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        server.send_to(&buf[..n], from).unwrap();
    });
    let reply = pair.pod.enter(|| {
        probe::set_thread_fs_ids(1000, 1000).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("169.254.169.254:53").unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.send(b"query").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).expect("a reply from 169.254.169.254:53");
        buf[..n].to_vec()
    });
    echo.join().unwrap();
    assert_eq!(reply, b"query");
}
