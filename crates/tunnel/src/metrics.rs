//! Prometheus metrics under upstream's names (`konnectivity_network_proxy_*`),
//! plus counters for what we add (queue overflow, refused bad input).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

const NS: &str = "konnectivity_network_proxy";

fn gauge(reg: &Registry, sub: &str, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help).namespace(NS).subsystem(sub)).unwrap();
    reg.register(Box::new(g.clone())).unwrap();
    g
}
fn gauge_vec(reg: &Registry, sub: &str, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace(NS).subsystem(sub), labels).unwrap();
    reg.register(Box::new(g.clone())).unwrap();
    g
}
fn counter_vec(
    reg: &Registry,
    sub: &str,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace(NS).subsystem(sub), labels).unwrap();
    reg.register(Box::new(c.clone())).unwrap();
    c
}
fn histogram(reg: &Registry, sub: &str, name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(
        HistogramOpts::new(name, help)
            .namespace(NS)
            .subsystem(sub)
            .buckets(vec![0.005, 0.025, 0.1, 0.5, 2.5, 12.5]),
    )
    .unwrap();
    reg.register(Box::new(h.clone())).unwrap();
    h
}

fn render(reg: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut out).unwrap();
    String::from_utf8(out).unwrap_or_default()
}

pub struct ServerMetrics {
    registry: Registry,
    pub grpc_connections: IntGaugeVec,
    pub http_connections: IntGauge,
    pub ready_backend_connections: IntGauge,
    pub pending_backend_dials: IntGauge,
    pub established_connections: IntGauge,
    pub dial_failure_count: IntCounterVec,
    pub dial_duration_seconds: Histogram,
    pub stream_packets_total: IntCounterVec,
    pub stream_errors_total: IntCounterVec,
    pub queue_overflow_total: IntCounterVec,
    pub bad_input_total: IntCounterVec,
    /// Connections a listener closed at once (at its cap) or cut off (a
    /// deadline), by listener and reason.
    pub connections_refused_total: IntCounterVec,
    /// Payload bytes per agent and direction (ours, not upstream's).
    pub agent_bytes_total: IntCounterVec,
    /// DATA sends that had to wait for flow-control credit or a full
    /// agent stream (ours, not upstream's).
    pub flow_control_stalls_total: IntCounterVec,
    /// `flow_control_stalls_total{segment="to_agent"}`, looked up once: it
    /// is counted on the data path.
    pub stalls_to_agent: prometheus::IntCounter,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let r = Registry::new();
        let s = "server";
        let stalls = counter_vec(
            &r,
            s,
            "flow_control_stalls_total",
            "DATA sends toward an agent that had to wait (no credit or a full agent stream).",
            &["segment"],
        );
        ServerMetrics {
            grpc_connections: gauge_vec(
                &r,
                s,
                "grpc_connections",
                "Number of current grpc connections, partitioned by service method.",
                &["service_method"],
            ),
            http_connections: gauge(
                &r,
                s,
                "http_connections",
                "Number of current HTTP CONNECT connections",
            ),
            ready_backend_connections: gauge(
                &r,
                s,
                "ready_backend_connections",
                "Number of konnectivity agent connected to the proxy server",
            ),
            pending_backend_dials: gauge(
                &r,
                s,
                "pending_backend_dials",
                "Current number of pending backend dial requests",
            ),
            established_connections: gauge(
                &r,
                s,
                "established_connections",
                "Current number of established end-to-end connections.",
            ),
            dial_failure_count: counter_vec(
                &r,
                s,
                "dial_failure_count",
                "Number of dial failures observed. Multiple failures can occur for a single dial request.",
                &["reason"],
            ),
            dial_duration_seconds: histogram(
                &r,
                s,
                "dial_duration_seconds",
                "Latency of dial to the remote endpoint in seconds",
            ),
            stream_packets_total: counter_vec(
                &r,
                s,
                "stream_packets_total",
                "Count of packets processed, by segment and packet type",
                &["segment", "packet_type"],
            ),
            stream_errors_total: counter_vec(
                &r,
                s,
                "stream_errors_total",
                "Count of gRPC stream errors, by segment, grpc Code, packet type.",
                &["segment", "code", "packet_type"],
            ),
            queue_overflow_total: counter_vec(
                &r,
                s,
                "queue_overflow_total",
                "Connections closed because their per-connection queue passed its byte limit (a reader too slow).",
                &["segment"],
            ),
            bad_input_total: counter_vec(
                &r,
                s,
                "bad_input_total",
                "Refused bad input, by kind.",
                &["kind"],
            ),
            connections_refused_total: counter_vec(
                &r,
                s,
                "connections_refused_total",
                "Connections closed at accept (reason=connection_cap) or cut off by a deadline (reason=timeout), by listener.",
                &["listener", "reason"],
            ),
            agent_bytes_total: counter_vec(
                &r,
                s,
                "agent_bytes_total",
                "Payload bytes carried per agent, by direction (to_agent, from_agent).",
                &["agent_id", "direction"],
            ),
            // Shown from the start (0), not only after the first stall.
            stalls_to_agent: stalls.with_label_values(&["to_agent"]),
            flow_control_stalls_total: stalls,
            registry: r,
        }
    }
}

