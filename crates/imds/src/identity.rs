//! Per-pod cloud identities: which identity a pod's credential request is
//! answered for, the refusal of requests that name another one, and the
//! cache of credentials per identity.
//!
//! A pod bound to an Azure managed identity (see `identities` in
//! [`crate::rules`]) asks `/metadata/identity/oauth2/token` as any SDK
//! does; the proxy answers it itself from a token fetched upstream with the
//! identity parameter the proxy sets (`client_id`, `object_id`,
//! `msi_res_id`, or none for the system-assigned identity). A request that
//! names a different identity is refused as IMDS refuses an identity the VM
//! does not have (400, OAuth error JSON); an unbound pod gets no token.
//!
//! Tokens are cached per (identity, resource, api-version), never shared
//! across identities, and refreshed halfway through their remaining life by
//! one upstream request however many pods ask at once (single flight).
//! Token bodies never go to logs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::mock::{QueryError, parse_query};

/// The Azure token endpoint the identity layer answers.
pub const AZURE_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// Query parameters by which a token request names a user-assigned
/// identity (`mi_res_id` is the newer spelling of `msi_res_id`).
const AZURE_IDENTITY_PARAMS: &[&str] = &["client_id", "object_id", "msi_res_id", "mi_res_id"];

/// A managed identity: exactly one of the three ids, or the VM's
/// system-assigned identity.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AzureIdentity {
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub object_id: Option<String>,
    #[serde(default)]
    pub msi_res_id: Option<String>,
    #[serde(default)]
    pub system_assigned: bool,
}

impl AzureIdentity {
    pub fn validate(&self) -> Result<(), String> {
        let given = [&self.client_id, &self.object_id, &self.msi_res_id]
            .iter()
            .filter(|v| v.is_some())
            .count()
            + usize::from(self.system_assigned);
        if given != 1 {
            return Err(
                "give exactly one of client_id, object_id, msi_res_id, system_assigned: true"
                    .into(),
            );
        }
        for v in [&self.client_id, &self.object_id, &self.msi_res_id]
            .into_iter()
            .flatten()
        {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("{v:?} is not a valid identity id"));
            }
        }
        Ok(())
    }

    /// The query parameter naming this identity upstream (`None`: the
    /// system-assigned identity, asked for by naming none).
    pub fn param(&self) -> Option<(&'static str, &str)> {
        if let Some(v) = &self.client_id {
            Some(("client_id", v))
        } else if let Some(v) = &self.object_id {
            Some(("object_id", v))
        } else {
            self.msi_res_id.as_deref().map(|v| ("msi_res_id", v))
        }
    }

    /// How audit lines and metrics name the identity.
    pub fn label(&self) -> String {
        match self.param() {
            Some((k, v)) => format!("azure:{k}={v}"),
            None => "azure:system".into(),
        }
    }

    /// Does a request naming `name=value` ask for this identity? Ids are
    /// GUIDs and ARM ids, both compared case-insensitively by Azure.
    fn is_named_by(&self, name: &str, value: &str) -> bool {
        let name = if name == "mi_res_id" {
            "msi_res_id"
        } else {
            name
        };
        self.param()
            .is_some_and(|(k, v)| k == name && v.eq_ignore_ascii_case(value))
    }
}

/// An IAM role a pod's AWS credentials are assumed for.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AwsRole {
    pub role_arn: String,
    /// Session length asked of STS (900..=43200; STS's own limits).
    #[serde(default = "default_role_duration")]
    pub duration_seconds: u32,
}

fn default_role_duration() -> u32 {
    3600
}

impl AwsRole {
    pub fn validate(&self) -> Result<(), String> {
        let parts: Vec<&str> = self.role_arn.splitn(6, ':').collect();
        let ok = parts.len() == 6
            && parts[0] == "arn"
            && matches!(parts[1], "aws" | "aws-cn" | "aws-us-gov")
            && parts[2] == "iam"
            && parts[3].is_empty()
            && parts[4].len() == 12
            && parts[4].bytes().all(|b| b.is_ascii_digit())
            && parts[5].starts_with("role/")
            && (1..=64).contains(&self.name().len())
            && self
                .name()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
        if !ok {
            return Err(format!(
                "role_arn {:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
                self.role_arn
            ));
        }
        if !(900..=43_200).contains(&self.duration_seconds) {
            return Err(format!(
                "duration_seconds {} is outside STS's 900..=43200",
                self.duration_seconds
            ));
        }
        Ok(())
    }

