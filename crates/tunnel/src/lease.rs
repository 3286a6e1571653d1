//! Lease-based server counting, as upstream: each server holds a
//! coordination.k8s.io/v1 Lease `konnectivity-proxy-server-<serverID>`
//! (renewed, garbage-collected when expired, deleted on stop); agents count
//! the unexpired Leases matching a label selector.
//!
//! The Kubernetes API is reached with a small HTTP/1.1 client (JSON only)
//! configured from a kubeconfig: server URL (http or https), CA, client
//! certificate or bearer token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A minimal Kubernetes API client.
#[derive(Clone)]
pub struct KubeClient {
    host: String,
    port: u16,
    base_path: String,
    tls: Option<Arc<ClientConfig>>,
    token: Option<String>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn b64(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => bail!("bad base64"),
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

fn pem_certs(pem: &[u8]) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        bail!("no certificate in PEM data");
    }
    Ok(certs)
}

impl KubeClient {
    /// From a kubeconfig file (its current context).
    pub fn from_kubeconfig(path: &Path) -> anyhow::Result<KubeClient> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read kubeconfig {}", path.display()))?;
        let cfg: serde_yaml::Value = serde_yaml::from_str(&text).context("parse kubeconfig")?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let rel = |p: &str| -> PathBuf {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { dir.join(p) }
        };
        let find = |list: &str, name: &str, key: &str| -> Option<serde_yaml::Value> {
            cfg.get(list)?
                .as_sequence()?
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some(name))?
                .get(key)
                .cloned()
        };
        let current = cfg
            .get("current-context")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("kubeconfig has no current-context"))?;
        let ctx = find("contexts", current, "context")
            .ok_or_else(|| anyhow!("context {current} not found"))?;
        let s =
            |v: &serde_yaml::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
        let cluster_name = s(&ctx, "cluster").ok_or_else(|| anyhow!("context has no cluster"))?;
        let cluster = find("clusters", &cluster_name, "cluster")
            .ok_or_else(|| anyhow!("cluster {cluster_name} not found"))?;
        let user = match s(&ctx, "user") {
            Some(u) => find("users", &u, "user").unwrap_or(serde_yaml::Value::Null),
            None => serde_yaml::Value::Null,
        };
        let server = s(&cluster, "server").ok_or_else(|| anyhow!("cluster has no server"))?;
        let (https, rest) = if let Some(r) = server.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = server.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("server {server:?}: want http:// or https://");
        };
        let (authority, base_path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
            None => (rest, String::new()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h.trim_matches(['[', ']']).to_string(), p.parse()?)
            }
            _ => (authority.to_string(), if https { 443 } else { 80 }),
        };
        let token = match (s(&user, "token"), s(&user, "tokenFile")) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(std::fs::read_to_string(rel(&f))?.trim().to_string()),
            _ => None,
        };
        let tls = if https {
            let ca = match (
                s(&cluster, "certificate-authority-data"),
                s(&cluster, "certificate-authority"),
            ) {
                (Some(d), _) => Some(b64(&d)?),
                (None, Some(f)) => Some(std::fs::read(rel(&f))?),
                _ => None,
            };
            let mut roots = rustls::RootCertStore::empty();
            match ca {
                Some(pem) => {
                    for c in pem_certs(&pem)? {
                        roots.add(c)?;
                    }
                }
                None => bail!("https server without certificate-authority(-data)"),
            }
            let builder = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
            let cert = match (
                s(&user, "client-certificate-data"),
                s(&user, "client-certificate"),
            ) {
                (Some(d), _) => Some(b64(&d)?),
                (None, Some(f)) => Some(std::fs::read(rel(&f))?),
                _ => None,
            };
            let key = match (s(&user, "client-key-data"), s(&user, "client-key")) {
                (Some(d), _) => Some(b64(&d)?),
                (None, Some(f)) => Some(std::fs::read(rel(&f))?),
                _ => None,
            };
            let config = match (cert, key) {
                (Some(c), Some(k)) => {
                    let key = rustls_pemfile::private_key(&mut &k[..])?
                        .ok_or_else(|| anyhow!("no private key in client-key"))?;
                    builder.with_client_auth_cert(pem_certs(&c)?, key)?
                }
                (None, None) => builder.with_no_client_auth(),
                _ => bail!("client-certificate and client-key go together"),
            };
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(KubeClient {
            host,
            port,
            base_path,
            tls,
            token,
        })
    }

    /// One request; returns the status and the JSON body (Null if empty).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| anyhow!("connect timeout"))??;
        let mut io: Box<dyn Io> = match &self.tls {
            Some(cfg) => {
                let name = ServerName::try_from(self.host.clone())?;
                Box::new(
                    tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(name, tcp)
                        .await?,
                )
            }
            None => Box::new(tcp),
        };
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: proxyctl-konnectivity\r\nConnection: close\r\n",
            self.base_path, self.host
        );
        if let Some(t) = &self.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if body.is_some() {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                payload.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&payload);
        let fut = async {
            io.write_all(req.as_bytes()).await?;
            let mut raw = Vec::new();
            io.read_to_end(&mut raw).await?;
            Ok::<_, std::io::Error>(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| anyhow!("request timeout"))??;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("bad HTTP response"))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut body = raw[split + 4..].to_vec();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line"))?;
        if head.lines().any(|l| {
            l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked")
        }) {
            body = dechunk(&body)?;
        }
        let v = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&body).context("JSON body")?
        };
        Ok((status, v))
    }
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("short chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Kubernetes MicroTime: `2006-01-02T15:04:05.000000Z`.
pub fn micro_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let dt = time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        d.subsec_micros()
    )
}

