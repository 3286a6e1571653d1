//! One caller connection: reads its request heads, decides each request,
//! forwards allowed ones over the connection's own upstream connection and
//! writes the answers; records every decision (metrics, audit).
//!
//! The framing is `h1` (see there for why not hyper). Per request this
//! does what nginx does: one read and one write toward the caller, one
//! write and one read toward the upstream, and at most two timer resets.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Sleep;

use super::*;
use crate::h1::{self, Chunk, ChunkedDecoder, HeadError, RequestHead, ResponseHead, View};
use crate::identity;
use crate::metrics::{FetchLabels, IssuedLabels};

/// Initial read buffer of a connection (either side); grows to the head
/// limit when a head needs it.
const READ_BUF: usize = 4096;

/// Upstream bodies up to this size with a known length are read whole, so
/// head and body leave in one write; bigger ones are streamed through.
const BUFFER_BODY_BELOW: u64 = 64 * 1024;

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Runs `work` until a deadline: `None` if the deadline came first.
/// `deadline` is called (for most callers a fixed instant; for writes a
/// clock read, which most writes never need because they complete at
/// once) only if `work` has to wait. The connection's one timer is reset
/// then, and only if it is not already set to that deadline.
async fn until<F: Future>(
    mut timer: Pin<&mut Sleep>,
    deadline: impl FnOnce() -> tokio::time::Instant,
    work: F,
) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    let mut deadline = Some(deadline);
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if let Some(deadline) = deadline.take() {
            let deadline = deadline();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// Writes all of `bytes` to the caller within the write timeout. False if
/// the caller is gone or did not take them in time (the connection must
/// close; a timeout is counted here).
async fn write_caller(
    shared: &Shared,
    conn: &Conn,
    stream: &mut TcpStream,
    bytes: &[u8],
    timer: Pin<&mut Sleep>,
) -> bool {
    let limit = shared.limits.write_timeout;
    let by = || tokio::time::Instant::now() + limit;
    match until(timer, by, stream.write_all(bytes)).await {
        Some(Ok(())) => true,
        Some(Err(_)) => false,
        None => {
            super::refuse_connection(
                shared,
                conn.listener,
                conn.caller.as_deref(),
                conn.peer,
                "write_timeout",
            );
            false
        }
    }
}

/// Why a connection ended before a request could be read.
enum ConnError {
    Timeout,
    Head(HeadError),
    /// The caller closed in the middle of a head or body.
    Incomplete,
    Io(io::Error),
}

impl ConnError {
    fn kind(&self) -> &'static str {
        match self {
            ConnError::Timeout => "header_timeout",
            ConnError::Head(HeadError::TooLarge | HeadError::TooManyFields) => "too_large",
            ConnError::Head(HeadError::Malformed(_)) => "malformed",
            ConnError::Incomplete => "incomplete",
            ConnError::Io(_) => "io",
        }
    }

    fn message(&self) -> String {
        match self {
            ConnError::Timeout => "request head not received in time".into(),
            ConnError::Head(e) => e.to_string(),
            ConnError::Incomplete => "connection closed before the message was complete".into(),
            ConnError::Io(e) => e.to_string(),
        }
    }

    /// What the caller is told before the connection closes (as hyper's
    /// server answers: 431 for oversized heads, 400 for malformed ones).
    fn answer(&self) -> Option<&'static [u8]> {
        match self {
            ConnError::Head(HeadError::TooLarge | HeadError::TooManyFields) => Some(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            ),
            ConnError::Head(HeadError::Malformed(_)) => {
                Some(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            }
            _ => None,
        }
    }
}

/// The caller's side of the connection.
struct Caller {
    stream: TcpStream,
    buf: BytesMut,
    fields: Vec<h1::Field>,
    out: Vec<u8>,
}

/// This connection's upstream connection, kept between its requests
/// (HTTP/1: one request at a time, so no pool and no lock).
struct Upstream {
    stream: TcpStream,
    buf: BytesMut,
    fields: Vec<h1::Field>,
}

/// Serves requests on `stream` until the caller or an error ends it.
pub(super) async fn serve(shared: &Shared, conn: &Conn, stream: TcpStream) {
    let mut caller = Caller {
        stream,
        buf: BytesMut::with_capacity(READ_BUF),
        fields: Vec::new(),
        out: Vec::with_capacity(1024),
    };
    let mut upstream: Option<Upstream> = None;
    let timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
    let mut timer: Pin<&mut Sleep> = timer;
    let mut first = true;
    loop {
        let read = read_head(&shared.limits, &mut caller, timer.as_mut(), first).await;
        first = false;
        let head = match read {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                if let Some(answer) = e.answer() {
                    write_caller(shared, conn, &mut caller.stream, answer, timer.as_mut()).await;
                }
                connection_refused(shared, conn, &e);
                return;
            }
        };
        let keep = serve_request(
            shared,
            conn,
            &mut caller,
            &mut upstream,
            head,
            timer.as_mut(),
        )
        .await;
        if !keep {
            return;
        }
    }
}

fn connection_refused(shared: &Shared, conn: &Conn, e: &ConnError) {
    let kind = e.kind();
    shared
        .metrics
        .connection_errors
        .get_or_create(&KindLabels { kind })
        .inc();
    // Bad input costs the pod a request's worth of its rate, as any
    // refused request does.
    if let Some(caller) = &conn.caller {
        caller.bucket.try_take();
    }
    let pod = caller_key(conn);
    let message = e.message();
    audit_refusal(
        shared,
        conn,
        &AuditRecord {
            ts: now_ts(),
            pod: &pod,
            listener: conn.listener,
            peer: conn.peer,
            method: "-",
            path: "-",
            decision: kind,
            status: 0,
            latency_ms: 0.0,
            rule: None,
            error: Some(message.clone()),
            identity: None,
            dropped: None,
        },
    );
    tracing::debug!(pod = &*pod, peer = %conn.peer, "connection refused: {kind}: {message}");
}

