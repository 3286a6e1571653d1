//! The small HTTP/1.1 servers on the health and admin ports
//! (/healthz, /readyz, /metrics), built on hyper.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A reply: status, content type, body, optional Location header.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub location: Option<String>,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            location: None,
        }
    }
    pub fn metrics(body: String) -> Self {
        Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body,
            location: None,
        }
    }
    pub fn not_found() -> Self {
        Reply::text(404, "404 page not found\n")
    }
}

/// Routes `path` (and query) to a reply.
pub type Handler = Arc<dyn Fn(&str, Option<&str>) -> Reply + Send + Sync>;

/// Routes `path`, query and the request's Host (header or authority) to a
/// reply.
pub type HostHandler = Arc<dyn Fn(&str, Option<&str>, Option<&str>) -> Reply + Send + Sync>;

/// Serves `handler` on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, handler: Handler, stop: CancellationToken) {
    serve_with_host(
        listener,
        Arc::new(move |path, query, _host| handler(path, query)),
        stop,
    )
    .await
}

/// As [`serve`], for handlers that need the Host the client asked for.
pub async fn serve_with_host(listener: TcpListener, handler: HostHandler, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { tracing::warn!(error = %e, "health accept"); continue; }
            },
        };
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let host = req
                    .headers()
                    .get(hyper::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| req.uri().authority().map(|a| a.as_str()));
                let reply = handler(req.uri().path(), req.uri().query(), host);
                let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
                *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
                resp.headers_mut()
                    .insert("content-type", reply.content_type.parse().unwrap());
                if let Some(loc) = reply.location
                    && let Ok(v) = loc.parse()
                {
                    resp.headers_mut().insert("location", v);
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
