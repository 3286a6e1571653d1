//! Access rules: which pods may use which metadata paths with which methods.
//!
//! Deny by default. Credential paths (Azure `/metadata/identity...`, AWS
//! `/latest/meta-data/iam...`) are opened only by a rule whose own path lies
//! inside them: a broad `prefix: /` or `prefix: /metadata` never hands out
//! tokens (the lesson of kube2iam/kiam defaults).
//!
//! ```yaml
//! rules:
//!   - name: clients-read-instance
//!     pods: { namespace: default, labels: { role: ClientContainer } }
//!     paths: [ { prefix: /metadata/instance }, { exact: /metadata/versions } ]
//!     methods: [GET]
//! identities:
//!   - name: web-keyvault
//!     pods: { namespace: default, labels: { app: web } }
//!     azure: { client_id: 11111111-2222-3333-4444-555555555555 }
//! ```
//!
//! `identities` bind pods (same selectors, first match wins) to the cloud
//! identity their credential requests are answered for; a rule still has to
//! allow the credential path. See [`crate::identity`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::Error;
use crate::identity::{AwsRole, AzureIdentity, StsSettings};
use crate::pods::Pod;

/// Path prefixes that hand out credentials. Compared case-insensitively, in
/// case an upstream treats paths that way.
pub const SENSITIVE_PREFIXES: &[&str] = &["/metadata/identity", "/latest/meta-data/iam"];

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub identities: Vec<IdentityBinding>,
    /// The STS endpoint AWS roles are assumed at.
    #[serde(default)]
    pub sts: Option<StsSettings>,
}

/// Pods whose credential requests are answered for one cloud identity.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityBinding {
    pub name: String,
    pub pods: PodSelector,
    /// The managed identity Azure tokens are issued for.
    #[serde(default)]
    pub azure: Option<AzureIdentity>,
    /// The IAM role AWS credentials are assumed for.
    #[serde(default)]
    pub aws: Option<AwsRole>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub pods: PodSelector,
    pub paths: Vec<PathMatch>,
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Let AWS metadata reads through without an IMDSv2 session token.
    #[serde(default)]
    pub imdsv1: bool,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into()]
}

/// Every field given must match; an empty selector matches every known pod.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PodSelector {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Exactly one of `exact` or `prefix`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
}

impl PathMatch {
    fn value(&self) -> &str {
        self.exact
            .as_deref()
            .or(self.prefix.as_deref())
            .unwrap_or_default()
    }

    fn matches(&self, path: &str) -> bool {
        match (&self.exact, &self.prefix) {
            (Some(p), None) => path == p,
            (None, Some(p)) => path.starts_with(p.as_str()),
            _ => false,
        }
    }
}

/// Is `path` one that hands out credentials? (Runs on every request: a
/// case-insensitive prefix compare, no lower-cased copy.)
pub fn is_sensitive(path: &str) -> bool {
    SENSITIVE_PREFIXES.iter().any(|p| {
        path.len() >= p.len() && path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
    })
}

impl PodSelector {
    pub fn matches(&self, pod: &Pod) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == pod.namespace)
            && self.name.as_ref().is_none_or(|n| *n == pod.name)
            && self
                .labels
                .iter()
                .all(|(k, v)| pod.labels.get(k).is_some_and(|pv| pv == v))
    }
}

/// The outcome of checking one request against the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Allowed by the named rule (borrowed: no copy per request).
    Allow(&'a str),
    Deny,
}

