//! The `proxyctl-cni` plugin: CNI spec 1.0 ADD, DEL, CHECK and VERSION,
//! chained after the network plugin (e.g. `bridge`).
//!
//! Owns: the plugin's configuration (rules that select pods and the
//! policies they get), reading the runtime's environment (`CNI_*`,
//! `CNI_ARGS` with `K8S_POD_NAMESPACE`/`K8S_POD_NAME`), the pod annotations
//! the runtime passes in `runtimeConfig` (capability
//! `io.kubernetes.cri.pod-annotations`, which containerd 1.6 honours), and
//! the CNI result and error JSON.
//!
//! On ADD the selected policies are installed with one atomic nft batch in
//! `CNI_NETNS` and `prevResult` is passed through. The runtime runs the CNI
//! chain while creating the pod sandbox, before any app container exists,
//! so the first packet of the app is already redirected.
//!
//! ```json
//! { "type": "proxyctl-cni",
//!   "capabilities": {"io.kubernetes.cri.pod-annotations": true},
//!   "rules": [ {"selector": {"namespaces": ["shop"], "annotations": {"proxy": "on"}},
//!               "policies": [ {"name": "mesh", "outboundPort": 15001, "exclude": {"uids": [1337]}} ]} ],
//!   "annotation": "proxyctl.io/policy" }
//! ```
//! A pod annotation named by `annotation` (default `proxyctl.io/policy`)
//! may carry policies itself (JSON or YAML, one policy or a list).

use std::collections::BTreeMap;
use std::path::PathBuf;

use proxyctl_nft::Target;
use proxyctl_policy::{FileFormat, Policy, policies_from_str};
use serde::Deserialize;
use serde_json::{Value, json};

/// The CNI versions this plugin speaks (chained plugins need prevResult,
/// which exists from 0.3.0 on; the result is passed through unchanged).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The pod annotation that may carry policies.
pub const DEFAULT_ANNOTATION: &str = "proxyctl.io/policy";
/// The runtimeConfig key (capability) carrying the pod's annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// A CNI error, printed as the spec's error JSON on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    // Well-known codes from the CNI spec.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// Plugin-specific (>= 100): the policy could not be installed.
    pub const POLICY_FAILED: u32 = 100;
    /// Plugin-specific: CHECK found the namespace's policies differ.
    pub const CHECK_FAILED: u32 = 101;

    fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.to_owned(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// Which pods a rule applies to; every given field must match (empty = any).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub selector: Selector,
    pub policies: Vec<Policy>,
}

/// The plugin's own part of the network configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct PluginConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    #[serde(default, rename = "runtimeConfig")]
    pub runtime_config: BTreeMap<String, Value>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub annotation: Option<String>,
}

/// What the runtime tells us about the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
}

/// The `CNI_*` environment.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl CniEnv {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }

    /// `CNI_ARGS` (`K=V;K=V`) as a map.
    pub fn args_map(&self) -> BTreeMap<String, String> {
        self.args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

impl Selector {
    pub fn matches(&self, pod: &PodIdentity) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&pod.namespace))
            && (self.names.is_empty() || self.names.contains(&pod.name))
            && self
                .annotations
                .iter()
                .all(|(k, v)| pod.annotations.get(k) == Some(v))
    }
}

/// Parses stdin as the plugin configuration, checking the version.
pub fn parse_conf(stdin: &[u8]) -> Result<PluginConf, CniError> {
    let conf: PluginConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            CniError::DECODE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            CniError::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "cniVersion {} is not one of {SUPPORTED_VERSIONS:?}",
                conf.cni_version
            ),
        ));
    }
    for (i, rule) in conf.rules.iter().enumerate() {
        for p in &rule.policies {
            p.clone().checked().map_err(|e| {
                CniError::new(
                    CniError::INVALID_CONFIG,
                    "invalid policy in the plugin configuration",
                    format!("rules[{i}]: {e}"),
                )
            })?;
        }
    }
    Ok(conf)
}

