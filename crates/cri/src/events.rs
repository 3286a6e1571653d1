//! A stream of pod events for `proxyctl watch`.
//!
//! CRI runtime.v1 as containerd 1.6 serves it has no event stream
//! (GetContainerEvents arrived with containerd 1.7 / Kubernetes 1.26), so
//! the watcher lists ListPodSandbox and diffs. What makes it list:
//! - containerd's own event service on the same socket ([`crate::containerd`]):
//!   each `/tasks/start` in the CRI namespace triggers a list at once, and a
//!   (re)subscription triggers a catch-up list;
//! - a timer: every `poll_interval` while no event stream is live (CRI-O,
//!   `--events poll`, or containerd restarting), every `live_interval` as a
//!   safety net while it is.
//!
//! The CRI plugin puts a new sandbox in the store ListPodSandbox reads only
//! after its task has started, so `/tasks/start` can arrive first: a started
//! id that a list does not show yet, and that is not an app container, is
//! listed again after short back-offs.
//!
//! After the runtime has been unreachable the watcher reconnects and
//! re-lists everything, so a consumer sees every ready pod again
//! (`resync: true`) and can reconcile.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::containerd::{self, EventSource, Signal};
use crate::{CriClient, CriError, PodRecord, PodState, RuntimeEndpoint};

/// Back-offs before listing again for a started task the last list did not
/// show as a ready pod (~0.3 s in all). Started app containers are told
/// apart first (ContainerStatus knows them) and not retried.
const NOT_YET_LISTED_RETRIES: &[Duration] = &[
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(60),
    Duration::from_millis(200),
];

/// Which list found a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FoundBy {
    /// A list triggered by a containerd task-start event (or its retries).
    Event,
    /// A timed list.
    Poll,
    /// The first list, the one after a runtime reconnect, or the catch-up
    /// list after the event stream was (re)subscribed.
    Relist,
}

impl FoundBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Poll => "poll",
            Self::Relist => "relist",
        }
    }
}

/// What changed since the last list.
#[derive(Debug, Clone)]
pub enum PodEvent {
    /// A ready pod with its network details: new since the last list, or
    /// re-listed after a (re)connect (`resync`).
    Ready {
        pod: Box<PodRecord>,
        resync: bool,
        found_by: FoundBy,
    },
    /// A pod seen ready before is stopped or removed.
    Gone { id: String },
    /// The runtime stopped answering; the watcher keeps retrying.
    RuntimeDown { reason: String },
    /// The runtime answers again; a full re-list follows.
    RuntimeUp,
    /// containerd's event stream is subscribed (again).
    EventsSubscribed,
    /// The event stream ended or could not be opened; lists fall back to
    /// `poll_interval` until it is back.
    EventsLost { reason: String },
    /// The runtime has no containerd event service: polling only.
    EventsUnsupported { reason: String },
}

/// How the watcher learns about new pods.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub events: EventSource,
    /// List interval while no event stream is live.
    pub poll_interval: Duration,
    /// List interval while the event stream is live (a safety net).
    pub live_interval: Duration,
    /// The containerd namespace whose task starts count.
    pub namespace: String,
}

impl WatchOptions {
    /// Polling only, every `interval`.
    pub fn poll(interval: Duration) -> Self {
        Self {
            events: EventSource::Poll,
            poll_interval: interval,
            live_interval: interval,
            namespace: containerd::CRI_NAMESPACE.into(),
        }
    }
}

/// Counters a metrics endpoint can read while the watcher runs.
#[derive(Debug, Default)]
pub struct WatcherCounters {
    /// Task-start events received from containerd.
    pub events_received: AtomicU64,
    /// ListPodSandbox calls made, whatever triggered them.
    pub lists: AtomicU64,
    /// Successful (re)subscriptions to containerd's event service.
    pub subscriptions: AtomicU64,
}

