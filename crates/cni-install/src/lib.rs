//! The node side of deploying `proxyctl-cni`: copy the plugin binary into
//! the node's CNI bin dir and chain the plugin into the node's active CNI
//! config (the file the runtime loads: the lexicographically first
//! `*.conf`/`*.conflist`/`*.json` in the conf dir, as libcni orders them);
//! keep it chained while the network plugin rewrites that file; un-chain on
//! stop. The behaviour istio-cni's install-cni has, written for our plugin.
//!
//! Every write is a temp file in the same directory then a rename, so the
//! runtime never reads half a config; temp names start with `.` and end in
//! `.tmp`, which libcni never loads. A single-plugin `.conf` is turned into a
//! `.conflist` (libcni reads a `.conf` as exactly one plugin). The binary is
//! left on the node at stop: pods set up through it still need it for their
//! CNI DEL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// Errors of the installer; none leaves a half-written file behind.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a CNI config: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("plugin config: {0}")]
    BadPlugin(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where things are on the node (as mounted into the installer's container).
#[derive(Debug, Clone)]
pub struct Installer {
    /// The node's CNI bin dir (`/opt/cni/bin` on most nodes).
    pub bin_dir: PathBuf,
    /// The node's CNI conf dir (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The plugin binary to copy (inside the installer's image).
    pub plugin_binary: PathBuf,
    /// The plugin's entry in the chain; its `type` names the binary.
    pub plugin: Value,
    /// A config file name to chain into instead of the first one.
    pub conf_name: Option<String>,
}

/// What one [`Installer::chain`] pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chained {
    /// No CNI config yet (the network plugin has not written one).
    NoConfig,
    /// The file already held our entry as configured.
    Unchanged(PathBuf),
    /// The file was (re)written with our entry last.
    Written(PathBuf),
}

/// The plugin entry proxyctl-cni needs at minimum: its type and the pod
/// annotations capability (containerd passes annotations only then).
pub fn default_plugin() -> Value {
    json!({
        "type": "proxyctl-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
    })
}

fn is_conf_name(name: &str) -> bool {
    !name.starts_with('.')
        && (name.ends_with(".conf") || name.ends_with(".conflist") || name.ends_with(".json"))
}

/// The config file the runtime uses: the first by name, as libcni sorts.
pub fn active_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let rd = match std::fs::read_dir(conf_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(conf_dir)(e)),
    };
    let mut names: Vec<String> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_conf_name(n))
        .collect();
    names.sort();
    Ok(names.first().map(|n| conf_dir.join(n)))
}

/// Writes `data` to `path` through a temp file and a rename.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(io(path))
}

fn parse(path: &Path, text: &str) -> Result<serde_json::Map<String, Value>, InstallError> {
    let bad = |reason: String| InstallError::BadConfig {
        path: path.to_owned(),
        reason,
    };
    let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let Value::Object(m) = v else {
        return Err(bad("not a JSON object".into()));
    };
    if let Some(p) = m.get("plugins") {
        if !p.is_array() {
            return Err(bad("`plugins` is not a list".into()));
        }
    } else if !m.get("type").is_some_and(Value::is_string) {
        return Err(bad("neither `plugins` nor `type`".into()));
    }
    Ok(m)
}

