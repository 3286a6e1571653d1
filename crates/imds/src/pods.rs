//! Who the pods are: a [`PodSource`] lists them (name, namespace, labels,
//! network namespace, IP). The static file source is read again at every
//! reconcile, so a node agent can rewrite it; the CRI source
//! ([`crate::cri::CriPodSource`]) reads the container runtime.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The pod's unique id when the source knows it (CRI sandbox id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's network namespace: a per-pod listener is bound inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The pod's address, for the source-IP fallback listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
}

fn default_namespace() -> String {
    "default".into()
}

impl Pod {
    /// `namespace/name`, as audit lines and metrics name the pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

pub trait PodSource: Send + Sync {
    /// The pods that exist now.
    fn pods(&self) -> Result<Vec<Pod>, Error>;

    /// For the source-IP fallback, asked at connection time after the
    /// namespace checks passed: whether `pod` is still, per the source, the
    /// live owner of `ip`. An error counts as no. Sources that know no more
    /// than their list (files, memory) say yes.
    fn owns_ip(&self, _pod: &Pod, _ip: IpAddr) -> Result<bool, Error> {
        Ok(true)
    }
    /// Wake-ups meaning "the pods may have changed: read them now" (a
    /// container runtime's task-start events), for sources that have them.
    /// Asked once, on the proxy's runtime; the periodic reconcile stays as
    /// the fallback, so a lost wake-up only delays a pod.
    fn changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<()>> {
        None
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodsFile {
    #[serde(default)]
    pods: Vec<Pod>,
}

/// Pods listed in a YAML file (`pods: [{name, namespace, labels, netns, ip}]`).
#[derive(Debug, Clone)]
pub struct FilePodSource {
    path: PathBuf,
}

impl FilePodSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Vec<Pod>, Error> {
        let file: PodsFile = serde_yaml::from_str(text).map_err(|e| Error::Pods {
            path: origin.display().to_string(),
            message: e.to_string(),
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for pod in &file.pods {
            if !seen.insert(pod.key()) {
                return Err(Error::Pods {
                    path: origin.display().to_string(),
                    message: format!("pod {} is listed twice", pod.key()),
                });
            }
        }
        Ok(file.pods)
    }
}

impl PodSource for FilePodSource {
    fn pods(&self) -> Result<Vec<Pod>, Error> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| Error::Pods {
            path: self.path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &self.path)
    }
}

/// Pods held in memory, set by the embedding program (tests, benches).
#[derive(Debug, Default)]
pub struct MemoryPodSource {
    pods: Mutex<Vec<Pod>>,
}

impl MemoryPodSource {
    pub fn new(pods: Vec<Pod>) -> Self {
        Self {
            pods: Mutex::new(pods),
        }
    }

    pub fn set(&self, pods: Vec<Pod>) {
        *self.pods.lock().expect("pod list poisoned") = pods;
    }
}

impl PodSource for MemoryPodSource {
    fn pods(&self) -> Result<Vec<Pod>, Error> {
        Ok(self.pods.lock().expect("pod list poisoned").clone())
    }
}
