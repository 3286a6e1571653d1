//! TLS configuration from PEM files (rustls with the ring provider), with
//! upstream's `--tls-min-version` and `--cipher-suites` mapped onto rustls.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in PEM file")]
    Empty { path: String, what: &'static str },
    #[error("unsupported TLS option: {0}")]
    Option(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Settings shared by every TLS endpoint of one process.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Go name: VersionTLS10 .. VersionTLS13 (rustls offers 1.2 and 1.3 only).
    pub min_version: Option<String>,
    /// Go/IANA names such as TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256; empty = defaults.
    pub cipher_suites: Vec<String>,
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or(TlsError::Empty {
            path: path.display().to_string(),
            what: "private key",
        })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store.add(cert)?;
    }
    Ok(store)
}

/// Go's name of a suite (`tls.CipherSuiteName`): rustls's own for TLS 1.2,
/// `TLS_…` for the TLS 1.3 ones rustls calls `TLS13_…`.
fn go_name(s: &rustls::SupportedCipherSuite) -> String {
    let n = format!("{:?}", s.suite());
    match n.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => n,
    }
}

/// Suites Go's crypto/tls knows (CipherSuites and InsecureCipherSuites)
/// that rustls does not implement: CBC, RC4, 3DES and RSA key exchange.
const GO_ONLY_SUITES: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

fn provider(opts: &TlsOptions) -> Result<Arc<CryptoProvider>, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first, as Go orders its suites on AES hardware: ring's
    // default puts AES-256-GCM-SHA384 first, whose SHA-384 runs without
    // SHA extensions and whose AES does 14 rounds instead of 10 (a profile
    // of the tunnel bench showed sha512_block_data_order_nohw near the top).
    provider.cipher_suites.sort_by_key(|s| {
        (
            s.tls13().is_none(),
            !format!("{:?}", s.suite()).contains("AES_128_GCM"),
        )
    });
    if !opts.cipher_suites.is_empty() {
        let wanted: Vec<String> = opts
            .cipher_suites
            .iter()
            .map(|s| s.trim().to_string())
            .collect();
        for name in &wanted {
            if !provider.cipher_suites.iter().any(|s| go_name(s) == *name) {
                let supported: Vec<String> = provider.cipher_suites.iter().map(go_name).collect();
                let why = if GO_ONLY_SUITES.contains(&name.as_str()) {
                    "is a Go cipher suite this TLS library (rustls) does not implement"
                } else {
                    "is not a known cipher suite"
                };
                return Err(TlsError::Option(format!(
                    "cipher suite {name} {why}; supported: {}",
                    supported.join(",")
                )));
            }
        }
        // TLS 1.3 suites are not configurable in Go either: keep them.
        provider
            .cipher_suites
            .retain(|s| s.tls13().is_some() || wanted.contains(&go_name(s)));
    }
    Ok(Arc::new(provider))
}

fn versions(
    opts: &TlsOptions,
) -> Result<&'static [&'static rustls::SupportedProtocolVersion], TlsError> {
    static BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match opts.min_version.as_deref().unwrap_or("") {
        // TLS 1.0 and 1.1 are accepted as names; rustls never offers them,
        // so the effective minimum is 1.2 (Go's default as well).
        "" | "VersionTLS10" | "VersionTLS11" | "VersionTLS12" => Ok(BOTH),
        "VersionTLS13" => Ok(ONLY13),
        other => Err(TlsError::Option(format!("--tls-min-version {other}"))),
    }
}

/// A server config; with `client_ca` the peer must present a certificate
/// signed by it (mTLS), as upstream does when the CA flag is set.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    opts: &TlsOptions,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider(opts)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(opts)?)?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Resumption without server-side state (stateless tickets, as Go's
    // crypto/tls): rustls's default keeps tickets in a 256-entry cache that
    // every client of the process shares and evicts. Two per handshake, so a
    // client dialling many connections at once rarely runs out and falls
    // back to a full handshake (signature + chain check: the P-256 share of
    // a dial-heavy profile).
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.send_tls13_tickets = 2;
    Ok(Arc::new(config))
}

/// A client config trusting `ca`, presenting `identity` (cert, key) if given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    opts: &TlsOptions,
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider(opts)?)
        .with_protocol_versions(versions(opts)?)?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// The name to verify the server's certificate against: an IP SAN for
/// addresses, a DNS SAN otherwise.
pub fn server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::Option(format!("invalid server name {host:?}")))
}

/// For unit tests: an mTLS server config and a client config that it
/// accepts (HTTP/1.1 ALPN), from certificates in the returned directory.
#[cfg(test)]
pub(crate) fn test_mtls_configs() -> (tempfile::TempDir, Arc<ServerConfig>, Arc<ClientConfig>) {
    let dir = tempfile::tempdir().unwrap();
    crate::certs::write_make_certs(dir.path(), "127.0.0.1").unwrap();
    let m = dir.path().join("certs/master");
    let server = server_config(
        &m.join("issued/proxy-master.crt"),
        &m.join("private/proxy-master.key"),
        Some(&m.join("issued/ca.crt")),
        &TlsOptions::default(),
        &[b"http/1.1"],
    )
    .unwrap();
    let client = client_config(
        &m.join("issued/ca.crt"),
        Some((
            &m.join("issued/proxy-client.crt"),
            &m.join("private/proxy-client.key"),
        )),
        &TlsOptions::default(),
        &[b"http/1.1".to_vec()],
    )
    .unwrap();
    (dir, server, client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A second mTLS connection from the same client config resumes the
    /// first session: no certificate signature or chain check, which is
    /// most of a handshake's cost (dials/s over the mTLS frontend).
    #[tokio::test]
    async fn second_mtls_handshake_resumes() {
        let (_dir, server, client) = test_mtls_configs();
        let mut kinds = Vec::new();
        for _ in 0..3 {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            let srv = tokio::spawn(async move {
                let mut s = acceptor.accept(b).await.unwrap();
                let mut byte = [0u8; 1];
                s.read_exact(&mut byte).await.unwrap();
                s.write_all(&byte).await.unwrap();
                s.flush().await.unwrap();
                let kind = s.get_ref().1.handshake_kind();
                // Keep the stream open until the client has read the echo
                // (and with it the session tickets sent before it).
                let _ = s.read(&mut byte).await;
                kind
            });
            let connector = tokio_rustls::TlsConnector::from(client.clone());
            let mut c = connector
                .connect(server_name("127.0.0.1").unwrap(), a)
                .await
                .unwrap();
            c.write_all(b"x").await.unwrap();
            c.flush().await.unwrap();
            let mut byte = [0u8; 1];
            c.read_exact(&mut byte).await.unwrap();
            kinds.push(c.get_ref().1.handshake_kind());
            drop(c);
            assert_eq!(srv.await.unwrap(), *kinds.last().unwrap());
        }
        use rustls::HandshakeKind::{Full, Resumed};
        assert_eq!(
            kinds,
            vec![Some(Full), Some(Resumed), Some(Resumed)],
            "mTLS sessions must resume"
        );
    }
}