/// The next request head; `None` when the caller closed between requests
/// or stayed silent past the idle timeout. The head has one deadline: from
/// the connection's start for its first request, else from its first byte
/// (or now, when part of it already came with the previous request).
async fn read_head(
    limits: &Limits,
    caller: &mut Caller,
    timer: Pin<&mut Sleep>,
    first: bool,
) -> Result<Option<RequestHead>, ConnError> {
    let max_len = limits.max_header_bytes;
    let mut idle = !first && caller.buf.is_empty();
    let mut deadline = tokio::time::Instant::now()
        + if idle {
            limits.idle_timeout
        } else {
            limits.header_read_timeout
        };
    let mut timer = timer;
    loop {
        if !caller.buf.is_empty() {
            let parsed =
                h1::parse_request(&caller.buf, &mut caller.fields, limits.max_headers, max_len)
                    .map_err(ConnError::Head)?;
            if let Some(head) = parsed {
                return Ok(Some(head));
            }
        }
        caller.buf.reserve(READ_BUF);
        let read = until(
            timer.as_mut(),
            || deadline,
            caller.stream.read_buf(&mut caller.buf),
        );
        match read.await {
            // A kept-alive connection nobody uses: closed quietly.
            None if idle => return Ok(None),
            None => return Err(ConnError::Timeout),
            Some(Ok(0)) if caller.buf.is_empty() => return Ok(None),
            Some(Ok(0)) => return Err(ConnError::Incomplete),
            Some(Ok(_)) if idle => {
                idle = false;
                deadline = tokio::time::Instant::now() + limits.header_read_timeout;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(ConnError::Io(e)),
        }
    }
}

/// A local answer (refusal or upstream failure).
struct Local {
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
    decision: &'static str,
    /// The connection closes after it (framing could not be trusted, or
    /// a request body was left unread).
    close: bool,
    retry_after: bool,
    /// `X-aws-ec2-metadata-token-ttl-seconds` of a session token answer.
    ttl_header: Option<String>,
}

impl Local {
    fn new(path: &str, status: StatusCode, message: &str, decision: &'static str) -> Self {
        let (content_type, body) = if is_azure(path) {
            (
                JSON,
                serde_json::to_vec(&json!({ "error": message })).unwrap_or_default(),
            )
        } else {
            ("text/plain", format!("{message}\n").into_bytes())
        };
        Local {
            status,
            content_type,
            body,
            decision,
            close: false,
            retry_after: false,
            ttl_header: None,
        }
    }

    fn text(status: StatusCode, message: &str, decision: &'static str) -> Self {
        Local {
            content_type: "text/plain",
            body: message.as_bytes().to_vec(),
            ..Local::new("", status, "", decision)
        }
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

const JSON: &str = "application/json; charset=utf-8";

/// What to do with a request (the rule that allowed it comes beside).
enum Decided {
    Answer(Local),
    Forward {
        body_len: u64,
    },
    /// A credential request answered by the identity layer for this
    /// identity (its label).
    AzureToken {
        ask: identity::AzureTokenAsk,
        identity: String,
    },
    /// An IMDSv2 session token for an AWS-bound pod, obtained upstream and
    /// remembered as this pod's.
    AwsSessionToken {
        ttl: String,
    },
    /// Credentials of the pod's IAM role.
    AwsCredentials {
        role: identity::AwsRole,
    },
    /// A token of the pod's Google service account.
    Gcp {
        account: crate::gcp::GcpServiceAccount,
        ask: crate::gcp::GcpAsk,
    },
}

const AWS_TOKEN_PATH: &str = "/latest/api/token";
const AWS_CREDENTIALS_DIR: &str = "/latest/meta-data/iam/security-credentials";

/// IMDS's refusals on the AWS side are bare statuses.
fn aws_refusal(status: StatusCode, decision: &'static str) -> Decided {
    let reason = status.canonical_reason().unwrap_or("");
    Decided::Answer(Local::text(status, &format!("{reason}\n"), decision))
}

/// The AWS part of `decide_credential`.
fn decide_aws(
    shared: &Shared,
    pod: &Pod,
    rule: &crate::rules::Rule,
    view: &View<'_>,
    method: &str,
    path: &str,
) -> Option<Decided> {
    let bound = shared.rules.identity_for(pod).and_then(|b| b.aws.as_ref());
    if path == AWS_TOKEN_PATH {
        // Only bound pods' tokens are needed here (to check their
        // credential reads); the others' pass through to the service.
        if method != "PUT" || bound.is_none() {
            return None;
        }
        let ttl = view.values(crate::mock::AWS_TOKEN_TTL_HEADER).next();
        let ttl = ttl.and_then(|t| std::str::from_utf8(t).ok()).unwrap_or("");
        return Some(Decided::AwsSessionToken {
            ttl: ttl.to_owned(),
        });
    }
    if !path.starts_with("/latest/") {
        return None;
    }
    let token = view
        .values(crate::mock::AWS_TOKEN_HEADER)
        .next()
        .and_then(|t| std::str::from_utf8(t).ok());
    if token.is_none() && !rule.imdsv1 {
        return Some(aws_refusal(StatusCode::UNAUTHORIZED, "imdsv1_refused"));
    }
    let rest = path.strip_prefix(AWS_CREDENTIALS_DIR)?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    if method != "GET" && method != "HEAD" {
        return Some(aws_refusal(StatusCode::METHOD_NOT_ALLOWED, "denied"));
    }
    let Some(role) = bound else {
        // A node with no role for this pod: IMDS's answer on an instance
        // without a profile.
        return Some(aws_refusal(StatusCode::NOT_FOUND, "no_identity"));
    };
    // A token must be one this proxy obtained for this very pod.
    if let Some(token) = token
        && !shared.session_tokens.valid_for(token, &pod.key())
    {
        return Some(aws_refusal(StatusCode::UNAUTHORIZED, "bad_token"));
    }
    let name = rest.trim_matches('/');
    Some(if name.is_empty() {
        Decided::Answer(Local::text(StatusCode::OK, role.name(), ALLOWED))
    } else if name == role.name() {
        Decided::AwsCredentials { role: role.clone() }
    } else {
        aws_refusal(StatusCode::NOT_FOUND, "wrong_identity")
    })
}

/// The GCP part of `decide_credential`: everything under the
/// service-accounts directory is answered here, never forwarded (in any
/// letter case: the rules treat the prefix case-insensitively too).
fn decide_gcp(
    shared: &Shared,
    pod: &Pod,
    method: &str,
    path: &str,
    query: &str,
) -> Option<Decided> {
    let dir = crate::gcp::SERVICE_ACCOUNTS_DIR;
    // A recursive listing of a directory above the accounts would carry
    // the node's account (email, scopes) to the pod: not served.
    let above = ["/computeMetadata/v1", "/computeMetadata/v1/instance"];
    if above.contains(&path.trim_end_matches('/'))
        && crate::mock::parse_query(query).map_or(true, |q| {
            q.get("recursive")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        })
    {
        return Some(Decided::Answer(Local::text(
            StatusCode::FORBIDDEN,
            "Forbidden. Recursive listings that include service accounts are not served\n",
            "denied",
        )));
    }
    if path.len() < dir.len() || !path.as_bytes()[..dir.len()].eq_ignore_ascii_case(dir.as_bytes())
    {
        return None;
    }
    let rest = &path[dir.len()..];
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    let bound = shared.rules.identity_for(pod).and_then(|b| b.gcp.as_ref());
    let ask = if path.starts_with(dir) {
        crate::gcp::gcp_ask(bound, method, rest, query)
    } else {
        crate::gcp::gcp_ask(bound, method, "/-/unknown", "")
    };
    Some(match (ask, bound) {
        (crate::gcp::GcpAsk::Answer(a), _) => Decided::Answer(a.into()),
        (ask, Some(account)) => Decided::Gcp {
            account: account.clone(),
            ask,
        },
        (_, None) => unreachable!("credential asks come only from bound pods"),
    })
}

impl From<identity::Answer> for Local {
    fn from(a: identity::Answer) -> Self {
        Local {
            status: StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY),
            content_type: a.content_type,
            body: a.body,
            decision: a.decision,
            close: false,
            retry_after: a.retry_after,
            ttl_header: None,
        }
    }
}

/// The identity layer's part of `decide` for an allowed request: `None`
/// when the request is not one it answers.
fn decide_credential(
    shared: &Shared,
    pod: &Pod,
    rule: &crate::rules::Rule,
    view: &View<'_>,
    method: &str,
    path: &str,
    query: &str,
) -> Option<Decided> {
    if path.starts_with("/latest/") {
        return decide_aws(shared, pod, rule, view, method, path);
    }
    if is_gcp(path) {
        return decide_gcp(shared, pod, method, path, query);
    }
    if !path.eq_ignore_ascii_case(identity::AZURE_TOKEN_PATH) || method != "GET" {
        return None;
    }
    let Some(bound) = shared
        .rules
        .identity_for(pod)
        .and_then(|b| b.azure.as_ref())
    else {
        // What IMDS answers on a VM without that identity: no token, and
        // nothing about the node's identities.
        return Some(Decided::Answer(Local {
            content_type: JSON,
            body: serde_json::to_vec(&json!({
                "error": "invalid_request",
                "error_description": "Identity not found",
            }))
            .unwrap_or_default(),
            ..Local::new(path, StatusCode::BAD_REQUEST, "", "no_identity")
        }));
    };
    Some(match identity::azure_token_ask(bound, query) {
        Ok(ask) => Decided::AzureToken {
            ask,
            identity: bound.label(),
        },
        Err(refusal) => Decided::Answer(refusal.into()),
    })
}

/// Order of checks: see the module doc of `proxy`.
fn decide<'r>(
    shared: &'r Shared,
    conn: &Conn,
    pod: Option<&Pod>,
    view: &View<'_>,
    head: &RequestHead,
) -> (Decided, Option<&'r str>) {
    let target = view.target(head);
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let answer = |local: Local| (Decided::Answer(local), None);
    let Some(pod) = pod else {
        return answer(Local::new(
            path,
            StatusCode::FORBIDDEN,
            "Forbidden. Unknown caller",
            "unknown_caller",
        ));
    };
    // Every request of a pod costs it a token, whatever its outcome: a pod
    // that floods refused requests is slowed down like any other.
    let bucket_ok = conn.caller.as_ref().is_some_and(|c| c.bucket.try_take());
    if !bucket_ok {
        let mut local = Local::new(
            path,
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            "rate_limited",
        );
        local.retry_after = true;
        // Its body (if any) is not read: the connection cannot go on.
        let bodyless = !view.has("transfer-encoding")
            && matches!(h1::content_length(view), Ok(None | Some(0)));
        return answer(if bodyless { local } else { local.closing() });
    }
    // Framing: one unambiguous Content-Length or nothing. Transfer-Encoding
    // on a request is refused outright: metadata requests are tiny, and
    // CL/TE disagreements are how requests are smuggled.
    if view.has("transfer-encoding") {
        return answer(
            Local::new(
                path,
                StatusCode::BAD_REQUEST,
                "Bad request. Ambiguous or chunked request framing",
                "bad_framing",
            )
            .closing(),
        );
    }
    let body_len = match h1::content_length(view) {
        Err(()) => {
            return answer(
                Local::new(
                    path,
                    StatusCode::BAD_REQUEST,
                    "Bad request. Invalid Content-Length",
                    "bad_framing",
                )
                .closing(),
            );
        }
        Ok(Some(n)) if n > shared.limits.max_body_bytes => {
            return answer(
                Local::new(
                    path,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request body too large",
                    "too_large",
                )
                .closing(),
            );
        }
        Ok(n) => n.unwrap_or(0),
    };
    // From here on a refusal leaves the body unread: close after it.
    let unread = |local: Local| {
        let local = if body_len > 0 { local.closing() } else { local };
        (Decided::Answer(local), None)
    };
    // Origin-form only: no absolute-form, authority-form or `*`.
    if !path_is_canonical(path) {
        return unread(Local::new(
            path,
            StatusCode::BAD_REQUEST,
            "Bad request. Path not accepted",
            "bad_path",
        ));
    }
    if view.has("x-forwarded-for") || view.has("forwarded") {
        let local = if is_azure(path) {
            Local::new(
                path,
                StatusCode::BAD_REQUEST,
                "Bad request. Requests with the X-Forwarded-For header are not accepted",
                "forwarded_header",
            )
        } else {
            Local::text(StatusCode::FORBIDDEN, "Forbidden\n", "forwarded_header")
        };
        return unread(local);
    }
    if is_gcp(path) {
        // Exactly one `Metadata-Flavor: Google`, as the metadata server
        // requires of every /computeMetadata request.
        let mut values = view.values(crate::gcp::FLAVOR_HEADER);
        let ok = values.next().is_some_and(|v| v == b"Google") && values.next().is_none();
        if !ok {
            return unread(Local::text(
                StatusCode::FORBIDDEN,
                "Missing required header \"Metadata-Flavor\": \"Google\"\n",
                "missing_metadata_header",
            ));
        }
    }
    if is_azure(path) {
        // Exactly one `Metadata` field, equal to `true`.
        let mut values = view.values("metadata");
        let ok = values
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case(b"true"))
            && values.next().is_none();
        if !ok {
            let body = if path == "/metadata/identity/oauth2/token" {
                json!({"error": "invalid_request", "error_description": "Required metadata header not specified"})
            } else {
                json!({"error": "Bad request. Required metadata header not specified"})
            };
            return unread(Local {
                content_type: JSON,
                body: serde_json::to_vec(&body).unwrap_or_default(),
                ..Local::new(path, StatusCode::BAD_REQUEST, "", "missing_metadata_header")
            });
        }
    }
    let method = view.method(head);
    let allowing = shared.rules.allowing_rule(pod, method, path);
    let rule = match allowing
        .map(|r| r.name.as_str())
        .map_or(Verdict::Deny, Verdict::Allow)
    {
        Verdict::Allow(rule) => rule,
        Verdict::Deny => {
            let message = format!("Forbidden. Pod {} may not {method} {path}", pod.key());
            return unread(Local::new(path, StatusCode::FORBIDDEN, &message, "denied"));
        }
    };
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let allowing = allowing.expect("allowed by a rule");
    if let Some(decided) = decide_credential(shared, pod, allowing, view, method, path, query) {
        let decided = match decided {
            Decided::Answer(local) => unread(local).0,
            other => other,
        };
        return (decided, Some(rule));
    }
    (Decided::Forward { body_len }, Some(rule))
}

