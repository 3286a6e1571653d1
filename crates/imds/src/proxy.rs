//! The proxy: per-pod listeners (and an optional source-IP listener), the
//! edge checks the real metadata services make, access rules, per-pod rate
//! limits, forwarding over pooled upstream connections, audit and metrics.
//!
//! Order of checks for one request: caller known (403) -> the pod's rate
//! limit (429; every request spends a token, refused ones too) -> framing
//! (400/413, connection closed) -> path shape (400) -> X-Forwarded-For (400
//! Azure / 403 AWS and GCP) -> `Metadata: true` on Azure paths (400 JSON),
//! `Metadata-Flavor: Google` on GCP paths (403) -> rules (403) -> forward,
//! keeping the upstream's status.
//!
//! Every listener is bounded (see `Limits`): connections per pod and in
//! all, a deadline for each request head, an idle and a write timeout;
//! audit lines of refusals are sampled per pod past a rate.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::{StatusCode, Uri};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Error;
use crate::audit::{Audit, AuditRecord, Sampler, now_ts};
use crate::metrics::{
    DecisionLabels, KindLabels, ListenerLabels, Metrics, PodLabel, PodLabels, RefusedLabels,
    RequestLabels,
};
use crate::netns::{self, NetnsId};
use crate::pods::{Pod, PodSource};
use crate::ratelimit::TokenBucket;
use crate::rules::{Rules, Verdict};
use crate::workers::{Spawner, Workers};
use proxyctl_listen::{AcceptBackoff, ConnLimit, ConnPermit, LogGate};

mod exchange;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The port imds-proxy listens on inside each pod's network namespace by
/// default; the pod's DNAT rule sends 169.254.169.254:80 there.
pub const DEFAULT_POD_LISTEN: &str = "127.0.0.1:15990";

/// Every bound of the proxy's listeners (docs/imds-proxy.md, "Limits",
/// says what a client sees at each).
#[derive(Debug, Clone)]
pub struct Limits {
    /// A client must send its whole request head within this time: from
    /// the connection's start for its first request, from the first byte
    /// for later ones. One deadline per head, never extended by a read.
    pub header_read_timeout: Duration,
    /// A kept-alive connection may wait this long for the first byte of
    /// its next request.
    pub idle_timeout: Duration,
    /// Each answer (or each piece of a streamed one) must be taken by the
    /// client within this time; a client that sends requests and does not
    /// read the answers is disconnected.
    pub write_timeout: Duration,
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's response head.
    pub upstream_timeout: Duration,
    /// Largest request head (bytes); bigger heads get 431.
    pub max_header_bytes: usize,
    /// Most header fields in one request; more gets 431.
    pub max_headers: usize,
    /// Largest request body (Content-Length); bigger gets 413.
    pub max_body_bytes: u64,
    /// Requests per second each pod may send, whatever their outcome
    /// (0 = unlimited).
    pub rate_per_sec: f64,
    pub burst: u32,
    /// Connections open at once from one pod (unknown callers of the
    /// source-IP listener share one such allowance).
    pub max_connections_per_pod: usize,
    /// Connections open at once on the pod-facing listeners together.
    pub max_connections: usize,
    /// Connections open at once on the admin listener.
    pub admin_max_connections: usize,
    /// Longest life of one admin connection (also ends a client that never
    /// reads its answer).
    pub admin_connection_lifetime: Duration,
    /// Audit lines of refusals each pod may cause per second (0: all are
    /// written); past it they are dropped and counted.
    pub audit_refused_per_sec: f64,
    pub audit_refused_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 64 * 1024,
            rate_per_sec: 20.0,
            burst: 40,
            max_connections_per_pod: 64,
            max_connections: 4096,
            admin_max_connections: 128,
            admin_connection_lifetime: Duration::from_secs(60),
            audit_refused_per_sec: 20.0,
            audit_refused_burst: 100,
        }
    }
}

