//! Lease-based server counting, as upstream: each server holds a
//! coordination.k8s.io/v1 Lease `konnectivity-proxy-server-<serverID>`
//! (renewed, garbage-collected when expired, deleted on stop); agents count
//! the unexpired Leases matching a label selector.
//!
//! The Kubernetes API is reached with [`crate::kube::KubeClient`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use serde_json::{Value, json};

pub use crate::kube::KubeClient;

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
    /// The garbage collector's series (upstream's server lease metrics).
    pub metrics: Option<crate::metrics::ServerLeaseMetrics>,
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
        let start = std::time::Instant::now();
        let (st, v) = self.client.request("GET", &list, None).await?;
        if let Some(m) = &self.metrics {
            m.list(st, &api_reason(st, &v), start.elapsed());
        }
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
            let start = std::time::Instant::now();
            let (st, v) = self
                .client
                .request(
                    "DELETE",
                    &format!("{}/{}", leases_path(&self.namespace), name),
                    None,
                )
                .await?;
            if let Some(m) = &self.metrics {
                m.delete(st, &api_reason(st, &v), start.elapsed());
                if st == 200 || st == 202 {
                    m.culled_leases_count.inc();
                }
            }
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

/// Upstream's `reason` label of a lease call: "" on success, else the
/// Kubernetes Status object's reason.
fn api_reason(code: u16, body: &Value) -> String {
    if (200..300).contains(&code) {
        String::new()
    } else {
        body["reason"].as_str().unwrap_or("").to_string()
    }
}

/// The agent side: counts unexpired Leases matching a selector; each list
/// call is recorded in `metrics` when given (as upstream's informer's).
pub async fn count_leases(
    client: &KubeClient,
    namespace: &str,
    selector: &str,
    metrics: Option<&crate::metrics::AgentLeaseMetrics>,
) -> anyhow::Result<usize> {
    let list = format!("{}?labelSelector={}", leases_path(namespace), enc(selector));
    let start = std::time::Instant::now();
    let (st, v) = client.request("GET", &list, None).await?;
    if let Some(m) = metrics {
        m.list(st, &api_reason(st, &v), start.elapsed());
    }
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
    fn labels() {
        let l = parse_labels("k8s-app=konnectivity-server,a=b").unwrap();
        assert_eq!(l["a"], "b");
        assert!(parse_labels("novalue").is_err());
    }
}