/// The longest the GCP metadata server may hold `target` open: a
/// `wait_for_change=true` request is answered when the value changes or
/// its `timeout_sec` passes (none given: up to an hour, the cap here),
/// so the upstream timeout starts after that.
fn held_open(target: &str) -> Option<Duration> {
    const MAX_HOLD: u64 = 3600;
    let query = target.split_once('?')?.1;
    let params = crate::mock::parse_query(query).ok()?;
    if !params
        .get("wait_for_change")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return None;
    }
    let secs = params
        .get("timeout_sec")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(MAX_HOLD)
        .min(MAX_HOLD);
    Some(Duration::from_secs(secs))
}

/// Whether the caller wants the connection kept after this request.
fn caller_keeps_alive(view: &View<'_>, head: &RequestHead) -> bool {
    if head.minor == 0 {
        view.lists("connection", "keep-alive")
    } else {
        !view.lists("connection", "close")
    }
}

/// Serves one request whose head is at the start of the caller's buffer.
/// Returns whether the connection stays open.
async fn serve_request(
    shared: &Shared,
    conn: &Conn,
    caller: &mut Caller,
    upstream: &mut Option<Upstream>,
    head: RequestHead,
    mut timer: Pin<&mut Sleep>,
) -> bool {
    let start = Instant::now();
    let pod = conn
        .caller
        .as_ref()
        .map(|i| i.pod.read().expect("pod poisoned").clone());
    let Caller {
        stream,
        buf,
        fields,
        out,
    } = caller;
    let view = View::new(&buf[..head.len], fields);
    let (verdict, rule) = decide(shared, conn, pod.as_deref(), &view, &head);
    let keep_alive = caller_keeps_alive(&view, &head);
    let target = view.target(&head);
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let method = view.method(&head);
    let gcp = is_gcp(path);

    let mut issued_for: Option<String> = None;
    let (status, decision, consumed, keep) = match verdict {
        Decided::AzureToken { ask, identity } => {
            let local = azure_token(shared, conn, &ask, &identity).await;
            issued_for = Some(identity);
            let keep = keep_alive && !local.close;
            write_local(out, &local, head.minor, keep, gcp, false);
            let ok = write_caller(shared, conn, stream, out, timer.as_mut()).await;
            (local.status.as_u16(), local.decision, head.len, keep && ok)
        }
        Decided::Gcp { account, ask } => {
            let label = account.label();
            let local = gcp_credential(shared, conn, &account, &ask, &label).await;
            issued_for = Some(label);
            let keep = keep_alive && !local.close;
            write_local(out, &local, head.minor, keep, gcp, method == "HEAD");
            let ok = write_caller(shared, conn, stream, out, timer.as_mut()).await;
            (local.status.as_u16(), local.decision, head.len, keep && ok)
        }
        Decided::AwsSessionToken { ttl } => {
            let local = aws_session_token(shared, conn, &ttl).await;
            let keep = keep_alive && !local.close;
            write_local(out, &local, head.minor, keep, gcp, false);
            let ok = write_caller(shared, conn, stream, out, timer.as_mut()).await;
            (local.status.as_u16(), local.decision, head.len, keep && ok)
        }
        Decided::AwsCredentials { role } => {
            let label = role.label();
            let local = aws_credentials(shared, conn, &role, &label).await;
            issued_for = Some(label);
            let keep = keep_alive && !local.close;
            write_local(out, &local, head.minor, keep, gcp, method == "HEAD");
            let ok = write_caller(shared, conn, stream, out, timer.as_mut()).await;
            (local.status.as_u16(), local.decision, head.len, keep && ok)
        }
        Decided::Answer(local) => {
            let keep = keep_alive && !local.close;
            write_local(out, &local, head.minor, keep, gcp, method == "HEAD");
            let ok = write_caller(shared, conn, stream, out, timer.as_mut()).await;
            (local.status.as_u16(), local.decision, head.len, keep && ok)
        }
        Decided::Forward { body_len, .. } => {
            // The upstream request: the head without hop-by-hop fields, then
            // the body (read whole: at most `max_body_bytes`).
            out.clear();
            write_upstream_head(out, &view, &head, &shared.upstream, body_len);
            let in_buf = (buf.len() - head.len).min(body_len as usize);
            out.extend_from_slice(&buf[head.len..head.len + in_buf]);
            let missing = body_len - in_buf as u64;
            if missing > 0 {
                if view.lists("expect", "100-continue")
                    && !write_caller(
                        shared,
                        conn,
                        stream,
                        b"HTTP/1.1 100 Continue\r\n\r\n",
                        timer.as_mut(),
                    )
                    .await
                {
                    return false;
                }
                let deadline = tokio::time::Instant::now() + shared.limits.header_read_timeout;
                let mut body = (&mut *stream).take(missing);
                let reading = body.read_to_end(out);
                match until(timer.as_mut(), || deadline, reading).await {
                    Some(Ok(n)) if n as u64 == missing => {}
                    _ => {
                        connection_refused(shared, conn, &ConnError::Incomplete);
                        return false;
                    }
                }
            }
            let idempotent = matches!(method, "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS");
            let head_only = method == "HEAD";
            let wait = if gcp { held_open(target) } else { None };
            let deadline = tokio::time::Instant::from_std(start)
                + wait.map_or(shared.limits.upstream_timeout, |w| {
                    w + shared.limits.upstream_timeout
                });
            let outcome = forward(
                shared,
                conn,
                upstream,
                out,
                idempotent,
                head_only,
                stream,
                head.minor,
                keep_alive,
                deadline,
                timer.as_mut(),
            )
            .await;
            match outcome {
                Forwarded::Answered { status, keep } => (status, ALLOWED, head.len + in_buf, keep),
                Forwarded::Failed(local) => {
                    let keep = keep_alive && !local.close;
                    write_local(out, &local, head.minor, keep, gcp, method == "HEAD");
                    let ok = write_caller(shared, conn, stream, out, timer.as_mut()).await;
                    (
                        local.status.as_u16(),
                        local.decision,
                        head.len + in_buf,
                        keep && ok,
                    )
                }
            }
        }
    };
    let latency = start.elapsed();
    record(
        shared,
        conn,
        method,
        path,
        decision,
        status,
        latency,
        rule,
        issued_for.as_deref(),
    );
    buf.advance(consumed);
    keep
}