pub struct ProxyConfig {
    /// `http://HOST[:PORT]` of the real service.
    pub upstream: Uri,
    pub rules: Rules,
    /// Bound inside every pod's network namespace (the preferred identity).
    pub pod_listen: Option<SocketAddr>,
    /// A listener in the proxy's own namespace identifying callers by source
    /// IP, each checked to be the live owner of that IP.
    pub source_ip_listen: Option<SocketAddr>,
    /// /healthz, /readyz, /metrics.
    pub admin_listen: Option<SocketAddr>,
    pub audit: Audit,
    pub limits: Limits,
    /// How often the pod source is read again, besides at once on the
    /// source's change wake-ups and every second until the first read
    /// succeeded (zero: only on `reconcile`, none of these).
    pub reconcile_every: Duration,
    /// Threads serving connections, each with its own single-threaded
    /// runtime (see `workers`); 0 serves them on the caller's runtime.
    pub workers: usize,
}

/// Checks an upstream URL: plain http, a host, no path, query or user info.
pub fn parse_upstream(url: &str) -> Result<Uri, Error> {
    let uri: Uri = url.parse().map_err(|_| Error::Upstream(url.into()))?;
    let ok = uri.scheme_str() == Some("http")
        && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
        && uri.path_and_query().is_none_or(|pq| pq.as_str() == "/");
    if ok {
        Ok(uri)
    } else {
        Err(Error::Upstream(url.into()))
    }
}

/// What a connection knows about its caller, fixed at accept time.
struct Identity {
    pod: RwLock<Arc<Pod>>,
    /// `namespace/name`: fixed for the entry (entries are keyed by it).
    key: Arc<str>,
    bucket: TokenBucket,
    /// This pod's connections: one pod cannot take the descriptors all
    /// pods share.
    conns: ConnLimit,
    audit: AuditBudget,
    /// This pod's `requests{decision="allowed",code="200"}` counter, looked
    /// up once: `Family::get_or_create` hashes the labels and takes a lock
    /// on every call, and this is the label set of nearly every request.
    allowed_ok: Counter,
}

/// Audit lines of one caller's refusals past a rate are dropped; counted
/// in `audit_lines_dropped_total{pod}`.
struct AuditBudget {
    sampler: Sampler,
    dropped: Counter,
}

impl AuditBudget {
    fn new(limits: &Limits, metrics: &Metrics, key: &Arc<str>) -> Self {
        AuditBudget {
            sampler: Sampler::new(limits.audit_refused_per_sec, limits.audit_refused_burst),
            dropped: metrics
                .audit_lines_dropped
                .get_or_create(&PodLabels {
                    pod: PodLabel(key.clone()),
                })
                .clone(),
        }
    }
}

struct PodEntry {
    identity: Arc<Identity>,
    netns: Option<(PathBuf, NetnsId)>,
    /// Dropping the sender closes the listener's open connections.
    listener: Option<(JoinHandle<()>, watch::Sender<()>)>,
    /// Its namespace was replaced under an unchanged record: not served.
    quarantined: bool,
}

impl Drop for PodEntry {
    fn drop(&mut self) {
        if let Some((task, _)) = &self.listener {
            task.abort();
        }
    }
}

struct Conn {
    caller: Option<Arc<Identity>>,
    listener: &'static str,
    peer: SocketAddr,
}

/// A served connection's places under the caps, released when it ends.
struct Permits {
    _all: ConnPermit,
    _caller: ConnPermit,
}

struct Shared {
    upstream: http::uri::Authority,
    rules: Rules,
    limits: Limits,
    pod_listen: Option<SocketAddr>,
    /// `(host, port)` of the upstream, for connecting.
    upstream_addr: (String, u16),
    audit: Audit,
    metrics: Arc<Metrics>,
    source: Arc<dyn PodSource>,
    pods: Mutex<HashMap<String, PodEntry>>,
    ready: Arc<AtomicBool>,
    spawner: Spawner,
    /// `request_duration_seconds{decision="allowed"}`, looked up once (as
    /// `Identity::allowed_ok`).
    allowed_duration: Histogram,
    /// Credentials per cloud identity (see `identity`).
    credentials: crate::identity::CredentialCache,
    /// IMDSv2 session tokens obtained for AWS-bound pods.
    session_tokens: crate::identity::SessionTokens,
    /// STS, when some pod is bound to an AWS role.
    sts: Option<crate::sts::StsConfig>,
    /// IAM Credentials (the same HTTP(S) client as STS), when some pod is
    /// bound to a Google service account.
    iam: Option<crate::sts::StsConfig>,
    /// Connections of the pod-facing listeners together.
    conns: ConnLimit,
    /// Callers of the source-IP listener no pod owns: one allowance of
    /// connections and audit lines for them all.
    unknown_conns: ConnLimit,
    unknown_audit: AuditBudget,
    /// The pod listeners' accept loops fail together at the descriptor
    /// limit: one log line among them.
    accept_log: LogGate,
}

