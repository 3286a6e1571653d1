//! The audit log: one JSON object per line for every request decision and
//! every refused connection (pod, path, method, decision, status, latency).
//!
//! Lines are handed to a writer thread over a bounded channel, so a slow
//! disk never stalls a request; if the channel is full the line is counted
//! as dropped (`dropped()`), never waited for.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{SystemTime, UNIX_EPOCH};

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
