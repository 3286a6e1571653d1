//! A stream of pod events for `proxyctl watch`.
//!
//! CRI runtime.v1 as containerd 1.6 serves it has no event stream
//! (GetContainerEvents arrived with containerd 1.7 / Kubernetes 1.26), so
//! the watcher polls ListPodSandbox at a short interval and diffs. After the
//! runtime has been unreachable it reconnects and re-lists everything, so a
//! consumer sees every ready pod again (`resync: true`) and can reconcile.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use crate::{CriClient, CriError, PodRecord, PodState, RuntimeEndpoint};

/// What changed since the last poll.
#[derive(Debug, Clone)]
pub enum PodEvent {
    /// A ready pod with its network details: new since the last poll, or
    /// re-listed after a (re)connect (`resync`).
    Ready { pod: Box<PodRecord>, resync: bool },
    /// A pod seen ready before is stopped or removed.
    Gone { id: String },
    /// The runtime stopped answering; the watcher keeps retrying.
    RuntimeDown { reason: String },
    /// The runtime answers again; a full re-list follows.
    RuntimeUp,
}

/// Polls a runtime for pod changes. Call [`PodWatcher::next`] in a loop.
#[derive(Debug)]
pub struct PodWatcher {
    endpoint: RuntimeEndpoint,
    interval: Duration,
    client: Option<CriClient>,
    known: HashSet<String>,
    pending: VecDeque<PodEvent>,
    /// None before the first successful list; Some(true) while the runtime is down.
    down: Option<bool>,
}

impl PodWatcher {
    pub fn new(endpoint: RuntimeEndpoint, interval: Duration) -> Self {
        Self {
            endpoint,
            interval,
            client: None,
            known: HashSet::new(),
            pending: VecDeque::new(),
            down: None,
        }
    }

    /// The next event; polls (and sleeps between polls) until there is one.
    pub async fn next(&mut self) -> PodEvent {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            self.poll().await;
            if self.pending.is_empty() {
                tokio::time::sleep(self.interval).await;
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

    async fn poll(&mut self) {
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
                    });
                }
                Err(e) if e.is_unavailable() => return self.mark_down(&e),
                // Removed between the list and the status call: the next
                // poll no longer lists it.
                Err(e) => tracing::debug!(pod = %summary.id, "pod status: {e}"),
            }
        }
    }
}
