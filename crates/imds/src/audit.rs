//! The audit log: one JSON object per line for every request decision and
//! every refused connection (pod, path, method, decision, status, latency).

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub struct Audit {
    sink: Option<Mutex<Box<dyn Write + Send>>>,
}

#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub ts: f64,
    /// `namespace/name`, or `-` when the caller is unknown.
    pub pod: &'a str,
    /// Which kind of listener: `pod` (inside the pod netns) or `source-ip`.
    pub listener: &'a str,
    pub peer: String,
    pub method: &'a str,
    pub path: &'a str,
    pub decision: &'a str,
    pub status: u16,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn now_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Audit {
    pub fn discard() -> Self {
        Self { sink: None }
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
        Self {
            sink: Some(Mutex::new(writer)),
        }
    }

    pub fn record(&self, rec: &AuditRecord<'_>) {
        let Some(sink) = &self.sink else { return };
        let Ok(mut line) = serde_json::to_vec(rec) else {
            return;
        };
        line.push(b'\n');
        let mut sink = sink.lock().expect("audit sink poisoned");
        // One write per line so concurrent readers never see half a record.
        if let Err(e) = sink.write_all(&line).and_then(|_| sink.flush()) {
            tracing::warn!("audit log write failed: {e}");
        }
    }
}