/// Watches a runtime for pod changes. Call [`PodWatcher::next`] in a loop.
#[derive(Debug)]
pub struct PodWatcher {
    endpoint: RuntimeEndpoint,
    options: WatchOptions,
    client: Option<CriClient>,
    known: HashSet<String>,
    pending: VecDeque<PodEvent>,
    /// None before the first successful list; Some(true) while the runtime is down.
    down: Option<bool>,
    signals: Option<mpsc::UnboundedReceiver<Signal>>,
    subscriber: Option<tokio::task::JoinHandle<()>>,
    events_live: bool,
    /// When the next timed list is due.
    next_tick: Instant,
    /// Started ids not yet listed as ready pods: how many retries are spent.
    not_yet_listed: HashMap<String, usize>,
    retry_at: Option<Instant>,
    counters: Arc<WatcherCounters>,
}

impl Drop for PodWatcher {
    fn drop(&mut self) {
        if let Some(task) = self.subscriber.take() {
            task.abort();
        }
    }
}

impl PodWatcher {
    /// Polling only, every `interval` (any CRI runtime).
    pub fn new(endpoint: RuntimeEndpoint, interval: Duration) -> Self {
        Self::with_options(endpoint, WatchOptions::poll(interval))
    }

    /// Starts the event subscriber (unless `options.events` is `Poll`);
    /// must be called inside a tokio runtime.
    pub fn with_options(endpoint: RuntimeEndpoint, options: WatchOptions) -> Self {
        let (signals, subscriber) = if options.events == EventSource::Poll {
            (None, None)
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(containerd::subscribe(
                endpoint.clone(),
                options.namespace.clone(),
                tx,
            ));
            (Some(rx), Some(task))
        };
        Self {
            endpoint,
            options,
            client: None,
            known: HashSet::new(),
            pending: VecDeque::new(),
            down: None,
            signals,
            subscriber,
            events_live: false,
            next_tick: Instant::now(),
            not_yet_listed: HashMap::new(),
            retry_at: None,
            counters: Arc::default(),
        }
    }

    pub fn counters(&self) -> Arc<WatcherCounters> {
        self.counters.clone()
    }

    /// Whether containerd's event stream currently drives the lists.
    pub fn events_live(&self) -> bool {
        self.events_live
    }

    fn interval(&self) -> Duration {
        if self.events_live {
            self.options.live_interval
        } else {
            self.options.poll_interval
        }
    }