/// A running proxy. Dropping it stops every listener it owns.
pub struct ProxyHandle {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    pub source_ip_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// Dropped after `Drop::drop` ran: stops the connection workers.
    _workers: Workers,
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.pods.lock().expect("pods poisoned").clear();
    }
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub failed: Vec<(String, String)>,
}

impl ProxyHandle {
    /// Starts the proxy on the current tokio runtime: reads the pod source
    /// once, binds every listener, then serves until dropped.
    pub async fn start(config: ProxyConfig, source: Arc<dyn PodSource>) -> Result<Self, Error> {
        let upstream = config
            .upstream
            .authority()
            .cloned()
            .ok_or_else(|| Error::Upstream(config.upstream.to_string()))?;
        let upstream_addr = (
            upstream
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            upstream.port_u16().unwrap_or(80),
        );
        let sts = if config.rules.identities.iter().any(|b| b.aws.is_some()) {
            let settings = config.rules.sts.clone().unwrap_or_default();
            let sts = crate::sts::StsConfig::new(&settings.endpoint, &settings.region).map_err(
                |message| Error::Rules {
                    path: "sts".into(),
                    message,
                },
            )?;
            Some(sts)
        } else {
            None
        };
        let iam = if config.rules.identities.iter().any(|b| b.gcp.is_some()) {
            let settings = config.rules.gcp.clone().unwrap_or_default();
            // The region is SigV4's; IAM Credentials takes bearer tokens.
            let iam = crate::sts::StsConfig::new(&settings.iam_endpoint, "global").map_err(
                |message| Error::Rules {
                    path: "gcp".into(),
                    message: message.replace("STS", "IAM Credentials"),
                },
            )?;
            Some(iam)
        } else {
            None
        };
        let (workers, spawner) = crate::workers::start(config.workers).map_err(Error::Workers)?;
        let metrics = Arc::new(Metrics::default());
        let allowed_duration = metrics
            .duration
            .get_or_create(&DecisionLabels { decision: ALLOWED })
            .clone();
        let unknown_key: Arc<str> = Arc::from("-");
        let unknown_audit = AuditBudget::new(&config.limits, &metrics, &unknown_key);
        let shared = Arc::new(Shared {
            conns: ConnLimit::new(config.limits.max_connections),
            unknown_conns: ConnLimit::new(config.limits.max_connections_per_pod),
            unknown_audit,
            accept_log: LogGate::new(),
            spawner,
            allowed_duration,
            upstream,
            rules: config.rules,
            limits: config.limits,
            pod_listen: config.pod_listen,
            upstream_addr,
            audit: config.audit,
            metrics,
            source,
            pods: Mutex::new(HashMap::new()),
            ready: Arc::new(AtomicBool::new(false)),
            credentials: Default::default(),
            session_tokens: Default::default(),
            sts,
            iam,
        });
        let mut tasks = Vec::new();
        let mut admin_addr = None;
        if let Some(addr) = config.admin_listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?;
            admin_addr = listener.local_addr().ok();
            tasks.push(tokio::spawn(crate::admin::serve(
                listener,
                shared.metrics.clone(),
                shared.ready.clone(),
                crate::admin::AdminLimits::from(&shared.limits),
            )));
        }
        let mut source_ip_addr = None;
        if let Some(addr) = config.source_ip_listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?;
            source_ip_addr = listener.local_addr().ok();
            tasks.push(tokio::spawn(source_ip_accept(shared.clone(), listener)));
        }
        let handle = Self {
            shared: shared.clone(),
            tasks,
            source_ip_addr,
            admin_addr,
            _workers: workers,
        };
        // Fail closed, not out: if the pods cannot be read (the container
        // runtime is not up yet), serve no pod, stay not ready, and keep
        // trying. Exiting would leave pods whose DNAT points here with
        // nothing at all, and restart loops are slower to recover.
        if let Err(e) = run_reconcile(&shared).await {
            tracing::error!("pods could not be read; serving none until they can: {e}");
        }
        let mut handle = handle;
        // Zero means reconciles only on request: no timer, no wake-ups.
        if !config.reconcile_every.is_zero() {
            handle.tasks.push(tokio::spawn(reconcile_loop(
                Arc::downgrade(&shared),
                config.reconcile_every,
                shared.source.changes(),
            )));
        }
        Ok(handle)
    }

    /// Reads the pod source and brings listeners in step with it.
    pub async fn reconcile(&self) -> Result<ReconcileReport, Error> {
        reconcile(&self.shared).await
    }

    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    /// Waits until every audit line recorded so far is written.
    pub fn flush_audit(&self) {
        self.shared.audit.flush();
    }

    /// See `crate::fuzzing::serve_as_pod`. The listener is kept as a
    /// bound namespace's would be, so the pod's removal stops it the same way.
    pub(crate) fn serve_as_pod(&self, listener: TcpListener, key: &str) -> bool {
        let mut pods = self.shared.pods.lock().expect("pods poisoned");
        let Some(entry) = pods.get_mut(key) else {
            return false;
        };
        if entry.listener.is_some() || entry.quarantined {
            return false;
        }
        let (closer, closed) = watch::channel(());
        let task = tokio::spawn(pod_accept(
            self.shared.clone(),
            listener,
            entry.identity.clone(),
            closed,
        ));
        entry.listener = Some((task, closer));
        true
    }
}

