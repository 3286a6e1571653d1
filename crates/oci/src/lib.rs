//! OCI image archives written without a container engine: one layer built
//! from local files, an image config, a manifest and an `index.json`, in
//! the OCI image layout, packed into one tar that `ctr images import`,
//! `skopeo copy oci-archive:` and `crane push` accept.
//!
//! Written here rather than taken from a crate: the crates that write OCI
//! layouts (`ocidir`, `oci-spec` + glue) pull in zstd/flate2/openssl-style
//! stacks for features we do not use, while an image of a few files needs
//! only tar and sha256. What this module owns is reproducibility: entries
//! are sorted, owners are numeric, every timestamp is the one given
//! (`SOURCE_DATE_EPOCH` in the CLI), and JSON is written with sorted keys,
//! so the same inputs give the same digest, byte for byte. Layers are
//! uncompressed tars (a valid OCI layer media type; no compression crate is
//! needed and registries store them as they are).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("path in image must be absolute and normal: {0:?}")]
    BadPath(String),
    #[error("{path} is listed twice with different contents")]
    Conflict { path: String },
    #[error("finding the libraries of {path}: {reason}")]
    Ldd { path: PathBuf, reason: String },
    #[error("image name must be fully qualified (registry/repo:tag): {0:?}")]
    BadName(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

/// The files of one layer. Paths are image paths without the leading `/`;
/// parent directories are added implicitly (mode 0755).
#[derive(Debug, Default, Clone)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
}

fn normal(path: &str) -> Result<String, OciError> {
    let p = path.strip_prefix('/').unwrap_or(path);
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(OciError::BadPath(path.to_owned()));
    }
    Ok(p.to_owned())
}

impl Layer {
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<(), OciError> {
        let p = normal(path)?;
        let mut parent = String::new();
        for comp in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            self.entries
                .entry(parent.clone())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
        match self.entries.get(&p) {
            Some(old)
                if *old != entry
                    && !matches!((old, &entry), (Entry::Dir { .. }, Entry::Dir { .. })) =>
            {
                Err(OciError::Conflict { path: p })
            }
            _ => {
                self.entries.insert(p, entry);
                Ok(())
            }
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, OciError> {
        self.insert(path, Entry::Dir { mode })?;
        Ok(self)
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<&mut Self, OciError> {
        self.insert(path, Entry::File { mode, data })?;
        Ok(self)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, OciError> {
        self.insert(
            path,
            Entry::Symlink {
                target: target.to_owned(),
            },
        )?;
        Ok(self)
    }

    /// Copies a host file into the image at `dest`, keeping its permission bits.
    pub fn copy(&mut self, src: &Path, dest: &str) -> Result<&mut Self, OciError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |source| OciError::Read {
            path: src.to_owned(),
            source,
        };
        let data = std::fs::read(src).map_err(read)?;
        let mode = std::fs::metadata(src).map_err(read)?.permissions().mode() & 0o7777;
        self.file(dest, mode, data)
    }

    /// Copies a dynamically linked executable's shared libraries (and its
    /// loader) into the image at their host paths, as `ldd` resolves them.
    /// A static executable adds nothing.
    pub fn copy_libraries_of(&mut self, exe: &Path) -> Result<&mut Self, OciError> {
        for lib in shared_libraries(exe)? {
            let real = std::fs::canonicalize(&lib).map_err(|source| OciError::Read {
                path: lib.clone(),
                source,
            })?;
            let dest = lib.to_string_lossy().into_owned();
            self.copy(&real, &dest)?;
        }
        Ok(self)
    }

    /// A minimal /etc: root and a `nonroot` user (65532, distroless's
    /// number) for images whose job needs no privileges, and /tmp.
    pub fn base_files(&mut self) -> Result<&mut Self, OciError> {
        self.file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n".to_vec(),
        )?
        .file("etc/group", 0o644, b"root:x:0:\nnonroot:x:65532:\n".to_vec())?
        .dir("tmp", 0o1777)?
        .dir("home/nonroot", 0o700)
    }

    /// The layer as an uncompressed tar, every entry owned by 0:0 (except
    /// /home/nonroot) with mtime `mtime`.
    pub fn to_tar(&self, mtime: u64) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut h = tar::Header::new_ustar();
            h.set_mtime(mtime);
            let owner = if path == "home/nonroot" { 65532 } else { 0 };
            h.set_uid(owner);
            h.set_gid(owner);
            let res = match entry {
                Entry::Dir { mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())
                }
                Entry::File { mode, data } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice())
                }
                Entry::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)
                }
            };
            res.expect("writing a tar into memory cannot fail");
        }
        b.into_inner().expect("tar into memory")
    }
}

