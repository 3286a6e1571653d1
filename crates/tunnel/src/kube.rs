//! The Kubernetes API client of proxy-server (TokenReview, Leases) and
//! proxy-agent (Lease counting): its configuration as client-go builds it,
//! from a kubeconfig (current context: server URL, CA, client certificate,
//! token, tokenFile, or an exec credential plugin of
//! `client.authentication.k8s.io/v1` or `v1beta1`) or, without one, from the
//! pod's service account (`KUBERNETES_SERVICE_HOST`/`_PORT`, the token and
//! CA files); client-side rate limiting (QPS and burst); and one JSON
//! request over HTTP/1.1.
//!
//! Hand-written because the binaries need four calls and kube-rs would
//! bring its own HTTP and TLS stacks and a second tokio-rustls version; the
//! rules follow client-go, named at each place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a pod's service account is mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Overrides [`SERVICE_ACCOUNT_DIR`] (tests; nodes that mount it elsewhere).
pub const SERVICE_ACCOUNT_DIR_ENV: &str = "PROXYCTL_SERVICE_ACCOUNT_DIR";

/// client-go's defaults for a zero QPS or burst.
pub const DEFAULT_QPS: f32 = 5.0;
pub const DEFAULT_BURST: u32 = 10;

/// A minimal Kubernetes API client.
#[derive(Clone)]
pub struct KubeClient {
    host: String,
    port: u16,
    base_path: String,
    /// Trust roots and a static client certificate; None for http://.
    tls: Option<TlsBase>,
    auth: Arc<Auth>,
    limiter: Arc<Limiter>,
}

#[derive(Clone)]
struct TlsBase {
    roots: Arc<rustls::RootCertStore>,
    /// The TLS config with the kubeconfig's own client certificate (or none).
    config: Arc<ClientConfig>,
    /// CA PEM, for an exec plugin's cluster info.
    ca_pem: Vec<u8>,
}

enum Auth {
    None,
    Token(String),
    /// Re-read on every request, so a rotated (projected) token is used at
    /// once; client-go re-reads at most once a minute. The last good token
    /// stays in use while the file cannot be read.
    TokenFile {
        path: PathBuf,
        last: Mutex<Option<String>>,
    },
    Exec(ExecPlugin),
}

/// `users[].user.exec` of a kubeconfig.
struct ExecPlugin {
    command: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    api_version: String,
    provide_cluster_info: bool,
    /// The cached credential, until it expires or the API answers 401.
    cached: Mutex<Option<ExecCredential>>,
    /// The server URL as the kubeconfig gives it (cluster info).
    server: String,
}