/// Retry interval while the pods have never been read (not ready).
const UNREADY_RETRY: Duration = Duration::from_secs(1);

/// Look-agains after a change wake-up: containerd reports a sandbox's task
/// start before the CRI plugin lists the sandbox, so the first read can
/// miss it (the same race `proxyctl_cri::events` retries for).
const AFTER_CHANGE: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(500),
];

/// One reconcile with its outcome logged.
async fn run_reconcile(shared: &Arc<Shared>) -> Result<(), Error> {
    let report = reconcile(shared).await?;
    for (pod, err) in &report.failed {
        tracing::error!(pod, "no listener for pod: {err}");
    }
    Ok(())
}

/// Reconciles every `every`, every `UNREADY_RETRY` until the first
/// success, and at once on each wake-up from `changes`.
async fn reconcile_loop(
    shared: std::sync::Weak<Shared>,
    every: Duration,
    mut changes: Option<tokio::sync::mpsc::UnboundedReceiver<()>>,
) {
    loop {
        let ready = match shared.upgrade() {
            Some(s) => s.ready.load(Ordering::SeqCst),
            None => return,
        };
        let wait = if ready {
            every
        } else {
            every.min(UNREADY_RETRY)
        };
        let woken = match changes.as_mut() {
            Some(rx) => tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        changes = None;
                    }
                    got.is_some()
                }
                () = tokio::time::sleep(wait) => false,
            },
            None => {
                tokio::time::sleep(wait).await;
                false
            }
        };
        let passes: &[Duration] = if woken {
            &AFTER_CHANGE
        } else {
            &[Duration::ZERO]
        };
        for delay in passes {
            tokio::time::sleep(*delay).await;
            // Wake-ups that queued meanwhile are covered by this pass.
            if let Some(rx) = changes.as_mut() {
                while rx.try_recv().is_ok() {}
            }
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if let Err(e) = run_reconcile(&shared).await {
                tracing::warn!("reconcile failed: {e}");
            }
        }
    }
}

/// Reads the pods and brings the listeners in step; the proxy is ready
/// from the first success on.
async fn reconcile(shared: &Arc<Shared>) -> Result<ReconcileReport, Error> {
    let report = reconcile_inner(shared).await?;
    shared.ready.store(true, Ordering::SeqCst);
    Ok(report)
}

