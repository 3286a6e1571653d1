//! Sockets for proving redirection with real traffic: proxy listeners that
//! recover the original destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST
//! for redirected TCP, IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR for tproxied
//! UDP), per-thread identities for clients, and anonymous namespaces.
//!
//! Used by `verify`, the demo and the tests; every function acts in the
//! network namespace of the calling thread.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int option of the right size.
    check(unsafe { libc::setsockopt(fd, level, name, &v as *const _ as *const libc::c_void, 4) })
        .map(|_| ())
}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn addr_of(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            )))
        }
        _ => None,
    }
}

/// A socket of `ty` for `addr`'s family, with `opts` set before bind.
fn bound_socket(
    addr: SocketAddr,
    ty: libc::c_int,
    opts: &[(libc::c_int, libc::c_int)],
) -> io::Result<RawFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) })?;
    let close = |e| {
        // SAFETY: fd is ours and not yet handed out.
        unsafe { libc::close(fd) };
        e
    };
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(close)?;
    if addr.is_ipv6() {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1).map_err(close)?;
    }
    for (level, name) in opts {
        setsockopt_int(fd, *level, *name, 1).map_err(close)?;
    }
    let (sa, len) = sockaddr_of(&addr);
    // SAFETY: sa is a valid sockaddr of len bytes.
    check(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) })
        .map_err(close)?;
    Ok(fd)
}

/// A TCP listener (v6 listeners are v6-only, so v4 and v6 can be told apart).
pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = bound_socket(addr, libc::SOCK_STREAM, &[])?;
    // SAFETY: fd is a bound socket we own.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    check(unsafe { libc::listen(fd, 64) })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A UDP socket that receives tproxied datagrams and their original
/// destination: IP(V6)_TRANSPARENT and IP(V6)_RECVORIGDSTADDR.
pub fn udp_tproxy_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let opts: &[(libc::c_int, libc::c_int)] = if addr.is_ipv4() {
        &[
            (libc::SOL_IP, libc::IP_TRANSPARENT),
            (libc::SOL_IP, libc::IP_RECVORIGDSTADDR),
        ]
    } else {
        &[
            (libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
            (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR),
        ]
    };
    let fd = bound_socket(addr, libc::SOCK_DGRAM, opts)?;
    // SAFETY: fd is a bound socket we own.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A plain UDP socket that also reports each datagram's destination.
pub fn udp_server(addr: SocketAddr) -> io::Result<UdpSocket> {
    let opt = if addr.is_ipv4() {
        (libc::SOL_IP, libc::IP_RECVORIGDSTADDR)
    } else {
        (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR)
    };
    let fd = bound_socket(addr, libc::SOCK_DGRAM, &[opt])?;
    // SAFETY: fd is a bound socket we own.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// The destination a redirected TCP connection was originally sent to.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    // SAFETY: sockaddr_storage is plain data.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let (level, name) = if local.is_ipv4() {
        (libc::SOL_IP, libc::SO_ORIGINAL_DST)
    } else {
        (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)
    };
    // SAFETY: storage is valid for len bytes.
    check(unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            name,
            &mut storage as *mut _ as *mut libc::c_void,
            &mut len,
        )
    })?;
    addr_of(&storage).ok_or_else(|| io::Error::other("SO_ORIGINAL_DST: unknown address family"))
}

/// One datagram: payload, sender, and the destination it was sent to.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub payload: Vec<u8>,
    pub peer: SocketAddr,
    pub original_dst: Option<SocketAddr>,
}

/// Receives one datagram if one is queued (the socket is non-blocking).
pub fn recv_datagram(sock: &UdpSocket) -> io::Result<Option<Datagram>> {
    let mut buf = [0u8; 2048];
    let mut cbuf = [0u64; 64];
    // SAFETY: sockaddr_storage/msghdr are plain data; pointers stay valid
    // for the duration of the call.
    let mut peer: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = &mut peer as *mut _ as *mut libc::c_void;
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = size_of::<[u64; 64]>();
    // SAFETY: msg points at live buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut original_dst = None;
    // SAFETY: walking the control buffer the kernel filled, with the
    // kernel's own CMSG macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let is_orig = (c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_ORIGDSTADDR)
                || (c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_ORIGDSTADDR);
            if is_orig {
                let mut storage: libc::sockaddr_storage = zeroed();
                let len = (c.cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    .min(size_of::<libc::sockaddr_storage>());
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cmsg),
                    &mut storage as *mut _ as *mut u8,
                    len,
                );
                original_dst = addr_of(&storage);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Some(Datagram {
        payload: buf[..n as usize].to_vec(),
        peer: addr_of(&peer).ok_or_else(|| io::Error::other("datagram without sender"))?,
        original_dst,
    }))
}

/// Sets the calling thread's filesystem uid and gid: new sockets take
/// their owner (`meta skuid`/`skgid`) from them. Per thread: raw syscalls,
/// not glibc's process-wide set*id broadcast.
pub fn set_thread_fs_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setfsuid/setfsgid only change this thread's credentials.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
        // Both return the previous value; reading it back proves the change.
        let now_uid = libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32;
        let now_gid = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
        if now_uid != uid || now_gid != gid {
            return Err(io::Error::other(format!(
                "setfsuid/setfsgid to {uid}/{gid} did not take (now {now_uid}/{now_gid})"
            )));
        }
    }
    Ok(())
}

/// Connects from `source` (port 0 = any) to `dest` within `timeout`; the
/// client's source port is known before connecting.
pub fn tcp_connect(
    source: SocketAddr,
    dest: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fd = bound_socket(source, libc::SOCK_STREAM, &[])?;
    // SAFETY: fd is a bound socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    stream.set_nonblocking(true)?;
    let (sa, len) = sockaddr_of(&dest);
    // SAFETY: sa is a valid sockaddr.
    let rc = unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: pfd is valid.
        let n = check(unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) })?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A UDP socket bound to `source`, for sending probes.
pub fn udp_client(source: SocketAddr) -> io::Result<UdpSocket> {
    let fd = bound_socket(source, libc::SOCK_DGRAM, &[])?;
    // SAFETY: fd is a bound socket we own.
    Ok(unsafe { UdpSocket::from_raw_fd(fd) })
}

/// Accepts one connection within `timeout` (the listener is non-blocking).
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> io::Result<Option<TcpStream>> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Receives one datagram within `timeout`.
pub fn recv_within(sock: &UdpSocket, timeout: Duration) -> io::Result<Option<Datagram>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(d) = recv_datagram(sock)? {
            return Ok(Some(d));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes a token and reads it back: proves a TCP path carries data.
pub fn echo_once(stream: &mut TcpStream, token: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(token)?;
    let mut buf = vec![0u8; token.len()];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

/// A fresh anonymous network namespace, alive as long as the returned file
/// is open (and no longer: nothing to clean up if the process dies).
/// Loopback is brought up.
pub fn anonymous_netns() -> io::Result<File> {
    std::thread::spawn(|| -> io::Result<File> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let file = File::open("/proc/thread-self/ns/net")?;
        set_lo_up()?;
        Ok(file)
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

fn set_lo_up() -> io::Result<()> {
    // SAFETY: ifreq ioctl on a throw-away socket.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let mut ifr: libc::ifreq = zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r >= 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut ifr);
        }
        libc::close(fd);
    }
    Ok(())
}

/// Whether `ip` is an IPv4 address (for choosing wildcard binds).
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}
