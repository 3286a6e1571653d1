//! The GCP side of per-pod identities, as the GKE metadata server does it:
//! a pod bound to a Google service account sees only that account under
//! `/computeMetadata/v1/instance/service-accounts/` (as `default` and by
//! its email), and its `token` and `identity?audience=` answers are for
//! that account, obtained from IAM Credentials `generateAccessToken` /
//! `generateIdToken` with the node's own token (which the node's metadata
//! server gives). Another account is answered 404, as the metadata server
//! answers an account the instance does not have; an unbound pod sees no
//! account at all.
//!
//! Credentials are cached per (account, scopes) and (account, audience,
//! format) in the identity layer's single-flight cache. Tokens never go
//! to logs; IAM errors are logged by their status and message only.

use std::time::Duration;

use http_body_util::Full;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::identity::{Answer, Credential, FetchError, unix_now, upstream_get};
use crate::mock::parse_query;
use crate::sts::StsConfig;

/// Where the metadata server keeps service accounts.
pub const SERVICE_ACCOUNTS_DIR: &str = "/computeMetadata/v1/instance/service-accounts";
pub const FLAVOR_HEADER: &str = "metadata-flavor";
/// The content type the metadata server gives text values.
pub const TEXT: &str = "application/text";
pub const JSON: &str = "application/json";
/// The scope an account's tokens get when the binding names none (what
/// GKE nodes and most SDK defaults use).
pub const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// A Google service account a pod's credentials are issued for.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GcpServiceAccount {
    pub email: String,
    /// Scopes of the account's tokens when the app asks for none.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Token lifetime asked of IAM Credentials (its default and, without
    /// the lifetime-extension org policy, its maximum: one hour).
    #[serde(default = "default_lifetime")]
    pub lifetime_seconds: u32,
}

fn default_scopes() -> Vec<String> {
    vec![CLOUD_PLATFORM.into()]
}

fn default_lifetime() -> u32 {
    3600
}

impl GcpServiceAccount {
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.email.split_once('@').is_some_and(|(user, domain)| {
            !user.is_empty()
                && domain.ends_with("gserviceaccount.com")
                && self
                    .email
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.@_".contains(&b))
        });
        if !ok {
            return Err(format!(
                "email {:?} is not a service account email (NAME@PROJECT.iam.gserviceaccount.com)",
                self.email
            ));
        }
        if self.scopes.is_empty() || self.scopes.iter().any(|s| !valid_scope(s)) {
            return Err("scopes must be a non-empty list of scope URLs".into());
        }
        if !(1..=43_200).contains(&self.lifetime_seconds) {
            return Err(format!(
                "lifetime_seconds {} is outside IAM Credentials' 1..=43200",
                self.lifetime_seconds
            ));
        }
        Ok(())
    }

    pub fn label(&self) -> String {
        format!("gcp:{}", self.email)
    }

    /// The directory of the account as the metadata server answers it
    /// with `?recursive=true`.
    fn info(&self) -> Value {
        json!({ "aliases": ["default"], "email": self.email, "scopes": self.scopes })
    }
}

fn valid_scope(s: &str) -> bool {
    s.starts_with("https://") && s.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

/// Where IAM Credentials is reached (rules file, top-level `gcp:`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GcpSettings {
    #[serde(default = "default_iam_endpoint")]
    pub iam_endpoint: String,
}

impl Default for GcpSettings {
    fn default() -> Self {
        GcpSettings {
            iam_endpoint: default_iam_endpoint(),
        }
    }
}

fn default_iam_endpoint() -> String {
    "https://iamcredentials.googleapis.com".into()
}

/// What one request under the service-accounts directory needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcpAsk {
    /// Answered from the binding alone (listings, email, refusals).
    Answer(Answer),
    /// An access token with these scopes.
    Token { scopes: Vec<String>, key: String },
    /// An ID token for `audience`.
    Identity {
        audience: String,
        include_email: bool,
        key: String,
    },
}

fn answer(
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    decision: &'static str,
) -> GcpAsk {
    GcpAsk::Answer(Answer {
        status,
        content_type,
        body,
        decision,
        retry_after: false,
    })
}

/// The metadata server's 404 (unknown path, or an account the instance
/// does not have): a plain page that says nothing about other accounts.
fn not_found(decision: &'static str) -> GcpAsk {
    answer(
        404,
        "text/html; charset=UTF-8",
        NOT_FOUND_PAGE.as_bytes().to_vec(),
        decision,
    )
}

