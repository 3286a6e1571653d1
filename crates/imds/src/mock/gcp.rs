//! The fake's GCP half: the metadata server (`/computeMetadata/v1/...`)
//! of a VM running as a node service account, and IAM Credentials'
//! `generateAccessToken` / `generateIdToken` (`/v1/projects/-/...`).
//!
//! There is no emulator of IAM Credentials, so this fake enforces the
//! documented contract strictly: a live bearer token this fake issued,
//! with the cloud-platform or iam scope (else 401 / 403); the `-` project
//! wildcard; known JSON fields only; a non-empty scope list and a lifetime
//! of at most 3600s; the caller granted Token Creator on the target (else
//! 403 PERMISSION_DENIED, the same answer as for an account that does not
//! exist); errors in Google's `{"error": {code, message, status}}` shape.
//!
//! Metadata server edge: `Metadata-Flavor: Google` required (403), any
//! `X-Forwarded-For` refused (403), every answer carries
//! `Metadata-Flavor: Google` and an ETag; `?recursive=true` (JSON, keys
//! in camelCase), `?alt=json|text`, `?wait_for_change=true` held until
//! the value differs from `last_etag` or `timeout_sec` passes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{MAX_BODY, parse_query, random_token, rfc3339, unix_now};
use crate::body::{ProxyBody, full};

pub const PROJECT: &str = "mock-project";
pub const PROJECT_NUMBER: u64 = 123_456_789_012;
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const IAM_SCOPE: &str = "https://www.googleapis.com/auth/iam";
/// Longest token lifetime IAM Credentials grants without the
/// lifetime-extension org policy.
const MAX_LIFETIME: u64 = 3600;
/// The metadata server's tokens: it hands out its cached token with the
/// life it has left and gets a new one when under five minutes remain.
pub const METADATA_TOKEN_LIFETIME: Duration = Duration::from_secs(3599);
const ID_TOKEN_LIFETIME: u64 = 3600;

struct Issued {
    email: String,
    scopes: Vec<String>,
    expires: u64,
}

/// The GCP side of the fake VM and project.
pub struct GcpMock {
    node: String,
    /// Service accounts of the project, the node's first.
    accounts: Vec<String>,
    /// Accounts the node may mint tokens for (Token Creator granted).
    grants: Vec<String>,
    metadata_lifetime: u64,
    node_token: Mutex<Option<(String, u64)>>,
    tokens: Mutex<HashMap<String, Issued>>,
    access_issued: Mutex<BTreeMap<String, u64>>,
    id_issued: Mutex<BTreeMap<String, u64>>,
}

pub fn account(name: &str) -> String {
    format!("{name}@{PROJECT}.iam.gserviceaccount.com")
}

impl Default for GcpMock {
    fn default() -> Self {
        Self::new(METADATA_TOKEN_LIFETIME)
    }
}