    /// The next event; lists (and waits between lists) until there is one.
    pub async fn next(&mut self) -> PodEvent {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            let wake = match self.retry_at {
                Some(r) if r < self.next_tick => r,
                _ => self.next_tick,
            };
            let signal = match self.signals.as_mut() {
                Some(rx) => tokio::select! {
                    biased;
                    s = rx.recv() => s,
                    _ = tokio::time::sleep_until(wake) => None,
                },
                None => {
                    tokio::time::sleep_until(wake).await;
                    None
                }
            };
            match signal {
                Some(signal) => self.on_signal(signal).await,
                None if self.retry_at.is_some_and(|r| r <= Instant::now()) => {
                    self.retry_at = None;
                    self.list(FoundBy::Event).await;
                }
                None if self.next_tick <= Instant::now() => {
                    self.list(FoundBy::Poll).await;
                }
                // The subscriber ended (it only does when the watcher is
                // dropped); keep polling.
                None => {
                    if self.signals.as_ref().is_some_and(|rx| rx.is_closed()) {
                        self.signals = None;
                        self.events_live = false;
                    }
                }
            }
        }
    }

    async fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::Subscribed => {
                self.events_live = true;
                self.counters.subscriptions.fetch_add(1, Ordering::Relaxed);
                self.pending.push_back(PodEvent::EventsSubscribed);
                self.list(FoundBy::Relist).await;
            }
            Signal::TaskStarted { id } => {
                self.counters
                    .events_received
                    .fetch_add(1, Ordering::Relaxed);
                self.list(FoundBy::Event).await;
                if id.is_empty()
                    || self.known.contains(&id)
                    || self.not_yet_listed.contains_key(&id)
                {
                    return;
                }
                // Not listed yet: a sandbox the CRI plugin has not stored
                // yet (retry soon), or an app container (nothing to do).
                let is_container = match self.client.as_mut() {
                    Some(c) => c.is_container(&id).await.unwrap_or(false),
                    None => false,
                };
                if !is_container {
                    tracing::debug!(id = %id, "started task not listed as a pod yet; listing again shortly");
                    self.not_yet_listed.insert(id, 0);
                    self.schedule_retry();
                }
            }
            Signal::Lost { reason } => {
                let was_live = std::mem::replace(&mut self.events_live, false);
                self.pending.push_back(PodEvent::EventsLost { reason });
                if was_live {
                    // The runtime may be going away: find out now, not at
                    // the next (possibly long) tick.
                    self.list(FoundBy::Poll).await;
                }
            }
            Signal::Unsupported { reason } => {
                self.events_live = false;
                self.pending
                    .push_back(PodEvent::EventsUnsupported { reason });
            }
        }
    }

    fn mark_down(&mut self, err: &CriError) {
        self.client = None;
        if self.down != Some(true) {
            self.down = Some(true);
            self.pending.push_back(PodEvent::RuntimeDown {
                reason: err.to_string(),
            });
        }
    }

    /// Lists pods now and schedules the next timed list.
    async fn list(&mut self, found_by: FoundBy) {
        self.next_tick = Instant::now() + self.interval();
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        self.poll(found_by).await;
        self.schedule_retry();
    }

    /// Started ids the lists have not shown yet get another list after a
    /// short back-off, a bounded number of times.
    fn schedule_retry(&mut self) {
        let known = &self.known;
        self.not_yet_listed
            .retain(|id, spent| !known.contains(id) && *spent < NOT_YET_LISTED_RETRIES.len());
        let wait = self
            .not_yet_listed
            .values_mut()
            .map(|spent| {
                let wait = NOT_YET_LISTED_RETRIES[*spent];
                *spent += 1;
                wait
            })
            .min();
        self.retry_at = wait.map(|w| Instant::now() + w);
    }

    async fn poll(&mut self, found_by: FoundBy) {
        if self.client.is_none() {
            match CriClient::connect(&self.endpoint).await {
                Ok(c) => self.client = Some(c),
                Err(e) => return self.mark_down(&e),
            }
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let pods = match client.list_pods().await {
            Ok(p) => p,
            Err(e) => return self.mark_down(&e),
        };
        let resync = self.down != Some(false);
        let found_by = if resync { FoundBy::Relist } else { found_by };
        if resync {
            if self.down == Some(true) {
                self.pending.push_back(PodEvent::RuntimeUp);
            }
            self.down = Some(false);
        }
        let ready: HashSet<&str> = pods
            .iter()
            .filter(|p| p.state == PodState::Ready)
            .map(|p| p.id.as_str())
            .collect();
        let gone: Vec<String> = self
            .known
            .iter()
            .filter(|id| !ready.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.known.remove(&id);
            self.pending.push_back(PodEvent::Gone { id });
        }
        for summary in pods.iter().filter(|p| p.state == PodState::Ready) {
            if !resync && self.known.contains(&summary.id) {
                continue;
            }
            match client.pod(&summary.id).await {
                Ok(pod) => {
                    self.known.insert(summary.id.clone());
                    self.pending.push_back(PodEvent::Ready {
                        pod: Box::new(pod),
                        resync,
                        found_by,
                    });
                }
                Err(e) if e.is_unavailable() => return self.mark_down(&e),
                // Removed between the list and the status call: the next
                // list no longer shows it.
                Err(e) => tracing::debug!(pod = %summary.id, "pod status: {e}"),
            }
        }
    }
}