/// The pod as the runtime describes it: namespace and name from `CNI_ARGS`,
/// annotations from `runtimeConfig`.
pub fn pod_identity(env: &CniEnv, conf: &PluginConf) -> PodIdentity {
    let args = env.args_map();
    let annotations = conf
        .runtime_config
        .get(ANNOTATIONS_CAPABILITY)
        .and_then(|v| v.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    PodIdentity {
        namespace: args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_default(),
        name: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
        annotations,
    }
}

/// The policies this pod gets: every matching rule's, then the annotation's.
/// Two policies with one name are refused (which should win is not ours to guess).
pub fn select_policies(conf: &PluginConf, pod: &PodIdentity) -> Result<Vec<Policy>, CniError> {
    let mut out: Vec<Policy> = Vec::new();
    for rule in conf.rules.iter().filter(|r| r.selector.matches(pod)) {
        out.extend(rule.policies.iter().cloned());
    }
    let key = conf.annotation.as_deref().unwrap_or(DEFAULT_ANNOTATION);
    if let Some(text) = pod.annotations.get(key) {
        let format = if text.trim_start().starts_with(['{', '[']) {
            FileFormat::Json
        } else {
            FileFormat::Yaml
        };
        let from_annotation = policies_from_str(&format!("annotation {key}"), text, format)
            .map_err(|e| {
                CniError::new(
                    CniError::INVALID_CONFIG,
                    "invalid policy in pod annotation",
                    e.to_string(),
                )
            })?;
        out.extend(from_annotation);
    }
    let mut normalized = Vec::with_capacity(out.len());
    for p in out {
        let p = p.checked().map_err(|e| {
            CniError::new(CniError::INVALID_CONFIG, "invalid policy", e.to_string())
        })?;
        if normalized.iter().any(|q: &Policy| q.name == p.name) {
            return Err(CniError::new(
                CniError::INVALID_CONFIG,
                "conflicting policies",
                format!(
                    "pod {}/{} is given two policies named `{}`",
                    pod.namespace, pod.name, p.name
                ),
            ));
        }
        normalized.push(p);
    }
    Ok(normalized)
}

fn require(value: &str, var: &str) -> Result<(), CniError> {
    if value.is_empty() {
        return Err(CniError::new(
            CniError::INVALID_ENV,
            "missing environment variable",
            format!("{var} is not set"),
        ));
    }
    Ok(())
}

fn chained_result(conf: &PluginConf) -> Result<Value, CniError> {
    let mut prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            CniError::INVALID_CONFIG,
            "proxyctl-cni must be chained",
            "no prevResult: list proxyctl-cni after the network plugin in a conflist",
        )
    })?;
    if let Some(obj) = prev.as_object_mut() {
        obj.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    Ok(prev)
}

fn policy_error(e: proxyctl_nft::NftError) -> CniError {
    CniError::new(
        CniError::POLICY_FAILED,
        "cannot install the redirect policy",
        e.to_string(),
    )
}

