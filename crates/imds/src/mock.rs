//! A strict local fake of the Azure Instance Metadata Service and of AWS
//! IMDSv2, for local development and for tests: it enforces the documented
//! contract (headers, methods, api-version, token TTLs, status codes) rather
//! than answering everything, so a proxy that drops a header or rewrites a
//! method is caught.
//!
//! Azure (`/metadata/...`): `Metadata: true` required (400 JSON), requests
//! carrying `X-Forwarded-For` refused (400), unknown paths 404, wrong method
//! 405, duplicate query parameters 400, `api-version` mandatory and checked
//! (400 listing the newest versions).
//! Managed identities: the system-assigned one and user-assigned ones
//! ([`MockIdentity`]); a token request naming an identity the fake VM does
//! not have gets IMDS's 400 `Identity not found`; tokens name their
//! identity and live [`AZURE_TOKEN_LIFETIME`] unless configured shorter.
//! AWS (`/latest/...`): `PUT /latest/api/token` with
//! `X-aws-ec2-metadata-token-ttl-seconds` in 1..=21600 (else 400; with
//! `X-Forwarded-For` 403); every metadata read needs a live token (else 401).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::Rng;
use serde_json::{Value, json};

use crate::body::{ProxyBody, empty, json as json_resp, text};

/// API versions the fake accepts, oldest first (Azure's published list).
pub const API_VERSIONS: &[&str] = &[
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2023-07-01",
];

/// Scheduled events has its own versions.
pub const SCHEDULED_EVENTS_VERSIONS: &[&str] =
    &["2017-11-01", "2019-01-01", "2019-08-01", "2020-07-01"];

pub const AWS_TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const AWS_TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const AWS_MAX_TTL: u64 = 21600;
const MAX_TOKENS: usize = 4096;
const MAX_BODY: usize = 64 * 1024;

/// The fake's state: issued IMDSv2 tokens and a count of requests it served
/// (tests use the count to prove that a refused request reached nothing).
pub struct MockState {
    requests: AtomicU64,
    tokens: Mutex<HashMap<String, Instant>>,
    instance: Value,
    /// The whole instance document, serialized once.
    instance_json: Bytes,
    /// The VM's managed identities: the system-assigned one first.
    identities: Vec<MockIdentity>,
    /// Lifetime of issued Azure tokens.
    token_lifetime: Duration,
    /// Azure tokens issued, by the identity's client id.
    issued: Mutex<BTreeMap<String, u64>>,
}

/// A managed identity assigned to the fake VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockIdentity {
    pub client_id: String,
    pub object_id: String,
    /// ARM resource id (`None` for the system-assigned identity).
    pub msi_res_id: Option<String>,
}

/// Azure's managed-identity tokens live about a day (IMDS answers
/// `expires_in` of 86399 or less, counting down as it caches them).
pub const AZURE_TOKEN_LIFETIME: Duration = Duration::from_secs(86_399);

impl MockIdentity {
    /// A user-assigned identity with ids derived from `n` (stable, so
    /// tests and local runs can name them).
    pub fn user_assigned(n: u8) -> Self {
        MockIdentity {
            client_id: format!("11111111-0000-0000-0000-0000000000{n:02x}"),
            object_id: format!("22222222-0000-0000-0000-0000000000{n:02x}"),
            msi_res_id: Some(format!(
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/mock-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/mock-id-{n}"
            )),
        }
    }

    pub fn system_assigned() -> Self {
        MockIdentity {
            client_id: "00000000-0000-0000-0000-00000000c11e".into(),
            object_id: "00000000-0000-0000-0000-00000000051e".into(),
            msi_res_id: None,
        }
    }
}

impl Default for MockState {
    fn default() -> Self {
        Self::with_identities(
            (1..=3).map(MockIdentity::user_assigned).collect(),
            AZURE_TOKEN_LIFETIME,
        )
    }
}

