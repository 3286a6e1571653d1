//! The small HTTP/1.1 servers on the health and admin ports
//! (/healthz, /readyz, /metrics), built on hyper.
//!
//! These ports answer anyone, so each is bounded: at most
//! [`MAX_CONNECTIONS`] open at once (one more is closed as soon as it is
//! accepted), a request head must arrive within [`HEADER_TIMEOUT`], and a
//! connection lives at most [`CONNECTION_LIFETIME`] (which also bounds a
//! client that never reads its response). Both are counted in
//! `connections_refused_total{listener, reason}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntCounterVec;
use proxyctl_listen::{AcceptBackoff, ConnLimit};
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

/// Connections one health or admin port keeps open at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Time a client has to send a whole request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection (Prometheus reconnects on the next scrape).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Routes `path`, query and the request's Host (header or authority) to a
/// reply.
pub type HostHandler = Arc<dyn Fn(&str, Option<&str>, Option<&str>) -> Reply + Send + Sync>;

/// Serves `handler` on `listener` until `stop` fires; `listener_name`
/// labels its refusals in `refused`.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    stop: CancellationToken,
    listener_name: &'static str,
    refused: IntCounterVec,
) {
    serve_with_host(
        listener,
        Arc::new(move |path, query, _host| handler(path, query)),
        stop,
        listener_name,
        refused,
    )
    .await
}

/// As [`serve`], for handlers that need the Host the client asked for.
pub async fn serve_with_host(
    listener: TcpListener,
    handler: HostHandler,
    stop: CancellationToken,
    listener_name: &'static str,
    refused: IntCounterVec,
) {
    let limit = ConnLimit::new(MAX_CONNECTIONS);
    let mut backoff = AcceptBackoff::new(listener_name);
    let at_cap = refused.with_label_values(&[listener_name, "connection_cap"]);
    let timed_out = refused.with_label_values(&[listener_name, "timeout"]);
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let stream = match r {
            Ok((s, _)) => {
                backoff.succeeded();
                s
            }
            Err(e) => {
                backoff.pause_after(&e).await;
                continue;
            }
        };
        let Some(permit) = limit.try_acquire() else {
            at_cap.inc();
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let stop = stop.clone();
        let timed_out = timed_out.clone();
        tokio::spawn(async move {
            let _permit = permit;
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
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {
                    let deadline = match &r {
                        Err(_) => true,
                        Ok(Err(e)) => e.is_timeout(),
                        Ok(Ok(())) => false,
                    };
                    if deadline {
                        timed_out.inc();
                    }
                }
                _ = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Reads until EOF; Err if the peer kept the connection open `wait`.
    async fn read_all(s: &mut TcpStream, wait: Duration) -> Result<Vec<u8>, ()> {
        let mut out = Vec::new();
        tokio::time::timeout(wait, s.read_to_end(&mut out))
            .await
            .map_err(|_| ())?
            .ok();
        Ok(out)
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_capped_and_timed_out_and_health_still_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = IntCounterVec::new(
            prometheus::Opts::new("refused", "test"),
            &["listener", "reason"],
        )
        .unwrap();
        let stop = CancellationToken::new();
        let handler: Handler = Arc::new(|path, _| match path {
            "/healthz" => Reply::text(200, "ok"),
            _ => Reply::not_found(),
        });
        let task = tokio::spawn(serve(
            listener,
            handler,
            stop.clone(),
            "health",
            refused.clone(),
        ));
        let at_cap = refused.with_label_values(&["health", "connection_cap"]);
        let timed_out = refused.with_label_values(&["health", "timeout"]);

        // An attacker's idle connections fill the cap ...
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // ... so one more is closed at once, and counted.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let got = read_all(&mut extra, Duration::from_secs(1)).await;
        assert_eq!(got, Ok(Vec::new()), "closed without an answer");
        assert_eq!(at_cap.get(), 1);

        // A trickled head meets one deadline: HEADER_TIMEOUT from the start.
        let t0 = tokio::time::Instant::now();
        idle[0]
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let first = read_all(&mut idle[0], HEADER_TIMEOUT * 2).await;
        assert!(
            first.is_ok(),
            "an idle connection outlived the header timeout"
        );
        assert!(t0.elapsed() <= HEADER_TIMEOUT + Duration::from_secs(1));
        for s in &mut idle[1..] {
            assert!(read_all(s, Duration::from_secs(1)).await.is_ok());
        }

        // The port serves again.
        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_all(&mut ok, Duration::from_secs(5)).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");

        // A client that sends requests but never reads is cut off too. The
        // connections above give their places back as their tasks end, a
        // moment after their clients saw them close: until then this one
        // may meet the cap (a CI run saw it refused), so it connects again.
        let mut greedy = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let refused_before = at_cap.get();
            let s = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            if at_cap.get() == refused_before {
                break s;
            }
        };
        let before = timed_out.get();
        let spam = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200_000);
        let _ = tokio::time::timeout(CONNECTION_LIFETIME * 2, greedy.write_all(&spam)).await;
        tokio::time::sleep(CONNECTION_LIFETIME).await;
        assert_eq!(
            timed_out.get(),
            before + 1,
            "the never-reading client was cut off"
        );
        stop.cancel();
        task.await.unwrap();
    }
}
