//! The certificate tree upstream's `make certs` writes, so the README's
//! commands run verbatim: `certs/master/{issued,private}` (client <-> server)
//! and `certs/agent/{issued,private}` (agent <-> server), each with its own
//! CA. Newer upstream READMEs name the frontend set `certs/frontend` and
//! `proxy-frontend`; the same files are written there too.
//!
//! Keys are ECDSA P-256 (upstream's easy-rsa makes RSA 2048; every client in
//! question accepts both). SANs as upstream: DNS:kubernetes, DNS:localhost,
//! IP:127.0.0.1 (the agent side's IP is `PROXY_SERVER_IP`, default 127.0.0.1),
//! plus IP:::1 so the servers, which listen on IPv6 and IPv4, can be reached
//! over IPv6 loopback too.

use std::path::Path;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

struct Issued {
    cert: Certificate,
    key: KeyPair,
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
}

fn ca(cn: &str) -> anyhow::Result<Issued> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Issued { cert, key })
}

fn leaf(cn: &str, sans: &[&str], server: bool, ca: &Issued) -> anyhow::Result<Issued> {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    Ok(Issued { cert, key })
}

fn write(dir: &Path, set: &str, name: &str, issued: &Issued) -> anyhow::Result<()> {
    let issued_dir = dir.join("certs").join(set).join("issued");
    let private_dir = dir.join("certs").join(set).join("private");
    std::fs::create_dir_all(&issued_dir)?;
    std::fs::create_dir_all(&private_dir)?;
    std::fs::write(issued_dir.join(format!("{name}.crt")), issued.cert.pem())?;
    let key_path = private_dir.join(format!("{name}.key"));
    std::fs::write(&key_path, issued.key.serialize_pem())?;
    // Owner-only key; on Windows the file inherits its directory's ACL.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes `DIR/certs/...` as `make certs` does. `proxy_server_ip` is the
/// agent-facing server address put into that certificate's SANs.
pub fn write_make_certs(dir: &Path, proxy_server_ip: &str) -> anyhow::Result<Vec<String>> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();

    let front_ca = ca(&format!("127.0.0.1@{stamp}"))?;
    let front_server = leaf(
        "proxy-master",
        &["kubernetes", "localhost", "127.0.0.1", "::1"],
        true,
        &front_ca,
    )?;
    let client = leaf("proxy-client", &[], false, &front_ca)?;
    for (set, server_name) in [("master", "proxy-master"), ("frontend", "proxy-frontend")] {
        write(dir, set, "ca", &front_ca)?;
        write(dir, set, server_name, &front_server)?;
        write(dir, set, "proxy-client", &client)?;
    }

    let agent_ca = ca(&format!("{proxy_server_ip}@{stamp}"))?;
    let mut sans = vec!["kubernetes", "localhost", proxy_server_ip];
    sans.dedup();
    for ip in ["127.0.0.1", "::1"] {
        if proxy_server_ip != ip {
            sans.push(ip);
        }
    }
    let agent_server = leaf("proxy-master", &sans, true, &agent_ca)?;
    let agent = leaf("proxy-agent", &[], false, &agent_ca)?;
    write(dir, "agent", "ca", &agent_ca)?;
    write(dir, "agent", "proxy-master", &agent_server)?;
    write(dir, "agent", "proxy-frontend", &agent_server)?;
    write(dir, "agent", "proxy-agent", &agent)?;

    let mut written = Vec::new();
    for set in ["master", "frontend", "agent"] {
        for kind in ["issued", "private"] {
            let d = dir.join("certs").join(set).join(kind);
            let mut names: Vec<_> = std::fs::read_dir(&d)?
                .filter_map(|e| e.ok())
                .map(|e| e.path().display().to_string())
                .collect();
            names.sort();
            written.extend(names);
        }
    }
    Ok(written)
}
