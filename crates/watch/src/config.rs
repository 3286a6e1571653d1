//! Which pods get which policies: `--selector/--policy` or a config file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proxyctl_policy::{Policy, policies_from_file};
use serde::Deserialize;

/// A bad selector or config file: names what is wrong; nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--selector: {0}")]
    Selector(String),
    #[error("--config {path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Policy(#[from] proxyctl_policy::PolicyError),
}

/// Labels a pod must carry, all of them (Kubernetes equality selection).
pub type Selector = BTreeMap<String, String>;

/// `KEY=VALUE[,KEY=VALUE...]` -> a selector. Keys must be non-empty.
pub fn parse_selector(text: &str) -> Result<Selector, ConfigError> {
    let mut out = Selector::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::Selector(format!("`{part}` is not KEY=VALUE")))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(ConfigError::Selector(format!(
                "`{part}`: empty or blank label key"
            )));
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(ConfigError::Selector(format!("label `{k}` given twice")));
        }
    }
    if out.is_empty() {
        return Err(ConfigError::Selector(
            "empty selector: give at least one KEY=VALUE (a watch on every pod must be explicit)"
                .into(),
        ));
    }
    Ok(out)
}

/// One selector and the policies matching pods get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRule {
    pub selector: Selector,
    pub policies: Vec<Policy>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SelectorSpec {
    Text(String),
    Map(Selector),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    selector: SelectorSpec,
    /// A policy file (JSON or YAML), relative to the config file.
    #[serde(default)]
    policy: Option<PathBuf>,
    #[serde(default)]
    policies: Vec<Policy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    rules: Vec<RuleSpec>,
}

/// Reads a config file:
/// ```yaml
/// rules:
///   - selector: app=web,tier=front
///     policy: mesh.yaml            # relative to this file
///   - selector: {app: db}
///     policies: [{name: db, outboundPort: 15002, exclude: {uids: [1337]}}]
/// ```
pub fn load_config(path: &Path) -> Result<Vec<WatchRule>, ConfigError> {
    let file_err = |message: String| ConfigError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    let spec: FileSpec = serde_yaml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut rules = Vec::new();
    for (i, r) in spec.rules.into_iter().enumerate() {
        let selector = match r.selector {
            SelectorSpec::Text(t) => {
                parse_selector(&t).map_err(|e| file_err(format!("rules[{i}]: {e}")))?
            }
            SelectorSpec::Map(m) if m.is_empty() => {
                return Err(file_err(format!("rules[{i}]: empty selector")));
            }
            SelectorSpec::Map(m) => m,
        };
        let mut policies = Vec::new();
        if let Some(p) = r.policy {
            policies.extend(policies_from_file(&base.join(p))?);
        }
        for p in r.policies {
            policies.push(
                p.checked()
                    .map_err(|e| file_err(format!("rules[{i}]: {e}")))?,
            );
        }
        if policies.is_empty() {
            return Err(file_err(format!(
                "rules[{i}]: no `policy` file or `policies`"
            )));
        }
        rules.push(WatchRule { selector, policies });
    }
    if rules.is_empty() {
        return Err(file_err("no rules".into()));
    }
    check_names(&rules).map_err(file_err)?;
    Ok(rules)
}

/// Two rules may give the same policy; they may not give different policies
/// under one name (a pod matching both would get one of them by chance).
pub fn check_names(rules: &[WatchRule]) -> Result<(), String> {
    let mut seen: BTreeMap<&str, &Policy> = BTreeMap::new();
    for p in rules.iter().flat_map(|r| &r.policies) {
        if let Some(prev) = seen.insert(&p.name, p)
            && prev != p
        {
            return Err(format!(
                "two different policies are named `{}`; give each its own name",
                p.name
            ));
        }
    }
    Ok(())
}

/// The policies for a pod with `labels`: those of every matching rule, each
/// name once.
pub fn desired_policies(rules: &[WatchRule], labels: &BTreeMap<String, String>) -> Vec<Policy> {
    let mut out: Vec<Policy> = Vec::new();
    for rule in rules
        .iter()
        .filter(|r| proxyctl_cri::labels_match(&r.selector, labels))
    {
        for p in &rule.policies {
            if !out.iter().any(|q| q.name == p.name) {
                out.push(p.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_or_name_the_problem() {
        let s = parse_selector("app=web, tier=front").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s["tier"], "front");
        for bad in ["", "app", "=x", "a=1,a=2", " , "] {
            assert!(
                parse_selector(bad)
                    .unwrap_err()
                    .to_string()
                    .starts_with("--selector"),
                "{bad}"
            );
        }
    }

    #[test]
    fn config_files_load_with_relative_policy_files() {
        let dir = std::env::temp_dir().join(format!("pxt-watch-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("mesh.yaml"),
            "name: mesh\noutboundPort: 15001\nexclude: {uids: [1337]}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("watch.yaml"),
            "rules:\n  - selector: app=web\n    policy: mesh.yaml\n  - selector: {app: db}\n    policies: [{name: db, outboundPort: 15002, exclude: {uids: [1337]}}]\n",
        )
        .unwrap();
        let rules = load_config(&dir.join("watch.yaml")).unwrap();
        std::fs::write(
            dir.join("clash.yaml"),
            "rules:\n  - selector: a=1\n    policies: [{name: x, outboundPort: 1, exclude: {uids: [1337]}}]\n  - selector: b=1\n    policies: [{name: x, outboundPort: 2, exclude: {uids: [1337]}}]\n",
        )
        .unwrap();
        let clash = load_config(&dir.join("clash.yaml"))
            .unwrap_err()
            .to_string();
        std::fs::write(
            dir.join("loop.yaml"),
            "rules:\n  - selector: a=1\n    policies: [{name: x, outboundPort: 1}]\n",
        )
        .unwrap();
        let looping = load_config(&dir.join("loop.yaml")).unwrap_err().to_string();
        assert!(looping.contains("--allow-proxy-loop"), "{looping}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].policies[0].outbound_port, Some(15001));
        let web: BTreeMap<_, _> = [("app".to_string(), "web".to_string())].into();
        assert_eq!(desired_policies(&rules, &web)[0].name, "mesh");
        assert!(desired_policies(&rules, &BTreeMap::new()).is_empty());
        assert!(
            clash.contains("two different policies are named `x`"),
            "{clash}"
        );
    }
}
