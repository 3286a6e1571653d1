//! Plumbing of the strict Kubernetes API fakes (Lease, TokenReview): the
//! serve loop on loopback (one request per connection, handed to the
//! fake's handler, its reply written back), the checks every fake makes
//! first (bearer token, JSON body), and the kubeconfig that points
//! proxy-server at the fake. What each fake accepts and answers stays in
//! its test file.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

/// One request as the fakes see it.
pub struct Request {
    pub method: String,
    pub target: String,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// A header by lower-case name.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    /// The 401 a real API server gives unless the request carries
    /// `Authorization: Bearer <token>`.
    pub fn unauthorized(&self, token: &str) -> Option<(u16, Value)> {
        (self.header("authorization").as_deref() != Some(&format!("Bearer {token}")))
            .then(|| status(401, "Unauthorized", "missing or wrong bearer token"))
    }

    /// The body as JSON: 415 unless the content type says JSON, 400 unless
    /// it parses.
    pub fn json_body(&self) -> Result<Value, (u16, Value)> {
        if !self
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json"))
        {
            return Err(status(415, "UnsupportedMediaType", "want application/json"));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| status(400, "BadRequest", &format!("body: {e}")))
    }
}

/// What a fake answers one request with.
pub enum Reply {
    /// A JSON body with its HTTP status.
    Json(u16, Value),
    /// A whole response written as it is (a broken answer on purpose).
    Raw(&'static [u8]),
}

impl From<(u16, Value)> for Reply {
    fn from((code, body): (u16, Value)) -> Reply {
        Reply::Json(code, body)
    }
}

/// A Kubernetes `Status` failure object with its HTTP code.
pub fn status(code: u16, reason: &str, msg: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": msg, "code": code}),
    )
}

/// A kubeconfig in `dir` pointing at `http://127.0.0.1:<port>` with a bearer token.
pub fn kubeconfig(dir: &Path, port: u16, token: &str) -> PathBuf {
    let p = dir.join("kubeconfig.yaml");
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: konnectivity\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: fake\n    user: konnectivity\n"
        ),
    )
    .unwrap();
    p
}

/// The serve loop; stops when dropped. Each connection gets its own
/// thread, which reads one request, asks `handle` for the reply, writes it
/// and closes; a malformed or cut-off request is closed unanswered.
pub struct FakeServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl FakeServer {
    pub fn start(handle: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> FakeServer {
        Self::serve(None, handle)
    }

    /// The same over TLS with `cert`/`key` (PEM files): what the pod's
    /// service account reaches at `https://$KUBERNETES_SERVICE_HOST`. A client
    /// that does not trust the certificate's CA never gets a request through.
    pub fn start_tls(
        cert: &Path,
        key: &Path,
        handle: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> FakeServer {
        let certs = rustls_pemfile::certs(&mut &std::fs::read(cert).unwrap()[..])
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut &std::fs::read(key).unwrap()[..])
            .unwrap()
            .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Self::serve(Some(Arc::new(cfg)), handle)
    }

    fn serve(
        tls: Option<Arc<rustls::ServerConfig>>,
        handle: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> FakeServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (sp, handle) = (stop.clone(), Arc::new(handle));
        std::thread::spawn(move || {
            for c in l.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(c) = c else { continue };
                c.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let handle = handle.clone();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    Some(cfg) => {
                        let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                            return;
                        };
                        let mut s = rustls::StreamOwned::new(conn, c);
                        if let Some(req) = read_request(&mut s) {
                            write_reply(&mut s, &handle(&req));
                            s.conn.send_close_notify();
                            let _ = s.flush();
                        }
                    }
                    None => {
                        let mut c = c;
                        if let Some(req) = read_request(&mut c) {
                            write_reply(&mut c, &handle(&req));
                        }
                    }
                });
            }
        });
        FakeServer { port, stop }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request (head byte by byte, then Content-Length bytes); None
/// on a malformed or cut-off request.
fn read_request(c: &mut impl Read) -> Option<Request> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (
        first.next().unwrap_or("").to_string(),
        first.next().unwrap_or("").to_string(),
    );
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    let len: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    req.body = vec![0u8; len];
    c.read_exact(&mut req.body).ok()?;
    Some(req)
}

/// Writes the reply; the connection closes when the caller drops it.
fn write_reply(c: &mut impl Write, reply: &Reply) {
    let _ = match reply {
        Reply::Json(code, body) => {
            let payload = body.to_string();
            c.write_all(
                format!(
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                    payload.len()
                )
                .as_bytes(),
            )
        }
        Reply::Raw(bytes) => c.write_all(bytes),
    };
}
