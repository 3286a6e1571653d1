//! containerd's own event service, used by [`crate::PodWatcher`] as a
//! trigger: CRI runtime.v1 in containerd 1.6 has no event stream, but the
//! same socket serves `containerd.services.events.v1.Events/Subscribe`.
//! A `/tasks/start` envelope in the CRI namespace means a sandbox (or an app
//! container) just started; the watcher then re-lists pods through CRI, which
//! stays the source of truth. The events carry no labels or network details.
//!
//! The subscriber runs as its own task and reports [`Signal`]s over a
//! channel; it re-subscribes (with a capped back-off) whenever the stream
//! ends, so a containerd restart costs one gap that the watcher's poll and
//! its catch-up list on [`Signal::Subscribed`] cover.

use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::RuntimeEndpoint;
use crate::client::unix_channel;

/// The generated client (see proto/containerd_events.proto and build.rs).
#[allow(clippy::all, missing_docs, unreachable_pub)]
mod proto {
    tonic::include_proto!("containerd.services.events.v1");
}

/// The containerd namespace the CRI plugin keeps Kubernetes objects in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The topic containerd publishes when a task (sandbox or container) starts.
pub const TASK_START_TOPIC: &str = "/tasks/start";
const TASK_START_TYPE: &str = "containerd.events.TaskStart";

/// containerd answers Subscribe's response headers only with the first
/// event (grpc-go sends headers lazily), so a call that has neither failed
/// nor ended this long after the request went out counts as subscribed.
/// The server registers the subscriber as soon as it reads the request.
const SUBSCRIBE_GRACE: Duration = Duration::from_millis(150);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After a runtime said it has no Events service (CRI-O), ask again this
/// rarely: the runtime behind the socket may be replaced by one that has.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

/// Which trigger makes the watcher re-list pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventSource {
    /// containerd's event service when the runtime serves it, else polling.
    #[default]
    Auto,
    /// containerd's event service; a runtime without it is an error.
    Containerd,
    /// Poll ListPodSandbox only (any CRI runtime).
    Poll,
}

impl std::str::FromStr for EventSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "containerd" => Ok(Self::Containerd),
            "poll" => Ok(Self::Poll),
            other => Err(format!("`{other}` is not one of auto, containerd, poll")),
        }
    }
}

impl std::fmt::Display for EventSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Containerd => "containerd",
            Self::Poll => "poll",
        })
    }
}

/// What the subscriber tells the watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The subscription is in place (first time or again after a loss).
    Subscribed,
    /// A task started in the CRI namespace; the id is the sandbox's id when
    /// the task is a pod sandbox, else an app container's (empty when the
    /// payload could not be decoded).
    TaskStarted { id: String },
    /// The stream could not be opened or ended; the subscriber retries.
    Lost { reason: String },
    /// The runtime does not serve containerd's Events service.
    Unsupported { reason: String },
}

/// The filter Subscribe is given: task starts in the CRI namespace only.
pub fn task_start_filter(namespace: &str) -> String {
    format!("namespace=={namespace:?},topic=={TASK_START_TOPIC:?}")
}

/// The started task's id from a `/tasks/start` envelope.
fn task_start_id(envelope: &proto::Envelope) -> Option<String> {
    let any = envelope.event.as_ref()?;
    if any.type_url.trim_start_matches('/') != TASK_START_TYPE {
        return None;
    }
    let start: proto::TaskStart = prost::Message::decode(any.value.as_slice()).ok()?;
    Some(start.container_id)
}

