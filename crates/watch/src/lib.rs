//! `proxyctl watch`: keeps redirect policies on every pod whose labels match.
//!
//! Owns the selector/policy rules ([`config`]), the reconcile loop over the
//! pod event stream ([`proxyctl_cri::PodWatcher`]: containerd 1.6 has no CRI
//! event stream, so pods are listed through CRI whenever containerd's own
//! event service reports a task start (`--events`), and on a timer), and the
//! metrics and health endpoint.
//!
//! Each ready pod is reconciled once when first seen and again whenever the
//! runtime comes back after being unreachable (a full re-list): the pod's
//! table is read back and, if every wanted policy is already there exactly,
//! left as it is; otherwise the wanted policies replace same-named ones in
//! one atomic batch (other policies in the namespace are kept).

pub mod config;
mod http;
mod metrics;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proxyctl_cri::{EventSource, PodEvent, PodRecord, PodWatcher, RuntimeEndpoint, WatchOptions};
use proxyctl_nft::Target;
use proxyctl_policy::Policy;

pub use config::{ConfigError, Selector, WatchRule, desired_policies, load_config, parse_selector};
pub use http::serve;
pub use metrics::Metrics;

/// How many pods are reconciled at once (netlink work runs on blocking threads).
const PARALLEL_APPLIES: usize = 8;
const APPLY_ATTEMPTS: u32 = 3;

/// What reconciling one pod did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Unchanged,
}

/// Makes the namespace hold `want` (by name), keeping other policies;
/// a no-op when every wanted policy is already there exactly.
pub fn ensure_policies(
    target: &Target,
    want: &[Policy],
) -> Result<Outcome, proxyctl_nft::NftError> {
    let have = proxyctl_nft::list(target)?;
    if want.iter().all(|p| have.contains(p)) {
        return Ok(Outcome::Unchanged);
    }
    let mut merged: Vec<Policy> = have
        .into_iter()
        .filter(|h| !want.iter().any(|w| w.name == h.name))
        .collect();
    merged.extend(want.iter().cloned());
    proxyctl_nft::apply(target, &merged)?;
    Ok(Outcome::Applied)
}

/// Why the watcher stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `--events containerd` against a runtime without containerd's event service.
    #[error("--events containerd: {0} (use --events auto or poll for this runtime)")]
    EventsUnsupported(String),
}

/// Runs until `shutdown` resolves (Ok) or the runtime cannot give what the
/// options require (Err).
pub async fn run(
    endpoint: RuntimeEndpoint,
    rules: Arc<Vec<WatchRule>>,
    options: WatchOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let mode = options.events;
    let _ = metrics.events_mode.set(mode.to_string());
    tracing::info!(
        endpoint = %endpoint,
        rules = rules.len(),
        events = %mode,
        poll_ms = options.poll_interval.as_millis() as u64,
        live_poll_ms = options.live_interval.as_millis() as u64,
        "watching pods"
    );
    let mut watcher = PodWatcher::with_options(endpoint, options);
    metrics.attach_watcher(watcher.counters());
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL_APPLIES));
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            e = watcher.next() => e,
        };
        match event {
            PodEvent::RuntimeDown { reason } => {
                metrics.runtime_up.store(false, Ordering::Relaxed);
                tracing::warn!("container runtime unreachable, retrying: {reason}");
            }
            PodEvent::RuntimeUp => {
                metrics.runtime_up.store(true, Ordering::Relaxed);
                metrics.runtime_restarts.fetch_add(1, Ordering::Relaxed);
                tracing::info!("container runtime is back; re-listing pods");
            }
            PodEvent::EventsSubscribed => {
                metrics.events_up.store(true, Ordering::Relaxed);
                tracing::info!("subscribed to containerd task-start events; listing pods on each");
            }
            PodEvent::EventsLost { reason } => {
                metrics.events_up.store(false, Ordering::Relaxed);
                tracing::warn!(
                    "containerd event stream unavailable ({reason}); polling until it is back"
                );
            }
            PodEvent::EventsUnsupported { reason } => {
                metrics.events_up.store(false, Ordering::Relaxed);
                if mode == EventSource::Containerd {
                    return Err(RunError::EventsUnsupported(reason));
                }
                tracing::warn!("{reason}; polling only");
            }
            PodEvent::Gone { id } => tracing::debug!(pod = %id, "pod stopped or removed"),
            PodEvent::Ready {
                pod,
                resync,
                found_by,
            } => {
                metrics.runtime_up.store(true, Ordering::Relaxed);
                metrics.pods_seen.fetch_add(1, Ordering::Relaxed);
                metrics.found(found_by);
                let want = desired_policies(&rules, &pod.labels);
                if want.is_empty() {
                    continue;
                }
                metrics.pods_matched.fetch_add(1, Ordering::Relaxed);
                let permit = limit.clone().acquire_owned().await.expect("semaphore open");
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    reconcile(*pod, want, resync, found_by, &metrics).await;
                    drop(permit);
                });
            }
        }
    }
    Ok(())
}

async fn reconcile(
    pod: PodRecord,
    want: Vec<Policy>,
    resync: bool,
    found_by: proxyctl_cri::FoundBy,
    metrics: &Metrics,
) {
    let who = format!("{} ({})", pod.full_name(), &pod.id[..pod.id.len().min(12)]);
    let Some(netns) = pod.netns.clone() else {
        metrics.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod = %who, "matched, but the runtime reports no network namespace (host network?)");
        return;
    };
    let names: Vec<String> = want.iter().map(|p| p.name.clone()).collect();
    let target = Target::Path(netns);
    let started = Instant::now();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        let (t, w) = (target.clone(), want.clone());
        let r = tokio::task::spawn_blocking(move || ensure_policies(&t, &w))
            .await
            .expect("apply task panicked");
        match r {
            Err(e) if attempt < APPLY_ATTEMPTS && !e.is_bad_input() => {
                tracing::debug!(pod = %who, "apply attempt {attempt} failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    let took = started.elapsed();
    match result {
        Ok(Outcome::Applied) => {
            metrics.applied.fetch_add(1, Ordering::Relaxed);
            metrics.observe_apply(took);
            if !resync && let Some(since) = since_created(pod.created_at) {
                metrics.observe_start_to_enforced(since);
            }
            tracing::info!(pod = %who, policies = ?names, found_by = found_by.as_str(), ms = %format!("{:.2}", took.as_secs_f64() * 1e3), "applied");
        }
        Ok(Outcome::Unchanged) => {
            metrics.unchanged.fetch_add(1, Ordering::Relaxed);
            tracing::info!(pod = %who, policies = ?names, "already in place");
        }
        Err(e) => {
            metrics.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(pod = %who, policies = ?names, "failed: {e}");
        }
    }
}

/// Time since the runtime's creation timestamp (nanoseconds since the epoch).
fn since_created(created_ns: i64) -> Option<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let created = Duration::from_nanos(u64::try_from(created_ns).ok()?);
    now.checked_sub(created)
}
