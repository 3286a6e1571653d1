//! The AWS side of per-pod identities: the node's own credentials from the
//! instance metadata service (IMDSv2), and STS AssumeRole signed with them
//! (SigV4 by `aws-sigv4`, the SDKs' signer), over plain HTTP or HTTPS.
//!
//! The STS endpoint is configurable (a regional endpoint, or a local STS
//! such as moto's server in the tests). Secrets never go to logs: errors
//! carry STS's error code and message, never a request or a body.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::Uri;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;

use crate::identity::{Credential, FetchError, upstream_get, upstream_request};

/// Where and how STS is called.
#[derive(Clone)]
pub struct StsConfig {
    /// `https://sts.REGION.amazonaws.com` or a local `http://HOST:PORT`.
    pub endpoint: Uri,
    /// Signing region (`us-east-1` for the global endpoint).
    pub region: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for StsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish()
    }
}

impl StsConfig {
    /// Checks the endpoint (http or https, a host, no path) and loads the
    /// system's trust roots for https.
    pub fn new(endpoint: &str, region: &str) -> Result<Self, String> {
        let uri: Uri = endpoint
            .parse()
            .map_err(|_| format!("STS endpoint {endpoint:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "STS endpoint {endpoint:?}: need http:// or https://"
                ));
            }
        };
        if uri.host().is_none() || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!(
                "STS endpoint {endpoint:?}: need SCHEME://HOST[:PORT]"
            ));
        }
        if region.is_empty()
            || !region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("STS region {region:?} is not a region name"));
        }
        let tls = if https {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no trusted root certificates found for the https STS endpoint".into());
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(StsConfig {
            endpoint: uri,
            region: region.into(),
            tls,
        })
    }
}

/// Access key, secret and session token.
#[derive(Clone)]
pub struct AwsKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AwsKeys { .. }")
    }
}

impl AwsKeys {
    /// The keys of an IMDS credentials document (`AccessKeyId`, ...).
    pub fn from_imds(doc: &Value) -> Option<Self> {
        Some(AwsKeys {
            access_key_id: doc.get("AccessKeyId")?.as_str()?.to_owned(),
            secret_access_key: doc.get("SecretAccessKey")?.as_str()?.to_owned(),
            session_token: doc
                .get("Token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        })
    }
}

/// IMDSv2 session token TTL the proxy asks for its own reads.
const NODE_TOKEN_TTL: &str = "21600";

/// The node's credentials from the metadata service at `upstream`: an
/// IMDSv2 token, the node role's name, then its credentials.
pub async fn node_credentials(
    upstream: (&str, u16),
    authority: &str,
    timeout: Duration,
) -> Result<Credential, FetchError> {
    let failed = |what: &str, status: u16| {
        FetchError::Failed(format!("node credentials: {what} answered {status}"))
    };
    let (status, _, token) = upstream_request(
        upstream,
        authority,
        "PUT",
        "/latest/api/token",
        &[("x-aws-ec2-metadata-token-ttl-seconds", NODE_TOKEN_TTL)],
        Vec::new(),
        timeout,
    )
    .await
    .map_err(FetchError::Failed)?;
    if status != 200 {
        return Err(failed("token PUT", status));
    }
    let token = String::from_utf8(token)
        .map_err(|_| FetchError::Failed("node token is not text".into()))?;
    let headers = [("x-aws-ec2-metadata-token", token.trim())];
    let list = "/latest/meta-data/iam/security-credentials/";
    let (status, roles) = upstream_get(upstream, authority, list, &headers, timeout)
        .await
        .map_err(FetchError::Failed)?;
    if status != 200 {
        return Err(failed("role list", status));
    }
    let roles = String::from_utf8_lossy(&roles);
    let role = roles
        .lines()
        .next()
        .map(str::trim)
        .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_graphic() && b != b'/'))
        .ok_or_else(|| FetchError::Failed("the node has no instance role".into()))?;
    let (status, body) = upstream_get(
        upstream,
        authority,
        &format!("{list}{role}"),
        &headers,
        timeout,
    )
    .await
    .map_err(FetchError::Failed)?;
    if status != 200 {
        return Err(failed("node credentials", status));
    }
    let doc: Value = serde_json::from_slice(&body)
        .map_err(|_| FetchError::Failed("node credentials are not JSON".into()))?;
    AwsKeys::from_imds(&doc)
        .ok_or_else(|| FetchError::Failed("node credentials lack keys".into()))?;
    let expires_on = doc
        .get("Expiration")
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
        .ok_or_else(|| FetchError::Failed("node credentials lack an Expiration".into()))?;
    Ok(Credential::new(doc, expires_on))
}

/// A role session name for `pod` (`namespace/name`) within STS's rules:
/// 2..=64 characters of `[\w+=,.@-]`; `/` becomes `@`, anything else `-`.
pub fn session_name(pod: &str) -> String {
    let mut name: String = pod
        .chars()
        .map(|c| match c {
            '/' => '@',
            c if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) => c,
            _ => '-',
        })
        .take(64)
        .collect();
    while name.len() < 2 {
        name.push('-');
    }
    name
}

