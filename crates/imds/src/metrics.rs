//! Prometheus metrics of the proxy (text exposition on the admin listener).

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A pod's `namespace/name`, shared rather than copied per request.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct PodLabel(pub Arc<str>);

impl EncodeLabelValue for PodLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub pod: PodLabel,
    pub decision: &'static str,
    pub code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// A connection refused at accept (a cap) or ended by a deadline, by
/// listener (`pod`, `source-ip`, `admin`), pod (`-`: unknown or none) and
/// reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: &'static str,
    pub pod: PodLabel,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub pod: PodLabel,
}

/// A credential issued to a pod, by the identity it was issued for.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    pub pod: PodLabel,
    pub identity: String,
}

/// An upstream credential fetch, by identity and outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub identity: String,
    pub outcome: &'static str,
}

type HistogramFamily = Family<DecisionLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily,
    pub connection_errors: Family<KindLabels, Counter>,
    pub pod_listeners: Gauge,
    pub listener_errors: Counter,
    pub credentials_issued: Family<IssuedLabels, Counter>,
    pub credential_fetches: Family<FetchLabels, Counter>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub audit_lines_dropped: Family<PodLabels, Counter>,
    pub accept_errors: Family<ListenerLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("imds_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let connection_errors = Family::<KindLabels, Counter>::default();
        let pod_listeners = Gauge::default();
        let listener_errors = Counter::default();
        registry.register(
            "requests",
            "Requests by calling pod, decision and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the response head, by decision",
            duration.clone(),
        );
        registry.register(
            "connection_errors",
            "Connections refused before a request: malformed HTTP, header timeout, I/O",
            connection_errors.clone(),
        );
        registry.register(
            "pod_listeners",
            "Listeners bound inside pod network namespaces",
            pod_listeners.clone(),
        );
        registry.register(
            "pod_listener_errors",
            "Pods whose listener could not be bound",
            listener_errors.clone(),
        );
        let credentials_issued = Family::<IssuedLabels, Counter>::default();
        let credential_fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "credentials_issued",
            "Credentials handed to pods, by pod and the identity they were issued for",
            credentials_issued.clone(),
        );
        registry.register(
            "credential_fetches",
            "Upstream credential requests, by identity and outcome (ok, refused, failed)",
            credential_fetches.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed by a bound: at accept past a connection cap \
             (connection_cap, pod_connection_cap), or by a deadline \
             (write_timeout; timeout on the admin listener)",
            connections_refused.clone(),
        );
        let audit_lines_dropped = Family::<PodLabels, Counter>::default();
        registry.register(
            "audit_lines_dropped",
            "Audit lines of refusals not written because the pod passed \
             --audit-refused-per-sec (each drop is summed in a summary line \
             now and then)",
            audit_lines_dropped.clone(),
        );
        let accept_errors = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "accept_errors",
            "Failed accepts, by listener (out of descriptors: EMFILE/ENFILE; \
             the accept loop pauses, doubling up to a second)",
            accept_errors.clone(),
        );
        Self {
            accept_errors,
            connections_refused,
            audit_lines_dropped,
            credentials_issued,
            credential_fetches,
            registry,
            requests,
            duration,
            connection_errors,
            pod_listeners,
            listener_errors,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
