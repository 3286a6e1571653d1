//! Prometheus metrics of the watcher, rendered in the text exposition format.
//! Hand-written because it is a few counters and two histograms: a metrics
//! crate would add more code than it saves here.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use proxyctl_cri::{FoundBy, WatcherCounters};
use std::time::Duration;

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub pods_seen: AtomicU64,
    pub pods_matched: AtomicU64,
    pub applied: AtomicU64,
    pub unchanged: AtomicU64,
    pub failed: AtomicU64,
    pub runtime_restarts: AtomicU64,
    pub runtime_up: AtomicBool,
    /// Whether containerd's event stream drives the lists right now.
    pub events_up: AtomicBool,
    /// The `--events` mode, for the info metric.
    pub events_mode: OnceLock<String>,
    found_by_event: AtomicU64,
    found_by_poll: AtomicU64,
    found_by_relist: AtomicU64,
    watcher: OnceLock<Arc<WatcherCounters>>,
    apply_seconds: Mutex<Histogram>,
    start_to_enforced_seconds: Mutex<Histogram>,
}

impl Metrics {
    /// Reads the watcher's own counters (events, lists) at render time.
    pub fn attach_watcher(&self, counters: Arc<WatcherCounters>) {
        let _ = self.watcher.set(counters);
    }

    pub fn found(&self, by: FoundBy) {
        match by {
            FoundBy::Event => &self.found_by_event,
            FoundBy::Poll => &self.found_by_poll,
            FoundBy::Relist => &self.found_by_relist,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_apply(&self, d: Duration) {
        self.apply_seconds.lock().unwrap().observe(d.as_secs_f64());
    }

    pub fn observe_start_to_enforced(&self, d: Duration) {
        self.start_to_enforced_seconds
            .lock()
            .unwrap()
            .observe(d.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 6] = [
            (
                "proxyctl_watch_pods_seen_total",
                "Ready pods observed (re-lists count again).",
                &self.pods_seen,
            ),
            (
                "proxyctl_watch_pods_matched_total",
                "Ready pods whose labels matched a selector.",
                &self.pods_matched,
            ),
            (
                "proxyctl_watch_policy_applied_total",
                "Pods whose policies were installed or updated.",
                &self.applied,
            ),
            (
                "proxyctl_watch_policy_unchanged_total",
                "Matching pods that already carried their policies.",
                &self.unchanged,
            ),
            (
                "proxyctl_watch_policy_failed_total",
                "Pods whose policies could not be installed.",
                &self.failed,
            ),
            (
                "proxyctl_watch_runtime_restarts_total",
                "Times the runtime came back after being unreachable.",
                &self.runtime_restarts,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP proxyctl_watch_pods_found_total Ready pods found, by what triggered the list that found them.\n# TYPE proxyctl_watch_pods_found_total counter"
        );
        for (by, v) in [
            (FoundBy::Event, &self.found_by_event),
            (FoundBy::Poll, &self.found_by_poll),
            (FoundBy::Relist, &self.found_by_relist),
        ] {
            let _ = writeln!(
                out,
                "proxyctl_watch_pods_found_total{{by=\"{}\"}} {}",
                by.as_str(),
                v.load(Ordering::Relaxed)
            );
        }
        let none = WatcherCounters::default();
        let w = self.watcher.get().map_or(&none, |w| w.as_ref());
        for (name, help, v) in [
            (
                "proxyctl_watch_events_received_total",
                "Task-start events received from containerd's event service.",
                &w.events_received,
            ),
            (
                "proxyctl_watch_event_subscriptions_total",
                "Times containerd's event service was (re)subscribed.",
                &w.subscriptions,
            ),
            (
                "proxyctl_watch_runtime_lists_total",
                "ListPodSandbox calls, whatever triggered them.",
                &w.lists,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let events_up = u8::from(self.events_up.load(Ordering::Relaxed));
        let mode = self.events_mode.get().map_or("poll", String::as_str);
        let _ = writeln!(
            out,
            "# HELP proxyctl_watch_event_stream_up Whether containerd's event stream drives the lists (else the poll timer does).\n# TYPE proxyctl_watch_event_stream_up gauge\nproxyctl_watch_event_stream_up{{mode=\"{mode}\"}} {events_up}"
        );
        let up = u8::from(self.runtime_up.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP proxyctl_watch_runtime_up Whether the last poll of the runtime succeeded.\n# TYPE proxyctl_watch_runtime_up gauge\nproxyctl_watch_runtime_up {up}"
        );
        self.apply_seconds.lock().unwrap().render(
            &mut out,
            "proxyctl_watch_apply_seconds",
            "Time to read and install one pod's policies.",
        );
        self.start_to_enforced_seconds.lock().unwrap().render(
            &mut out,
            "proxyctl_watch_pod_start_to_enforced_seconds",
            "From the pod sandbox's creation (runtime clock) to its policies being enforced.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counters_render() {
        let m = Metrics::default();
        m.applied.fetch_add(3, Ordering::Relaxed);
        m.observe_apply(Duration::from_millis(3));
        m.observe_apply(Duration::from_millis(30));
        let text = m.render();
        assert!(
            text.contains("proxyctl_watch_policy_applied_total 3\n"),
            "{text}"
        );
        assert!(text.contains("proxyctl_watch_apply_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("proxyctl_watch_apply_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("proxyctl_watch_apply_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("proxyctl_watch_apply_seconds_count 2\n"));
    }
}