impl Rules {
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, Error> {
        let rules: Rules = serde_yaml::from_str(text).map_err(|e| Error::Rules {
            path: origin.into(),
            message: e.to_string(),
        })?;
        rules.validate().map_err(|message| Error::Rules {
            path: origin.into(),
            message,
        })?;
        Ok(rules)
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Rules {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    fn validate(&self) -> Result<(), String> {
        for rule in &self.rules {
            if rule.paths.is_empty() {
                return Err(format!("rule {:?}: paths must not be empty", rule.name));
            }
            for p in &rule.paths {
                if p.exact.is_some() == p.prefix.is_some() {
                    return Err(format!(
                        "rule {:?}: each path needs exactly one of exact or prefix",
                        rule.name
                    ));
                }
                if !p.value().starts_with('/') {
                    return Err(format!(
                        "rule {:?}: path {:?} must start with '/'",
                        rule.name,
                        p.value()
                    ));
                }
            }
            if rule.methods.is_empty() {
                return Err(format!("rule {:?}: methods must not be empty", rule.name));
            }
            for m in &rule.methods {
                if http::Method::from_bytes(m.as_bytes()).is_err()
                    || m.bytes().any(|b| b.is_ascii_lowercase())
                {
                    return Err(format!(
                        "rule {:?}: method {m:?} is not an upper-case HTTP method",
                        rule.name
                    ));
                }
            }
        }
        for binding in &self.identities {
            if binding.azure.is_none() && binding.aws.is_none() {
                return Err(format!(
                    "identity {:?}: names no identity (azure, aws)",
                    binding.name
                ));
            }
            if let Some(aws) = &binding.aws {
                aws.validate()
                    .map_err(|e| format!("identity {:?}: aws: {e}", binding.name))?;
            }
            if let Some(azure) = &binding.azure {
                azure
                    .validate()
                    .map_err(|e| format!("identity {:?}: azure: {e}", binding.name))?;
            }
        }
        Ok(())
    }

    /// The identity `pod` is bound to: the first binding whose selector
    /// matches it.
    pub fn identity_for(&self, pod: &Pod) -> Option<&IdentityBinding> {
        self.identities.iter().find(|b| b.pods.matches(pod))
    }

    /// Decides whether `pod` may send `method path`.
    pub fn check(&self, pod: &Pod, method: &str, path: &str) -> Verdict<'_> {
        match self.allowing_rule(pod, method, path) {
            Some(rule) => Verdict::Allow(&rule.name),
            None => Verdict::Deny,
        }
    }

    /// The first rule that allows `pod` to send `method path`.
    pub fn allowing_rule(&self, pod: &Pod, method: &str, path: &str) -> Option<&Rule> {
        let sensitive = is_sensitive(path);
        for rule in &self.rules {
            if !rule.pods.matches(pod) || !rule.methods.iter().any(|m| m == method) {
                continue;
            }
            let hit = rule
                .paths
                .iter()
                .any(|p| p.matches(path) && (!sensitive || is_sensitive(p.value())));
            if hit {
                return Some(rule);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            name: name.into(),
            namespace: ns.into(),
            uid: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: None,
            ip: None,
        }
    }

    const RULES: &str = r#"
rules:
  - name: everything-but-credentials
    pods: { labels: { role: ClientContainer } }
    paths: [ { prefix: / } ]
  - name: token-for-msi
    pods: { namespace: kube-system, labels: { role: MSIProxyContainer } }
    paths: [ { exact: /metadata/identity/oauth2/token } ]
  - name: aws-creds
    pods: { name: aws-app }
    paths: [ { prefix: /latest/meta-data/iam/ } ]
    methods: [GET, PUT]
"#;

    #[test]
    fn broad_rules_never_open_credentials() {
        let rules = Rules::from_yaml(RULES, "test").unwrap();
        let client = pod("default", "c", &[("role", "ClientContainer")]);
        assert!(matches!(
            rules.check(&client, "GET", "/metadata/instance"),
            Verdict::Allow(_)
        ));
        for p in [
            "/metadata/identity/oauth2/token",
            "/METADATA/Identity/oauth2/token",
            "/latest/meta-data/iam/security-credentials/r",
        ] {
            assert_eq!(rules.check(&client, "GET", p), Verdict::Deny, "{p}");
        }
        assert_eq!(
            rules.check(&client, "POST", "/metadata/instance"),
            Verdict::Deny
        );
        let msi = pod("kube-system", "m", &[("role", "MSIProxyContainer")]);
        assert_eq!(
            rules.check(&msi, "GET", "/metadata/identity/oauth2/token"),
            Verdict::Allow("token-for-msi")
        );
        let msi_elsewhere = pod("default", "m", &[("role", "MSIProxyContainer")]);
        assert_eq!(
            rules.check(&msi_elsewhere, "GET", "/metadata/identity/oauth2/token"),
            Verdict::Deny
        );
        let aws = pod("default", "aws-app", &[]);
        assert!(matches!(
            rules.check(&aws, "GET", "/latest/meta-data/iam/security-credentials/r"),
            Verdict::Allow(_)
        ));
        assert_eq!(
            rules.check(&pod("default", "other", &[]), "GET", "/metadata/instance"),
            Verdict::Deny
        );
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (text, needle) in [
            (
                "rules: [{name: a, pods: {}, paths: []}]",
                "paths must not be empty",
            ),
            (
                "rules: [{name: a, pods: {}, paths: [{prefix: x}]}]",
                "must start with",
            ),
            (
                "rules: [{name: a, pods: {}, paths: [{prefix: /}], methods: [get]}]",
                "upper-case",
            ),
            (
                "rules: [{name: a, pods: {}, paths: [{prefix: /}], extra: 1}]",
                "unknown field",
            ),
            (
                "rules: [{name: a, pods: {}, paths: [{prefix: /, exact: /}]}]",
                "exactly one",
            ),
            ("rules: [{name: a, pods: {}, paths: [{}]}]", "exactly one"),
            (
                "rules: [{name: a, pods: {label: {}}, paths: [{prefix: /}]}]",
                "unknown field",
            ),
        ] {
            let err = Rules::from_yaml(text, "t").unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
