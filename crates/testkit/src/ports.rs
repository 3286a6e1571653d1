//! Free TCP ports for servers that tests start as separate processes.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u16 = 20000;
const SPAN: u16 = 12000;

/// A port no one listens on, for a process the test starts (which binds it
/// later, so bind(0) cannot be used).
///
/// Ports come from 20000-31999, below the kernel's ephemeral range
/// (32768-60999): a port the kernel picks for bind(0) can be given to any
/// outgoing connection of a parallel test before the process under test
/// binds it. Within one process a counter never hands a port out twice.
/// Across test processes running at once each process starts at an offset
/// derived from its pid, and on Linux claims the port system-wide with an
/// abstract unix socket named after it, held until the process exits (the
/// kernel drops it then: nothing is left behind). A port is handed out only
/// when it is claimed and the wildcard address can bind it.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(997) % u32::from(SPAN);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < u32::from(SPAN),
            "free_port: no free port left below the ephemeral range"
        );
        let port = FIRST + ((start + n) % u32::from(SPAN)) as u16;
        // Binding the wildcard address fails if any local address holds the port.
        if claim(port) && TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

/// The first of `n` consecutive free ports (claimed like [`free_port`]),
/// for a process that binds a run of ports from one base.
pub fn free_consecutive_ports(n: u16) -> u16 {
    loop {
        let base = free_port();
        if base.checked_add(n).is_none_or(|end| end > FIRST + SPAN) {
            continue;
        }
        if (1..n).all(|i| claim(base + i) && TcpListener::bind(("0.0.0.0", base + i)).is_ok()) {
            return base;
        }
    }
}

/// Claims held for the life of the process.
#[cfg(target_os = "linux")]
static CLAIMS: std::sync::Mutex<Vec<std::os::unix::net::UnixListener>> =
    std::sync::Mutex::new(Vec::new());

/// False when another test process holds `port`.
#[cfg(target_os = "linux")]
fn claim(port: u16) -> bool {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    let name = format!("proxyctl-testkit-port-{port}");
    let Ok(addr) = SocketAddr::from_abstract_name(name.as_bytes()) else {
        return true;
    };
    match UnixListener::bind_addr(&addr) {
        Ok(l) => {
            CLAIMS.lock().unwrap().push(l);
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => false,
        // No claim possible here (unusual sandbox): the bind check remains.
        Err(_) => true,
    }
}

#[cfg(not(target_os = "linux"))]
fn claim(_port: u16) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_ports_are_free_and_not_handed_out_again() {
        let base = free_consecutive_ports(3);
        for p in base..base + 3 {
            assert!(TcpListener::bind(("127.0.0.1", p)).is_ok(), "{p}");
        }
        let later: Vec<u16> = (0..10).map(|_| free_port()).collect();
        assert!(
            later.iter().all(|p| !(base..base + 3).contains(p)),
            "{later:?}"
        );
    }

    #[test]
    fn ports_are_below_the_ephemeral_range_distinct_and_claimed() {
        let ports: Vec<u16> = (0..20).map(|_| free_port()).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "{ports:?}");
        for &p in &ports {
            assert!((FIRST..FIRST + SPAN).contains(&p), "{p}");
            assert!(TcpListener::bind(("127.0.0.1", p)).is_ok(), "{p} in use");
            // Another process could not claim it now.
            #[cfg(target_os = "linux")]
            assert!(!claim(p), "{p} not claimed");
        }
    }
}