impl GcpMock {
    /// The node `node-sa`, and `app-1`, `app-2` (the node may act as
    /// them) and `app-3` (it may not).
    pub fn new(metadata_lifetime: Duration) -> Self {
        GcpMock {
            node: account("node-sa"),
            accounts: ["node-sa", "app-1", "app-2", "app-3"]
                .iter()
                .map(|n| account(n))
                .collect(),
            grants: vec![account("app-1"), account("app-2")],
            metadata_lifetime: metadata_lifetime.as_secs().max(1),
            node_token: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            access_issued: Mutex::new(BTreeMap::new()),
            id_issued: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn node_account(&self) -> &str {
        &self.node
    }

    /// The project's accounts, the node's first.
    pub fn accounts(&self) -> &[String] {
        &self.accounts
    }

    /// Accounts the node may mint tokens for.
    pub fn grants(&self) -> &[String] {
        &self.grants
    }

    /// `generateAccessToken` calls that issued a token for `email`.
    pub fn access_tokens_issued(&self, email: &str) -> u64 {
        self.access_issued
            .lock()
            .expect("poisoned")
            .get(email)
            .copied()
            .unwrap_or(0)
    }

    /// `generateIdToken` calls that issued a token for `email`.
    pub fn id_tokens_issued(&self, email: &str) -> u64 {
        self.id_issued
            .lock()
            .expect("poisoned")
            .get(email)
            .copied()
            .unwrap_or(0)
    }

    /// Whose live access token `token` is.
    pub fn token_owner(&self, token: &str) -> Option<String> {
        let tokens = self.tokens.lock().expect("poisoned");
        tokens
            .get(token)
            .filter(|i| i.expires > unix_now())
            .map(|i| i.email.clone())
    }

    fn issue(&self, email: &str, scopes: Vec<String>, lifetime: u64) -> (String, u64) {
        let token = format!("ya29.mock-{}", random_token().replace(['+', '/', '='], ""));
        let expires = unix_now() + lifetime;
        let mut tokens = self.tokens.lock().expect("poisoned");
        let now = unix_now();
        tokens.retain(|_, i| i.expires > now);
        tokens.insert(
            token.clone(),
            Issued {
                email: email.into(),
                scopes,
                expires,
            },
        );
        (token, expires)
    }

    /// The node's token as the metadata server hands it out.
    fn metadata_token(&self) -> (String, u64) {
        let mut cached = self.node_token.lock().expect("poisoned");
        let now = unix_now();
        let renew_below = (self.metadata_lifetime / 2).min(300);
        match cached.as_ref() {
            Some((t, exp)) if exp.saturating_sub(now) > renew_below => (t.clone(), *exp),
            _ => {
                let fresh = self.issue(
                    &self.node,
                    vec![CLOUD_PLATFORM.into()],
                    self.metadata_lifetime,
                );
                *cached = Some(fresh.clone());
                fresh
            }
        }
    }

    fn id_token(&self, email: &str, audience: &str, include_email: bool) -> String {
        let now = unix_now();
        let mut claims = json!({
            "aud": audience,
            "azp": format!("1{:020}", email.len()),
            "exp": now + ID_TOKEN_LIFETIME,
            "iat": now,
            "iss": "https://accounts.google.com",
            "sub": format!("1{:020}", email.bytes().map(u64::from).sum::<u64>()),
        });
        if include_email {
            claims["email"] = json!(email);
            claims["email_verified"] = json!(true);
        }
        let header = json!({ "alg": "RS256", "kid": "mock", "typ": "JWT" });
        let sig = random_token();
        format!(
            "{}.{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes()),
            b64url(sig.as_bytes())
        )
    }

    /// The metadata tree (service accounts as the recursive listing
    /// shows them: no tokens).
    fn tree(&self) -> Value {
        let info =
            json!({ "aliases": ["default"], "email": self.node, "scopes": [CLOUD_PLATFORM] });
        json!({
            "instance": {
                "id": 4_520_031_799_277_581_759u64,
                "hostname": format!("mock-vm.us-central1-a.c.{PROJECT}.internal"),
                "machine-type": format!("projects/{PROJECT_NUMBER}/machineTypes/e2-standard-2"),
                "zone": format!("projects/{PROJECT_NUMBER}/zones/us-central1-a"),
                "service-accounts": { "default": info, self.node.clone(): info },
            },
            "project": { "project-id": PROJECT, "numeric-project-id": PROJECT_NUMBER },
        })
    }
}

fn b64url(input: &[u8]) -> String {
    super::base64(input)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

fn with_flavor(mut resp: Response<ProxyBody>, content_type: &'static str) -> Response<ProxyBody> {
    let h = resp.headers_mut();
    h.insert("metadata-flavor", HeaderValue::from_static("Google"));
    h.insert("server", HeaderValue::from_static("Metadata Server for VM"));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    resp
}

fn plain(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    with_flavor(resp, content_type)
}

fn not_found() -> Response<ProxyBody> {
    plain(
        StatusCode::NOT_FOUND,
        "text/html; charset=UTF-8",
        "<!DOCTYPE html>\n<html lang=en>\n  <title>Error 404 (Not Found)!!1</title>\n  <p>The requested URL was not found on this server.\n".into(),
    )
}

/// `machine-type` -> `machineType`, as recursive JSON answers spell keys.
fn camel(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let mut out = String::new();
                    let mut up = false;
                    for c in k.chars() {
                        if c == '-' && !k.contains('@') {
                            up = true;
                        } else if up {
                            out.extend(c.to_uppercase());
                            up = false;
                        } else {
                            out.push(c);
                        }
                    }
                    (out, camel(v))
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

fn etag(body: &str) -> String {
    // FNV-1a: a stable tag per content, as the server's ETag is.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// `/computeMetadata/...` as the metadata server answers it.
pub async fn metadata(gcp: &GcpMock, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.headers().contains_key("x-forwarded-for") {
        return plain(
            StatusCode::FORBIDDEN,
            "text/html; charset=UTF-8",
            "Forbidden\n".into(),
        );
    }
    let flavor: Vec<_> = req.headers().get_all("metadata-flavor").iter().collect();
    if flavor.len() != 1 || flavor[0].as_bytes() != b"Google" {
        return plain(
            StatusCode::FORBIDDEN,
            "text/html; charset=UTF-8",
            "Missing required header \"Metadata-Flavor\": \"Google\"\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "Method Not Allowed\n".into(),
        );
    }
    let Some(path) = req.uri().path().strip_prefix("/computeMetadata/v1/") else {
        return not_found();
    };
    let Ok(q) = parse_query(req.uri().query().unwrap_or("")) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "Malformed query\n".into(),
        );
    };
    let alt = q.get("alt").map(String::as_str);
    if !matches!(alt, None | Some("json" | "text")) {
        return plain(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "Invalid alt value\n".into(),
        );
    }
    let recursive = q.get("recursive").is_some_and(|v| v == "true");
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Tokens of the node's account (by alias or email).
    if let ["instance", "service-accounts", who, item] = segments.as_slice()
        && (*who == "default" || *who == gcp.node)
        && matches!(*item, "token" | "identity")
    {
        let now = unix_now();
        if *item == "token" {
            let (token, exp) = gcp.metadata_token();
            let body = json!({ "access_token": token, "expires_in": exp.saturating_sub(now), "token_type": "Bearer" });
            return plain(StatusCode::OK, "application/json", body.to_string());
        }
        let Some(audience) = q.get("audience").filter(|a| !a.is_empty()) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "non-empty audience parameter required\n".into(),
            );
        };
        let full = q.get("format").is_some_and(|f| f == "full");
        return plain(
            StatusCode::OK,
            "text/html; charset=utf-8",
            gcp.id_token(&gcp.node, audience, full),
        );
    }
    let tree = gcp.tree();
    let mut node = &tree;
    for seg in &segments {
        match node.get(seg) {
            Some(n) => node = n,
            None => return not_found(),
        }
    }
    let (content_type, body) = match node {
        Value::Object(map) if recursive && alt != Some("text") => {
            ("application/json", camel(node).to_string())
        }
        Value::Object(map) if alt == Some("json") => (
            "application/json",
            json!(map.keys().collect::<Vec<_>>()).to_string(),
        ),
        Value::Object(map) => (
            "application/text",
            map.iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/\n")
                    } else {
                        format!("{k}\n")
                    }
                })
                .collect(),
        ),
        leaf if alt == Some("json") => ("application/json", leaf.to_string()),
        Value::String(s) => ("application/text", s.clone()),
        Value::Array(items) => (
            "application/text",
            items
                .iter()
                .map(|v| format!("{}\n", v.as_str().unwrap_or_default()))
                .collect(),
        ),
        leaf => ("application/text", leaf.to_string()),
    };
    let tag = etag(&body);
    if q.get("wait_for_change").is_some_and(|v| v == "true")
        && q.get("last_etag").is_none_or(|last| *last == tag)
    {
        // Nothing in the fake ever changes: held for the whole timeout.
        let secs = q
            .get("timeout_sec")
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(300)
            .min(3600);
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    let mut resp = plain(StatusCode::OK, content_type, body);
    if let Ok(v) = HeaderValue::from_str(&tag) {
        resp.headers_mut().insert(http::header::ETAG, v);
    }
    resp
}