impl MockState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A fake VM with the system-assigned identity plus `user_assigned`,
    /// issuing Azure tokens that live `token_lifetime`.
    pub fn with_identities(user_assigned: Vec<MockIdentity>, token_lifetime: Duration) -> Self {
        let instance = instance_document();
        let mut identities = vec![MockIdentity::system_assigned()];
        identities.extend(user_assigned);
        Self {
            requests: AtomicU64::new(0),
            tokens: Mutex::new(HashMap::new()),
            instance_json: Bytes::from(instance.to_string()),
            instance,
            identities,
            token_lifetime,
            issued: Mutex::new(BTreeMap::new()),
        }
    }

    /// The VM's identities, the system-assigned one first.
    pub fn identities(&self) -> &[MockIdentity] {
        &self.identities
    }

    /// Azure tokens issued so far for the identity with `client_id`.
    pub fn tokens_issued(&self, client_id: &str) -> u64 {
        self.issued
            .lock()
            .expect("issued poisoned")
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }

    /// Requests that reached a handler (parsed HTTP requests, any status).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// The instance document served at `/metadata/instance`.
    pub fn instance(&self) -> &Value {
        &self.instance
    }
}

/// Serves the fake on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<MockState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Answers one request as the real service would.
pub async fn handle(state: &MockState, req: Request<Incoming>) -> Response<ProxyBody> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    if path == "/metadata" || path.starts_with("/metadata/") {
        azure(state, req).await
    } else if path == "/latest" || path.starts_with("/latest/") {
        aws(state, req)
    } else {
        not_found_json()
    }
}

// ---------------------------------------------------------------- Azure --

fn bad_request(message: &str) -> Response<ProxyBody> {
    json_resp(
        StatusCode::BAD_REQUEST,
        &json!({ "error": format!("Bad request. {message}") }),
    )
}

fn not_found_json() -> Response<ProxyBody> {
    json_resp(StatusCode::NOT_FOUND, &json!({ "error": "Not found" }))
}