const NOT_FOUND_PAGE: &str = "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 404 (Not Found)!!1</title>\n  <p><b>404.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The requested URL was not found on this server.  <ins>That\u{2019}s all we know.</ins>\n";

fn bad_request(message: &str) -> GcpAsk {
    answer(
        400,
        TEXT,
        format!("{message}\n").into_bytes(),
        "bad_request",
    )
}

/// A value as the metadata server writes it: JSON with `alt=json` (or for
/// recursive directories), text otherwise.
fn value_answer(value: Value, json_out: bool) -> GcpAsk {
    if json_out {
        return answer(200, JSON, value.to_string().into_bytes(), "allowed");
    }
    let text = match value {
        Value::String(s) => s,
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned) + "\n")
            .collect(),
        other => other.to_string(),
    };
    answer(200, TEXT, text.into_bytes(), "allowed")
}

/// Decides a request for `SERVICE_ACCOUNTS_DIR + rest` from a pod bound to
/// `bound` (or to nothing).
pub fn gcp_ask(bound: Option<&GcpServiceAccount>, method: &str, rest: &str, query: &str) -> GcpAsk {
    let Ok(params) = parse_query(query) else {
        return bad_request("Malformed query");
    };
    let alt = params.get("alt").map(String::as_str);
    if !matches!(alt, None | Some("json" | "text")) {
        return bad_request("Invalid alt value; use json or text");
    }
    let recursive = params
        .get("recursive")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if method != "GET" && method != "HEAD" {
        return answer(405, TEXT, b"Method Not Allowed\n".to_vec(), "denied");
    }
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let (account, item) = match rest.split_once('/') {
        Some((a, i)) => (a, Some(i)),
        None => (rest, None),
    };
    if account.is_empty() {
        // The directory itself: only the pod's own account.
        return match bound {
            None if recursive || alt == Some("json") => value_answer(json!({}), true),
            None => answer(200, TEXT, Vec::new(), "no_identity"),
            Some(sa) if recursive && alt != Some("text") => value_answer(
                json!({ "default": sa.info(), sa.email.clone(): sa.info() }),
                true,
            ),
            Some(sa) => {
                let listing = format!("default/\n{}/\n", sa.email);
                answer(200, TEXT, listing.into_bytes(), "allowed")
            }
        };
    }
    let Some(sa) = bound else {
        return not_found("no_identity");
    };
    if account != "default" && account != sa.email {
        return not_found("wrong_identity");
    }
    let json_out = alt == Some("json");
    match item.unwrap_or("") {
        "" => {
            if recursive && alt != Some("text") {
                value_answer(sa.info(), true)
            } else {
                value_answer(
                    json!(["aliases", "email", "identity", "scopes", "token"]),
                    json_out,
                )
            }
        }
        "email" => value_answer(json!(sa.email), json_out),
        "aliases" => value_answer(json!(["default"]), json_out),
        "scopes" => value_answer(json!(sa.scopes), json_out),
        "token" => {
            let scopes: Vec<String> = match params.get("scopes") {
                Some(s) => s
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                None => sa.scopes.clone(),
            };
            if scopes.is_empty() || scopes.iter().any(|s| !valid_scope(s)) {
                return bad_request("Invalid scopes");
            }
            GcpAsk::Token {
                key: format!("{}\ntoken\n{}", sa.label(), scopes.join(",")),
                scopes,
            }
        }
        "identity" => {
            let Some(audience) = params.get("audience").filter(|a| !a.is_empty()) else {
                return bad_request("non-empty audience parameter required");
            };
            let include_email = match params.get("format").map(String::as_str) {
                None | Some("standard") => false,
                Some("full") => true,
                Some(_) => return bad_request("format must be standard or full"),
            };
            GcpAsk::Identity {
                key: format!("{}\nidentity\n{include_email}\n{audience}", sa.label()),
                audience: audience.clone(),
                include_email,
            }
        }
        _ => not_found("bad_path"),
    }
}

/// The token answer a pod gets: `expires_in` counts down from the cache.
pub fn token_answer(c: &Credential, now: u64) -> Vec<u8> {
    json!({
        "access_token": c.document["access_token"],
        "expires_in": c.expires_on.saturating_sub(now),
        "token_type": "Bearer",
    })
    .to_string()
    .into_bytes()
}