    /// The role's name: what IMDS lists under `security-credentials/`.
    pub fn name(&self) -> &str {
        self.role_arn.rsplit('/').next().unwrap_or_default()
    }

    pub fn label(&self) -> String {
        format!("aws:{}", self.role_arn)
    }
}

/// Where STS is reached (rules file, top-level `sts:`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StsSettings {
    #[serde(default = "default_sts_endpoint")]
    pub endpoint: String,
    #[serde(default = "default_sts_region")]
    pub region: String,
}

impl Default for StsSettings {
    fn default() -> Self {
        StsSettings {
            endpoint: default_sts_endpoint(),
            region: default_sts_region(),
        }
    }
}

fn default_sts_endpoint() -> String {
    "https://sts.amazonaws.com".into()
}

fn default_sts_region() -> String {
    "us-east-1".into()
}

/// IMDSv2 session tokens the proxy obtained for pods, each good only for
/// the pod it was issued to (a stolen token is useless elsewhere).
#[derive(Default)]
pub struct SessionTokens {
    tokens: Mutex<HashMap<String, (std::sync::Arc<str>, std::time::Instant)>>,
}

const MAX_SESSION_TOKENS: usize = 65_536;

impl SessionTokens {
    /// Remembers `token` for `pod` for `ttl`; false when full.
    pub fn insert(&self, token: &str, pod: std::sync::Arc<str>, ttl: Duration) -> bool {
        let mut tokens = self.tokens.lock().expect("tokens poisoned");
        let now = std::time::Instant::now();
        if tokens.len() >= MAX_SESSION_TOKENS {
            tokens.retain(|_, (_, expiry)| *expiry > now);
            if tokens.len() >= MAX_SESSION_TOKENS {
                return false;
            }
        }
        tokens.insert(token.to_owned(), (pod, now + ttl));
        true
    }

    /// Is `token` live and `pod`'s?
    pub fn valid_for(&self, token: &str, pod: &str) -> bool {
        let tokens = self.tokens.lock().expect("tokens poisoned");
        tokens
            .get(token)
            .is_some_and(|(owner, expiry)| &**owner == pod && *expiry > std::time::Instant::now())
    }
}

/// A local answer of the identity layer: status, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The audit decision (`allowed` for an issued credential).
    pub decision: &'static str,
    /// Ask the client to retry (upstream failures).
    pub retry_after: bool,
}

const JSON: &str = "application/json; charset=utf-8";

impl Answer {
    fn oauth_error(status: u16, error: &str, description: &str, decision: &'static str) -> Self {
        Answer {
            status,
            content_type: JSON,
            body: json!({ "error": error, "error_description": description })
                .to_string()
                .into_bytes(),
            decision,
            retry_after: false,
        }
    }
}

/// What the upstream is asked for one Azure token request, and the cache
/// key it is kept under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureTokenAsk {
    /// Path and query of the upstream request.
    pub target: String,
    pub key: String,
}

