//! Guards shared by every listener of proxy-server, proxy-agent and
//! imds-proxy, so a flood of connections costs a bounded number of file
//! descriptors and CPU:
//! - [`ConnLimit`]: a cap on connections open at once per listener; one
//!   past it is closed as soon as it is accepted (the caller counts it).
//! - [`AcceptBackoff`]: what an accept loop does when accept fails. At the
//!   file-descriptor limit (EMFILE, ENFILE) accept fails at once, forever,
//!   until a descriptor is freed: retrying without a pause burns a core and
//!   logs a line per try. The loop sleeps, doubling up to a second, and logs
//!   one line per ten seconds with the count of failures in between.
//!   Loops that fail together (one listener per pod: at the descriptor limit
//!   they all fail at once) can share that one line through a [`LogGate`].
//! - [`raise_nofile_limit`]: the soft RLIMIT_NOFILE raised to the hard
//!   limit at start-up, as Go's runtime does for upstream's binaries (a 1024
//!   soft limit is a thousand idle connections away from refusing every
//!   tunnel); [`cap_within_nofile_limit`] keeps a default connection cap
//!   below it.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// At most this many connections of one listener are open at once.
#[derive(Clone, Debug)]
pub struct ConnLimit {
    sem: Arc<Semaphore>,
    max: usize,
}

/// Held for as long as one connection is open.
pub type ConnPermit = OwnedSemaphorePermit;

impl ConnLimit {
    pub fn new(max: usize) -> Self {
        ConnLimit {
            sem: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A permit for one more connection, or None at the cap.
    pub fn try_acquire(&self) -> Option<ConnPermit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    /// Connections open now.
    pub fn in_use(&self) -> usize {
        self.max - self.sem.available_permits()
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// The pause after the first failed accept, and the longest pause.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one log line per listener in this time.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The state of one accept loop's failures.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    pause: Duration,
    log: LogGate,
}

/// The rate limit of accept-failure log lines, shared by the accept loops
/// that hold clones of it: one line per ten seconds among them all.
#[derive(Debug, Clone, Default)]
pub struct LogGate(Arc<Mutex<GateState>>);

#[derive(Debug, Default)]
struct GateState {
    last_log: Option<Instant>,
    unlogged: u64,
}

impl LogGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one failure; Some(failures since the last line) when a line
    /// is due now.
    fn due(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        state.unlogged += 1;
        let now = Instant::now();
        if state
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            state.last_log = Some(now);
            Some(std::mem::take(&mut state.unlogged))
        } else {
            None
        }
    }
}

/// Accept errors that come from running out of descriptors or memory:
/// they last until something is freed, so retrying at once is futile.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl AcceptBackoff {
    /// `what` names the listener in the log line.
    pub fn new(what: &'static str) -> Self {
        Self::with_gate(what, LogGate::new())
    }

    /// As [`new`](Self::new), logging through `gate`, which other loops
    /// share.
    pub fn with_gate(what: &'static str, gate: LogGate) -> Self {
        AcceptBackoff {
            what,
            pause: Duration::ZERO,
            log: gate,
        }
    }

    /// An accept succeeded: the next failure starts over with a short pause.
    pub fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// An accept failed: logs (rate-limited) and returns how long to pause
    /// before the next accept (zero for a failure of one connection, such
    /// as ECONNABORTED).
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        if let Some(failures) = self.log.due() {
            tracing::warn!(
                listener = self.what,
                error = %e,
                failures,
                "accept failed (further failures are logged at most every 10 s)"
            );
        }
        if !is_exhaustion(e) {
            return Duration::ZERO;
        }
        self.pause = (self.pause * 2).clamp(FIRST_PAUSE, MAX_PAUSE);
        self.pause
    }

    /// [`failed`](Self::failed), then the pause.
    pub async fn pause_after(&mut self, e: &io::Error) {
        let pause = self.failed(e);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Raises the soft limit on open files to the hard limit. Returns the
/// (old, new) soft limits.
#[cfg(unix)]
// rlim_t is u64 on Linux but not on every unix.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur as u64;
    if lim.rlim_cur >= lim.rlim_max {
        return Ok((old, old));
    }
    lim.rlim_cur = lim.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((old, lim.rlim_cur as u64))
}

/// `want`, lowered to three quarters of the soft open-file limit: a
/// connection cap above what the process can open protects nothing, and the
/// last quarter stays for the other listeners and the outgoing sockets.
#[cfg(unix)]
pub fn cap_within_nofile_limit(want: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return want;
    }
    let soft = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    want.min(soft / 4 * 3).max(1)
}

#[cfg(not(unix))]
pub fn cap_within_nofile_limit(want: usize) -> usize {
    want
}

#[cfg(not(unix))]
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    Ok((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_limit_counts_and_refuses_past_the_cap() {
        let l = ConnLimit::new(2);
        let a = l.try_acquire().unwrap();
        let _b = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.in_use(), 2);
        drop(a);
        assert_eq!(l.in_use(), 1);
        assert!(l.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn exhaustion_pauses_grow_to_a_second_and_reset_on_success() {
        let mut b = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<_> = (0..12).map(|_| b.failed(&emfile)).collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(*pauses.last().unwrap(), MAX_PAUSE);
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(b.failed(&aborted), Duration::ZERO);
        b.succeeded();
        assert_eq!(b.failed(&emfile), FIRST_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn loops_sharing_a_gate_log_one_line_per_ten_seconds_among_them() {
        let gate = LogGate::new();
        let mut a = AcceptBackoff::with_gate("pod", gate.clone());
        let mut b = AcceptBackoff::with_gate("pod", gate.clone());
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        // The first failure logs; the next ones, of either loop, wait.
        assert_eq!(gate.due(), Some(1));
        a.failed(&emfile);
        b.failed(&emfile);
        a.failed(&emfile);
        tokio::time::advance(LOG_EVERY).await;
        // Both loops' three failures and this one come in one line.
        assert_eq!(gate.due(), Some(4));
        // Each loop still paces its own retries.
        assert_eq!(b.failed(&emfile), FIRST_PAUSE * 2);
    }

    #[test]
    fn caps_stay_within_three_quarters_of_the_fd_limit() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        let soft = lim.rlim_cur as usize;
        assert_eq!(cap_within_nofile_limit(10), 10.min(soft / 4 * 3));
        assert_eq!(cap_within_nofile_limit(usize::MAX), soft / 4 * 3);
    }

    #[test]
    fn the_soft_fd_limit_is_raised_to_the_hard_one() {
        let (_, new) = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(new, lim.rlim_cur);
    }
}