/// The node's own access token from its metadata server.
pub async fn node_token(
    upstream: (&str, u16),
    authority: &str,
    timeout: Duration,
) -> Result<Credential, FetchError> {
    let (status, body) = upstream_get(
        upstream,
        authority,
        &format!("{SERVICE_ACCOUNTS_DIR}/default/token"),
        &[("metadata-flavor", "Google")],
        timeout,
    )
    .await
    .map_err(FetchError::Failed)?;
    if status != 200 {
        return Err(FetchError::Failed(format!(
            "node token: metadata server answered {status}"
        )));
    }
    let doc: Value = serde_json::from_slice(&body)
        .map_err(|_| FetchError::Failed("node token answer is not JSON".into()))?;
    let expires_in = doc.get("expires_in").and_then(Value::as_u64);
    match (doc.get("access_token").and_then(Value::as_str), expires_in) {
        (Some(_), Some(secs)) => Ok(Credential::new(doc.clone(), unix_now() + secs)),
        _ => Err(FetchError::Failed(
            "node token answer lacks access_token/expires_in".into(),
        )),
    }
}

/// One IAM Credentials call: `POST /v1/projects/-/serviceAccounts/EMAIL:VERB`
/// with the node's token; the answer's JSON.
async fn iam_call(
    iam: &StsConfig,
    node_token: &str,
    email: &str,
    verb: &str,
    body: Value,
    timeout: Duration,
) -> Result<Value, FetchError> {
    let authority = iam
        .endpoint
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let path = format!("/v1/projects/-/serviceAccounts/{email}:{verb}");
    let request = http::Request::post(&path)
        .header("host", &authority)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {node_token}"))
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .map_err(|e| FetchError::Failed(format!("IAM request: {e}")))?;
    let (status, answer) = tokio::time::timeout(timeout, crate::sts::send(iam, request))
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
        .map_err(|e| FetchError::Failed(format!("IAM Credentials: {e}")))?;
    let doc: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    if status != 200 {
        // Google's error shape: {"error": {"code", "message", "status"}}.
        let err = &doc["error"];
        return Err(FetchError::Failed(format!(
            "IAM Credentials {verb} for {email} answered {status}: {}: {}",
            err["status"].as_str().unwrap_or("?"),
            err["message"].as_str().unwrap_or("")
        )));
    }
    Ok(doc)
}

/// An access token for `account` with `scopes`.
pub async fn generate_access_token(
    iam: &StsConfig,
    node_token: &str,
    account: &GcpServiceAccount,
    scopes: &[String],
    timeout: Duration,
) -> Result<Credential, FetchError> {
    let body = json!({ "scope": scopes, "lifetime": format!("{}s", account.lifetime_seconds) });
    let doc = iam_call(
        iam,
        node_token,
        &account.email,
        "generateAccessToken",
        body,
        timeout,
    )
    .await?;
    let token = doc["accessToken"]
        .as_str()
        .ok_or_else(|| FetchError::Failed("generateAccessToken answer lacks accessToken".into()))?;
    let expires_on = doc["expireTime"]
        .as_str()
        .and_then(crate::sts::parse_rfc3339)
        .ok_or_else(|| FetchError::Failed("generateAccessToken expireTime is not a time".into()))?;
    Ok(Credential::new(
        json!({ "access_token": token }),
        expires_on,
    ))
}

/// An ID token for `account` and `audience`.
pub async fn generate_id_token(
    iam: &StsConfig,
    node_token: &str,
    account: &GcpServiceAccount,
    audience: &str,
    include_email: bool,
    timeout: Duration,
) -> Result<Credential, FetchError> {
    let body = json!({ "audience": audience, "includeEmail": include_email });
    let doc = iam_call(
        iam,
        node_token,
        &account.email,
        "generateIdToken",
        body,
        timeout,
    )
    .await?;
    let token = doc["token"]
        .as_str()
        .ok_or_else(|| FetchError::Failed("generateIdToken answer lacks token".into()))?;
    let exp = jwt_claims(token)
        .and_then(|c| c["exp"].as_u64())
        .ok_or_else(|| FetchError::Failed("ID token has no readable exp claim".into()))?;
    Ok(Credential::new(json!({ "token": token }), exp))
}