/// The shared libraries `ldd` resolves for `exe` (loader included), or none
/// for a static executable.
pub fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>, OciError> {
    let err = |reason: String| OciError::Ldd {
        path: exe.to_owned(),
        reason,
    };
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| err(format!("running ldd: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let mut libs = Vec::new();
    for line in stdout.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(err(format!("unresolved: {line}")));
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// What the image runs and how it is described.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// `uid[:gid]`; empty means root.
    pub user: String,
    pub working_dir: String,
    /// OCI annotations/labels (`org.opencontainers.image.*`).
    pub labels: BTreeMap<String, String>,
    /// Unix seconds, for the config's `created` and every tar mtime.
    pub created: u64,
}

/// The digests of a written image.
#[derive(Debug, Clone)]
pub struct Written {
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digest: String,
    pub size: u64,
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// RFC 3339 UTC for unix seconds (days-from-civil, so no date crate is needed).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Writes `layer` and `config` as an OCI image layout tar at `out`, tagged
/// `name` (fully qualified, e.g. `ghcr.io/org/proxyctl:0.1.0`).
pub fn write_archive(
    out: &Path,
    name: &str,
    layer: &Layer,
    config: &ImageConfig,
) -> Result<Written, OciError> {
    let tag = name
        .rsplit_once(':')
        .filter(|(repo, tag)| repo.contains('/') && !tag.contains('/') && !tag.is_empty())
        .map(|(_, t)| t)
        .ok_or_else(|| OciError::BadName(name.to_owned()))?;
    let layer_tar = layer.to_tar(config.created);
    let layer_digest = sha256(&layer_tar);
    let mut cfg = serde_json::Map::new();
    let list = |v: &[String]| serde_json::json!(v);
    if !config.entrypoint.is_empty() {
        cfg.insert("Entrypoint".into(), list(&config.entrypoint));
    }
    if !config.cmd.is_empty() {
        cfg.insert("Cmd".into(), list(&config.cmd));
    }
    if !config.env.is_empty() {
        cfg.insert("Env".into(), list(&config.env));
    }
    if !config.user.is_empty() {
        cfg.insert("User".into(), config.user.clone().into());
    }
    if !config.working_dir.is_empty() {
        cfg.insert("WorkingDir".into(), config.working_dir.clone().into());
    }
    if !config.labels.is_empty() {
        cfg.insert("Labels".into(), serde_json::json!(config.labels));
    }
    let image_config = serde_json::to_vec(&serde_json::json!({
        "created": rfc3339(config.created),
        "architecture": go_arch(),
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": rfc3339(config.created), "created_by": "proxyctl-oci"}],
    }))
    .expect("JSON");
    let config_digest = sha256(&image_config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": image_config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_tar.len()}],
        "annotations": config.labels,
    }))
    .expect("JSON");
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": go_arch(), "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .expect("JSON");

    let werr = |source| OciError::Write {
        path: out.to_owned(),
        source,
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(werr)?;
    }
    // Written beside the target and renamed: a reader never sees half an archive.
    let tmp = out.with_extension("tar.partial");
    let file = std::fs::File::create(&tmp).map_err(werr)?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let parts: [(String, &[u8]); 5] = [
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".into(), &index),
        (blob(&manifest_digest), &manifest),
        (blob(&config_digest), &image_config),
        (blob(&layer_digest), &layer_tar),
    ];
    (|| -> std::io::Result<()> {
        for (path, data) in parts {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_mtime(config.created);
            b.append_data(&mut h, path, data)?;
        }
        b.into_inner()?.flush()
    })()
    .map_err(werr)?;
    std::fs::rename(&tmp, out).map_err(werr)?;
    let size = std::fs::metadata(out).map_err(werr)?.len();
    Ok(Written {
        manifest_digest,
        config_digest,
        layer_digest,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_936_000), "2025-12-05T12:00:00Z");
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut l = Layer::new();
        assert!(l.file("../etc/x", 0o644, vec![]).is_err());
        assert!(l.file("/", 0o644, vec![]).is_err());
        assert!(l.file("a//b", 0o644, vec![]).is_err());
        l.file("/bin/x", 0o755, b"1".to_vec()).unwrap();
        l.file("/bin/x", 0o755, b"1".to_vec()).unwrap();
        assert!(matches!(
            l.file("/bin/x", 0o755, b"2".to_vec()),
            Err(OciError::Conflict { .. })
        ));
    }

    #[test]
    fn same_inputs_same_digest_and_parents_exist() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Layer::new();
        l.base_files().unwrap();
        l.file("/usr/local/bin/tool", 0o755, b"#!/bin/sh\n".to_vec())
            .unwrap();
        let cfg = ImageConfig {
            entrypoint: vec!["/usr/local/bin/tool".into()],
            user: "65532:65532".into(),
            created: 1_700_000_000,
            ..Default::default()
        };
        let a = write_archive(&dir.path().join("a.tar"), "localhost/x/tool:1", &l, &cfg).unwrap();
        let b = write_archive(&dir.path().join("b.tar"), "localhost/x/tool:1", &l, &cfg).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(
            std::fs::read(dir.path().join("a.tar")).unwrap(),
            std::fs::read(dir.path().join("b.tar")).unwrap()
        );
        let names: Vec<String> = tar::Archive::new(l.to_tar(0).as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        for want in [
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/tool",
            "tmp/",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(write_archive(&dir.path().join("c.tar"), "tool", &l, &cfg).is_err());
    }

    #[test]
    fn libraries_of_a_dynamic_executable_are_found() {
        let libs = shared_libraries(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(shared_libraries(Path::new("/nonexistent/x")).is_err());
    }
}