async fn reconcile_inner(shared: &Arc<Shared>) -> Result<ReconcileReport, Error> {
    let source = shared.source.clone();
    let pods = tokio::task::spawn_blocking(move || source.pods())
        .await
        .map_err(|e| Error::Pods {
            path: "pod source".into(),
            message: e.to_string(),
        })??;
    let mut report = ReconcileReport::default();
    let wanted: HashMap<String, Pod> = pods.into_iter().map(|p| (p.key(), p)).collect();

    // Drop pods that are gone, and pods whose namespace is not the one we
    // bound into (deleted, or a new namespace mounted at the old path).
    let stale: Vec<(String, Option<(PathBuf, NetnsId)>)> = {
        let entries = shared.pods.lock().expect("pods poisoned");
        entries
            .iter()
            .map(|(k, e)| (k.clone(), e.netns.clone()))
            .collect()
    };
    // Listeners stopped here are awaited before reconcile returns: an
    // aborted task drops its socket only when the runtime next polls it, and
    // until then the kernel still completes handshakes on it. A caller (or a
    // pod) that sees the reconcile done must find the port closed.
    let mut closing: Vec<JoinHandle<()>> = Vec::new();
    for (key, bound) in stale {
        let keep = match (wanted.get(&key), bound) {
            (None, _) => false,
            (Some(pod), Some((path, id))) => {
                let same_record = pod.netns.as_ref() == Some(&path) && {
                    let entries = shared.pods.lock().expect("pods poisoned");
                    entries.get(&key).is_some_and(|e| {
                        e.identity.pod.read().expect("pod poisoned").uid == pod.uid
                    })
                };
                if same_record && !netns::netns_id(&path).is_ok_and(|now| now == id) {
                    // The namespace behind an unchanged pod record was
                    // replaced (the pod died, something else now lives at
                    // that path). Whoever lives there now is not that pod:
                    // stop serving it until the source tells us more.
                    let mut entries = shared.pods.lock().expect("pods poisoned");
                    if let Some(e) = entries.get_mut(&key) {
                        let had_listener = e.listener.take().map(|(task, _closer)| {
                            task.abort();
                            closing.push(task);
                        });
                        if had_listener.is_some() || !e.quarantined {
                            report.failed.push((
                                key.clone(),
                                "network namespace replaced under an unchanged pod record".into(),
                            ));
                        }
                        e.quarantined = true;
                    }
                }
                same_record
            }
            (Some(pod), None) => pod.netns.is_none(),
        };
        if !keep {
            let removed = shared.pods.lock().expect("pods poisoned").remove(&key);
            if let Some((task, _closer)) = removed.and_then(|mut e| e.listener.take()) {
                task.abort();
                closing.push(task);
            }
            report.removed.push(key);
        }
    }
    for task in closing {
        // Err(cancelled) is the expected outcome.
        let _ = task.await;
    }

    for (key, pod) in wanted {
        let pod = Arc::new(pod);
        if let Some(entry) = shared.pods.lock().expect("pods poisoned").get(&key) {
            if !entry.quarantined {
                *entry.identity.pod.write().expect("pod poisoned") = pod;
            }
            continue;
        }
        let key_label: Arc<str> = Arc::from(key.as_str());
        let allowed_ok = shared
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                pod: PodLabel(key_label.clone()),
                decision: ALLOWED,
                code: 200,
            })
            .clone();
        let identity = Arc::new(Identity {
            pod: RwLock::new(pod.clone()),
            audit: AuditBudget::new(&shared.limits, &shared.metrics, &key_label),
            key: key_label,
            bucket: TokenBucket::new(shared.limits.rate_per_sec, shared.limits.burst),
            conns: ConnLimit::new(shared.limits.max_connections_per_pod),
            allowed_ok,
        });
        let mut entry = PodEntry {
            identity: identity.clone(),
            netns: None,
            listener: None,
            quarantined: false,
        };
        if let Some(path) = pod.netns.clone() {
            match shared.pod_listen {
                Some(addr) => {
                    let bind_path = path.clone();
                    let bound =
                        tokio::task::spawn_blocking(move || netns::bind_in_netns(&bind_path, addr))
                            .await
                            .map_err(|e| Error::Netns {
                                path: path.display().to_string(),
                                source: std::io::Error::other(e.to_string()),
                            })
                            .and_then(|r| r)
                            .and_then(|(l, id)| {
                                TcpListener::from_std(l)
                                    .map(|l| (l, id))
                                    .map_err(|source| Error::Bind { addr, source })
                            });
                    match bound {
                        Ok((listener, id)) => {
                            let (closer, closed) = watch::channel(());
                            let task = tokio::spawn(pod_accept(
                                shared.clone(),
                                listener,
                                identity,
                                closed,
                            ));
                            entry.netns = Some((path, id));
                            entry.listener = Some((task, closer));
                        }
                        Err(e) => {
                            shared.metrics.listener_errors.inc();
                            report.failed.push((key, e.to_string()));
                            continue;
                        }
                    }
                }
                None => match netns::netns_id(&path) {
                    Ok(id) => entry.netns = Some((path, id)),
                    Err(e) => {
                        report.failed.push((key, e.to_string()));
                        continue;
                    }
                },
            }
        }
        shared
            .pods
            .lock()
            .expect("pods poisoned")
            .insert(key.clone(), entry);
        report.added.push(key);
    }
    let listeners = shared
        .pods
        .lock()
        .expect("pods poisoned")
        .values()
        .filter(|e| e.listener.is_some())
        .count();
    shared.metrics.pod_listeners.set(listeners as i64);
    Ok(report)
}