#[allow(clippy::too_many_arguments)]
fn record(
    shared: &Shared,
    conn: &Conn,
    method: &str,
    path: &str,
    decision: &'static str,
    status: u16,
    latency: Duration,
    rule: Option<&str>,
    identity: Option<&str>,
) {
    match &conn.caller {
        Some(caller) if decision == ALLOWED && status == 200 => {
            caller.allowed_ok.inc();
        }
        _ => {
            shared
                .metrics
                .requests
                .get_or_create(&RequestLabels {
                    pod: PodLabel(caller_key(conn)),
                    decision,
                    code: status,
                })
                .inc();
        }
    }
    if decision == ALLOWED {
        shared.allowed_duration.observe(latency.as_secs_f64());
    } else {
        shared
            .metrics
            .duration
            .get_or_create(&DecisionLabels { decision })
            .observe(latency.as_secs_f64());
    }
    let rec = AuditRecord {
        ts: now_ts(),
        pod: conn.caller.as_ref().map_or("-", |c| &*c.key),
        listener: conn.listener,
        peer: conn.peer,
        method,
        path,
        decision,
        status,
        latency_ms: latency.as_secs_f64() * 1000.0,
        rule,
        error: None,
        identity,
        dropped: None,
    };
    if decision == ALLOWED {
        // Bounded by the pod's request rate: never dropped.
        shared.audit.record(&rec);
    } else {
        audit_refusal(shared, conn, &rec);
    }
}

