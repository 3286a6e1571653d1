//! Prometheus metrics as upstream's dashboards and alerts read them: the
//! names, label names and values, and histogram buckets of
//! `pkg/server/metrics`, `pkg/agent/metrics` and konnectivity-client's
//! common metrics, plus the standard `process_*` series
//! ([`process_metrics`]); and counters for what we add (queue overflow,
//! refused bad input, flow control, bytes per agent).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const NS: &str = "konnectivity_network_proxy";

/// Upstream server's `latencyBuckets`.
pub const SERVER_LATENCY_BUCKETS: &[f64] =
    &[0.000001, 0.00001, 0.0001, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5];
/// Upstream server's `connectionDurationBuckets`.
pub const CONNECTION_DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
];
/// Upstream agent's `latencyBuckets`.
pub const AGENT_LATENCY_BUCKETS: &[f64] = &[0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0];

/// Go's `codes.Code.String()` for a gRPC status code, the `code` label of
/// the stream error counters.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// `packet_type` of a stream error that carries no packet, as upstream.
pub const NO_PACKET: &str = "Unknown";

/// `grpc_connections{service_method}`: upstream's values are the method
/// names `Proxy` and `Connect`; callers may pass the full gRPC path.
#[derive(Clone)]
pub struct ServiceMethodGauge(IntGaugeVec);

impl ServiceMethodGauge {
    pub fn with_label_values(&self, values: &[&str]) -> IntGauge {
        let method = values.first().copied().unwrap_or("");
        let short = method.rsplit('/').next().unwrap_or(method);
        self.0.with_label_values(&[short])
    }
}

fn gauge(reg: &Registry, sub: &str, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help).namespace(NS).subsystem(sub)).unwrap();
    reg.register(Box::new(g.clone())).unwrap();
    g
}
fn counter(reg: &Registry, sub: &str, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, help).namespace(NS).subsystem(sub)).unwrap();
    reg.register(Box::new(c.clone())).unwrap();
    c
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
fn histogram(reg: &Registry, sub: &str, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(
        HistogramOpts::new(name, help)
            .namespace(NS)
            .subsystem(sub)
            .buckets(buckets.to_vec()),
    )
    .unwrap();
    reg.register(Box::new(h.clone())).unwrap();
    h
}
fn histogram_vec(
    reg: &Registry,
    sub: &str,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help)
            .namespace(NS)
            .subsystem(sub)
            .buckets(buckets.to_vec()),
        labels,
    )
    .unwrap();
    reg.register(Box::new(h.clone())).unwrap();
    h
}

fn render(reg: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut out).unwrap();
    let mut text = String::from_utf8(out).unwrap_or_default();
    text.push_str(&process_metrics());
    text
}

/// The `process_*` series of Prometheus' Go and Rust clients, read from
/// /proc/self (Linux; empty elsewhere). Hand-written: the prometheus
/// crate's collector needs the procfs crate for the same seven numbers.
pub fn process_metrics() -> String {
    #[cfg(target_os = "linux")]
    {
        linux_process_metrics().unwrap_or_default()
    }
    #[cfg(not(target_os = "linux"))]
    String::new()
}

#[cfg(target_os = "linux")]
fn linux_process_metrics() -> Option<String> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // proc(5) numbers fields from 1 (pid); `rest` starts at field 3 (state).
    let field = |n: usize| -> Option<f64> { f.get(n - 3)?.parse().ok() };
    // SAFETY: sysconf and getrlimit only read process-wide settings.
    let (ticks, page, max_fds) = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur as f64
        } else {
            0.0
        };
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_PAGESIZE) as f64,
            max,
        )
    };
    let cpu = (field(14)? + field(15)?) / ticks;
    let threads = field(20)?;
    let start_ticks = field(22)?;
    let vsize = field(23)?;
    let rss = field(24)? * page;
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    let mut out = String::new();
    for (name, kind, help, v) in [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            cpu,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            btime + start_ticks / ticks,
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            threads,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsize,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    Some(out)
}

fn packets_counter(r: &Registry, sub: &str) -> IntCounterVec {
    counter_vec(
        r,
        sub,
        "stream_packets_total",
        "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
        &["segment", "packet_type"],
    )
}
fn errors_counter(r: &Registry, sub: &str) -> IntCounterVec {
    counter_vec(
        r,
        sub,
        "stream_errors_total",
        "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
        &["segment", "code", "packet_type"],
    )
}