/// After refusing a connection past a pod's cap, its listener rests this
/// long: a pod that reconnects in a loop costs a bounded amount of CPU (its
/// further connects wait in the kernel's backlog meanwhile).
const CAP_PAUSE: Duration = Duration::from_millis(10);

/// The answer to a connection past a cap, written only if the socket takes
/// it at once (a fresh socket's buffer is empty) and never waited for.
const AT_CAP_ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 21\r\nretry-after: 1\r\nconnection: close\r\n\r\nToo many connections\n";

/// Counts a connection refused at a cap (or ended by a deadline) and says
/// so in the audit log (sampled).
fn refuse_connection(
    shared: &Shared,
    listener: &'static str,
    caller: Option<&Identity>,
    peer: SocketAddr,
    reason: &'static str,
) {
    let (key, budget) = match caller {
        Some(c) => (c.key.clone(), &c.audit),
        None => (Arc::from("-"), &shared.unknown_audit),
    };
    shared
        .metrics
        .connections_refused
        .get_or_create(&RefusedLabels {
            listener,
            pod: PodLabel(key.clone()),
            reason,
        })
        .inc();
    let rec = AuditRecord {
        ts: now_ts(),
        pod: &key,
        listener,
        peer,
        method: "-",
        path: "-",
        decision: reason,
        status: 0,
        latency_ms: 0.0,
        rule: None,
        error: None,
        identity: None,
        dropped: None,
    };
    audit_sampled(shared, budget, &rec);
}

/// Writes `rec` unless `budget` is spent (then counts the drop), after a
/// summary line when one is due.
fn audit_sampled(shared: &Shared, budget: &AuditBudget, rec: &AuditRecord<'_>) {
    let sampled = budget.sampler.admit();
    if let Some(n) = sampled.summary {
        tracing::warn!(
            pod = rec.pod,
            dropped = n,
            "audit lines of refused requests dropped (past --audit-refused-per-sec)"
        );
        shared.audit.record(&AuditRecord {
            decision: "audit_lines_dropped",
            method: "-",
            path: "-",
            status: 0,
            latency_ms: 0.0,
            rule: None,
            error: None,
            identity: None,
            dropped: Some(n),
            ..*rec
        });
    }
    if sampled.write {
        shared.audit.record(rec);
    } else {
        budget.dropped.inc();
    }
}