#[derive(Clone)]
struct ExecCredential {
    token: Option<String>,
    /// TLS config with the plugin's client certificate.
    tls: Option<Arc<ClientConfig>>,
    expires: Option<SystemTime>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) fn b64(s: &str) -> anyhow::Result<Vec<u8>> {
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

fn b64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                out.push(T[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pem_certs(pem: &[u8]) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        bail!("no certificate in PEM data");
    }
    Ok(certs)
}

fn tls_config(
    roots: &Arc<rustls::RootCertStore>,
    identity: Option<(&[u8], &[u8])>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone());
    let config = match identity {
        Some((cert, key)) => {
            let key = rustls_pemfile::private_key(&mut &key[..])?
                .ok_or_else(|| anyhow!("no private key in the client key"))?;
            builder.with_client_auth_cert(pem_certs(cert)?, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Splits `http(s)://host[:port][/path]`.
fn parse_server(server: &str) -> anyhow::Result<(bool, String, u16, String)> {
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
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (
            h.trim_matches(['[', ']']).to_string(),
            p.parse().with_context(|| format!("port in {server:?}"))?,
        ),
        _ => (
            authority.trim_matches(['[', ']']).to_string(),
            if https { 443 } else { 80 },
        ),
    };
    if host.is_empty() {
        bail!("server {server:?} has no host");
    }
    Ok((https, host, port, base_path))
}

/// Token bucket of client-go's flowcontrol limiter: `burst` requests at
/// once, then `qps` a second.
struct Limiter {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    fn new(qps: f32, burst: u32) -> Limiter {
        let qps = if qps > 0.0 { qps } else { DEFAULT_QPS };
        let burst = if burst > 0 { burst } else { DEFAULT_BURST };
        Limiter {
            qps: f64::from(qps),
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }
    /// Takes a token now and says how long to wait before using it.
    fn reserve(&self) -> Duration {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(st.1).as_secs_f64();
        st.0 = (st.0 + elapsed * self.qps).min(self.burst) - 1.0;
        st.1 = now;
        if st.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-st.0 / self.qps)
        }
    }
}

impl KubeClient {
    /// client-go's `BuildConfigFromFlags("", kubeconfig)`: the kubeconfig
    /// when given, else the pod's service account.
    pub fn from_flags(kubeconfig: &str) -> anyhow::Result<KubeClient> {
        if kubeconfig.is_empty() {
            Self::in_cluster().context("no --kubeconfig and no in-cluster configuration")
        } else {
            Self::from_kubeconfig(kubeconfig.as_ref())
        }
    }

    /// Sets client-side rate limiting; 0 keeps client-go's default (5 QPS,
    /// burst 10).
    pub fn with_rate_limit(mut self, qps: f32, burst: u32) -> KubeClient {
        self.limiter = Arc::new(Limiter::new(qps, burst));
        self
    }

    /// client-go's `rest.InClusterConfig`: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`,
    /// the service account's token (re-read as it rotates) and CA.
    pub fn in_cluster() -> anyhow::Result<KubeClient> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").unwrap_or_default();
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_default();
        if host.is_empty() || port.is_empty() {
            bail!(
                "unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be defined"
            );
        }
        let dir = std::env::var(SERVICE_ACCOUNT_DIR_ENV)
            .ok()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| SERVICE_ACCOUNT_DIR.into());
        let dir = Path::new(&dir);
        let token_path = dir.join("token");
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("read {}", token_path.display()))?;
        let ca_path = dir.join("ca.crt");
        let ca = std::fs::read(&ca_path).with_context(|| format!("read {}", ca_path.display()))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("KUBERNETES_SERVICE_PORT {port:?}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(&ca).with_context(|| format!("CA {}", ca_path.display()))? {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        Ok(KubeClient {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            base_path: String::new(),
            tls: Some(TlsBase {
                config: tls_config(&roots, None)?,
                roots,
                ca_pem: ca,
            }),
            auth: Arc::new(Auth::TokenFile {
                path: token_path,
                last: Mutex::new(Some(token.trim().to_string())),
            }),
            limiter: Arc::new(Limiter::new(0.0, 0)),
        })
    }

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
        let (https, host, port, base_path) = parse_server(&server)?;
        if user.get("auth-provider").is_some() {
            bail!(
                "user.auth-provider plugins are not supported (client-go removed them too): use an exec plugin"
            );
        }
        let auth = if let Some(exec) = user.get("exec").filter(|e| !e.is_null()) {
            if s(&user, "token").is_some() || s(&user, "tokenFile").is_some() {
                // client-go: a static token wins over the plugin's.
                None
            } else {
                Some(Auth::Exec(ExecPlugin::from_kubeconfig(
                    exec, &dir, &server,
                )?))
            }
        } else {
            None
        };
        let auth = match auth {
            Some(a) => a,
            None => match (s(&user, "token"), s(&user, "tokenFile")) {
                (Some(t), _) => Auth::Token(t),
                (None, Some(f)) => {
                    let path = rel(&f);
                    let t = std::fs::read_to_string(&path)
                        .with_context(|| format!("read tokenFile {}", path.display()))?;
                    Auth::TokenFile {
                        path,
                        last: Mutex::new(Some(t.trim().to_string())),
                    }
                }
                _ => Auth::None,
            },
        };
        let tls = if https {
            let ca = match (
                s(&cluster, "certificate-authority-data"),
                s(&cluster, "certificate-authority"),
            ) {
                (Some(d), _) => b64(&d)?,
                (None, Some(f)) => std::fs::read(rel(&f))?,
                _ => bail!("https server without certificate-authority(-data)"),
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certs(&ca)? {
                roots.add(c)?;
            }
            let roots = Arc::new(roots);
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
            let config = match (&cert, &key) {
                (Some(c), Some(k)) => tls_config(&roots, Some((c, k)))?,
                (None, None) => tls_config(&roots, None)?,
                _ => bail!("client-certificate and client-key go together"),
            };
            Some(TlsBase {
                roots,
                config,
                ca_pem: ca,
            })
        } else {
            None
        };
        Ok(KubeClient {
            host,
            port,
            base_path,
            tls,
            auth: Arc::new(auth),
            limiter: Arc::new(Limiter::new(0.0, 0)),
        })
    }

    /// The bearer token and TLS config for the next request.
    async fn credentials(&self) -> anyhow::Result<(Option<String>, Option<Arc<ClientConfig>>)> {
        let base = self.tls.as_ref().map(|t| t.config.clone());
        match &*self.auth {
            Auth::None => Ok((None, base)),
            Auth::Token(t) => Ok((Some(t.clone()), base)),
            Auth::TokenFile { path, last } => {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                match std::fs::read_to_string(path) {
                    Ok(t) if !t.trim().is_empty() => *last = Some(t.trim().to_string()),
                    Ok(_) => {
                        tracing::warn!(path = %path.display(), "token file is empty; keeping the last token")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "token file unreadable; keeping the last token")
                    }
                }
                Ok((last.clone(), base))
            }
            Auth::Exec(plugin) => {
                let cred = plugin.credential(self.tls.as_ref()).await?;
                Ok((cred.token, cred.tls.or(base)))
            }
        }
    }

    /// One request; returns the status and the JSON body (Null if empty).
    /// Waits for the rate limiter first. With an exec plugin, a 401 runs
    /// the plugin again and retries once, as client-go does.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let wait = self.limiter.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let (code, v) = self.request_once(method, path, body).await?;
        if code == 401
            && let Auth::Exec(plugin) = &*self.auth
        {
            plugin.forget();
            return self.request_once(method, path, body).await;
        }
        Ok((code, v))
    }

    async fn request_once(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let (token, tls) = self.credentials().await?;
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| anyhow!("connect timeout"))??;
        let mut io: Box<dyn Io> = match tls {
            Some(cfg) => {
                let name = ServerName::try_from(self.host.clone())?;
                Box::new(
                    tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await?,
                )
            }
            None => Box::new(tcp),
        };
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut req = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nUser-Agent: proxyctl-konnectivity\r\nConnection: close\r\n",
            self.base_path
        );
        if let Some(t) = &token {
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

const EXEC_V1: &str = "client.authentication.k8s.io/v1";
const EXEC_V1BETA1: &str = "client.authentication.k8s.io/v1beta1";

impl ExecPlugin {
    fn from_kubeconfig(
        exec: &serde_yaml::Value,
        dir: &Path,
        server: &str,
    ) -> anyhow::Result<ExecPlugin> {
        let s = |k: &str| exec.get(k).and_then(|x| x.as_str()).map(String::from);
        let api_version = s("apiVersion").unwrap_or_default();
        if api_version != EXEC_V1 && api_version != EXEC_V1BETA1 {
            bail!("exec plugin apiVersion {api_version:?}: want {EXEC_V1} or {EXEC_V1BETA1}");
        }
        let mut command = s("command")
            .filter(|c| !c.is_empty())
            .ok_or_else(|| anyhow!("exec plugin has no command"))?;
        // clientcmd resolves a relative command with a path separator
        // against the kubeconfig's directory; a bare name goes to $PATH.
        if command.contains('/') && !Path::new(&command).is_absolute() {
            command = dir.join(&command).display().to_string();
        }
        let args = match exec.get("args") {
            Some(serde_yaml::Value::Sequence(v)) => v
                .iter()
                .map(|a| {
                    a.as_str()
                        .map(String::from)
                        .ok_or_else(|| anyhow!("exec args: strings only"))
                })
                .collect::<anyhow::Result<_>>()?,
            None | Some(serde_yaml::Value::Null) => Vec::new(),
            _ => bail!("exec args: want a list"),
        };
        let env = match exec.get("env") {
            Some(serde_yaml::Value::Sequence(v)) => v
                .iter()
                .map(|e| {
                    let n = e.get("name").and_then(|x| x.as_str());
                    let v = e.get("value").and_then(|x| x.as_str());
                    match (n, v) {
                        (Some(n), Some(v)) => Ok((n.to_string(), v.to_string())),
                        _ => Err(anyhow!("exec env: each entry needs name and value")),
                    }
                })
                .collect::<anyhow::Result<_>>()?,
            None | Some(serde_yaml::Value::Null) => Vec::new(),
            _ => bail!("exec env: want a list"),
        };
        // client-go: v1 must say how it may interact; we never have a
        // terminal (the binaries run as daemons), so "Always" cannot work.
        match s("interactiveMode").as_deref() {
            None if api_version == EXEC_V1 => {
                bail!("exec plugin: interactiveMode must be specified for {EXEC_V1}")
            }
            None | Some("Never") | Some("IfAvailable") => {}
            Some("Always") => bail!(
                "exec plugin: interactiveMode Always needs a terminal, which proxy-server and proxy-agent never have"
            ),
            Some(other) => bail!("exec plugin: invalid interactiveMode {other:?}"),
        }
        Ok(ExecPlugin {
            command,
            args,
            env,
            api_version,
            provide_cluster_info: exec
                .get("provideClusterInfo")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            cached: Mutex::new(None),
            server: server.to_string(),
        })
    }

    fn forget(&self) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The cached credential while unexpired, else a fresh one.
    async fn credential(&self, tls: Option<&TlsBase>) -> anyhow::Result<ExecCredential> {
        if let Some(c) = self
            .cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|c| c.expires.is_none_or(|t| SystemTime::now() < t))
        {
            return Ok(c);
        }
        let cred = self.run(tls).await?;
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(cred.clone());
        Ok(cred)
    }

    /// Runs the plugin (no stdin: never interactive) and checks its
    /// ExecCredential as client-go does.
    async fn run(&self, tls: Option<&TlsBase>) -> anyhow::Result<ExecCredential> {
        let mut spec = json!({"interactive": false});
        if self.provide_cluster_info {
            let mut cluster = json!({"server": self.server});
            if let Some(t) = tls {
                cluster["certificate-authority-data"] = json!(b64_encode(&t.ca_pem));
            }
            spec["cluster"] = cluster;
        }
        let info = json!({"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec});
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(&self.command)
                .args(&self.args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .env("KUBERNETES_EXEC_INFO", info.to_string())
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| anyhow!("exec plugin {} did not finish in 60 s", self.command))?
        .with_context(|| format!("exec plugin {}", self.command))?;
        if !out.status.success() {
            bail!("exec plugin {} failed: {}", self.command, out.status);
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("exec plugin {}: output is not JSON", self.command))?;
        if v["kind"] != "ExecCredential" {
            bail!(
                "exec plugin {}: kind {} is not ExecCredential",
                self.command,
                v["kind"]
            );
        }
        if v["apiVersion"] != self.api_version.as_str() {
            bail!(
                "exec plugin {}: apiVersion {} is not the configured {}",
                self.command,
                v["apiVersion"],
                self.api_version
            );
        }
        let status = &v["status"];
        if !status.is_object() {
            bail!("exec plugin {}: no status", self.command);
        }
        let token = status["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(String::from);
        let cert = status["clientCertificateData"]
            .as_str()
            .filter(|s| !s.is_empty());
        let key = status["clientKeyData"].as_str().filter(|s| !s.is_empty());
        let tls = match (cert, key) {
            (Some(c), Some(k)) => {
                let base = tls.ok_or_else(|| {
                    anyhow!("exec plugin returned a client certificate for an http:// server")
                })?;
                Some(tls_config(&base.roots, Some((c.as_bytes(), k.as_bytes())))?)
            }
            (None, None) => None,
            _ => bail!(
                "exec plugin {}: clientCertificateData and clientKeyData go together",
                self.command
            ),
        };
        if token.is_none() && tls.is_none() {
            bail!(
                "exec plugin {}: status has neither token nor client certificate",
                self.command
            );
        }
        let expires = match status["expirationTimestamp"].as_str() {
            Some(t) => Some(
                crate::lease::parse_time(t)
                    .ok_or_else(|| anyhow!("exec plugin: bad expirationTimestamp {t:?}"))?,
            ),
            None => None,
        };
        Ok(ExecCredential {
            token,
            tls,
            expires,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_both_ways() {
        assert_eq!(b64("aGVsbG8=").unwrap(), b"hello");
        assert!(b64("a*b").is_err());
        for s in ["", "a", "ab", "abc", "abcd", "hello world"] {
            assert_eq!(b64(&b64_encode(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64_encode(b"hello"), "aGVsbG8=");
    }

    #[test]
    fn server_urls() {
        assert_eq!(
            parse_server("https://[::1]:6443/k").unwrap(),
            (true, "::1".into(), 6443, "/k".into())
        );
        assert_eq!(
            parse_server("http://api").unwrap(),
            (false, "api".into(), 80, String::new())
        );
        assert!(parse_server("ftp://x").is_err());
        assert!(parse_server("https://:1").is_err());
    }

    #[test]
    fn limiter_allows_the_burst_then_the_rate() {
        let l = Limiter::new(10.0, 3);
        for _ in 0..3 {
            assert_eq!(l.reserve(), Duration::ZERO);
        }
        let w = l.reserve();
        assert!(
            w > Duration::from_millis(50) && w <= Duration::from_millis(100),
            "{w:?}"
        );
    }
}