pub struct ServerMetrics {
    registry: Registry,
    pub grpc_connections: ServiceMethodGauge,
    pub http_connections: IntGauge,
    pub ready_backend_connections: IntGauge,
    /// Agents usable by each configured strategy.
    pub ready_backends: IntGaugeVec,
    /// Always 0: no receive channel here blocks a connection (per-connection
    /// queues); kept so upstream's alerts find the series.
    pub full_receive_channels: IntGaugeVec,
    /// Time to hand a packet to the frontend's writer.
    pub frontend_write_duration_seconds: Histogram,
    /// How long established end-to-end connections stayed open.
    pub connection_duration_seconds: Histogram,
    pub lease: ServerLeaseMetrics,
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
    /// Bytes held in every connection's queue (toward clients) and gRPC
    /// receive buffer (toward agents), summed.
    pub queued_bytes: IntGauge,
    /// Dials refused before reaching an agent, by reason
    /// (`queued_bytes_cap`: `queued_bytes` at `--max-queued-bytes`).
    pub dials_refused_total: IntCounterVec,
    /// Payload bytes per agent and direction (ours, not upstream's).
    pub agent_bytes_total: IntCounterVec,
    /// Waits for a reader, by segment (see its help text; ours, not
    /// upstream's).
    pub flow_control_stalls_total: IntCounterVec,
    /// `flow_control_stalls_total{segment="to_agent"}`, looked up once: it
    /// is counted on the data path.
    pub stalls_to_agent: prometheus::IntCounter,
    /// Times a connection's flow-control window grew: its sender ran out
    /// of credit while the reader here kept up (ours, not upstream's).
    pub flow_window_growths_total: IntCounter,
    /// Tunnels ended with data still on its way because its reader took
    /// none of it for [`crate::DRAIN_AFTER_CLOSE`] after the other end left.
    pub drain_timeouts_total: IntCounter,
    /// Uploading clients (HTTP-CONNECT, gRPC frontend connections) read in their agent stream's task.
    pub link_task_readers: IntGauge,
    /// Connections whose agent moved its packets to another of its links
    /// (the moves extension; ours, not upstream's).
    pub moved_connections_total: IntCounter,
}

/// The lease garbage collector's series (server side).
#[derive(Clone)]
pub struct ServerLeaseMetrics {
    pub culled_leases_count: IntCounter,
    pub lease_delete_latency_seconds: HistogramVec,
    pub lease_delete_total: IntCounterVec,
    pub lease_list_latency_seconds: HistogramVec,
    pub lease_list_total: IntCounterVec,
}

impl ServerLeaseMetrics {
    /// One lease list: HTTP status and reason ("" on success), latency.
    pub fn list(&self, code: u16, reason: &str, latency: std::time::Duration) {
        let c = code.to_string();
        self.lease_list_total.with_label_values(&[&c, reason]).inc();
        self.lease_list_latency_seconds
            .with_label_values(&[&c])
            .observe(latency.as_secs_f64());
    }
    pub fn delete(&self, code: u16, reason: &str, latency: std::time::Duration) {
        let c = code.to_string();
        self.lease_delete_total
            .with_label_values(&[&c, reason])
            .inc();
        self.lease_delete_latency_seconds
            .with_label_values(&[&c])
            .observe(latency.as_secs_f64());
    }
}

/// The agent's lease counting series.
#[derive(Clone)]
pub struct AgentLeaseMetrics {
    pub lease_lists_total: IntCounterVec,
    /// Registered as upstream does; never counted there either.
    pub lease_watches_total: IntCounterVec,
    pub lease_list_latency_seconds: HistogramVec,
}

