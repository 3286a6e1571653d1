//! Against the real kernel, in throw-away network namespaces (threads that
//! unshare their own): a veth pair wired with these calls carries a TCP
//! connection over IPv4 and IPv6, and the kernel's refusals come back named.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

use nix::sched::{CloneFlags, setns, unshare};
use proxyctl_link::{LinkError, Rtnl};

/// A new network namespace, held open by the returned file.
fn new_netns() -> File {
    std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare");
        File::open("/proc/thread-self/ns/net").expect("open ns")
    })
    .join()
    .unwrap()
}

fn in_ns<T: Send + 'static>(ns: &File, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.try_clone().unwrap();
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn a_veth_pair_between_two_namespaces_carries_tcp_over_both_families() {
    if !proxyctl_testkit::require_root("veth_pair_carries_tcp") {
        return;
    }
    let a = new_netns();
    let b = new_netns();
    let b2 = b.try_clone().unwrap();
    in_ns(&a, move || {
        let mut rt = Rtnl::new().unwrap();
        rt.add_veth("left", "right", Some(b2.as_fd())).unwrap();
        rt.set_up("lo").unwrap();
        rt.set_up("left").unwrap();
        rt.add_address("left", "10.200.0.1/30".parse().unwrap())
            .unwrap();
        rt.add_address("left", "fd00:200::1/64".parse().unwrap())
            .unwrap();
        // The peer end went to the other namespace: not here any more.
        assert!(matches!(
            rt.set_up("right"),
            Err(LinkError::NoSuchLink { .. })
        ));
    });
    in_ns(&b, || {
        let mut rt = Rtnl::new().unwrap();
        rt.set_up("right").unwrap();
        rt.add_address("right", "10.200.0.2/30".parse().unwrap())
            .unwrap();
        rt.add_address("right", "fd00:200::2/64".parse().unwrap())
            .unwrap();
        // A route through the link to an address on no link at all.
        rt.add_route_via_link("198.51.100.0/24".parse().unwrap(), "right")
            .unwrap();
        rt.add_route_via_link("::/0".parse().unwrap(), "right")
            .unwrap();
    });
    for (server, client) in [
        ("10.200.0.2:7000", "10.200.0.1"),
        ("[fd00:200::2]:7000", "fd00:200::1"),
    ] {
        let server: SocketAddr = server.parse().unwrap();
        let listener = in_ns(&b, move || TcpListener::bind(server).unwrap());
        let accept = std::thread::spawn(move || {
            let (mut s, peer) = listener.accept().unwrap();
            s.write_all(b"over the veth").unwrap();
            peer.ip()
        });
        let got = in_ns(&a, move || {
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(3)).unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        });
        assert_eq!(got, "over the veth");
        assert_eq!(accept.join().unwrap().to_string(), client);
    }
}

#[test]
fn refusals_name_the_operation_and_change_nothing() {
    if !proxyctl_testkit::require_root("refusals_name_the_operation") {
        return;
    }
    let ns = new_netns();
    in_ns(&ns, || {
        let mut rt = Rtnl::new().unwrap();
        rt.add_veth("one", "two", None).unwrap();
        let err = rt.add_veth("one", "three", None).unwrap_err();
        assert!(matches!(err, LinkError::Kernel { .. }), "{err}");
        assert!(
            err.to_string().contains("adding veth pair one/three"),
            "{err}"
        );
        // The refused request made nothing.
        assert!(matches!(
            rt.set_up("three"),
            Err(LinkError::NoSuchLink { .. })
        ));
        rt.add_address("one", "10.1.0.1/24".parse().unwrap())
            .unwrap();
        let dup = rt
            .add_address("one", "10.1.0.1/24".parse().unwrap())
            .unwrap_err();
        assert!(dup.to_string().contains("File exists"), "{dup}");
        // Routes, a table of its own, source rules; deletion.
        let far: std::net::IpAddr = "203.0.113.9".parse().unwrap();
        assert!(!rt.has_route(far).unwrap());
        rt.set_up("one").unwrap();
        rt.add_route_via_link_in("0.0.0.0/0".parse().unwrap(), "one", 2018)
            .unwrap();
        assert!(
            !rt.has_route(far).unwrap(),
            "a route in table 2018 alone is not used"
        );
        let from: std::net::IpAddr = "10.1.0.1".parse().unwrap();
        rt.add_source_rule(from, 2018, 1400).unwrap();
        assert!(
            rt.add_source_rule(from, 2018, 1400).is_err(),
            "a duplicate rule is refused"
        );
        rt.delete_source_rule(from, 2018, 1400).unwrap();
        assert!(rt.delete_source_rule(from, 2018, 1400).is_err());
        rt.add_route_via_link("203.0.113.0/24".parse().unwrap(), "one")
            .unwrap();
        assert!(rt.has_route(far).unwrap());
        rt.delete_link("one").unwrap();
        assert!(
            matches!(rt.set_up("two"), Err(LinkError::NoSuchLink { .. })),
            "the pair went whole"
        );
        assert!(!rt.has_route(far).unwrap(), "its routes went with it");
        let missing = rt.set_up("nope").unwrap_err();
        assert!(
            missing.to_string().contains("no link named \"nope\""),
            "{missing}"
        );
    });
}