fn newest_versions(versions: &[&'static str]) -> Vec<&'static str> {
    versions.iter().rev().take(3).copied().collect()
}

fn has_metadata_true(headers: &HeaderMap) -> bool {
    let values: Vec<_> = headers.get_all("metadata").iter().collect();
    values.len() == 1 && values[0].as_bytes().eq_ignore_ascii_case(b"true")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AzureApi {
    Instance,
    Token,
    Attested,
    ScheduledEvents,
    Versions,
}

fn azure_route(path: &str) -> Option<AzureApi> {
    match path {
        "/metadata/identity/oauth2/token" => Some(AzureApi::Token),
        "/metadata/attested/document" => Some(AzureApi::Attested),
        "/metadata/scheduledevents" => Some(AzureApi::ScheduledEvents),
        "/metadata/versions" => Some(AzureApi::Versions),
        p if p == "/metadata/instance" || p.starts_with("/metadata/instance/") => {
            Some(AzureApi::Instance)
        }
        _ => None,
    }
}

async fn azure(state: &MockState, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let api = azure_route(&path);
    if req.headers().contains_key("x-forwarded-for") {
        return bad_request("Requests with the X-Forwarded-For header are not accepted");
    }
    if !has_metadata_true(req.headers()) {
        return if api == Some(AzureApi::Token) {
            json_resp(
                StatusCode::BAD_REQUEST,
                &json!({
                    "error": "invalid_request",
                    "error_description": "Required metadata header not specified",
                }),
            )
        } else {
            bad_request("Required metadata header not specified")
        };
    }
    let Some(api) = api else {
        return not_found_json();
    };
    let allowed: &[Method] = match api {
        AzureApi::ScheduledEvents => &[Method::GET, Method::POST],
        _ => &[Method::GET],
    };
    if !allowed.contains(req.method()) {
        return json_resp(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": format!("Http method not allowed: path={path}, method={}", req.method()) }),
        );
    }
    let query = match parse_query(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(QueryError::Duplicate(name)) => {
            return bad_request(&format!(
                "Query parameter '{name}' is specified more than once"
            ));
        }
        Err(QueryError::Malformed) => return bad_request("Malformed query string"),
    };
    if api != AzureApi::Versions {
        let versions = if api == AzureApi::ScheduledEvents {
            SCHEDULED_EVENTS_VERSIONS
        } else {
            API_VERSIONS
        };
        match query.get("api-version") {
            None => {
                return json_resp(
                    StatusCode::BAD_REQUEST,
                    &json!({
                        "error": "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds",
                        "newest-versions": newest_versions(versions),
                    }),
                );
            }
            Some(v) if !versions.contains(&v.as_str()) => {
                return json_resp(
                    StatusCode::BAD_REQUEST,
                    &json!({
                        "error": "Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds",
                        "newest-versions": newest_versions(versions),
                    }),
                );
            }
            Some(_) => {}
        }
    }
    match api {
        AzureApi::Versions => json_resp(StatusCode::OK, &json!({ "apiVersions": API_VERSIONS })),
        AzureApi::Instance => instance(state, &path, &query),
        AzureApi::Token => token(state, &query),
        AzureApi::Attested => attested(state, &query),
        AzureApi::ScheduledEvents => scheduled_events(req).await,
    }
}

fn instance(
    state: &MockState,
    path: &str,
    query: &BTreeMap<String, String>,
) -> Response<ProxyBody> {
    let format = query.get("format").map(String::as_str).unwrap_or("json");
    if format != "json" && format != "text" {
        return bad_request("Unsupported format; use json or text");
    }
    let rest = path.trim_start_matches("/metadata/instance");
    if rest.is_empty() && format == "json" {
        let mut resp = text(StatusCode::OK, state.instance_json.clone());
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        return resp;
    }
    let mut node = &state.instance;
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        let next = match node {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return not_found_json(),
        }
    }
    let leaf = !matches!(node, Value::Object(_) | Value::Array(_));
    match (format, leaf) {
        ("text", true) => text(
            StatusCode::OK,
            match node {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        ),
        ("text", false) => bad_request("Text format is only supported for leaf nodes"),
        _ => json_resp(StatusCode::OK, node),
    }
}

fn token(state: &MockState, query: &BTreeMap<String, String>) -> Response<ProxyBody> {
    let oauth_error = |description: &str| {
        json_resp(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "invalid_request", "error_description": description }),
        )
    };
    let Some(resource) = query.get("resource") else {
        return oauth_error("Required query variable 'resource' is missing");
    };
    let named: Vec<(&str, &String)> = ["client_id", "object_id", "msi_res_id", "mi_res_id"]
        .iter()
        .filter_map(|k| query.get(*k).map(|v| (*k, v)))
        .collect();
    let identity = match named.as_slice() {
        [] => state.identities.first(),
        [(kind, value)] => state.identities.iter().skip(1).find(|i| match *kind {
            "client_id" => i.client_id.eq_ignore_ascii_case(value),
            "object_id" => i.object_id.eq_ignore_ascii_case(value),
            _ => i
                .msi_res_id
                .as_deref()
                .is_some_and(|r| r.eq_ignore_ascii_case(value)),
        }),
        _ => return oauth_error("Only one of client_id, object_id and msi_res_id may be given"),
    };
    // IMDS's answer for an identity not assigned to the VM.
    let Some(identity) = identity else {
        return oauth_error("Identity not found");
    };
    *state
        .issued
        .lock()
        .expect("issued poisoned")
        .entry(identity.client_id.clone())
        .or_default() += 1;
    let now = unix_now();
    let lifetime = state.token_lifetime.as_secs();
    // The token names its identity (as a real one's appid/oid claims do),
    // so a test can tell whose it is.
    let claims = json!({
        "appid": identity.client_id,
        "oid": identity.object_id,
        "aud": resource,
        "exp": now + lifetime,
    });
    json_resp(
        StatusCode::OK,
        &json!({
            "access_token": format!("mock.{}.{}", base64(claims.to_string().as_bytes()).trim_end_matches('='), random_token()),
            "client_id": identity.client_id,
            "expires_in": lifetime.to_string(),
            "expires_on": (now + lifetime).to_string(),
            "ext_expires_in": lifetime.to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}

fn attested(state: &MockState, query: &BTreeMap<String, String>) -> Response<ProxyBody> {
    let nonce = query.get("nonce").cloned().unwrap_or_default();
    if nonce.len() > 10 || !nonce.bytes().all(|b| b.is_ascii_digit()) {
        return bad_request("nonce must be at most 10 digits");
    }
    let document = json!({
        "nonce": nonce,
        "vmId": state.instance["compute"]["vmId"],
        "timeStamp": { "createdOn": unix_now().to_string() },
    });
    json_resp(
        StatusCode::OK,
        &json!({ "encoding": "pkcs7", "signature": base64(document.to_string().as_bytes()) }),
    )
}

async fn scheduled_events(req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() == Method::GET {
        return json_resp(
            StatusCode::OK,
            &json!({ "DocumentIncarnation": 1, "Events": [] }),
        );
    }
    let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
        return bad_request("Request body too large or unreadable");
    };
    let parsed: Result<Value, _> = serde_json::from_slice(&body.to_bytes());
    match parsed {
        Ok(v) if v.get("StartRequests").is_some_and(Value::is_array) => {
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        _ => bad_request("Body must be JSON with a StartRequests array"),
    }
}

// ------------------------------------------------------------------ AWS --

fn aws_error(status: StatusCode) -> Response<ProxyBody> {
    let reason = status.canonical_reason().unwrap_or("");
    let mut resp = text(
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<html><head><title>{} - {reason}</title></head><body><h1>{} - {reason}</h1></body></html>\n",
            status.as_u16(),
            status.as_u16()
        ),
    );
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html"),
    );
    resp
}

fn aws(state: &MockState, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path();
    if path == "/latest/api/token" {
        if req.method() != Method::PUT {
            return aws_error(StatusCode::METHOD_NOT_ALLOWED);
        }
        if req.headers().contains_key("x-forwarded-for") {
            return aws_error(StatusCode::FORBIDDEN);
        }
        let ttl = req
            .headers()
            .get(AWS_TOKEN_TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ttl| (1..=AWS_MAX_TTL).contains(ttl));
        let Some(ttl) = ttl else {
            return aws_error(StatusCode::BAD_REQUEST);
        };
        let token = random_token();
        {
            let mut tokens = state.tokens.lock().expect("token store poisoned");
            let now = Instant::now();
            tokens.retain(|_, expiry| *expiry > now);
            if tokens.len() >= MAX_TOKENS {
                return aws_error(StatusCode::SERVICE_UNAVAILABLE);
            }
            tokens.insert(token.clone(), now + Duration::from_secs(ttl));
        }
        let mut resp = text(StatusCode::OK, token);
        resp.headers_mut()
            .insert(AWS_TOKEN_TTL_HEADER, HeaderValue::from(ttl));
        return resp;
    }
    let Some(rest) = path
        .strip_prefix("/latest/meta-data")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    else {
        return aws_error(StatusCode::NOT_FOUND);
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return aws_error(StatusCode::METHOD_NOT_ALLOWED);
    }
    let token_ok = req
        .headers()
        .get(AWS_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            let tokens = state.tokens.lock().expect("token store poisoned");
            tokens.get(t).is_some_and(|expiry| *expiry > Instant::now())
        });
    if !token_ok {
        return aws_error(StatusCode::UNAUTHORIZED);
    }
    match aws_metadata(rest.trim_matches('/')) {
        Some(body) => text(StatusCode::OK, body),
        None => aws_error(StatusCode::NOT_FOUND),
    }
}

/// The few meta-data items the fake knows; directories list their children.
fn aws_metadata(item: &str) -> Option<String> {
    let role = "mock-role";
    Some(match item {
        "" => "ami-id\ninstance-id\ninstance-type\nlocal-ipv4\nplacement/\niam/".into(),
        "ami-id" => "ami-0123456789abcdef0".into(),
        "instance-id" => "i-0123456789abcdef0".into(),
        "instance-type" => "m5.large".into(),
        "local-ipv4" => "10.0.0.5".into(),
        "placement" => "availability-zone\nregion".into(),
        "placement/availability-zone" => "us-east-1a".into(),
        "placement/region" => "us-east-1".into(),
        "iam" => "info\nsecurity-credentials/".into(),
        "iam/info" => json!({
            "Code": "Success",
            "InstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/mock-role",
            "InstanceProfileId": "AIPAMOCKMOCKMOCKMOCK",
        })
        .to_string(),
        "iam/security-credentials" => role.into(),
        "iam/security-credentials/mock-role" => json!({
            "Code": "Success",
            "Type": "AWS-HMAC",
            "AccessKeyId": "ASIAMOCKMOCKMOCKMOCK",
            "SecretAccessKey": random_token(),
            "Token": random_token(),
            // Role credentials live six hours on EC2.
            "Expiration": rfc3339(unix_now() + 6 * 3600),
            "LastUpdated": rfc3339(unix_now()),
        })
        .to_string(),
        _ => return None,
    })
}

// -------------------------------------------------------------- helpers --

#[derive(Debug, PartialEq, Eq)]
pub enum QueryError {
    Duplicate(String),
    Malformed,
}

/// Parses a query string into decoded name/value pairs; a name given twice
/// is an error (the real service refuses it).
pub fn parse_query(query: &str) -> Result<BTreeMap<String, String>, QueryError> {
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name).ok_or(QueryError::Malformed)?;
        let value = percent_decode(value).ok_or(QueryError::Malformed)?;
        if out.contains_key(&name) {
            return Err(QueryError::Duplicate(name));
        }
        out.insert(name, value);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds (civil-from-days, proleptic
/// Gregorian), the form EC2 writes credential times in.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::thread_rng().r#gen();
    base64(&bytes)
}

// Tokens and the attested signature only need to look like base64; a
// dependency for ten lines is not worth it.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn instance_document() -> Value {
    json!({
        "compute": {
            "location": "westus2",
            "name": "mock-vmss_1",
            "offer": "WindowsServerSemiAnnual",
            "osType": "Linux",
            "platformFaultDomain": "1",
            "platformUpdateDomain": "1",
            "resourceGroupName": "mock-rg",
            "subscriptionId": "00000000-0000-0000-0000-000000000000",
            "tags": "role:mock",
            "vmId": "a7c7a8a7-7cdb-4c49-a3a5-d67dc6aa2050",
            "vmSize": "Standard_D2s_v3",
            "zone": "1",
        },
        "network": {
            "interface": [{
                "ipv4": {
                    "ipAddress": [{ "privateIpAddress": "10.0.0.5", "publicIpAddress": "" }],
                    "subnet": [{ "address": "10.0.0.0", "prefix": "16" }],
                },
                "ipv6": { "ipAddress": [] },
                "macAddress": "000D3AF9AECA",
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_duplicates_are_refused() {
        assert_eq!(
            parse_query("api-version=1&api-version=2"),
            Err(QueryError::Duplicate("api-version".into()))
        );
        assert_eq!(parse_query("a=%zz"), Err(QueryError::Malformed));
        let q = parse_query("resource=https%3A%2F%2Fvault.azure.net&x=").unwrap();
        assert_eq!(q["resource"], "https://vault.azure.net");
        assert_eq!(q["x"], "");
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