/// Subscribes until `signals` is closed (the watcher went away), reporting
/// each change of state once and each task start.
pub async fn subscribe(
    endpoint: RuntimeEndpoint,
    namespace: String,
    signals: UnboundedSender<Signal>,
) {
    let filter = task_start_filter(&namespace);
    let mut backoff = BACKOFF_MIN;
    // Whether the last thing reported was a loss, so a runtime that stays
    // down is reported once, not at every retry.
    let mut reported_lost = false;
    loop {
        let outcome = subscribe_once(&endpoint, &filter, &signals).await;
        let (wait, signal) = match outcome {
            Ended::WatcherGone => return,
            Ended::Unsupported(reason) => (UNSUPPORTED_RETRY, Some(Signal::Unsupported { reason })),
            Ended::Lost {
                reason,
                was_subscribed,
            } => {
                if was_subscribed {
                    backoff = BACKOFF_MIN;
                }
                let report = was_subscribed || !reported_lost;
                (backoff, report.then_some(Signal::Lost { reason }))
            }
        };
        if let Some(signal) = signal {
            reported_lost = matches!(signal, Signal::Lost { .. });
            if signals.send(signal).is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = signals.closed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Ended {
    WatcherGone,
    Unsupported(String),
    Lost {
        reason: String,
        was_subscribed: bool,
    },
}

async fn subscribe_once(
    endpoint: &RuntimeEndpoint,
    filter: &str,
    signals: &UnboundedSender<Signal>,
) -> Ended {
    let lost = |reason: String, was_subscribed| Ended::Lost {
        reason,
        was_subscribed,
    };
    let channel = match unix_channel(endpoint.socket(), None).await {
        Ok(c) => c,
        Err(e) => return lost(format!("connect {endpoint}: {e}"), false),
    };
    let mut client = proto::events_client::EventsClient::new(channel);
    let request = proto::SubscribeRequest {
        filters: vec![filter.to_owned()],
    };
    let call = client.subscribe(request);
    tokio::pin!(call);
    let mut subscribed = false;
    let response = tokio::select! {
        r = &mut call => r,
        _ = tokio::time::sleep(SUBSCRIBE_GRACE) => {
            subscribed = true;
            if signals.send(Signal::Subscribed).is_err() {
                return Ended::WatcherGone;
            }
            call.await
        }
    };
    let mut stream = match response {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            return Ended::Unsupported(format!(
                "{endpoint} does not serve containerd.services.events.v1.Events: {}",
                s.message()
            ));
        }
        Err(s) => return lost(format!("Subscribe: {s}"), subscribed),
    };
    if !subscribed {
        subscribed = true;
        if signals.send(Signal::Subscribed).is_err() {
            return Ended::WatcherGone;
        }
    }
    loop {
        let envelope = tokio::select! {
            m = stream.message() => m,
            _ = signals.closed() => return Ended::WatcherGone,
        };
        match envelope {
            Ok(Some(envelope)) => {
                let id = task_start_id(&envelope).unwrap_or_default();
                tracing::trace!(topic = %envelope.topic, id = %id, "containerd event");
                if signals.send(Signal::TaskStarted { id }).is_err() {
                    return Ended::WatcherGone;
                }
            }
            Ok(None) => return lost("the event stream ended".into(), subscribed),
            Err(s) => return lost(format!("event stream: {s}"), subscribed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_start_payloads_decode_and_others_are_ignored() {
        let payload = proto::TaskStart {
            container_id: "abc123".into(),
            pid: 42,
        };
        let mut envelope = proto::Envelope {
            timestamp: None,
            namespace: CRI_NAMESPACE.into(),
            topic: TASK_START_TOPIC.into(),
            event: Some(prost_types::Any {
                type_url: TASK_START_TYPE.into(),
                value: prost::Message::encode_to_vec(&payload),
            }),
        };
        assert_eq!(task_start_id(&envelope).as_deref(), Some("abc123"));
        envelope.event.as_mut().unwrap().type_url = "containerd.events.TaskExit".into();
        assert_eq!(task_start_id(&envelope), None);
        envelope.event = None;
        assert_eq!(task_start_id(&envelope), None);
    }

    #[test]
    fn modes_parse_and_the_filter_quotes_its_values() {
        assert_eq!("auto".parse(), Ok(EventSource::Auto));
        assert_eq!("containerd".parse(), Ok(EventSource::Containerd));
        assert_eq!("poll".parse(), Ok(EventSource::Poll));
        assert!("events".parse::<EventSource>().is_err());
        assert_eq!(
            task_start_filter("k8s.io"),
            r#"namespace=="k8s.io",topic=="/tasks/start""#
        );
    }
}
