//! The admin listener, apart from the pod-facing ones: `/healthz` (the
//! process serves), `/readyz` (pods were read and listeners bound once),
//! `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use proxyctl_listen::{AcceptBackoff, ConnLimit};

use crate::body::{ProxyBody, text};
use crate::metrics::{ListenerLabels, Metrics, PodLabel, RefusedLabels};

/// The admin listener's bounds (from the proxy's `Limits`).
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Connections open at once; one more is closed as soon as accepted.
    pub max_connections: usize,
    /// Time to send a whole request head (also the wait between requests
    /// of a kept-alive connection: hyper counts it from the end of the
    /// previous answer).
    pub header_timeout: Duration,
    /// Longest life of one connection; also ends a client that never reads.
    pub lifetime: Duration,
}

impl From<&crate::proxy::Limits> for AdminLimits {
    fn from(l: &crate::proxy::Limits) -> Self {
        AdminLimits {
            max_connections: l.admin_max_connections,
            header_timeout: l.header_read_timeout,
            lifetime: l.admin_connection_lifetime,
        }
    }
}

/// Serves the admin endpoints on `listener`. It answers anyone who can
/// reach it, so it holds at most `limits.max_connections`, each for a
/// bounded time; both refusals are counted in
/// `connections_refused_total{listener="admin"}`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    limits: AdminLimits,
) {
    let cap = ConnLimit::new(limits.max_connections);
    let mut backoff = AcceptBackoff::new("admin");
    let refused = |reason| {
        metrics
            .connections_refused
            .get_or_create(&RefusedLabels {
                listener: "admin",
                pod: PodLabel(Arc::from("-")),
                reason,
            })
            .clone()
    };
    let failed = metrics
        .accept_errors
        .get_or_create(&ListenerLabels { listener: "admin" })
        .clone();
    let at_cap = refused("connection_cap");
    let timed_out = refused("timeout");
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                backoff.succeeded();
                s
            }
            Err(e) => {
                failed.inc();
                backoff.pause_after(&e).await;
                continue;
            }
        };
        let Some(permit) = cap.try_acquire() else {
            at_cap.inc();
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        let timed_out = timed_out.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = answer(req.uri().path(), &metrics, &ready);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            let timeout = match tokio::time::timeout(limits.lifetime, conn).await {
                Err(_) => true,
                Ok(Err(e)) => e.is_timeout(),
                Ok(Ok(())) => false,
            };
            if timeout {
                timed_out.inc();
            }
        });
    }
}

fn answer(path: &str, metrics: &Metrics, ready: &AtomicBool) -> Response<ProxyBody> {
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready.load(Ordering::SeqCst) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut resp = text(StatusCode::OK, metrics.encode());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