/// STS AssumeRole for `role_arn`, signed with `node`. The answer is an
/// IMDS-shaped credentials document (`Code`, `Type`, `AccessKeyId`, ...).
pub async fn assume_role(
    sts: &StsConfig,
    node: &AwsKeys,
    role_arn: &str,
    session: &str,
    duration_secs: u32,
    timeout: Duration,
) -> Result<Credential, FetchError> {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("Action", "AssumeRole")
        .append_pair("Version", "2011-06-15")
        .append_pair("RoleArn", role_arn)
        .append_pair("RoleSessionName", session)
        .append_pair("DurationSeconds", &duration_secs.to_string())
        .finish();
    let authority = sts
        .endpoint
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let url = format!(
        "{}://{authority}/",
        sts.endpoint.scheme_str().unwrap_or("https")
    );
    let content_type = "application/x-www-form-urlencoded; charset=utf-8";
    let mut request = http::Request::post(&url)
        .header("host", &authority)
        .header("content-type", content_type)
        .body(Full::new(bytes::Bytes::from(body.clone())))
        .map_err(|e| FetchError::Failed(format!("STS request: {e}")))?;
    let identity: Identity = Credentials::new(
        &node.access_key_id,
        &node.secret_access_key,
        node.session_token.clone(),
        None,
        "imds-proxy-node",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&sts.region)
        .name("sts")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| FetchError::Failed(format!("SigV4 parameters: {e}")))?
        .into();
    let signable = SignableRequest::new(
        "POST",
        &url,
        [("host", authority.as_str()), ("content-type", content_type)].into_iter(),
        SignableBody::Bytes(body.as_bytes()),
    )
    .map_err(|e| FetchError::Failed(format!("SigV4: {e}")))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| FetchError::Failed(format!("SigV4: {e}")))?
        .into_parts();
    instructions.apply_to_request_http1x(&mut request);

    let (status, xml) = tokio::time::timeout(timeout, send(sts, request))
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
        .map_err(|e| FetchError::Failed(format!("STS: {e}")))?;
    let xml = String::from_utf8_lossy(&xml);
    if status != 200 {
        let code = tag(&xml, "Code").unwrap_or("?");
        let message = tag(&xml, "Message").unwrap_or("");
        return Err(FetchError::Failed(format!(
            "STS AssumeRole {role_arn} answered {status}: {code}: {message}"
        )));
    }
    let field = |name: &str| {
        tag(&xml, name)
            .map(str::to_owned)
            .ok_or_else(|| FetchError::Failed(format!("STS answer lacks {name}")))
    };
    let expiration = field("Expiration")?;
    let expires_on = parse_rfc3339(&expiration)
        .ok_or_else(|| FetchError::Failed("STS Expiration is not a time".into()))?;
    let doc = serde_json::json!({
        "Code": "Success",
        "LastUpdated": crate::mock::rfc3339(crate::identity::unix_now()),
        "Type": "AWS-HMAC",
        "AccessKeyId": field("AccessKeyId")?,
        "SecretAccessKey": field("SecretAccessKey")?,
        "Token": field("SessionToken")?,
        "Expiration": crate::mock::rfc3339(expires_on),
    });
    Ok(Credential::new(doc, expires_on))
}

async fn send(
    sts: &StsConfig,
    request: http::Request<Full<bytes::Bytes>>,
) -> Result<(u16, Vec<u8>), String> {
    let host = sts
        .endpoint
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let port = sts
        .endpoint
        .port_u16()
        .unwrap_or(if sts.tls.is_some() { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    match &sts.tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("server name {host}: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(stream, request).await
        }
        None => exchange(tcp, request).await,
    }
}

async fn exchange<S>(
    stream: S,
    request: http::Request<Full<bytes::Bytes>>,
) -> Result<(u16, Vec<u8>), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

/// The text of the first `<name>...</name>` element. STS's answers are
/// small fixed-shape XML; the few fields needed do not justify an XML
/// parser. Values are unescaped for the five predefined entities.
fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    let value = &xml[start..end];
    (!value.contains('&')).then_some(value.trim())
}

/// Unix seconds of `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let time = time.split('.').next()?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // days_from_civil (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_fit_sts_rules() {
        assert_eq!(session_name("default/web-1"), "default@web-1");
        assert_eq!(session_name("a/b c"), "a@b-c");
        assert_eq!(session_name(&"x".repeat(100)).len(), 64);
        assert_eq!(session_name(""), "--");
    }

    #[test]
    fn times_round_trip() {
        for t in [0, 951_782_400, 1_767_225_599, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&crate::mock::rfc3339(t)), Some(t));
        }
        assert_eq!(
            parse_rfc3339("2026-12-05T14:09:14.123Z"),
            Some(1_796_479_754)
        );
        assert_eq!(parse_rfc3339("2026-13-05T14:09:14Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn xml_fields() {
        let xml = "<AssumeRoleResult><Credentials><AccessKeyId>ASIA1</AccessKeyId></Credentials></AssumeRoleResult>";
        assert_eq!(tag(xml, "AccessKeyId"), Some("ASIA1"));
        assert_eq!(tag(xml, "Nope"), None);
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(StsConfig::new("http://127.0.0.1:5000", "us-east-1").is_ok());
        for bad in ["ftp://x", "http://x/path", "x"] {
            assert!(StsConfig::new(bad, "us-east-1").is_err(), "{bad}");
        }
        assert!(StsConfig::new("http://x", "us east").is_err());
    }
}