/// The audit line of a refusal, through the caller's sampler.
fn audit_refusal(shared: &Shared, conn: &Conn, rec: &AuditRecord<'_>) {
    let budget = conn
        .caller
        .as_ref()
        .map_or(&shared.unknown_audit, |c| &c.audit);
    super::audit_sampled(shared, budget, rec);
}

/// An IMDSv2 session token from the service for an AWS-bound pod, kept as
/// that pod's for its TTL.
async fn aws_session_token(shared: &Shared, conn: &Conn, ttl: &str) -> Local {
    let (upstream, timeout) = upstream_of(shared);
    let got = identity::upstream_request(
        upstream,
        shared.upstream.as_str(),
        "PUT",
        AWS_TOKEN_PATH,
        &[(crate::mock::AWS_TOKEN_TTL_HEADER, ttl)],
        Vec::new(),
        timeout,
    )
    .await;
    match got {
        Ok((200, answered_ttl, body)) => {
            let token = String::from_utf8_lossy(&body).trim().to_owned();
            let secs = answered_ttl
                .as_deref()
                .unwrap_or(ttl)
                .parse::<u64>()
                .unwrap_or(0);
            if token.is_empty()
                || !shared.session_tokens.insert(
                    &token,
                    caller_key(conn),
                    Duration::from_secs(secs),
                )
            {
                return identity::failure_answer(identity::FetchError::Failed(
                    "no session token to hand out".into(),
                ))
                .into();
            }
            Local {
                ttl_header: Some(secs.to_string()),
                ..Local::text(StatusCode::OK, &token, ALLOWED)
            }
        }
        // The service's refusal (bad TTL ...) as it was.
        Ok((status, _, body)) => Local {
            content_type: "text/html",
            body,
            ..Local::text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                "",
                "upstream_refused",
            )
        },
        Err(e) => identity::failure_answer(identity::FetchError::Failed(e)).into(),
    }
}

/// How a refusal from a credential's source reaches the pod.
#[derive(Clone, Copy)]
enum Refusals {
    /// As the source gave it: IMDS's own errors are the Azure SDK's to read.
    PassedOn,
    /// As a failure the SDKs retry (503): AWS SDKs retry 5xx on the
    /// credentials path, not 4xx, and IAM's refusals are the node's
    /// configuration, logged, not the pod's to read.
    AsFailures,
}

/// What every credential path shares: the cache (one fetch per key at a
/// time), each fetch counted for its identity, the issued counter, and the
/// failure answer the SDKs retry on.
async fn cached_credential<Fut>(
    shared: &Shared,
    conn: &Conn,
    (key, label): (&str, &str),
    refusals: Refusals,
    fetch: impl FnOnce() -> Fut,
    answer: impl FnOnce(&identity::Credential) -> Local,
) -> Local
where
    Fut: Future<Output = Result<identity::Credential, identity::FetchError>>,
{
    let counted = || async {
        let got = fetch().await;
        count_fetch(shared, label, &got);
        match (refusals, got) {
            (Refusals::AsFailures, Err(identity::FetchError::Refused { status, .. })) => Err(
                identity::FetchError::Failed(format!("refused with {status}")),
            ),
            (_, got) => got,
        }
    };
    match shared.credentials.get(key, counted).await {
        Ok((credential, _)) => {
            issued(shared, conn, label);
            answer(&credential)
        }
        Err(e) => identity::failure_answer(e).into(),
    }
}

/// The answer when the rules bind an identity whose endpoint is not set.
fn not_configured(what: &str) -> Local {
    identity::failure_answer(identity::FetchError::Failed(format!(
        "no {what} endpoint configured"
    )))
    .into()
}

/// The upstream metadata service's address and the time a fetch may take.
fn upstream_of(shared: &Shared) -> ((&str, u16), Duration) {
    let (host, port) = &shared.upstream_addr;
    ((host.as_str(), *port), shared.limits.upstream_timeout)
}

/// The node's own credential (its AWS keys, its GCP token) from the cache,
/// or fetched from the metadata service with `fetch`, under `key`.
async fn node_credential<'s, Fut>(
    shared: &'s Shared,
    key: &str,
    fetch: impl FnOnce((&'s str, u16), &'s str, Duration) -> Fut,
) -> Result<Arc<identity::Credential>, identity::FetchError>
where
    Fut: Future<Output = Result<identity::Credential, identity::FetchError>>,
{
    let (upstream, timeout) = upstream_of(shared);
    let fetch = || fetch(upstream, shared.upstream.as_str(), timeout);
    Ok(shared.credentials.get(key, fetch).await?.0)
}

/// The pod's role credentials from the cache, or assumed at STS with the
/// node's credentials (both cached, one fetch per identity at a time).
async fn aws_credentials(
    shared: &Shared,
    conn: &Conn,
    role: &identity::AwsRole,
    label: &str,
) -> Local {
    let Some(sts) = shared.sts.as_ref() else {
        return not_configured("STS");
    };
    let timeout = shared.limits.upstream_timeout;
    let pod = caller_key(conn);
    let fetch = || async {
        let node = node_credential(shared, "aws:node", crate::sts::node_credentials).await?;
        let Some(keys) = crate::sts::AwsKeys::from_imds(&node.document) else {
            return Err(identity::FetchError::Failed("node keys unreadable".into()));
        };
        crate::sts::assume_role(
            sts,
            &keys,
            &role.role_arn,
            &crate::sts::session_name(&pod),
            role.duration_seconds,
            timeout,
        )
        .await
    };
    cached_credential(
        shared,
        conn,
        (label, label),
        Refusals::AsFailures,
        fetch,
        |credential| Local {
            content_type: "text/plain",
            body: credential.document.to_string().into_bytes(),
            ..Local::text(StatusCode::OK, "", ALLOWED)
        },
    )
    .await
}

fn count_fetch<T>(shared: &Shared, label: &str, got: &Result<T, identity::FetchError>) {
    let outcome = match got {
        Ok(_) => "ok",
        Err(identity::FetchError::Refused { .. }) => "refused",
        Err(identity::FetchError::Failed(_)) => "failed",
    };
    shared
        .metrics
        .credential_fetches
        .get_or_create(&FetchLabels {
            identity: label.to_owned(),
            outcome,
        })
        .inc();
}

fn issued(shared: &Shared, conn: &Conn, label: &str) {
    shared
        .metrics
        .credentials_issued
        .get_or_create(&IssuedLabels {
            pod: PodLabel(caller_key(conn)),
            identity: label.to_owned(),
        })
        .inc();
}