/// Parses RFC 3339 UTC (`...Z`, optional fraction) into a SystemTime.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, clock) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut c = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, se) = (c.next()??, c.next()??, c.next()??);
    let date =
        time::Date::from_calendar_date(y as i32, time::Month::try_from(mo as u8).ok()?, da as u8)
            .ok()?;
    let secs = date.to_julian_day() as i64 - 2_440_588;
    let unix = secs * 86400 + h * 3600 + mi * 60 + se;
    let mut nanos = 0u32;
    if !frac.is_empty() {
        let f: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = f.parse().ok()?;
    }
    if unix < 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(unix as u64, nanos))
}

/// Whether a Lease object is still valid at `now`.
pub fn lease_valid(lease: &Value, now: SystemTime) -> bool {
    let spec = &lease["spec"];
    let Some(dur) = spec["leaseDurationSeconds"].as_u64() else {
        return false;
    };
    let Some(renew) = spec["renewTime"].as_str().and_then(parse_time) else {
        return false;
    };
    renew + Duration::from_secs(dur) > now
}

fn leases_path(ns: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases")
}

fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Parses `k=v,k2=v2` into labels.
pub fn parse_labels(s: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("label {part:?}: want key=value"))?;
        if k.is_empty() {
            bail!("label {part:?}: empty key");
        }
        m.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(m)
}

/// The server side: holds, renews, garbage-collects and finally deletes.
pub struct LeaseController {
    pub client: KubeClient,
    pub server_id: String,
    pub namespace: String,
    pub labels: serde_json::Map<String, Value>,
    pub duration: Duration,
    pub renew: Duration,
    pub gc: Duration,
}

