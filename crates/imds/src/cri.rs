//! Pods from the container runtime (CRI runtime.v1, through proxyctl-cri):
//! every ready pod sandbox with a network namespace becomes a [`Pod`]
//! (namespace, name, labels, the sandbox id as uid, the netns path, the
//! first IP). A sandbox's labels, namespace and addresses are fixed for its
//! life, so each sandbox's status is read once and cached by id; only the
//! list (with the ready state) is read at every reconcile.
//!
//! New sandboxes are noticed at once where the runtime is containerd: its
//! event service (on the same socket) reports each task start, and
//! [`PodSource::changes`] turns those into early reconciles. Runtimes
//! without it (CRI-O) are read at the periodic reconcile only.
//!
//! For the source-IP fallback, [`PodSource::owns_ip`] asks the runtime
//! again at connection time: the sandbox must still be READY, still report
//! the same network namespace and still hold the address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use proxyctl_cri::containerd::{self, Signal};
use proxyctl_cri::{CriClient, PodRecord, PodState, RuntimeEndpoint};
use tokio::sync::mpsc;

use crate::Error;
use crate::pods::{Pod, PodSource};

pub struct CriPodSource {
    endpoint: RuntimeEndpoint,
    /// The connected client (only when made on a long-lived runtime).
    client: tokio::sync::Mutex<Option<CriClient>>,
    /// Sandbox id -> its full record.
    cache: Mutex<HashMap<String, PodRecord>>,
}

impl std::fmt::Debug for CriPodSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriPodSource")
            .field("endpoint", &self.endpoint.socket())
            .finish()
    }
}

fn cri_err(endpoint: &RuntimeEndpoint, e: impl std::fmt::Display) -> Error {
    Error::Pods {
        path: format!("unix://{}", endpoint.socket().display()),
        message: e.to_string(),
    }
}

impl CriPodSource {
    pub fn new(endpoint: RuntimeEndpoint) -> Self {
        Self {
            endpoint,
            client: tokio::sync::Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` with a connected client. On a tokio runtime (the proxy's
    /// blocking pool) the client is kept; without one a private runtime is
    /// made for the call and the client dropped with it.
    fn with_client<T>(
        &self,
        f: impl AsyncFnOnce(&mut CriClient) -> Result<T, proxyctl_cri::CriError>,
    ) -> Result<T, Error> {
        let run = async {
            let mut slot = self.client.lock().await;
            if slot.is_none() {
                *slot = Some(
                    CriClient::connect(&self.endpoint)
                        .await
                        .map_err(|e| cri_err(&self.endpoint, e))?,
                );
            }
            let client = slot.as_mut().expect("connected above");
            let result = f(client).await;
            if let Err(e) = &result
                && e.is_unavailable()
            {
                // Reconnect next time (the runtime restarted).
                *slot = None;
            }
            result.map_err(|e| cri_err(&self.endpoint, e))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.block_on(run),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| cri_err(&self.endpoint, e))?;
                let out = rt.block_on(run);
                *self.client.blocking_lock() = None;
                out
            }
        }
    }
}

/// A ready sandbox with a network namespace, as imds-proxy sees it.
fn to_pod(r: &PodRecord) -> Option<Pod> {
    if r.state != PodState::Ready {
        return None;
    }
    let netns = r.netns.clone()?;
    Some(Pod {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        uid: Some(r.id.clone()),
        labels: r.labels.clone(),
        netns: Some(netns),
        ip: r.ips.first().copied(),
    })
}

impl PodSource for CriPodSource {
    fn pods(&self) -> Result<Vec<Pod>, Error> {
        let known: Vec<String> = self
            .cache
            .lock()
            .expect("cache poisoned")
            .keys()
            .cloned()
            .collect();
        let (listed, fresh) = self.with_client(async move |client| {
            let listed = client.list_pods().await?;
            let mut fresh = Vec::new();
            for s in listed
                .iter()
                .filter(|s| s.state == PodState::Ready && !known.contains(&s.id))
            {
                match client.pod(&s.id).await {
                    Ok(record) => fresh.push(record),
                    // Removed between the list and the status: skip it.
                    Err(proxyctl_cri::CriError::Rpc { status, .. })
                        if status.code() == tonic::Code::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok((listed, fresh))
        })?;
        let mut cache = self.cache.lock().expect("cache poisoned");
        for r in fresh {
            cache.insert(r.id.clone(), r);
        }
        let ready: HashMap<&str, i64> = listed
            .iter()
            .filter(|s| s.state == PodState::Ready)
            .map(|s| (s.id.as_str(), s.created_at))
            .collect();
        cache.retain(|id, _| ready.contains_key(id.as_str()));
        // One pod per namespace/name: if a runtime ever reports two ready
        // sandboxes for one name, the newest wins.
        let mut by_key: HashMap<String, (&PodRecord, Pod)> = HashMap::new();
        for r in cache.values() {
            let Some(pod) = to_pod(r) else { continue };
            let key = pod.key();
            match by_key.get(&key) {
                Some((prev, _)) if prev.created_at >= r.created_at => {}
                _ => {
                    by_key.insert(key, (r, pod));
                }
            }
        }
        Ok(by_key.into_values().map(|(_, p)| p).collect())
    }

    fn owns_ip(&self, pod: &Pod, ip: IpAddr) -> Result<bool, Error> {
        let Some(id) = pod.uid.clone() else {
            return Ok(false);
        };
        let r = self.with_client(async move |client| client.pod(&id).await)?;
        Ok(r.state == PodState::Ready && r.netns == pod.netns && r.ips.contains(&ip))
    }
    /// A wake-up for every containerd task start in the CRI namespace, and
    /// one each time the subscription is (re)made (events may have been
    /// missed meanwhile, e.g. while the runtime was down). The subscriber
    /// retries on its own and stops when the receiver is dropped.
    fn changes(&self) -> Option<mpsc::UnboundedReceiver<()>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (signal_tx, mut signals) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::unbounded_channel();
        handle.spawn(containerd::subscribe(
            self.endpoint.clone(),
            containerd::CRI_NAMESPACE.into(),
            signal_tx,
        ));
        handle.spawn(async move {
            while let Some(signal) = signals.recv().await {
                let wake = match signal {
                    Signal::TaskStarted { .. } | Signal::Subscribed => true,
                    Signal::Lost { reason } => {
                        tracing::debug!("containerd events lost: {reason}");
                        false
                    }
                    Signal::Unsupported { reason } => {
                        tracing::info!(
                            "no containerd events ({reason}): new pods wait for the periodic reconcile"
                        );
                        false
                    }
                };
                if wake && tx.send(()).is_err() {
                    return;
                }
            }
        });
        Some(rx)
    }
}