/// Closes a connection refused at a cap, with a 503 if the socket takes it
/// without waiting.
fn turn_away(stream: std::net::TcpStream) {
    // The socket is non-blocking: one write(2), taken or not. (tokio's
    // try_write would not even try before the reactor saw it writable.)
    let _ = std::io::Write::write(&mut &stream, AT_CAP_ANSWER);
    drop(stream);
}

fn accept_errors(shared: &Shared, listener: &'static str) -> Counter {
    shared
        .metrics
        .accept_errors
        .get_or_create(&ListenerLabels { listener })
        .clone()
}

/// The next connection `listener` accepts, out of the reactor (it is
/// registered again on the worker that serves it); accept errors are
/// counted in `failed` and paused after (out of descriptors).
async fn next_connection(
    listener: &TcpListener,
    backoff: &mut AcceptBackoff,
    failed: &Counter,
) -> (std::net::TcpStream, SocketAddr) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => {
                backoff.succeeded();
                s
            }
            Err(e) => {
                failed.inc();
                backoff.pause_after(&e).await;
                continue;
            }
        };
        match stream.into_std() {
            Ok(s) => return (s, peer),
            Err(e) => tracing::warn!(peer = %peer, "deregistering an accepted connection: {e}"),
        }
    }
}

async fn pod_accept(
    shared: Arc<Shared>,
    listener: TcpListener,
    identity: Arc<Identity>,
    closed: watch::Receiver<()>,
) {
    let mut backoff = AcceptBackoff::with_gate("pod", shared.accept_log.clone());
    let failed = accept_errors(&shared, "pod");
    loop {
        let (stream, peer) = next_connection(&listener, &mut backoff, &failed).await;
        let Some(caller_permit) = identity.conns.try_acquire() else {
            refuse_connection(&shared, "pod", Some(&identity), peer, "pod_connection_cap");
            turn_away(stream);
            tokio::time::sleep(CAP_PAUSE).await;
            continue;
        };
        let Some(all_permit) = shared.conns.try_acquire() else {
            refuse_connection(&shared, "pod", Some(&identity), peer, "connection_cap");
            turn_away(stream);
            continue;
        };
        let permits = Permits {
            _all: all_permit,
            _caller: caller_permit,
        };
        let conn = Arc::new(Conn {
            caller: Some(identity.clone()),
            listener: "pod",
            peer,
        });
        shared.spawner.spawn(serve_conn(
            shared.clone(),
            stream,
            conn,
            Some(closed.clone()),
            permits,
        ));
    }
}

async fn source_ip_accept(shared: Arc<Shared>, listener: TcpListener) {
    let mut backoff = AcceptBackoff::new("source-ip");
    let failed = accept_errors(&shared, "source-ip");
    loop {
        let (stream, peer) = next_connection(&listener, &mut backoff, &failed).await;
        // The total first: who the caller is costs a look into its
        // namespace and the pod source, which a flood must not buy.
        let Some(all_permit) = shared.conns.try_acquire() else {
            refuse_connection(&shared, "source-ip", None, peer, "connection_cap");
            turn_away(stream);
            continue;
        };
        let task_shared = shared.clone();
        shared.spawner.spawn(async move {
            let shared = task_shared;
            let caller = live_owner(&shared, peer.ip()).await;
            let limit = caller.as_ref().map_or(&shared.unknown_conns, |c| &c.conns);
            let Some(caller_permit) = limit.try_acquire() else {
                refuse_connection(
                    &shared,
                    "source-ip",
                    caller.as_deref(),
                    peer,
                    "pod_connection_cap",
                );
                turn_away(stream);
                return;
            };
            let permits = Permits {
                _all: all_permit,
                _caller: caller_permit,
            };
            let conn = Arc::new(Conn {
                caller,
                listener: "source-ip",
                peer,
            });
            serve_conn(shared, stream, conn, None, permits).await;
        });
    }
}