impl Installer {
    fn plugin_type(&self) -> Result<&str, InstallError> {
        self.plugin
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && !t.contains('/'))
            .ok_or_else(|| InstallError::BadPlugin("needs a `type` naming the binary".into()))
    }

    fn config_file(&self) -> Result<Option<PathBuf>, InstallError> {
        match &self.conf_name {
            Some(n) => {
                let p = self.conf_dir.join(n);
                Ok(p.is_file().then_some(p))
            }
            None => active_config(&self.conf_dir),
        }
    }

    /// Copies the plugin binary into the bin dir as `<type>` (atomically,
    /// so a runtime calling the old one mid-copy still runs a whole file).
    pub fn install_binary(&self) -> Result<PathBuf, InstallError> {
        let data = std::fs::read(&self.plugin_binary).map_err(io(&self.plugin_binary))?;
        let dest = self.bin_dir.join(self.plugin_type()?);
        if std::fs::read(&dest).is_ok_and(|old| old == data) {
            return Ok(dest);
        }
        write_atomic(&dest, &data, 0o755)?;
        Ok(dest)
    }

    /// Chains our entry last into the active config (replacing an older
    /// entry of ours). A `.conf` becomes a `.conflist` of the same stem.
    pub fn chain(&self) -> Result<Chained, InstallError> {
        let ty = self.plugin_type()?.to_owned();
        let Some(path) = self.config_file()? else {
            return Ok(Chained::NoConfig);
        };
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let mut conf = parse(&path, &text)?;
        let mut target = path.clone();
        if !conf.contains_key("plugins") {
            // A single plugin: the list's name and version move up a level.
            let mut list = serde_json::Map::new();
            for k in ["cniVersion", "name"] {
                if let Some(v) = conf.remove(k) {
                    list.insert(k.to_owned(), v);
                }
            }
            list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
            conf = list;
            target = path.with_extension("conflist");
        }
        let plugins = conf
            .get_mut("plugins")
            .and_then(Value::as_array_mut)
            .expect("checked by parse");
        let want_last = plugins.last() == Some(&self.plugin)
            && plugins.iter().filter(|p| p["type"] == ty.as_str()).count() == 1;
        if want_last && target == path {
            return Ok(Chained::Unchanged(path));
        }
        plugins.retain(|p| p["type"] != ty.as_str());
        plugins.push(self.plugin.clone());
        let mut out = serde_json::to_vec_pretty(&Value::Object(conf)).expect("JSON");
        out.push(b'\n');
        write_atomic(&target, &out, 0o644)?;
        if target != path {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(Chained::Written(target))
    }

    /// Removes our entry from every config file in the conf dir that has
    /// it; returns the files changed.
    pub fn unchain(&self) -> Result<Vec<PathBuf>, InstallError> {
        let ty = self.plugin_type()?.to_owned();
        let mut changed = Vec::new();
        let rd = match std::fs::read_dir(&self.conf_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(changed),
            Err(e) => return Err(io(&self.conf_dir)(e)),
        };
        let mut paths: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_conf_name)
            })
            .collect();
        paths.sort();
        for path in paths {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            // Files that are not ours to understand are left alone.
            let Ok(mut conf) = parse(&path, &text) else {
                continue;
            };
            let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
                continue;
            };
            let before = plugins.len();
            plugins.retain(|p| p["type"] != ty.as_str());
            if plugins.len() == before {
                continue;
            }
            let mut out = serde_json::to_vec_pretty(&Value::Object(conf)).expect("JSON");
            out.push(b'\n');
            write_atomic(&path, &out, 0o644)?;
            changed.push(path);
        }
        Ok(changed)
    }

    /// Installs, chains, then keeps the chain in place (checking every
    /// `interval`: a network plugin that rewrites its config drops our
    /// entry, and a new first file may appear) until `stop()` is true;
    /// then un-chains. Polling rather than inotify: the conf dir is a
    /// hostPath mount, rewrites are rare, and a re-read of one small file
    /// per interval costs nothing measurable.
    pub fn run(&self, interval: Duration, stop: impl Fn() -> bool) -> Result<(), InstallError> {
        let bin = self.install_binary()?;
        tracing::info!(binary = %bin.display(), "plugin installed");
        let mut last: Option<Chained> = None;
        while !stop() {
            match self.chain() {
                Ok(c) => {
                    if last.as_ref() != Some(&c) {
                        match &c {
                            Chained::NoConfig => {
                                tracing::info!(dir = %self.conf_dir.display(), "no CNI config yet; waiting")
                            }
                            Chained::Written(p) => {
                                tracing::info!(file = %p.display(), "plugin chained")
                            }
                            Chained::Unchanged(p) => {
                                tracing::debug!(file = %p.display(), "plugin already chained")
                            }
                        }
                    }
                    last = Some(match c {
                        Chained::Written(p) => Chained::Unchanged(p),
                        other => other,
                    });
                }
                // A half-written or foreign file: retry on the next tick.
                Err(e) => tracing::warn!(error = %e, "chaining failed; retrying"),
            }
            let until = std::time::Instant::now() + interval;
            while !stop() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20).min(interval));
            }
        }
        let changed = self.unchain()?;
        tracing::info!(files = ?changed, "plugin un-chained");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Installer) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::create_dir_all(d.path().join("net.d")).unwrap();
        std::fs::write(d.path().join("plugin"), b"\x7fELF plugin").unwrap();
        let i = Installer {
            bin_dir: d.path().join("bin"),
            conf_dir: d.path().join("net.d"),
            plugin_binary: d.path().join("plugin"),
            plugin: default_plugin(),
            conf_name: None,
        };
        (d, i)
    }

    fn conflist(plugins: &[&str]) -> String {
        let ps: Vec<Value> = plugins.iter().map(|t| json!({"type": t})).collect();
        json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": ps}).to_string()
    }

    fn types(path: &Path) -> Vec<String> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn chains_into_the_first_file_and_unchains() {
        let (_d, i) = setup();
        assert_eq!(i.chain().unwrap(), Chained::NoConfig);
        std::fs::write(i.conf_dir.join("20-b.conflist"), conflist(&["bridge"])).unwrap();
        std::fs::write(
            i.conf_dir.join("10-a.conflist"),
            conflist(&["ptp", "portmap"]),
        )
        .unwrap();
        std::fs::write(i.conf_dir.join(".hidden.conflist"), "garbage").unwrap();
        let first = i.conf_dir.join("10-a.conflist");
        assert_eq!(i.chain().unwrap(), Chained::Written(first.clone()));
        assert_eq!(types(&first), ["ptp", "portmap", "proxyctl-cni"]);
        assert_eq!(types(&i.conf_dir.join("20-b.conflist")), ["bridge"]);
        assert_eq!(i.chain().unwrap(), Chained::Unchanged(first.clone()));
        assert_eq!(i.unchain().unwrap(), vec![first.clone()]);
        assert_eq!(types(&first), ["ptp", "portmap"]);
        assert!(i.unchain().unwrap().is_empty());
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(&i.conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_rewritten_config_is_rechained_and_an_old_entry_replaced() {
        let (_d, mut i) = setup();
        let f = i.conf_dir.join("10-net.conflist");
        std::fs::write(&f, conflist(&["bridge"])).unwrap();
        i.chain().unwrap();
        // The network plugin rewrites its file: our entry is gone.
        std::fs::write(&f, conflist(&["bridge", "bandwidth"])).unwrap();
        assert_eq!(i.chain().unwrap(), Chained::Written(f.clone()));
        assert_eq!(types(&f), ["bridge", "bandwidth", "proxyctl-cni"]);
        // A changed plugin config replaces the old entry, never duplicates it.
        i.plugin["rules"] = json!([]);
        assert_eq!(i.chain().unwrap(), Chained::Written(f.clone()));
        assert_eq!(types(&f), ["bridge", "bandwidth", "proxyctl-cni"]);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        assert_eq!(v["plugins"][2]["rules"], json!([]));
        // Our entry in the middle (someone appended after it) moves last.
        std::fs::write(&f, conflist(&["bridge", "proxyctl-cni", "tuning"])).unwrap();
        i.chain().unwrap();
        assert_eq!(types(&f), ["bridge", "tuning", "proxyctl-cni"]);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let (_d, i) = setup();
        let f = i.conf_dir.join("10-bridge.conf");
        std::fs::write(
            &f,
            json!({"cniVersion": "0.4.0", "name": "k8s", "type": "bridge", "bridge": "cni0"})
                .to_string(),
        )
        .unwrap();
        let list = i.conf_dir.join("10-bridge.conflist");
        assert_eq!(i.chain().unwrap(), Chained::Written(list.clone()));
        assert!(!f.exists());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
        assert_eq!(v["name"], "k8s");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["plugins"][0], json!({"type": "bridge", "bridge": "cni0"}));
        assert_eq!(v["plugins"][1]["type"], "proxyctl-cni");
    }

    #[test]
    fn bad_input_changes_nothing() {
        let (_d, mut i) = setup();
        let f = i.conf_dir.join("10-x.conflist");
        for bad in ["{not json", "[]", r#"{"plugins": 3}"#, r#"{"name": "x"}"#] {
            std::fs::write(&f, bad).unwrap();
            let e = i.chain().unwrap_err();
            assert!(matches!(e, InstallError::BadConfig { .. }), "{bad}: {e}");
            assert_eq!(std::fs::read_to_string(&f).unwrap(), bad);
            assert!(i.unchain().unwrap().is_empty());
        }
        i.plugin = json!({"type": "../evil"});
        assert!(matches!(i.chain(), Err(InstallError::BadPlugin(_))));
        assert!(matches!(
            i.install_binary(),
            Err(InstallError::BadPlugin(_))
        ));
        assert_eq!(std::fs::read_dir(&i.bin_dir).unwrap().count(), 0);
    }

    #[test]
    fn binary_is_copied_executable_and_run_unchains_on_stop() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, i) = setup();
        let f = i.conf_dir.join("10-net.conflist");
        std::fs::write(&f, conflist(&["bridge"])).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                i.run(Duration::from_millis(20), || {
                    stop.load(std::sync::atomic::Ordering::SeqCst)
                })
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while types(&f) != ["bridge", "proxyctl-cni"] {
                assert!(std::time::Instant::now() < deadline, "never chained");
                std::thread::sleep(Duration::from_millis(10));
            }
            // Rewritten by "the network plugin" while we run: re-chained.
            std::fs::write(&f, conflist(&["bridge", "portmap"])).unwrap();
            while types(&f) != ["bridge", "portmap", "proxyctl-cni"] {
                assert!(std::time::Instant::now() < deadline, "never re-chained");
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            h.join().unwrap().unwrap();
        });
        assert_eq!(types(&f), ["bridge", "portmap"]);
        let bin = i.bin_dir.join("proxyctl-cni");
        assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF plugin");
        assert_eq!(
            std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }
}