/// Runs one CNI command; `Ok(Some(json))` is printed on stdout.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    match env.command.as_str() {
        "VERSION" => Ok(Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}),
        )),
        "ADD" => {
            let conf = parse_conf(stdin)?;
            require(&env.container_id, "CNI_CONTAINERID")?;
            require(&env.netns, "CNI_NETNS")?;
            require(&env.ifname, "CNI_IFNAME")?;
            let result = chained_result(&conf)?;
            let pod = pod_identity(env, &conf);
            let policies = select_policies(&conf, &pod)?;
            if !policies.is_empty() {
                proxyctl_nft::apply(&Target::Path(PathBuf::from(&env.netns)), &policies)
                    .map_err(policy_error)?;
            }
            Ok(Some(result))
        }
        "DEL" => {
            // DEL must succeed when its work is already done: no netns (it is
            // gone), or a namespace without our table.
            let _conf = parse_conf(stdin)?;
            if !env.netns.is_empty() && std::path::Path::new(&env.netns).exists() {
                match proxyctl_nft::clear(&Target::Path(PathBuf::from(&env.netns)), None) {
                    // A Target error: unmounted between the check and the
                    // open, so nothing is left to remove.
                    Ok(_) | Err(proxyctl_nft::NftError::Target { .. }) => {}
                    Err(e) => return Err(policy_error(e)),
                }
            }
            Ok(None)
        }
        "CHECK" => {
            let conf = parse_conf(stdin)?;
            require(&env.netns, "CNI_NETNS")?;
            chained_result(&conf)?;
            let pod = pod_identity(env, &conf);
            let want = select_policies(&conf, &pod)?;
            let have = proxyctl_nft::list(&Target::Path(PathBuf::from(&env.netns)))
                .map_err(policy_error)?;
            for p in &want {
                match have.iter().find(|h| h.name == p.name) {
                    None => {
                        return Err(CniError::new(
                            CniError::CHECK_FAILED,
                            "policy missing",
                            format!("policy `{}` is not installed in {}", p.name, env.netns),
                        ));
                    }
                    Some(h) if h != p => {
                        return Err(CniError::new(
                            CniError::CHECK_FAILED,
                            "policy differs",
                            format!(
                                "policy `{}` in {} differs from the configured one",
                                p.name, env.netns
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
            Ok(None)
        }
        "" => Err(CniError::new(
            CniError::INVALID_ENV,
            "missing environment variable",
            "CNI_COMMAND is not set",
        )),
        other => Err(CniError::new(
            CniError::INVALID_ENV,
            "unknown CNI_COMMAND",
            format!("`{other}` is not ADD, DEL, CHECK or VERSION"),
        )),
    }
}

/// The cniVersion to put in an error: the config's if it parses, else 1.0.0.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "1.0.0".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: Value) -> PluginConf {
        let mut base = json!({"cniVersion": "1.0.0", "name": "n", "type": "proxyctl-cni",
            "prevResult": {"cniVersion": "1.0.0", "ips": []}});
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        parse_conf(&serde_json::to_vec(&base).unwrap()).unwrap()
    }

    fn pod(ns: &str, name: &str, ann: &[(&str, &str)]) -> PodIdentity {
        PodIdentity {
            namespace: ns.into(),
            name: name.into(),
            annotations: ann
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn rules_select_by_namespace_name_and_annotations() {
        let c = conf(json!({"rules": [
            {"selector": {"namespaces": ["shop"], "annotations": {"proxy": "on"}},
             "policies": [{"name": "mesh", "outboundPort": 15001, "exclude": {"uids": [1337]}}]},
            {"selector": {"names": ["db"]}, "policies": [{"name": "db", "outboundPort": 15002, "exclude": {"uids": [1337]}}]}]}));
        let names = |p: &PodIdentity| -> Vec<String> {
            select_policies(&c, p)
                .unwrap()
                .into_iter()
                .map(|p| p.name)
                .collect()
        };
        assert_eq!(names(&pod("shop", "web", &[("proxy", "on")])), ["mesh"]);
        assert!(names(&pod("shop", "web", &[("proxy", "off")])).is_empty());
        assert!(names(&pod("other", "web", &[("proxy", "on")])).is_empty());
        assert_eq!(names(&pod("x", "db", &[])), ["db"]);
    }

    #[test]
    fn annotation_policies_are_parsed_and_conflicts_refused() {
        let c = conf(
            json!({"rules": [{"policies": [{"name": "mesh", "outboundPort": 15001, "exclude": {"uids": [1337]}}]}]}),
        );
        let p = pod(
            "a",
            "b",
            &[(
                DEFAULT_ANNOTATION,
                r#"{"name": "extra", "outboundPort": 15009, "exclude": {"uids": [1337]}}"#,
            )],
        );
        let got = select_policies(&c, &p).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].outbound_port, Some(15009));
        let clash = pod(
            "a",
            "b",
            &[(
                DEFAULT_ANNOTATION,
                "name: mesh\noutboundPort: 1\nexclude: {uids: [1337]}\n",
            )],
        );
        assert_eq!(
            select_policies(&c, &clash).unwrap_err().code,
            CniError::INVALID_CONFIG
        );
        // A looping policy (no identity excluded) is refused in an
        // annotation, naming the flags, unless it says allowProxyLoop.
        let looping = pod(
            "a",
            "b",
            &[(
                DEFAULT_ANNOTATION,
                r#"{"name": "l", "outboundPort": 15009}"#,
            )],
        );
        let err = select_policies(&c, &looping).unwrap_err();
        assert_eq!(err.code, CniError::INVALID_CONFIG);
        assert!(format!("{err:?}").contains("--allow-proxy-loop"), "{err:?}");
        let allowed = pod(
            "a",
            "b",
            &[(
                DEFAULT_ANNOTATION,
                r#"{"name": "l", "outboundPort": 15009, "allowProxyLoop": true}"#,
            )],
        );
        assert!(select_policies(&c, &allowed).unwrap()[1].allow_proxy_loop);
        let bad = pod("a", "b", &[(DEFAULT_ANNOTATION, r#"{"name": "x"}"#)]);
        assert_eq!(
            select_policies(&c, &bad).unwrap_err().code,
            CniError::INVALID_CONFIG
        );
    }

    #[test]
    fn bad_configs_and_env_give_cni_errors() {
        assert_eq!(parse_conf(b"{").unwrap_err().code, CniError::DECODE);
        assert_eq!(
            parse_conf(br#"{"cniVersion": "9.9.9"}"#).unwrap_err().code,
            CniError::INCOMPATIBLE_VERSION
        );
        let bad_rule = br#"{"cniVersion": "1.0.0", "rules": [{"policies": [{"name": "x"}]}]}"#;
        assert_eq!(
            parse_conf(bad_rule).unwrap_err().code,
            CniError::INVALID_CONFIG
        );
        let looping = br#"{"cniVersion": "1.0.0", "rules": [{"policies": [{"outboundPort": 1}]}]}"#;
        assert_eq!(
            parse_conf(looping).unwrap_err().code,
            CniError::INVALID_CONFIG
        );
        let env = CniEnv {
            command: "ADD".into(),
            ..Default::default()
        };
        let ok_conf = br#"{"cniVersion": "1.0.0", "prevResult": {}}"#;
        assert_eq!(run(&env, ok_conf).unwrap_err().code, CniError::INVALID_ENV);
        let env = CniEnv {
            command: "ADD".into(),
            container_id: "c".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            args: String::new(),
        };
        let unchained = br#"{"cniVersion": "1.0.0"}"#;
        assert_eq!(
            run(&env, unchained).unwrap_err().code,
            CniError::INVALID_CONFIG
        );
        let env = CniEnv {
            command: "BOGUS".into(),
            ..Default::default()
        };
        assert_eq!(run(&env, ok_conf).unwrap_err().code, CniError::INVALID_ENV);
    }

    #[test]
    fn identity_comes_from_cni_args_and_runtime_config() {
        let c = conf(json!({"runtimeConfig": {ANNOTATIONS_CAPABILITY: {"a": "1"}}}));
        let env = CniEnv {
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web".into(),
            ..Default::default()
        };
        assert_eq!(pod_identity(&env, &c), pod("ns", "web", &[("a", "1")]));
    }
}