impl LeaseController {
    pub fn lease_name(&self) -> String {
        format!("konnectivity-proxy-server-{}", self.server_id)
    }
    fn selector(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Creates or renews our Lease once.
    pub async fn acquire_or_renew(&self) -> anyhow::Result<()> {
        let name = self.lease_name();
        let path = format!("{}/{}", leases_path(&self.namespace), name);
        let now = micro_time(SystemTime::now());
        let (st, cur) = self.client.request("GET", &path, None).await?;
        match st {
            404 => {
                let body = json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": self.namespace, "labels": self.labels},
                    "spec": {
                        "holderIdentity": self.server_id,
                        "leaseDurationSeconds": self.duration.as_secs().max(1),
                        "acquireTime": now,
                        "renewTime": now,
                    }
                });
                let (st, v) = self
                    .client
                    .request("POST", &leases_path(&self.namespace), Some(&body))
                    .await?;
                if st != 201 && st != 200 {
                    bail!("create lease: HTTP {st}: {v}");
                }
            }
            200 => {
                let mut l = cur;
                if !l["metadata"].is_object() || !l["spec"].is_object() {
                    bail!("lease without metadata/spec: {l}");
                }
                let holder_changed = l["spec"]["holderIdentity"].as_str() != Some(&self.server_id);
                l["spec"]["holderIdentity"] = json!(self.server_id);
                l["spec"]["leaseDurationSeconds"] = json!(self.duration.as_secs().max(1));
                l["spec"]["renewTime"] = json!(now);
                if holder_changed || l["spec"]["acquireTime"].is_null() {
                    l["spec"]["acquireTime"] = json!(now);
                }
                l["metadata"]["labels"] = Value::Object(self.labels.clone());
                let (st, v) = self.client.request("PUT", &path, Some(&l)).await?;
                if st != 200 {
                    bail!("renew lease: HTTP {st}: {v}");
                }
            }
            _ => bail!("get lease: HTTP {st}: {cur}"),
        }
        Ok(())
    }

    /// Deletes every expired Lease matching our labels (not our own).
    pub async fn gc(&self) -> anyhow::Result<usize> {
        let list = format!(
            "{}?labelSelector={}",
            leases_path(&self.namespace),
            enc(&self.selector())
        );
        let (st, v) = self.client.request("GET", &list, None).await?;
        if st != 200 {
            bail!("list leases: HTTP {st}: {v}");
        }
        let now = SystemTime::now();
        let mut n = 0;
        for l in v["items"].as_array().cloned().unwrap_or_default() {
            let Some(name) = l["metadata"]["name"].as_str() else {
                continue;
            };
            if name == self.lease_name() || lease_valid(&l, now) {
                continue;
            }
            let (st, _) = self
                .client
                .request(
                    "DELETE",
                    &format!("{}/{}", leases_path(&self.namespace), name),
                    None,
                )
                .await?;
            if st == 200 || st == 202 || st == 404 {
                n += 1;
            }
        }
        Ok(n)
    }

    pub async fn delete(&self) -> anyhow::Result<()> {
        let path = format!("{}/{}", leases_path(&self.namespace), self.lease_name());
        let (st, v) = self.client.request("DELETE", &path, None).await?;
        if st != 200 && st != 202 && st != 404 {
            bail!("delete lease: HTTP {st}: {v}");
        }
        Ok(())
    }

    /// Runs until `stop`; then deletes the Lease.
    pub async fn run(self, stop: impl std::future::Future<Output = ()> + Send) {
        tokio::pin!(stop);
        let mut renew = tokio::time::interval(self.renew);
        let mut gc = tokio::time::interval(self.gc);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = renew.tick() => {
                    if let Err(e) = self.acquire_or_renew().await {
                        tracing::warn!(error = %e, "lease renewal failed");
                    }
                }
                _ = gc.tick() => {
                    match self.gc().await {
                        Ok(n) if n > 0 => tracing::info!(deleted = n, "expired leases removed"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "lease GC failed"),
                    }
                }
            }
        }
        if let Err(e) = self.delete().await {
            tracing::warn!(error = %e, "lease delete on stop failed");
        }
    }
}

/// The agent side: counts unexpired Leases matching a selector.
pub async fn count_leases(
    client: &KubeClient,
    namespace: &str,
    selector: &str,
) -> anyhow::Result<usize> {
    let list = format!("{}?labelSelector={}", leases_path(namespace), enc(selector));
    let (st, v) = client.request("GET", &list, None).await?;
    if st != 200 {
        bail!("list leases: HTTP {st}: {v}");
    }
    let now = SystemTime::now();
    Ok(v["items"]
        .as_array()
        .map(|a| a.iter().filter(|l| lease_valid(l, now)).count())
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000);
        let s = micro_time(t);
        assert_eq!(s, "2023-11-14T22:13:20.123456Z");
        assert_eq!(parse_time(&s), Some(t));
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(parse_time("2023-11-14T22:13:20+01:00"), None);
    }

    #[test]
    fn base64_and_labels() {
        assert_eq!(b64("aGVsbG8=").unwrap(), b"hello");
        assert!(b64("a*b").is_err());
        let l = parse_labels("k8s-app=konnectivity-server,a=b").unwrap();
        assert_eq!(l["a"], "b");
        assert!(parse_labels("novalue").is_err());
    }
}