impl ServerMetrics {
    pub fn render(&self) -> String {
        render(&self.registry)
    }
    pub fn bad(&self, kind: &str) {
        self.bad_input_total.with_label_values(&[kind]).inc();
    }
    pub fn packet(&self, segment: &str, kind: &str) {
        self.stream_packets_total
            .with_label_values(&[segment, kind])
            .inc();
    }
}

pub struct AgentMetrics {
    registry: Registry,
    pub open_server_connections: IntGauge,
    pub known_server_count: IntGauge,
    pub open_endpoint_connections: IntGauge,
    pub endpoint_dial_failure_total: IntCounterVec,
    pub dial_duration_seconds: Histogram,
    pub stream_packets_total: IntCounterVec,
    pub stream_errors_total: IntCounterVec,
    pub queue_overflow_total: IntCounterVec,
    pub bad_input_total: IntCounterVec,
    /// Connections a listener closed at once (at its cap) or cut off (a
    /// deadline), by listener and reason.
    pub connections_refused_total: IntCounterVec,
    pub flow_control_stalls_total: IntCounterVec,
    /// `flow_control_stalls_total{segment="to_server"}`, looked up once.
    pub stalls_to_server: prometheus::IntCounter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let r = Registry::new();
        let s = "agent";
        let stalls = counter_vec(
            &r,
            s,
            "flow_control_stalls_total",
            "DATA sends toward a server that had to wait (no credit: the client reads slower than its backend sends).",
            &["segment"],
        );
        AgentMetrics {
            open_server_connections: gauge(
                &r,
                s,
                "open_server_connections",
                "Current number of open server connections.",
            ),
            known_server_count: gauge(&r, s, "known_server_count", "Current known server count."),
            open_endpoint_connections: gauge(
                &r,
                s,
                "open_endpoint_connections",
                "Current number of open endpoint connections.",
            ),
            endpoint_dial_failure_total: counter_vec(
                &r,
                s,
                "endpoint_dial_failure_total",
                "Number of failures dialing the remote endpoint, by reason (example: timeout).",
                &["reason"],
            ),
            dial_duration_seconds: histogram(
                &r,
                s,
                "dial_duration_seconds",
                "Latency of dial to the remote endpoint in seconds",
            ),
            stream_packets_total: counter_vec(
                &r,
                s,
                "stream_packets_total",
                "Count of packets processed, by segment and packet type",
                &["segment", "packet_type"],
            ),
            stream_errors_total: counter_vec(
                &r,
                s,
                "stream_errors_total",
                "Count of gRPC stream errors, by segment, grpc Code, packet type.",
                &["segment", "code", "packet_type"],
            ),
            queue_overflow_total: counter_vec(
                &r,
                s,
                "queue_overflow_total",
                "Endpoint connections closed because their queue passed its byte limit.",
                &["segment"],
            ),
            bad_input_total: counter_vec(
                &r,
                s,
                "bad_input_total",
                "Refused bad input, by kind.",
                &["kind"],
            ),
            connections_refused_total: counter_vec(
                &r,
                s,
                "connections_refused_total",
                "Connections closed at accept (reason=connection_cap) or cut off by a deadline (reason=timeout), by listener.",
                &["listener", "reason"],
            ),
            // Shown from the start (0), not only after the first stall.
            stalls_to_server: stalls.with_label_values(&["to_server"]),
            flow_control_stalls_total: stalls,
            registry: r,
        }
    }
}

impl AgentMetrics {
    pub fn render(&self) -> String {
        render(&self.registry)
    }
    pub fn bad(&self, kind: &str) {
        self.bad_input_total.with_label_values(&[kind]).inc();
    }
    pub fn packet(&self, segment: &str, kind: &str) {
        self.stream_packets_total
            .with_label_values(&[segment, kind])
            .inc();
    }
}