fn google_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let name = match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        _ => "FAILED_PRECONDITION",
    };
    let mut resp = crate::body::json(
        status,
        &json!({ "error": { "code": status.as_u16(), "message": message, "status": name } }),
    );
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    resp
}

/// IAM Credentials: `POST /v1/projects/-/serviceAccounts/ID:VERB`.
pub async fn iam(gcp: &GcpMock, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/v1/projects/") else {
        return google_error(StatusCode::NOT_FOUND, "Not Found");
    };
    let Some((project, rest)) = rest.split_once("/serviceAccounts/") else {
        return google_error(StatusCode::NOT_FOUND, "Not Found");
    };
    let Some((target, verb)) = rest.split_once(':') else {
        return google_error(StatusCode::NOT_FOUND, "Not Found");
    };
    if !matches!(verb, "generateAccessToken" | "generateIdToken") {
        return google_error(StatusCode::NOT_FOUND, "Not Found");
    }
    if req.method() != Method::POST {
        return google_error(StatusCode::NOT_FOUND, "Not Found");
    }
    let caller = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| {
            let tokens = gcp.tokens.lock().expect("poisoned");
            tokens
                .get(t)
                .filter(|i| i.expires > unix_now())
                .map(|i| (i.email.clone(), i.scopes.clone()))
        });
    let Some((caller, caller_scopes)) = caller else {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        );
    };
    if !caller_scopes
        .iter()
        .any(|s| s == CLOUD_PLATFORM || s == IAM_SCOPE)
    {
        return google_error(
            StatusCode::FORBIDDEN,
            "Request had insufficient authentication scopes.",
        );
    }
    if project != "-" {
        return google_error(
            StatusCode::BAD_REQUEST,
            "The project ID must be the wildcard character '-'.",
        );
    }
    let json_body = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
        return google_error(StatusCode::BAD_REQUEST, "Request body unreadable");
    };
    let doc: Value = match serde_json::from_slice(&body.to_bytes()) {
        Ok(Value::Object(m)) if json_body => Value::Object(m),
        _ => return google_error(StatusCode::BAD_REQUEST, "Invalid JSON payload received."),
    };
    let known: &[&str] = if verb == "generateAccessToken" {
        &["delegates", "scope", "lifetime"]
    } else {
        &["delegates", "audience", "includeEmail"]
    };
    if let Some(unknown) = doc
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| !known.contains(&k.as_str()))
    {
        return google_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "Invalid JSON payload received. Unknown name \"{unknown}\": Cannot find field."
            ),
        );
    }
    if doc
        .get("delegates")
        .is_some_and(|d| d.as_array().is_none_or(|a| !a.is_empty()))
    {
        return google_error(
            StatusCode::BAD_REQUEST,
            "The fake supports no delegation chains.",
        );
    }
    let permission = if verb == "generateAccessToken" {
        "iam.serviceAccounts.getAccessToken"
    } else {
        "iam.serviceAccounts.getOpenIdToken"
    };
    // The same answer for an account that does not exist as for one the
    // caller may not act as. Token Creator is granted to the node only
    // (not even an account on itself, as in IAM without that binding).
    let exists = gcp.accounts.iter().any(|a| a == target);
    let granted = caller == gcp.node && gcp.grants.iter().any(|g| g == target);
    if !(exists && granted) {
        return google_error(
            StatusCode::FORBIDDEN,
            &format!("Permission '{permission}' denied on resource (or it may not exist)."),
        );
    }
    if verb == "generateAccessToken" {
        let scopes: Option<Vec<String>> = doc.get("scope").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        });
        let Some(scopes) = scopes.filter(|s| !s.is_empty()) else {
            return google_error(StatusCode::BAD_REQUEST, "Scope required.");
        };
        let lifetime = match doc.get("lifetime") {
            None => Some(MAX_LIFETIME),
            Some(Value::String(l)) => l
                .strip_suffix('s')
                .and_then(|n| n.parse::<f64>().ok())
                .filter(|n| n.is_finite() && *n >= 1.0)
                .map(|n| n.ceil() as u64),
            Some(_) => None,
        };
        let Some(lifetime) = lifetime else {
            return google_error(
                StatusCode::BAD_REQUEST,
                "Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration)",
            );
        };
        if lifetime > MAX_LIFETIME {
            return google_error(
                StatusCode::BAD_REQUEST,
                "The lifetime must be at most 3600s unless the lifetime-extension policy allows more.",
            );
        }
        let (token, expires) = gcp.issue(target, scopes, lifetime);
        *gcp.access_issued
            .lock()
            .expect("poisoned")
            .entry(target.to_owned())
            .or_default() += 1;
        return crate::body::json(
            StatusCode::OK,
            &json!({ "accessToken": token, "expireTime": rfc3339(expires) }),
        );
    }
    let Some(audience) = doc
        .get("audience")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
    else {
        return google_error(StatusCode::BAD_REQUEST, "Audience required.");
    };
    let include_email = match doc.get("includeEmail") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return google_error(
                StatusCode::BAD_REQUEST,
                "Invalid value at 'include_email' (TYPE_BOOL)",
            );
        }
    };
    *gcp.id_issued
        .lock()
        .expect("poisoned")
        .entry(target.to_owned())
        .or_default() += 1;
    crate::body::json(
        StatusCode::OK,
        &json!({ "token": gcp.id_token(target, audience, include_email) }),
    )
}