/// A token of `account` from the cache, or from IAM Credentials with the
/// node's token (both cached, one fetch per key at a time).
async fn gcp_credential(
    shared: &Shared,
    conn: &Conn,
    account: &crate::gcp::GcpServiceAccount,
    ask: &crate::gcp::GcpAsk,
    label: &str,
) -> Local {
    use crate::gcp::GcpAsk;
    let Some(iam) = shared.iam.as_ref() else {
        return not_configured("IAM Credentials");
    };
    let timeout = shared.limits.upstream_timeout;
    let key = match ask {
        GcpAsk::Token { key, .. } | GcpAsk::Identity { key, .. } => key.as_str(),
        GcpAsk::Answer(_) => unreachable!("answered in decide"),
    };
    let fetch = || async {
        let node = node_credential(shared, "gcp:node", crate::gcp::node_token).await?;
        let node_token = node.document["access_token"].as_str().unwrap_or_default();
        match ask {
            GcpAsk::Token { scopes, .. } => {
                crate::gcp::generate_access_token(iam, node_token, account, scopes, timeout).await
            }
            GcpAsk::Identity {
                audience,
                include_email,
                ..
            } => {
                crate::gcp::generate_id_token(
                    iam,
                    node_token,
                    account,
                    audience,
                    *include_email,
                    timeout,
                )
                .await
            }
            GcpAsk::Answer(_) => unreachable!("answered in decide"),
        }
    };
    cached_credential(
        shared,
        conn,
        (key, label),
        Refusals::AsFailures,
        fetch,
        |credential| match ask {
            GcpAsk::Identity { .. } => Local {
                content_type: crate::gcp::TEXT,
                body: credential.document["token"]
                    .as_str()
                    .unwrap_or_default()
                    .as_bytes()
                    .to_vec(),
                ..Local::text(StatusCode::OK, "", ALLOWED)
            },
            _ => Local {
                content_type: crate::gcp::JSON,
                body: crate::gcp::token_answer(credential, identity::unix_now()),
                ..Local::text(StatusCode::OK, "", ALLOWED)
            },
        },
    )
    .await
}

/// A token for `identity` from the cache, fetched upstream when it is
/// missing or due for refresh (one fetch per identity at a time).
async fn azure_token(
    shared: &Shared,
    conn: &Conn,
    ask: &identity::AzureTokenAsk,
    label: &str,
) -> Local {
    let (upstream, timeout) = upstream_of(shared);
    cached_credential(
        shared,
        conn,
        (&ask.key, label),
        Refusals::PassedOn,
        || identity::fetch_azure(upstream, shared.upstream.as_str(), ask, timeout),
        |credential| Local {
            content_type: JSON,
            body: credential.azure_answer(identity::unix_now()),
            ..Local::text(StatusCode::OK, "", ALLOWED)
        },
    )
    .await
}

