//! The audit log: one JSON object per line for every request decision and
//! every refused connection (pod, path, method, decision, status, latency).
//!
//! Lines are handed to a writer thread over a bounded channel, so a slow
//! disk never stalls a request; if the channel is full the line is counted
//! as dropped (`dropped()`), never waited for.
//!
//! A pod that sends refused requests as fast as it can would otherwise
//! write a line per request (hundreds of MB a minute): lines of refusals
//! pass through a per-pod [`Sampler`], and past its rate they are dropped,
//! counted, and summed up in one line now and then.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

const QUEUE: usize = 65_536;

enum Msg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

pub struct Audit {
    tx: Option<SyncSender<Msg>>,
    dropped: Arc<AtomicU64>,
}

#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub ts: f64,
    /// `namespace/name`, or `-` when the caller is unknown.
    pub pod: &'a str,
    /// Which kind of listener: `pod` (inside the pod netns) or `source-ip`.
    pub listener: &'a str,
    pub peer: std::net::SocketAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub decision: &'a str,
    pub status: u16,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cloud identity a credential request was answered for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a str>,
    /// On a summary line (decision `audit_lines_dropped`): lines of this
    /// pod dropped since its previous summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
}

/// At most one summary line per pod in this time while its lines are
/// being dropped.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// A token bucket of audit lines for one pod's refusals.
#[derive(Debug)]
pub struct Sampler {
    rate_per_sec: f64,
    burst: f64,
    state: Mutex<SamplerState>,
}

#[derive(Debug)]
struct SamplerState {
    tokens: f64,
    at: Instant,
    /// Dropped since the last summary.
    dropped: u64,
    last_summary: Option<Instant>,
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampled {
    /// The line is written (else it is dropped and must be counted).
    pub write: bool,
    /// A summary of this many dropped lines is due before it.
    pub summary: Option<u64>,
}

impl Sampler {
    /// `rate_per_sec` of 0: every line is written.
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate_per_sec,
            burst,
            state: Mutex::new(SamplerState {
                tokens: burst,
                at: Instant::now(),
                dropped: 0,
                last_summary: None,
            }),
        }
    }

    /// Decides the next line. A summary is due with the first drop, then
    /// with the next line (written or dropped) at least [`SUMMARY_EVERY`]
    /// after the last summary while there are drops to report; so drops
    /// are reported within about that time while lines keep coming, and
    /// the count of a flood that stopped comes with the pod's next line.
    pub fn admit(&self) -> Sampled {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Sampled {
        if self.rate_per_sec <= 0.0 {
            return Sampled {
                write: true,
                summary: None,
            };
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let refill = now.saturating_duration_since(st.at).as_secs_f64() * self.rate_per_sec;
        st.tokens = (st.tokens + refill).min(self.burst);
        st.at = now;
        let write = st.tokens >= 1.0;
        if write {
            st.tokens -= 1.0;
        } else {
            st.dropped += 1;
        }
        let summary_due = st.dropped > 0
            && st
                .last_summary
                .is_none_or(|t| now.saturating_duration_since(t) >= SUMMARY_EVERY);
        let summary = summary_due.then(|| {
            st.last_summary = Some(now);
            std::mem::take(&mut st.dropped)
        });
        Sampled { write, summary }
    }
}

pub fn now_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn writer_loop(rx: Receiver<Msg>, mut out: Box<dyn Write + Send>) {
    let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
    let mut pending = Vec::new();
    while let Ok(first) = rx.recv() {
        pending.push(first);
        // Take whatever else is queued, then write it in one go.
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        for msg in pending.drain(..) {
            match msg {
                Msg::Line(line) => {
                    if let Err(e) = buf.write_all(&line) {
                        tracing::warn!("audit log write failed: {e}");
                    }
                }
                Msg::Flush(ack) => {
                    let _ = buf.flush();
                    let _ = ack.send(());
                }
            }
        }
        if let Err(e) = buf.flush() {
            tracing::warn!("audit log write failed: {e}");
        }
        // Let lines gather: under load this turns one wake-up per request
        // into one per batch, at the cost of lines landing up to 2 ms late.
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

impl Audit {
    pub fn discard() -> Self {
        Self {
            tx: None,
            dropped: Arc::default(),
        }
    }

    pub fn stdout() -> Self {
        Self::to_writer(Box::new(std::io::stdout()))
    }

    /// Appends to `path` (created if missing).
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self::to_writer(Box::new(file)))
    }

    pub fn to_writer(writer: Box<dyn Write + Send>) -> Self {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("imds-audit".into())
            .spawn(move || writer_loop(rx, writer))
            .expect("spawning the audit writer");
        Self {
            tx: Some(tx),
            dropped: Arc::default(),
        }
    }

    pub fn record(&self, rec: &AuditRecord<'_>) {
        let Some(tx) = &self.tx else { return };
        // Sized for a typical line, so serialising does not regrow it.
        let mut line = Vec::with_capacity(320);
        if serde_json::to_writer(&mut line, rec).is_err() {
            return;
        }
        line.push(b'\n');
        let sent = tx.try_send(Msg::Line(line));
        if let Err(TrySendError::Full(_)) = sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines lost because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line recorded so far is written.
    pub fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (ack_tx, ack_rx) = sync_channel(1);
        let sent = tx.send(Msg::Flush(ack_tx));
        if sent.is_ok() {
            let _ = ack_rx.recv();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_rate_lines_are_dropped_and_summed_up() {
        let t0 = Instant::now();
        let s = Sampler::new(1.0, 2);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let w = |write, summary| Sampled { write, summary };
        assert_eq!(s.admit_at(at(0)), w(true, None));
        assert_eq!(s.admit_at(at(0)), w(true, None));
        // The first drop is announced at once, with a count of one.
        assert_eq!(s.admit_at(at(0)), w(false, Some(1)));
        assert_eq!(s.admit_at(at(1)), w(false, None));
        assert_eq!(s.admit_at(at(2)), w(false, None));
        // A token later the line is written; the next summary waits for
        // SUMMARY_EVERY, whatever comes meanwhile.
        assert_eq!(s.admit_at(at(1002)), w(true, None));
        assert_eq!(s.admit_at(at(1003)), w(false, None));
        let later = SUMMARY_EVERY.as_millis() as u64;
        // The flood stopped: its count comes with the next line, which
        // finds the bucket full again (capped at the burst of 2).
        assert_eq!(s.admit_at(at(later)), w(true, Some(3)));
        assert_eq!(s.admit_at(at(later)), w(true, None));
        assert_eq!(s.admit_at(at(later)), w(false, None));
        assert_eq!(s.admit_at(at(later + 5_000)), w(true, None));
        assert_eq!(s.admit_at(at(2 * later)), w(true, Some(1)));
        // Rate 0: no sampling.
        let all = Sampler::new(0.0, 1);
        assert!((0..1000).all(|_| all.admit_at(t0).write));
    }
}