/// Checks a bound pod's token request (its raw query string) and builds
/// the upstream request for its identity, or the refusal IMDS would give.
pub fn azure_token_ask(bound: &AzureIdentity, query: &str) -> Result<AzureTokenAsk, Answer> {
    let params = parse_query(query).map_err(|e| match e {
        QueryError::Duplicate(name) => Answer::oauth_error(
            400,
            "invalid_request",
            &format!("Query parameter '{name}' is specified more than once"),
            "bad_request",
        ),
        QueryError::Malformed => {
            Answer::oauth_error(400, "invalid_request", "Malformed query", "bad_request")
        }
    })?;
    let named: Vec<(&str, &str)> = AZURE_IDENTITY_PARAMS
        .iter()
        .filter_map(|k| params.get(*k).map(|v| (*k, v.as_str())))
        .collect();
    if named.len() > 1 {
        return Err(Answer::oauth_error(
            400,
            "invalid_request",
            "Only one of client_id, object_id and msi_res_id may be given",
            "bad_request",
        ));
    }
    if let Some((name, value)) = named.first()
        && !bound.is_named_by(name, value)
    {
        // What IMDS answers for an identity not assigned to the VM: the pod
        // learns nothing about which identities exist.
        return Err(Answer::oauth_error(
            400,
            "invalid_request",
            "Identity not found",
            "wrong_identity",
        ));
    }
    let Some(resource) = params.get("resource").filter(|r| !r.is_empty()) else {
        return Err(Answer::oauth_error(
            400,
            "invalid_request",
            "Required query variable 'resource' is missing",
            "bad_request",
        ));
    };
    let Some(api_version) = params.get("api-version") else {
        return Err(Answer::oauth_error(
            400,
            "invalid_request",
            "Required query variable 'api-version' is missing",
            "bad_request",
        ));
    };
    let mut target = format!(
        "{AZURE_TOKEN_PATH}?api-version={}&resource={}",
        encode(api_version),
        encode(resource)
    );
    if let Some((k, v)) = bound.param() {
        target.push_str(&format!("&{k}={}", encode(v)));
    }
    Ok(AzureTokenAsk {
        key: format!("{}\n{resource}\n{api_version}", bound.label()),
        target,
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A credential as fetched: the token JSON and when it expires.
#[derive(Debug, Clone)]
pub struct Credential {
    pub document: Value,
    /// Unix seconds.
    pub expires_on: u64,
    /// Unix seconds after which the next request fetches a new one.
    pub refresh_after: u64,
}

impl Credential {
    /// A credential expiring at `expires_on`, refreshed halfway through
    /// the life it has left now.
    pub fn new(document: Value, expires_on: u64) -> Self {
        let now = unix_now();
        Credential {
            refresh_after: now + expires_on.saturating_sub(now) / 2,
            expires_on,
            document,
        }
    }

    /// An Azure token answer (`expires_on` as IMDS writes it: a string of
    /// unix seconds; `expires_in` as a fallback).
    pub fn from_azure(document: Value, now: u64) -> Option<Self> {
        let number = |v: &Value| -> Option<u64> {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        };
        let expires_on = document
            .get("expires_on")
            .and_then(number)
            .or_else(|| document.get("expires_in").and_then(number).map(|s| now + s))?;
        document.get("access_token")?.as_str()?;
        Some(Credential {
            refresh_after: now + expires_on.saturating_sub(now) / 2,
            expires_on,
            document,
        })
    }

    /// The token as the caller gets it: `expires_in` counts down from the
    /// cache, as IMDS's own cache does.
    pub fn azure_answer(&self, now: u64) -> Vec<u8> {
        let mut doc = self.document.clone();
        if let Some(map) = doc.as_object_mut()
            && map.contains_key("expires_in")
        {
            map.insert(
                "expires_in".into(),
                Value::String(self.expires_on.saturating_sub(now).to_string()),
            );
        }
        doc.to_string().into_bytes()
    }
}

/// Why a fetch gave no credential.
#[derive(Debug, Clone)]
pub enum FetchError {
    /// The upstream answered with a refusal: passed on as it is.
    Refused { status: u16, body: Vec<u8> },
    /// Unreachable, timed out, or an answer that was not a credential.
    Failed(String),
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<Credential>>>,
    /// Held by the one request that refreshes this identity's credential.
    refresh: tokio::sync::Mutex<()>,
}

/// Credentials per key (an identity and what was asked for it).
#[derive(Default)]
pub struct CredentialCache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// Where a credential came from (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Fetched,
}

impl CredentialCache {
    /// The cached credential for `key` if it is fresh; otherwise one caller
    /// fetches with `fetch` while the others wait for its result. A failed
    /// refresh falls back to a cached credential that has not expired yet.
    pub async fn get<F, Fut>(
        &self,
        key: &str,
        fetch: F,
    ) -> Result<(Arc<Credential>, Source), FetchError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Credential, FetchError>>,
    {
        let slot = {
            let mut slots = self.slots.lock().expect("cache poisoned");
            match slots.get(key) {
                Some(s) => s.clone(),
                None => slots.entry(key.to_owned()).or_default().clone(),
            }
        };
        let fresh = |slot: &Slot| {
            let now = unix_now();
            slot.current
                .lock()
                .expect("slot poisoned")
                .clone()
                .filter(|c| now < c.refresh_after)
        };
        if let Some(c) = fresh(&slot) {
            return Ok((c, Source::Cache));
        }
        let _refreshing = slot.refresh.lock().await;
        // Whoever held the lock before may have refreshed it.
        if let Some(c) = fresh(&slot) {
            return Ok((c, Source::Cache));
        }
        match fetch().await {
            Ok(c) => {
                let c = Arc::new(c);
                *slot.current.lock().expect("slot poisoned") = Some(c.clone());
                Ok((c, Source::Fetched))
            }
            Err(e) => {
                let now = unix_now();
                let still_valid = slot
                    .current
                    .lock()
                    .expect("slot poisoned")
                    .clone()
                    .filter(|c| now + 60 < c.expires_on);
                match still_valid {
                    Some(c) => {
                        tracing::warn!("credential refresh failed, serving the cached one: {e:?}");
                        Ok((c, Source::Cache))
                    }
                    None => Err(e),
                }
            }
        }
    }
}

/// How long an upstream credential fetch may take in all.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 GET to the upstream metadata service, on a connection of
/// its own (fetches are rare: once per identity per refresh).
pub async fn upstream_get(
    upstream: (&str, u16),
    authority: &str,
    target: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    upstream_request(
        upstream,
        authority,
        "GET",
        target,
        headers,
        Vec::new(),
        timeout,
    )
    .await
    .map(|(status, _, body)| (status, body))
}

/// One HTTP/1.1 request to the upstream metadata service on a connection
/// of its own: status, the TTL field of an IMDSv2 token answer, body.
pub async fn upstream_request(
    upstream: (&str, u16),
    authority: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(u16, Option<String>, Vec<u8>), String> {
    use http_body_util::{BodyExt, Full, Limited};
    let work = async {
        let stream = tokio::net::TcpStream::connect(upstream)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(target)
            .header("host", authority);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let ttl = resp
            .headers()
            .get(crate::mock::AWS_TOKEN_TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, ttl, body.to_vec()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// Fetches the Azure token `ask` describes from the metadata service.
pub async fn fetch_azure(
    upstream: (&str, u16),
    authority: &str,
    ask: &AzureTokenAsk,
    timeout: Duration,
) -> Result<Credential, FetchError> {
    let (status, body) = upstream_get(
        upstream,
        authority,
        &ask.target,
        &[("metadata", "true")],
        timeout,
    )
    .await
    .map_err(FetchError::Failed)?;
    if status != 200 {
        // Refusals (unknown identity, bad resource) are the service's word;
        // server errors are failures the caller may retry.
        return Err(if (400..500).contains(&status) {
            FetchError::Refused { status, body }
        } else {
            FetchError::Failed(format!("upstream answered {status}"))
        });
    }
    let document: Value = serde_json::from_slice(&body)
        .map_err(|_| FetchError::Failed("token answer is not JSON".into()))?;
    Credential::from_azure(document, unix_now())
        .ok_or_else(|| FetchError::Failed("token answer has no access_token/expiry".into()))
}

/// The answer for a failed fetch: the upstream's refusal as it was, or a
/// 503 that every cloud SDK retries.
pub fn failure_answer(e: FetchError) -> Answer {
    match e {
        FetchError::Refused { status, body } => Answer {
            status,
            content_type: JSON,
            body,
            decision: "credential_refused",
            retry_after: false,
        },
        FetchError::Failed(why) => {
            tracing::warn!("credential fetch failed: {why}");
            Answer {
                retry_after: true,
                ..Answer::oauth_error(
                    503,
                    "service_unavailable",
                    "The credential could not be obtained from the metadata service; retry",
                    "credential_error",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str) -> AzureIdentity {
        AzureIdentity {
            client_id: Some(id.into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_bound_identity_is_set_and_others_are_refused() {
        let bound = client("AAAA-1");
        let ask = azure_token_ask(
            &bound,
            "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net",
        )
        .unwrap();
        assert_eq!(
            ask.target,
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&client_id=AAAA-1"
        );
        // Naming the bound identity (any case) is the same request.
        let same = azure_token_ask(
            &bound,
            "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&client_id=aaaa-1",
        )
        .unwrap();
        assert_eq!(same, ask);
        for other in [
            "client_id=BBBB",
            "object_id=AAAA-1",
            "msi_res_id=x",
            "mi_res_id=x",
        ] {
            let refused =
                azure_token_ask(&bound, &format!("api-version=1&resource=r&{other}")).unwrap_err();
            assert_eq!(refused.status, 400, "{other}");
            assert_eq!(refused.decision, "wrong_identity", "{other}");
            let body: Value = serde_json::from_slice(&refused.body).unwrap();
            assert_eq!(body["error"], "invalid_request");
        }
        let system = AzureIdentity {
            system_assigned: true,
            ..Default::default()
        };
        let ask = azure_token_ask(&system, "api-version=1&resource=r").unwrap();
        assert_eq!(
            ask.target,
            format!("{AZURE_TOKEN_PATH}?api-version=1&resource=r")
        );
        assert_eq!(
            azure_token_ask(&system, "api-version=1&resource=r&client_id=x")
                .unwrap_err()
                .decision,
            "wrong_identity"
        );
        // Keys never collide across identities.
        assert_ne!(
            azure_token_ask(&client("a"), "api-version=1&resource=r")
                .unwrap()
                .key,
            azure_token_ask(&client("b"), "api-version=1&resource=r")
                .unwrap()
                .key
        );
        for bad in [
            "resource=r",
            "api-version=1",
            "api-version=1&resource=r&resource=s",
        ] {
            assert_eq!(
                azure_token_ask(&bound, bad).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn identities_must_name_exactly_one_id() {
        assert!(client("x").validate().is_ok());
        assert!(AzureIdentity::default().validate().is_err());
        let two = AzureIdentity {
            client_id: Some("a".into()),
            system_assigned: true,
            ..Default::default()
        };
        assert!(two.validate().is_err());
        assert!(client("a b").validate().is_err());
    }

    #[test]
    fn expires_in_counts_down_from_the_cache() {
        let c = Credential::from_azure(
            json!({"access_token": "t", "expires_in": "3600", "expires_on": "10000"}),
            6400,
        )
        .unwrap();
        assert_eq!(c.refresh_after, 6400 + 1800);
        let out: Value = serde_json::from_slice(&c.azure_answer(9000)).unwrap();
        assert_eq!(out["expires_in"], "1000");
        assert!(Credential::from_azure(json!({"expires_in": "1"}), 0).is_none());
    }

    #[tokio::test]
    async fn one_fetch_however_many_ask() {
        let cache = Arc::new(CredentialCache::default());
        let fetches = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = Vec::new();
        for i in 0..50 {
            let cache = cache.clone();
            let fetches = fetches.clone();
            let key = if i % 2 == 0 { "a" } else { "b" };
            tasks.push(tokio::spawn(async move {
                cache
                    .get(key, || async move {
                        fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let now = unix_now();
                        Ok(Credential {
                            document: json!({"access_token": key}),
                            expires_on: now + 3600,
                            refresh_after: now + 1800,
                        })
                    })
                    .await
                    .map(|(c, _)| (key, c.document["access_token"].clone()))
                    .unwrap()
            }));
        }
        for t in tasks {
            let (key, token) = t.await.unwrap();
            assert_eq!(token, key, "a credential crossed identities");
        }
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