fn status_line(out: &mut Vec<u8>, code: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    h1::put_number(out, u64::from(code));
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

fn connection_field(out: &mut Vec<u8>, minor: u8, keep: bool) {
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// `head_only`: the answer to a HEAD request, whose body the caller will not
/// read (RFC 9110 9.3.2): sent, it would be taken for the next answer.
/// `gcp`: the answer to a GCP metadata path, which carries
/// `Metadata-Flavor: Google` as every metadata server answer does (SDKs
/// check it to know they reached one).
fn write_local(
    out: &mut Vec<u8>,
    local: &Local,
    minor: u8,
    keep: bool,
    gcp: bool,
    head_only: bool,
) {
    out.clear();
    let reason = local.status.canonical_reason().unwrap_or("");
    status_line(out, local.status.as_u16(), reason.as_bytes());
    h1::put_field(out, "content-type", local.content_type.as_bytes());
    out.extend_from_slice(b"content-length: ");
    h1::put_number(out, local.body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if local.retry_after {
        out.extend_from_slice(b"retry-after: 1\r\n");
    }
    if gcp {
        out.extend_from_slice(b"metadata-flavor: Google\r\n");
    }
    if let Some(ttl) = &local.ttl_header {
        h1::put_field(out, crate::mock::AWS_TOKEN_TTL_HEADER, ttl.as_bytes());
    }
    connection_field(out, minor, keep);
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&local.body);
    }
}

/// The request head toward the upstream: origin-form, HTTP/1.1, the
/// caller's fields minus hop-by-hop ones and `Expect` (answered here), the
/// caller's Host (the upstream's when there is none), and the body length.
fn write_upstream_head(
    out: &mut Vec<u8>,
    view: &View<'_>,
    head: &RequestHead,
    authority: &http::uri::Authority,
    body_len: u64,
) {
    let method = view.method(head);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(view.target(head).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    for (name, value) in view.fields() {
        if h1::is_hop_by_hop(view, name)
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("content-length")
        {
            continue;
        }
        has_host |= name.eq_ignore_ascii_case("host");
        h1::put_field(out, name, value);
    }
    if !has_host {
        h1::put_field(out, "host", authority.as_str().as_bytes());
    }
    if body_len > 0 || matches!(method, "POST" | "PUT" | "PATCH") {
        out.extend_from_slice(b"content-length: ");
        h1::put_number(out, body_len);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

enum Forwarded {
    /// The upstream's answer went to the caller (whole or streamed).
    Answered { status: u16, keep: bool },
    /// Nothing was sent to the caller yet; answer this instead.
    Failed(Local),
}

enum UpstreamError {
    /// Connect failed, or the connection ended before any answer.
    Unreachable(String),
    Timeout,
    /// The answer was not valid HTTP/1.x or ended early.
    Broken(&'static str),
}

impl UpstreamError {
    fn local(self) -> Local {
        match self {
            UpstreamError::Unreachable(e) => {
                tracing::warn!("upstream request failed: {e}");
                Local::text(
                    StatusCode::BAD_GATEWAY,
                    "Upstream metadata service unreachable\n",
                    "upstream_error",
                )
            }
            UpstreamError::Broken(why) => {
                tracing::warn!("upstream answer refused: {why}");
                Local::text(
                    StatusCode::BAD_GATEWAY,
                    "Upstream metadata service failed mid-body\n",
                    "upstream_error",
                )
            }
            UpstreamError::Timeout => Local::text(
                StatusCode::GATEWAY_TIMEOUT,
                "Upstream metadata service timed out\n",
                "upstream_timeout",
            ),
        }
    }
}

/// How the upstream's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Sends the request in `out` upstream and passes the answer to the
/// caller. `out` is free for the answer once the request is written.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    conn: &Conn,
    slot: &mut Option<Upstream>,
    out: &mut Vec<u8>,
    idempotent: bool,
    head_only: bool,
    caller: &mut TcpStream,
    caller_minor: u8,
    caller_keep: bool,
    deadline: tokio::time::Instant,
    mut timer: Pin<&mut Sleep>,
) -> Forwarded {
    let (mut up, resp) =
        match exchange(shared, slot, out, idempotent, deadline, timer.as_mut()).await {
            Ok(r) => r,
            Err(e) => return Forwarded::Failed(e.local()),
        };
    let view = View::new(&up.buf[..resp.len], &up.fields);
    let both_framings = view.has("transfer-encoding") && view.has("content-length");
    let framing = if head_only || matches!(resp.code, 204 | 304) {
        Framing::Empty
    } else if view.has("transfer-encoding") {
        if view.lists("transfer-encoding", "chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match h1::content_length(&view) {
            Ok(Some(n)) => Framing::Length(n),
            Ok(None) => Framing::UntilClose,
            Err(()) => {
                return Forwarded::Failed(UpstreamError::Broken("bad Content-Length").local());
            }
        }
    };
    let upstream_keeps = !both_framings
        && framing != Framing::UntilClose
        && if resp.minor == 0 {
            view.lists("connection", "keep-alive")
        } else {
            !view.lists("connection", "close")
        };
    // A body of unknown length reaches an HTTP/1.0 caller as bytes up to
    // the close; an HTTP/1.1 caller gets it chunked and keeps the connection.
    let rechunk = matches!(framing, Framing::Chunked | Framing::UntilClose) && caller_minor == 1;
    let keep =
        caller_keep && (rechunk || !matches!(framing, Framing::Chunked | Framing::UntilClose));

    out.clear();
    let reason = view.reason(&resp);
    let reason = if reason.is_empty() {
        StatusCode::from_u16(resp.code)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
            .as_bytes()
    } else {
        reason
    };
    status_line(out, resp.code, reason);
    for (name, value) in view.fields() {
        if h1::is_hop_by_hop(&view, name)
            || (name.eq_ignore_ascii_case("content-length") && framing != Framing::Empty)
        {
            continue;
        }
        h1::put_field(out, name, value);
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            h1::put_number(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked | Framing::UntilClose if rechunk => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        _ => {}
    }
    connection_field(out, caller_minor, keep);
    out.extend_from_slice(b"\r\n");
    up.buf.advance(resp.len);
    let status = resp.code;

    let body_done = match framing {
        Framing::Empty => true,
        Framing::Length(n) if n <= BUFFER_BODY_BELOW => {
            // Read whole before anything goes to the caller: a failure
            // here is still a clean 502.
            let n = n as usize;
            while up.buf.len() < n {
                up.buf.reserve(n - up.buf.len());
                match until(timer.as_mut(), || deadline, up.stream.read_buf(&mut up.buf)).await {
                    Some(Ok(0)) | Some(Err(_)) => {
                        return Forwarded::Failed(
                            UpstreamError::Broken("body ended early").local(),
                        );
                    }
                    None => return Forwarded::Failed(UpstreamError::Timeout.local()),
                    Some(Ok(_)) => {}
                }
            }
            out.extend_from_slice(&up.buf[..n]);
            up.buf.advance(n);
            true
        }
        Framing::Length(n) => {
            let to = To::new(shared, conn, caller, timer.as_mut());
            stream_length(&mut up, out, to, n).await
        }
        Framing::Chunked => {
            let to = To::new(shared, conn, caller, timer.as_mut());
            stream_chunked(&mut up, out, to, rechunk).await
        }
        Framing::UntilClose => {
            let to = To::new(shared, conn, caller, timer.as_mut());
            stream_until_close(&mut up, out, to, rechunk).await
        }
    };
    if !body_done {
        return Forwarded::Answered {
            status,
            keep: false,
        };
    }
    if !out.is_empty() && !write_caller(shared, conn, caller, out, timer.as_mut()).await {
        return Forwarded::Answered {
            status,
            keep: false,
        };
    }
    if upstream_keeps && up.buf.is_empty() {
        *slot = Some(up);
    }
    Forwarded::Answered { status, keep }
}

/// The caller a streamed body goes to.
struct To<'a> {
    shared: &'a Shared,
    conn: &'a Conn,
    stream: &'a mut TcpStream,
    timer: Pin<&'a mut Sleep>,
}

impl<'a> To<'a> {
    fn new(
        shared: &'a Shared,
        conn: &'a Conn,
        stream: &'a mut TcpStream,
        timer: Pin<&'a mut Sleep>,
    ) -> Self {
        To {
            shared,
            conn,
            stream,
            timer,
        }
    }
}

/// Writes `out` (within the write timeout) and empties it; false if the
/// caller is gone or too slow.
async fn flush(to: &mut To<'_>, out: &mut Vec<u8>) -> bool {
    let ok = write_caller(to.shared, to.conn, to.stream, out, to.timer.as_mut()).await;
    out.clear();
    ok
}

/// Reads more of the upstream's body; false at its end or on an error.
async fn fill(up: &mut Upstream) -> bool {
    up.buf.reserve(READ_BUF * 16);
    matches!(up.stream.read_buf(&mut up.buf).await, Ok(n) if n > 0)
}

/// Passes `left` bytes through. Streamed bodies have no deadline (as they
/// may legitimately trickle); the caller's close ends them.
async fn stream_length(
    up: &mut Upstream,
    out: &mut Vec<u8>,
    mut to: To<'_>,
    mut left: u64,
) -> bool {
    loop {
        let take = (up.buf.len() as u64).min(left) as usize;
        out.extend_from_slice(&up.buf[..take]);
        up.buf.advance(take);
        left -= take as u64;
        if left == 0 {
            return true;
        }
        if !flush(&mut to, out).await || !fill(up).await {
            return false;
        }
    }
}

fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

async fn stream_chunked(
    up: &mut Upstream,
    out: &mut Vec<u8>,
    mut to: To<'_>,
    rechunk: bool,
) -> bool {
    let mut decoder = ChunkedDecoder::default();
    loop {
        match decoder.step(&mut up.buf) {
            Ok(Chunk::Data(data)) if rechunk => put_chunk(out, &data),
            Ok(Chunk::Data(data)) => out.extend_from_slice(&data),
            Ok(Chunk::End) => {
                if rechunk {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                return true;
            }
            Ok(Chunk::NeedMore) => {
                // The caller gets what arrived before the upstream is
                // waited on again (a body may trickle).
                if !flush(&mut to, out).await || !fill(up).await {
                    return false;
                }
            }
            Err(why) => {
                tracing::warn!("upstream chunked body refused: {why}");
                return false;
            }
        }
    }
}

async fn stream_until_close(
    up: &mut Upstream,
    out: &mut Vec<u8>,
    mut to: To<'_>,
    rechunk: bool,
) -> bool {
    loop {
        if !up.buf.is_empty() {
            let data = up.buf.split().freeze();
            if rechunk {
                put_chunk(out, &data);
            } else {
                out.extend_from_slice(&data);
            }
        }
        if !flush(&mut to, out).await {
            return false;
        }
        up.buf.reserve(READ_BUF * 16);
        match up.stream.read_buf(&mut up.buf).await {
            Ok(0) => {
                if rechunk {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                return true;
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// A new upstream connection (TCP_NODELAY).
async fn connect(
    shared: &Shared,
    deadline: tokio::time::Instant,
    timer: Pin<&mut Sleep>,
) -> Result<Upstream, UpstreamError> {
    let (host, port) = &shared.upstream_addr;
    let connect_by = deadline.min(tokio::time::Instant::now() + shared.limits.connect_timeout);
    let connect = async {
        loop {
            match TcpStream::connect((host.as_str(), *port)).await {
                // Out of descriptors is this process's state, not the
                // service's, and passes (say, as a flood's connections are
                // closed): wait for one to come free within the connect
                // time rather than tell the pod the service is unreachable.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                done => return done,
            }
        }
    };
    let stream = match until(timer, || connect_by, connect).await {
        None if connect_by < deadline => {
            return Err(UpstreamError::Unreachable("connect timed out".into()));
        }
        None => return Err(UpstreamError::Timeout),
        Some(Err(e)) => return Err(UpstreamError::Unreachable(e.to_string())),
        Some(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(Upstream {
        stream,
        buf: BytesMut::with_capacity(READ_BUF),
        fields: Vec::new(),
    })
}

/// Whether a kept connection is still open and silent, checked without a
/// system call when the reactor saw nothing arrive.
fn still_usable(up: &Upstream) -> bool {
    let mut probe = [0u8; 1];
    match up.stream.try_read(&mut probe) {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}

/// One attempt's failure.
enum Attempt {
    /// Nothing came back: on a kept connection the upstream may have
    /// closed it while idle.
    NothingBack(String),
    Fatal(UpstreamError),
}

/// Writes the request and reads the answer's head (interim 1xx answers
/// skipped). A kept connection that turns out closed before answering is
/// replaced once for idempotent requests; others only go out on a kept
/// connection checked to be open.
async fn exchange(
    shared: &Shared,
    slot: &mut Option<Upstream>,
    request: &[u8],
    idempotent: bool,
    deadline: tokio::time::Instant,
    mut timer: Pin<&mut Sleep>,
) -> Result<(Upstream, ResponseHead), UpstreamError> {
    let mut kept = slot.take().filter(|up| idempotent || still_usable(up));
    loop {
        let (mut up, reused) = match kept.take() {
            Some(up) => (up, true),
            None => (connect(shared, deadline, timer.as_mut()).await?, false),
        };
        match attempt(&mut up, request, deadline, timer.as_mut()).await {
            Ok(head) => return Ok((up, head)),
            Err(Attempt::NothingBack(_)) if reused => continue,
            Err(Attempt::NothingBack(e)) => return Err(UpstreamError::Unreachable(e)),
            Err(Attempt::Fatal(e)) => return Err(e),
        }
    }
}

async fn attempt(
    up: &mut Upstream,
    request: &[u8],
    deadline: tokio::time::Instant,
    mut timer: Pin<&mut Sleep>,
) -> Result<ResponseHead, Attempt> {
    up.buf.clear();
    match until(timer.as_mut(), || deadline, up.stream.write_all(request)).await {
        None => return Err(Attempt::Fatal(UpstreamError::Timeout)),
        Some(Err(e)) => return Err(Attempt::NothingBack(e.to_string())),
        Some(Ok(())) => {}
    }
    let mut answered = false;
    loop {
        if !up.buf.is_empty() {
            match h1::parse_response(&up.buf, &mut up.fields, MAX_RESPONSE_HEAD) {
                Err(_) => {
                    return Err(Attempt::Fatal(UpstreamError::Broken(
                        "malformed response head",
                    )));
                }
                Ok(Some(head)) if head.code == 101 => {
                    return Err(Attempt::Fatal(UpstreamError::Broken(
                        "upstream switched protocols",
                    )));
                }
                Ok(Some(head)) if (100..200).contains(&head.code) => {
                    up.buf.advance(head.len);
                    continue;
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
            }
        }
        up.buf.reserve(READ_BUF);
        match until(timer.as_mut(), || deadline, up.stream.read_buf(&mut up.buf)).await {
            None => return Err(Attempt::Fatal(UpstreamError::Timeout)),
            Some(Ok(0)) if !answered => {
                return Err(Attempt::NothingBack("closed before answering".into()));
            }
            Some(Ok(0)) => return Err(Attempt::Fatal(UpstreamError::Broken("closed mid-head"))),
            Some(Err(e)) if !answered => return Err(Attempt::NothingBack(e.to_string())),
            Some(Err(_)) => return Err(Attempt::Fatal(UpstreamError::Broken("reset mid-head"))),
            Some(Ok(_)) => answered = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use crate::proxy::{Limits, ProxyHandle};

    /// The proxy for one pod allowed GET and HEAD under `/allowed/`, served
    /// on a loopback listener (no network namespace, so no root).
    async fn proxy_for(upstream: std::net::SocketAddr) -> (ProxyHandle, std::net::SocketAddr) {
        crate::fuzzing::loopback_proxy(
            upstream,
            "t",
            "rules: [{name: t, pods: {name: t}, paths: [{prefix: /allowed/}], methods: [GET, HEAD]}]",
            Limits::default(),
            0,
        )
        .await
    }

    /// Sends `request`, half-closes, reads to the proxy's close.
    async fn talk(addr: std::net::SocketAddr, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn local_answers_to_head_requests_have_no_body() {
        // Nothing is forwarded: the upstream's address is never dialled.
        let (_proxy, addr) = proxy_for("127.0.0.1:9".parse().unwrap()).await;
        let out = talk(
            addr,
            b"HEAD /denied HTTP/1.1\r\nHost: x\r\n\r\nGET /denied HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        // The GET's answer starts where the HEAD's head ends, and keeps its body.
        let head_end = out.find("\r\n\r\n").expect(&out) + 4;
        assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out:?}");
        assert!(
            out[head_end..].starts_with("HTTP/1.1 403 Forbidden\r\n"),
            "{out:?}"
        );
        assert!(out.ends_with("may not GET /denied\n"), "{out:?}");
    }

    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed_quietly_at_the_idle_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = Limits {
            idle_timeout: std::time::Duration::from_millis(200),
            header_read_timeout: std::time::Duration::from_secs(30),
            ..Limits::default()
        };
        let (proxy, addr) = crate::fuzzing::loopback_proxy(
            "127.0.0.1:9".parse().unwrap(),
            "t",
            "rules: [{name: t, pods: {name: t}, paths: [{prefix: /allowed/}]}]",
            limits,
            0,
        )
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /denied HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 403"));
        // Nothing more is sent: the proxy hangs up (well before the head
        // timeout, which would otherwise apply) ...
        let closed = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("closed at the idle timeout, not the head timeout");
        assert_eq!(closed.unwrap(), 0);
        // ... without calling it an error.
        let metrics = proxy.metrics_text();
        assert!(!metrics.contains("kind=\"header_timeout\""), "{metrics}");
    }

    #[tokio::test]
    async fn upstream_answers_without_a_reason_phrase_are_forwarded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 1024];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "request cut short");
                buf.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
        });
        let (_proxy, addr) = proxy_for(upstream_addr).await;
        let out = talk(
            addr,
            b"GET /allowed/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        // The canonical reason stands in for the missing one.
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out:?}");
        assert!(out.ends_with("\r\n\r\nok"), "{out:?}");
    }
}