/// The pod that owns `ip` right now: the source lists it with that IP, its
/// namespace is still the one we recorded, and that namespace holds the
/// address. Anything else (no pod, several, a deleted pod's stale record)
/// is an unknown caller (kube2iam #178, kiam #499 handed out another pod's
/// credentials here).
async fn live_owner(shared: &Arc<Shared>, ip: IpAddr) -> Option<Arc<Identity>> {
    let candidates: Vec<(Arc<Identity>, PathBuf, NetnsId)> = {
        let entries = shared.pods.lock().expect("pods poisoned");
        entries
            .values()
            .filter(|e| !e.quarantined)
            .filter_map(|e| {
                let pod = e.identity.pod.read().expect("pod poisoned").clone();
                let (path, id) = e.netns.clone()?;
                (pod.ip == Some(ip)).then(|| (e.identity.clone(), path, id))
            })
            .collect()
    };
    let source = shared.source.clone();
    let live = tokio::task::spawn_blocking(move || {
        candidates
            .into_iter()
            .filter(|(identity, path, id)| {
                netns::netns_id(path).is_ok_and(|now| now == *id)
                    && netns::addresses_in_netns(path).is_ok_and(|a| a.contains(&ip))
                    && {
                        let pod = identity.pod.read().expect("pod poisoned").clone();
                        source.owns_ip(&pod, ip).unwrap_or_else(|e| {
                            tracing::warn!(pod = %pod.key(), "live-owner check failed: {e}");
                            false
                        })
                    }
            })
            .map(|(identity, _, _)| identity)
            .collect::<Vec<_>>()
    })
    .await
    .ok()?;
    match <[_; 1]>::try_from(live) {
        Ok([one]) => Some(one),
        Err(_) => None,
    }
}

/// Serves one connection on the current (worker) runtime. The socket comes
/// as a std socket and is registered here: a tokio socket stays tied to
/// the reactor of the runtime that accepted it, and every readiness event
/// would then cross from the accepting thread to the worker.
async fn serve_conn(
    shared: Arc<Shared>,
    stream: std::net::TcpStream,
    conn: Arc<Conn>,
    closed: Option<watch::Receiver<()>>,
    permits: Permits,
) {
    // Held until the connection ends, however it ends.
    let _permits = permits;
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(peer = %conn.peer, "registering an accepted connection: {e}");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let serving = exchange::serve(&shared, &conn, stream);
    match closed {
        Some(mut closed) => {
            tokio::select! {
                () = serving => {}
                _ = closed.changed() => {}
            }
        }
        None => serving.await,
    }
}

fn caller_key(conn: &Conn) -> Arc<str> {
    conn.caller
        .as_ref()
        .map_or_else(|| Arc::from("-"), |i| i.key.clone())
}

fn is_azure(path: &str) -> bool {
    path == "/metadata" || path.starts_with("/metadata/")
}

fn is_gcp(path: &str) -> bool {
    path == "/computeMetadata" || path.starts_with("/computeMetadata/")
}

/// Only plain, canonical paths reach the rules: no dot segments, no empty
/// segments, no percent-encoding (`@` is allowed: GCP names service
/// accounts by email in paths), so `/metadata/x/../identity` or
/// `/metadata/%69dentity` cannot slip past a prefix check.
fn path_is_canonical(path: &str) -> bool {
    path.starts_with('/')
        && path.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~' | b'@')
        })
        && !path.contains("//")
        && !path.split('/').any(|seg| seg == "." || seg == "..")
}

const ALLOWED: &str = "allowed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_paths_pass() {
        for ok in [
            "/",
            "/metadata/instance",
            "/metadata/instance/compute/vmId",
            "/latest/meta-data/iam/security-credentials/",
        ] {
            assert!(path_is_canonical(ok), "{ok}");
        }
        for bad in [
            "/metadata/x/../identity/oauth2/token",
            "/metadata/./identity",
            "/metadata//identity",
            "/metadata/%69dentity",
            "/latest/meta-data/iam/..",
            "metadata",
        ] {
            assert!(!path_is_canonical(bad), "{bad}");
        }
    }

    #[test]
    fn upstream_must_be_plain_http_host() {
        assert!(parse_upstream("http://169.254.169.254").is_ok());
        assert!(parse_upstream("http://127.0.0.1:8080/").is_ok());
        for bad in [
            "https://x",
            "http://x/path",
            "http://u@x",
            "x",
            "http://x/?a=1",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }
}
