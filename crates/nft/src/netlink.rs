//! Raw netlink: a socket, a message/attribute builder and a parser.
//!
//! Owns the byte layout shared by nf_tables (NETLINK_NETFILTER) and
//! rtnetlink (NETLINK_ROUTE) messages: `nlmsghdr`, 4-byte aligned `nlattr`s,
//! nested attributes, acks and errors. Nothing here knows about nftables.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
/// `NLMSGERR_ATTR_MSG`: the kernel's extended-ack text.
const NLMSGERR_ATTR_MSG: u16 = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A growing buffer of netlink messages (one batch or one request).
#[derive(Debug, Default)]
pub struct MsgBuf {
    pub buf: Vec<u8>,
    /// (sequence number, start offset) of every message, to name failures.
    pub messages: Vec<(u32, usize)>,
}

impl MsgBuf {
    /// Starts a message: header plus the fixed family header `fixed`.
    pub fn begin(&mut self, ty: u16, flags: u16, seq: u32, fixed: &[u8]) -> usize {
        let start = self.buf.len();
        self.messages.push((seq, start));
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(fixed);
        self.pad();
        start
    }

    pub fn end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        let aligned = align4(self.buf.len());
        self.buf.resize(aligned, 0);
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn attr_str(&mut self, ty: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(ty, &data);
    }

    pub fn attr_be32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    pub fn attr_ne32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    pub fn nest_begin(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub fn nest_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Bytes since `start`: lets callers keep nested attributes under the
    /// 64 KiB an `nlattr` length can describe.
    pub fn since(&self, start: usize) -> usize {
        self.buf.len() - start
    }
}

/// One received message: type, flags, sequence and payload (after nlmsghdr).
#[derive(Debug, Clone)]
pub struct Message {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
}

impl Message {
    /// For NLMSG_ERROR: the errno (0 = ack) and the kernel's message, if any.
    pub fn error(&self) -> Option<(i32, Option<String>)> {
        if self.ty != NLMSG_ERROR || self.payload.len() < 4 {
            return None;
        }
        let code = i32::from_ne_bytes(self.payload[0..4].try_into().ok()?);
        // With NETLINK_CAP_ACK the original message is reduced to its
        // header, so extended-ack attributes follow at a fixed offset.
        let text = self
            .payload
            .get(4 + NLMSG_HDRLEN..)
            .and_then(|tlvs| {
                Attrs::new(tlvs)
                    .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
                    .map(|(_, v)| cstr(v))
            })
            .filter(|s| !s.is_empty());
        Some((-code, text))
    }
}

/// Splits a receive buffer into messages.
pub fn parse_messages(mut data: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            break;
        }
        out.push(Message {
            ty: u16::from_ne_bytes(data[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(data[6..8].try_into().unwrap()),
            seq: u32::from_ne_bytes(data[8..12].try_into().unwrap()),
            payload: data[NLMSG_HDRLEN..len].to_vec(),
        });
        data = &data[align4(len).min(data.len())..];
    }
    out
}

/// Iterates `(type, payload)` over a run of attributes; the nested flag is
/// masked off the type.
pub struct Attrs<'a> {
    data: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes(self.data[0..2].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(self.data[2..4].try_into().unwrap()) & NLA_TYPE_MASK;
        if len < 4 || len > self.data.len() {
            self.data = &[];
            return None;
        }
        let value = &self.data[4..len];
        self.data = &self.data[align4(len).min(self.data.len())..];
        Some((ty, value))
    }
}

/// The first attribute of type `ty`.
pub fn attr(data: &[u8], ty: u16) -> Option<&[u8]> {
    Attrs::new(data).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

pub fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(0..4)?.try_into().ok()?))
}

pub fn cstr(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// A netlink socket of one protocol, bound in the network namespace of the
/// thread that created it (it stays there whichever thread uses it later).
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let sock = Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };
        // SAFETY: sockaddr_nl is plain data; zeroed means "kernel picks pid".
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl of the given length.
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // Acks carry only the failing message's header, so a 60 KiB element
        // message that fails does not overflow the receive buffer; the
        // kernel's reason comes as an extended-ack string.
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)?;
        // Room for big dumps and many acks; *FORCE needs CAP_NET_ADMIN,
        // which every caller of this crate has, else fall back quietly.
        let _ = sock
            .setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)
            .or_else(|_| sock.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20));
        Ok(sock)
    }

    fn setsockopt(&self, level: libc::c_int, name: libc::c_int, value: i32) -> io::Result<()> {
        // SAFETY: value is an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                &value as *const i32 as *const libc::c_void,
                4,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sends the whole buffer in one datagram: an nf_tables batch must
    /// arrive in one piece to be one transaction.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        let want = (buf.len() + 64 * 1024).min(i32::MAX as usize) as i32;
        let _ = self
            .setsockopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want)
            .or_else(|_| self.setsockopt(libc::SOL_SOCKET, libc::SO_SNDBUF, want));
        // SAFETY: zeroed sockaddr_nl = the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buf and addr are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram (possibly several messages). `None` when
    /// `nonblocking` and nothing is queued.
    pub fn recv(&self, nonblocking: bool) -> io::Result<Option<Vec<Message>>> {
        let mut buf = vec![0u8; 1 << 20];
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    flags,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if nonblocking => return Ok(None),
                    _ => return Err(err),
                }
            }
            return Ok(Some(parse_messages(&buf[..n as usize])));
        }
    }

    /// Sends a dump request and collects every reply message until DONE.
    pub fn dump(&self, request: &MsgBuf) -> io::Result<Vec<Message>> {
        self.send(&request.buf)?;
        let mut out = Vec::new();
        loop {
            let Some(messages) = self.recv(false)? else {
                continue;
            };
            for m in messages {
                match m.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let (errno, text) = m.error().unwrap_or((libc::EIO, None));
                        if errno == 0 {
                            continue;
                        }
                        return Err(errno_error(errno, text));
                    }
                    _ => out.push(m),
                }
            }
        }
    }

    /// Sends a request with NLM_F_ACK set and waits for its ack.
    pub fn request(&self, request: &MsgBuf) -> io::Result<Vec<Message>> {
        self.send(&request.buf)?;
        let mut out = Vec::new();
        loop {
            let Some(messages) = self.recv(false)? else {
                continue;
            };
            for m in messages {
                if let Some((errno, text)) = m.error() {
                    if errno == 0 {
                        return Ok(out);
                    }
                    return Err(errno_error(errno, text));
                }
                out.push(m);
            }
        }
    }
}

/// An error the kernel answered, with its extended-ack text if any.
#[derive(Debug)]
pub struct KernelError {
    pub errno: i32,
    pub text: Option<String>,
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))?;
        if let Some(t) = &self.text {
            write!(f, " ({t})")?;
        }
        Ok(())
    }
}

impl std::error::Error for KernelError {}

pub fn errno_error(errno: i32, text: Option<String>) -> io::Error {
    let kind = io::Error::from_raw_os_error(errno).kind();
    io::Error::new(kind, KernelError { errno, text })
}

/// The errno behind an error from this module.
pub fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
        .or_else(|| e.get_ref()?.downcast_ref::<KernelError>().map(|k| k.errno))
}
