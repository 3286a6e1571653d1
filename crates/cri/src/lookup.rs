//! Container id, unique prefix, pod sandbox id or `pod:NAMESPACE/NAME` ->
//! the pod sandbox and its network namespace.

use std::path::PathBuf;

use serde::Serialize;

use crate::{ContainerRecord, CriClient, CriError, PodRecord, PodState, RuntimeEndpoint};

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// A container id, a pod sandbox id, or a unique prefix of either.
    Id(String),
    /// `pod:NAMESPACE/NAME`.
    Pod { namespace: String, name: String },
}

impl Query {
    pub fn parse(value: &str) -> Result<Self, CriError> {
        let value = value.trim();
        if let Some(rest) = value.strip_prefix("pod:") {
            let (namespace, name) = rest
                .split_once('/')
                .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
                .ok_or_else(|| {
                    CriError::InvalidQuery(format!("`{value}` is not pod:NAMESPACE/NAME"))
                })?;
            return Ok(Query::Pod {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        }
        if value.is_empty() {
            return Err(CriError::InvalidQuery(
                "empty container id: give a container id, a unique prefix of one, or pod:NAMESPACE/NAME"
                    .into(),
            ));
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(CriError::InvalidQuery(format!(
                "`{value}` is not a container id (letters, digits, - _ .) or pod:NAMESPACE/NAME"
            )));
        }
        Ok(Query::Id(value.to_owned()))
    }
}

/// The answer to a lookup: the container asked for (if a container was
/// named) and its pod sandbox with the network details.
#[derive(Debug, Clone, Serialize)]
pub struct LookupRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRecord>,
    pub pod: PodRecord,
}

impl LookupRecord {
    /// The network namespace policies go into; an error when the pod has none.
    pub fn netns(&self) -> Result<PathBuf, CriError> {
        match (&self.pod.netns, self.pod.state) {
            (Some(path), PodState::Ready) => Ok(path.clone()),
            (_, PodState::NotReady) => Err(CriError::NoNetns {
                pod: self.pod.full_name(),
                reason: "the pod sandbox is not ready (stopped)".into(),
            }),
            (None, _) => Err(CriError::NoNetns {
                pod: self.pod.full_name(),
                reason: "the runtime reports none (host network?)".into(),
            }),
        }
    }
}

/// Resolves `query` against the runtime. Ids and prefixes match container
/// ids first-class and pod sandbox ids too; a prefix matching several
/// objects is refused with the candidates named.
pub async fn lookup(client: &mut CriClient, query: &Query) -> Result<LookupRecord, CriError> {
    match query {
        Query::Pod { namespace, name } => {
            let pods = client.list_pods().await?;
            let mut same: Vec<_> = pods
                .iter()
                .filter(|p| &p.namespace == namespace && &p.name == name)
                .collect();
            // A restarted pod leaves stopped sandboxes behind: the ready one wins.
            if same.iter().any(|p| p.state == PodState::Ready) {
                same.retain(|p| p.state == PodState::Ready);
            }
            let shown = format!("pod:{namespace}/{name}");
            match same.as_slice() {
                [] => Err(CriError::NotFound(shown)),
                [one] => Ok(LookupRecord {
                    container: None,
                    pod: client.pod(&one.id).await?,
                }),
                many => Err(CriError::Ambiguous {
                    query: shown,
                    candidates: many
                        .iter()
                        .map(|p| format!("pod sandbox {}", p.id))
                        .collect(),
                }),
            }
        }
        Query::Id(prefix) => {
            let containers = client.list_containers().await?;
            let pods = client.list_pods().await?;
            // An exact id wins over longer ids it happens to prefix.
            let exact_c = containers.iter().find(|c| &c.id == prefix);
            let exact_p = pods.iter().find(|p| &p.id == prefix);
            let (mc, mp): (Vec<_>, Vec<_>) = match (exact_c, exact_p) {
                (Some(c), _) => (vec![c], vec![]),
                (None, Some(p)) => (vec![], vec![p]),
                (None, None) => (
                    containers
                        .iter()
                        .filter(|c| c.id.starts_with(prefix.as_str()))
                        .collect(),
                    pods.iter()
                        .filter(|p| p.id.starts_with(prefix.as_str()))
                        .collect(),
                ),
            };
            match (mc.as_slice(), mp.as_slice()) {
                ([], []) => Err(CriError::NotFound(prefix.clone())),
                ([c], []) => Ok(LookupRecord {
                    container: Some((*c).clone()),
                    pod: client.pod(&c.pod_sandbox_id).await?,
                }),
                ([], [p]) => Ok(LookupRecord {
                    container: None,
                    pod: client.pod(&p.id).await?,
                }),
                (cs, ps) => {
                    Err(CriError::Ambiguous {
                        query: prefix.clone(),
                        candidates: cs
                            .iter()
                            .map(|c| format!("container {} ({})", c.id, c.name))
                            .chain(ps.iter().map(|p| {
                                format!("pod sandbox {} ({}/{})", p.id, p.namespace, p.name)
                            }))
                            .collect(),
                    })
                }
            }
        }
    }
}

/// Blocking convenience for callers without a tokio runtime (the CLI's
/// TARGET fallback): connects, looks `query` up and returns the record.
pub fn lookup_blocking(endpoint: &RuntimeEndpoint, query: &str) -> Result<LookupRecord, CriError> {
    let query = Query::parse(query)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CriError::Connect {
            path: endpoint.socket().to_path_buf(),
            reason: format!("starting an async runtime: {e}"),
        })?;
    rt.block_on(async {
        let mut client = CriClient::connect(endpoint).await?;
        lookup(&mut client, &query).await
    })
}

/// A TARGET that is a container id (or unique prefix) or `pod:NS/NAME` ->
/// the pod's network namespace path. `endpoint` is the `--runtime-endpoint`
/// flag if given (else `CONTAINER_RUNTIME_ENDPOINT`, else containerd's
/// default socket).
pub fn resolve_target(target: &str, endpoint: Option<&str>) -> Result<PathBuf, CriError> {
    let endpoint = RuntimeEndpoint::resolve(endpoint)?;
    lookup_blocking(&endpoint, target)?.netns()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_or_name_the_problem() {
        assert_eq!(Query::parse("abc123").unwrap(), Query::Id("abc123".into()));
        assert_eq!(
            Query::parse("pod:default/web").unwrap(),
            Query::Pod {
                namespace: "default".into(),
                name: "web".into()
            }
        );
        for bad in [
            "",
            "pod:",
            "pod:ns",
            "pod:/x",
            "pod:ns/",
            "pod:a/b/c",
            "a b",
            "x/y",
        ] {
            assert!(
                matches!(Query::parse(bad), Err(CriError::InvalidQuery(_))),
                "{bad} accepted"
            );
        }
    }
}