impl AgentLeaseMetrics {
    pub fn list(&self, code: u16, reason: &str, latency: std::time::Duration) {
        let c = code.to_string();
        self.lease_lists_total
            .with_label_values(&[&c, reason])
            .inc();
        self.lease_list_latency_seconds
            .with_label_values(&[&c])
            .observe(latency.as_secs_f64());
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let r = Registry::new();
        let s = "server";
        let full = gauge_vec(
            &r,
            s,
            "full_receive_channels",
            "Number of current connections blocked by a full receive channel, partitioned by service method.",
            &["service_method"],
        );
        for m in ["Proxy", "Connect"] {
            full.with_label_values(&[m]).set(0);
        }
        let lease = ServerLeaseMetrics {
            culled_leases_count: {
                let c = IntCounter::with_opts(
                    Opts::new(
                        "culled_leases_count",
                        "Count of expired leases that the lease garbage collection controller has culled.",
                    )
                    .namespace(NS)
                    .subsystem(s),
                )
                .unwrap();
                r.register(Box::new(c.clone())).unwrap();
                c
            },
            lease_delete_latency_seconds: histogram_vec(
                &r,
                s,
                "lease_delete_latency_seconds",
                "Latency of lease deletion calls by the garbage collection controller in seconds.",
                prometheus::DEFAULT_BUCKETS,
                &["http_status_code"],
            ),
            lease_delete_total: counter_vec(
                &r,
                s,
                "lease_delete_total",
                "Count of lease deletion calls by the garbage collection controller. Labeled by HTTP status code and reason.",
                &["http_status_code", "reason"],
            ),
            lease_list_latency_seconds: histogram_vec(
                &r,
                s,
                "lease_list_latency_seconds",
                "Latency of lease list calls by the garbage collection controller in seconds.",
                prometheus::DEFAULT_BUCKETS,
                &["http_status_code"],
            ),
            lease_list_total: counter_vec(
                &r,
                s,
                "lease_list_total",
                "Count of lease list calls by the garbage collection controller. Labeled by HTTP status code and reason.",
                &["http_status_code", "reason"],
            ),
        };
        let stalls = counter_vec(
            &r,
            s,
            "flow_control_stalls_total",
            "Waits for a reader: to_agent, DATA toward an agent that had to wait (no credit or a full agent stream); to_client, the agent stream held for a client's full queue (a link without the flow-control extension).",
            &["segment"],
        );
        ServerMetrics {
            grpc_connections: ServiceMethodGauge(gauge_vec(
                &r,
                s,
                "grpc_connections",
                "Number of current grpc connections, partitioned by service method.",
                &["service_method"],
            )),
            ready_backends: gauge_vec(
                &r,
                s,
                "ready_backends",
                "Number of konnectivity agent connected to the proxy server",
                &["proxy_strategy"],
            ),
            full_receive_channels: full,
            frontend_write_duration_seconds: histogram(
                &r,
                s,
                "frontend_write_duration_seconds",
                "Latency of write to the frontend in seconds",
                SERVER_LATENCY_BUCKETS,
            ),
            connection_duration_seconds: histogram(
                &r,
                s,
                "connection_duration_seconds",
                "Duration in seconds a proxied end-to-end connection was established (post-dial) before being closed.",
                CONNECTION_DURATION_BUCKETS,
            ),
            lease,
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
                "Number of konnectivity agent connected to the proxy server. DEPRECATED, please use ready_backends",
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
                SERVER_LATENCY_BUCKETS,
            ),
            stream_packets_total: packets_counter(&r, s),
            stream_errors_total: errors_counter(&r, s),
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
            queued_bytes: gauge(
                &r,
                s,
                "queued_bytes",
                "Bytes held for connections whose reader has not taken them yet (queues toward clients and the packet each is writing, gRPC receive buffers toward agents), summed over all connections.",
            ),
            link_task_readers: gauge(
                &r,
                s,
                "link_task_readers",
                "Uploading clients (HTTP-CONNECT connections, gRPC frontend connections) read in their agent stream's task (at most one per agent stream).",
            ),
            dials_refused_total: counter_vec(
                &r,
                s,
                "dials_refused_total",
                "Dials refused by this server before reaching an agent, by reason (queued_bytes_cap: queued_bytes at its cap).",
                &["reason"],
            ),
            agent_bytes_total: counter_vec(
                &r,
                s,
                "agent_bytes_total",
                "Payload bytes carried per agent, by direction (to_agent, from_agent).",
                &["agent_id", "direction"],
            ),
            // Shown from the start (0), not only after the first stall.
            drain_timeouts_total: counter(
                &r,
                s,
                "drain_timeouts_total",
                &format!(
                    "Tunnels whose client left while client bytes were still on their way to the agent, which took none of them for {} s; the bytes were dropped.",
                    crate::DRAIN_AFTER_CLOSE.as_secs()
                ),
            ),
            flow_window_growths_total: counter(
                &r,
                s,
                "flow_window_growths_total",
                "Times a connection's flow-control window grew: the peer ran out of credit while the reader here kept up (the flow-control extension).",
            ),
            moved_connections_total: counter(
                &r,
                s,
                "moved_connections_total",
                "Connections whose agent moved its packets to another of its links to this server (the moves extension), counted when the first came on the new link.",
            ),
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
    pub server_connection_failure_count: IntCounterVec,
    pub lease: AgentLeaseMetrics,
    pub open_server_connections: IntGauge,
    pub known_server_count: IntGauge,
    pub open_endpoint_connections: IntGauge,
    pub link_task_readers: IntGauge,
    /// Links (connections with a Connect stream) open, over all servers.
    pub server_links: IntGauge,
    pub endpoint_dial_failure_total: IntCounterVec,
    pub dial_duration_seconds: Histogram,
    pub stream_packets_total: IntCounterVec,
    pub stream_errors_total: IntCounterVec,
    pub queue_overflow_total: IntCounterVec,
    pub bad_input_total: IntCounterVec,
    /// Connections a listener closed at once (at its cap) or cut off (a
    /// deadline), by listener and reason.
    pub connections_refused_total: IntCounterVec,
    /// Bytes queued toward backends, summed over all connections.
    pub queued_bytes: IntGauge,
    /// Dials refused without dialling, by reason (`queued_bytes_cap`).
    pub dials_refused_total: IntCounterVec,
    /// Waits for a reader, by segment (see its help text).
    pub flow_control_stalls_total: IntCounterVec,
    /// `flow_control_stalls_total{segment="to_server"}`, looked up once.
    pub stalls_to_server: prometheus::IntCounter,
    /// Times a connection's flow-control window grew: its sender ran out
    /// of credit while the reader here kept up (ours, not upstream's).
    pub flow_window_growths_total: IntCounter,
    /// `--probe-interval` checks of server connections, by result.
    pub server_probes_total: IntCounterVec,
    /// Streaming connections whose packets toward the server this agent
    /// moved to another link (the moves extension).
    pub moved_streams_total: IntCounter,
    /// Tunnels ended with data still on its way because its reader took
    /// none of it for [`crate::DRAIN_AFTER_CLOSE`] after the other end left.
    pub drain_timeouts_total: IntCounter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let r = Registry::new();
        let s = "agent";
        let stalls = counter_vec(
            &r,
            s,
            "flow_control_stalls_total",
            "Waits for a reader: to_server, DATA toward a server without credit (the client reads slower than its backend sends); to_endpoint, the server stream held for a backend's full queue (a link without the flow-control extension).",
            &["segment"],
        );
        AgentMetrics {
            open_server_connections: gauge(
                &r,
                s,
                "open_server_connections",
                "Current number of open server connections.",
            ),
            known_server_count: gauge(
                &r,
                s,
                "known_server_count",
                "Current number of servers agent is trying to connect to.",
            ),
            open_endpoint_connections: gauge(
                &r,
                s,
                "open_endpoint_connections",
                "Current number of open endpoint connections.",
            ),
            link_task_readers: gauge(
                &r,
                s,
                "link_task_readers",
                "Streaming endpoint readers running in their server connection's task (at most one per server connection).",
            ),
            server_links: gauge(
                &r,
                s,
                "server_links",
                "Open server connections counted one per link (--links-per-server of them per server); open_server_connections counts servers.",
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
                AGENT_LATENCY_BUCKETS,
            ),
            stream_packets_total: packets_counter(&r, s),
            stream_errors_total: errors_counter(&r, s),
            server_connection_failure_count: counter_vec(
                &r,
                s,
                "server_connection_failure_count",
                "Count of failures to send to or receive from the proxy server, labeled by the direction (from_server or to_server). DEPRECATED, please use stream_events_error_total",
                &["direction"],
            ),
            lease: AgentLeaseMetrics {
                lease_lists_total: counter_vec(
                    &r,
                    s,
                    "lease_lists_total",
                    "Count of server lease list calls made by the agent to the k8s apiserver, labeled by HTTP response code and reason",
                    &["http_response_code", "reason"],
                ),
                lease_watches_total: counter_vec(
                    &r,
                    s,
                    "lease_watches_total",
                    "Count of server lease watch calls made by the agent to the k8s apiserver, labeled by HTTP response code and reason",
                    &["http_response_code", "reason"],
                ),
                lease_list_latency_seconds: histogram_vec(
                    &r,
                    s,
                    "lease_list_latency_seconds",
                    "Latency of server lease listing in seconds",
                    AGENT_LATENCY_BUCKETS,
                    &["http_response_code"],
                ),
            },
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
            server_probes_total: counter_vec(
                &r,
                s,
                "server_probes_total",
                "Checks of server connections every --probe-interval, by result (not_ready: closed or GOAWAY received; the connection is dropped and dialled again).",
                &["result"],
            ),
            drain_timeouts_total: counter(
                &r,
                s,
                "drain_timeouts_total",
                &format!(
                    "Connections closed (CLOSE_REQ) while bytes were still on their way to the backend, which took none of them for {} s; the bytes were dropped.",
                    crate::DRAIN_AFTER_CLOSE.as_secs()
                ),
            ),
            queued_bytes: gauge(
                &r,
                s,
                "queued_bytes",
                "Bytes queued toward backends that have not taken them yet (the packet each is writing included), summed over all connections.",
            ),
            dials_refused_total: counter_vec(
                &r,
                s,
                "dials_refused_total",
                "Dials refused without dialling, by reason (queued_bytes_cap: queued_bytes at its cap).",
                &["reason"],
            ),
            // Shown from the start (0), not only after the first stall.
            flow_window_growths_total: counter(
                &r,
                s,
                "flow_window_growths_total",
                "Times a connection's flow-control window grew: the peer ran out of credit while the reader here kept up (the flow-control extension).",
            ),
            moved_streams_total: counter(
                &r,
                s,
                "moved_streams_total",
                "Streaming connections whose packets toward the server were moved to another link to that server with fewer streams (the moves extension).",
            ),
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