/// The (unverified) claims of a JWT: only its expiry is read, to know
/// when to refresh; the pod's SDK and the audience verify it.
pub fn jwt_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&base64url_decode(payload)?).ok()
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.trim_end_matches('=').bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(email: &str) -> GcpServiceAccount {
        GcpServiceAccount {
            email: email.into(),
            scopes: default_scopes(),
            lifetime_seconds: 3600,
        }
    }

    fn body(ask: &GcpAsk) -> (u16, String, &'static str) {
        match ask {
            GcpAsk::Answer(a) => (
                a.status,
                String::from_utf8(a.body.clone()).unwrap(),
                a.decision,
            ),
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn only_the_bound_account_is_visible() {
        let web = sa("web@p.iam.gserviceaccount.com");
        let (s, listing, _) = body(&gcp_ask(Some(&web), "GET", "/", ""));
        assert_eq!(
            (s, listing.as_str()),
            (200, "default/\nweb@p.iam.gserviceaccount.com/\n")
        );
        let (_, rec, _) = body(&gcp_ask(Some(&web), "GET", "/", "recursive=true"));
        let rec: Value = serde_json::from_str(&rec).unwrap();
        assert_eq!(rec.as_object().unwrap().len(), 2);
        assert_eq!(rec["default"]["email"], web.email.as_str());
        for account in ["default", "web@p.iam.gserviceaccount.com"] {
            let (_, email, _) = body(&gcp_ask(
                Some(&web),
                "GET",
                &format!("/{account}/email"),
                "",
            ));
            assert_eq!(email, web.email);
            assert!(matches!(
                gcp_ask(Some(&web), "GET", &format!("/{account}/token"), ""),
                GcpAsk::Token { .. }
            ));
        }
        let (s, _, d) = body(&gcp_ask(
            Some(&web),
            "GET",
            "/other@p.iam.gserviceaccount.com/token",
            "",
        ));
        assert_eq!((s, d), (404, "wrong_identity"));
        let (s, _, d) = body(&gcp_ask(None, "GET", "/default/token", ""));
        assert_eq!((s, d), (404, "no_identity"));
        let (s, listing, _) = body(&gcp_ask(None, "GET", "/", ""));
        assert_eq!((s, listing.as_str()), (200, ""));
        let (_, j, _) = body(&gcp_ask(Some(&web), "GET", "/default/email", "alt=json"));
        assert_eq!(j, format!("\"{}\"", web.email));
        assert_eq!(
            body(&gcp_ask(Some(&web), "POST", "/default/token", "")).0,
            405
        );
        assert_eq!(
            body(&gcp_ask(Some(&web), "GET", "/default/email", "alt=xml")).0,
            400
        );
    }

    #[test]
    fn keys_separate_accounts_scopes_and_audiences() {
        let key = |email: &str, rest: &str, q: &str| match gcp_ask(Some(&sa(email)), "GET", rest, q)
        {
            GcpAsk::Token { key, .. } | GcpAsk::Identity { key, .. } => key,
            other => panic!("{other:?}"),
        };
        let a = "a@p.iam.gserviceaccount.com";
        let b = "b@p.iam.gserviceaccount.com";
        assert_ne!(key(a, "/default/token", ""), key(b, "/default/token", ""));
        assert_ne!(
            key(a, "/default/token", ""),
            key(
                a,
                "/default/token",
                "scopes=https://www.googleapis.com/auth/devstorage.read_only"
            )
        );
        assert_ne!(
            key(a, "/default/identity", "audience=x"),
            key(a, "/default/identity", "audience=y")
        );
        assert_ne!(
            key(a, "/default/identity", "audience=x"),
            key(a, "/default/identity", "audience=x&format=full")
        );
        assert_eq!(
            body(&gcp_ask(Some(&sa(a)), "GET", "/default/identity", "")).0,
            400,
            "audience is required"
        );
    }

    #[test]
    fn accounts_are_checked() {
        assert!(sa("web@p.iam.gserviceaccount.com").validate().is_ok());
        assert!(
            sa("123-compute@developer.gserviceaccount.com")
                .validate()
                .is_ok()
        );
        for bad in [
            "web",
            "web@example.com",
            "Web@p.iam.gserviceaccount.com",
            "@p.iam.gserviceaccount.com",
        ] {
            assert!(sa(bad).validate().is_err(), "{bad}");
        }
        let mut long = sa("web@p.iam.gserviceaccount.com");
        long.lifetime_seconds = 0;
        assert!(long.validate().is_err());
    }

    #[test]
    fn jwt_expiry_is_read() {
        // {"alg":"RS256"} . {"exp":1700000000,"aud":"x"} . sig
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjE3MDAwMDAwMDAsImF1ZCI6IngifQ.c2ln";
        assert_eq!(jwt_claims(token).unwrap()["exp"], 1_700_000_000u64);
        assert!(jwt_claims("a.!!.c").is_none());
    }
}
