//! Agent authentication by service-account token, as upstream's
//! `--agent-namespace`, `--agent-service-account` and
//! `--authentication-audience`: the agent sends `authorization: Bearer
//! <token>` with its Connect call; the server asks the Kubernetes API
//! (`authentication.k8s.io/v1` TokenReview, audience = ours) whether the
//! token is valid and accepts the agent only if it belongs to
//! `system:serviceaccount:<namespace>:<service account>`.
//!
//! Error texts are upstream's, word for word: an agent (or an operator
//! reading its log) sees the same gRPC status from either server.

use serde_json::{Value, json};

use crate::lease::KubeClient;

/// What the agent puts before its token in the `authorization` metadata.
pub const BEARER_PREFIX: &str = "Bearer ";

const TOKENREVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Why an agent was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("Authentication context was not found in metadata")]
    NoToken,
    #[error("too many ({0}) tokens are received")]
    TooManyTokens(usize),
    #[error("received token does not have \"Bearer \" prefix")]
    NotBearer,
    #[error("Failed to validate authentication token, err:{0}")]
    Review(#[from] ReviewError),
}

/// Why a token did not pass review.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API could not be asked or answered something that is not a
    /// TokenReview: the agent is refused, never let in by default.
    #[error("Failed to authenticate request. err:{0}")]
    Api(String),
    #[error("lookup failed: {0}")]
    StatusError(String),
    #[error("lookup failed: service account jwt not valid")]
    NotAuthenticated,
    #[error("lookup failed: unexpected username format")]
    UsernameFormat,
    #[error("lookup failed: username returned is not a service account")]
    NotServiceAccount,
    #[error("lookup failed: incoming request from {got:?} namespace. Expected {want:?}")]
    Namespace { got: String, want: String },
    #[error("lookup failed: incoming request from {got:?} service account. Expected {want:?}")]
    ServiceAccount { got: String, want: String },
}

impl AuthError {
    /// The `kind` label of the server's bad-input counter for this refusal.
    pub fn metric_kind(&self) -> &'static str {
        match self {
            AuthError::NoToken => "agent_token_missing",
            AuthError::TooManyTokens(_) | AuthError::NotBearer => "agent_token_malformed",
            AuthError::Review(ReviewError::Api(_)) => "agent_token_review_failed",
            AuthError::Review(_) => "agent_token_refused",
        }
    }
}

/// The expected identity and the client that asks the API about tokens.
#[derive(Clone)]
pub struct AgentTokenAuth {
    pub client: KubeClient,
    pub namespace: String,
    pub service_account: String,
    pub audience: String,
}

impl std::fmt::Debug for AgentTokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTokenAuth")
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl AgentTokenAuth {
    /// Checks the values of the agent's `authorization` metadata (every
    /// value given; a value that is not visible ASCII is passed as "").
    /// Returns the service account's username.
    pub async fn authenticate(&self, authorization: &[String]) -> Result<String, AuthError> {
        let value = match authorization {
            [] => return Err(AuthError::NoToken),
            [one] => one,
            many => return Err(AuthError::TooManyTokens(many.len())),
        };
        let token = value
            .strip_prefix(BEARER_PREFIX)
            .ok_or(AuthError::NotBearer)?;
        Ok(self.review(token).await?)
    }

    /// One TokenReview; holds no lock, so a slow API delays only this agent.
    async fn review(&self, token: &str) -> Result<String, ReviewError> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        });
        let (code, answer) = self
            .client
            .request("POST", TOKENREVIEWS_PATH, Some(&body))
            .await
            .map_err(|e| ReviewError::Api(format!("{e:#}")))?;
        if !(200..300).contains(&code) {
            let message = answer["message"].as_str().unwrap_or("no message");
            return Err(ReviewError::Api(format!(
                "the server answered {code}: {message}"
            )));
        }
        check_review(&answer, &self.namespace, &self.service_account)
    }
}

/// Upstream's checks on a TokenReview answer, in its order. Like upstream,
/// `status.audiences` is not compared: the API server already answers
/// `authenticated: false` for a token not issued for the audience asked.
fn check_review(
    answer: &Value,
    namespace: &str,
    service_account: &str,
) -> Result<String, ReviewError> {
    if answer["kind"] != "TokenReview" {
        return Err(ReviewError::Api(format!(
            "the server answered a {} instead of a TokenReview",
            answer["kind"].as_str().unwrap_or("non-object")
        )));
    }
    let status = &answer["status"];
    if let Some(error) = status["error"].as_str().filter(|e| !e.is_empty()) {
        return Err(ReviewError::StatusError(error.to_string()));
    }
    if status["authenticated"] != true {
        return Err(ReviewError::NotAuthenticated);
    }
    let username = status["user"]["username"].as_str().unwrap_or("");
    let parts: Vec<&str> = username.split(':').collect();
    let [system, kind, ns, sa] = parts.as_slice() else {
        return Err(ReviewError::UsernameFormat);
    };
    if *system != "system" || *kind != "serviceaccount" {
        return Err(ReviewError::NotServiceAccount);
    }
    if *ns != namespace {
        return Err(ReviewError::Namespace {
            got: ns.to_string(),
            want: namespace.into(),
        });
    }
    if *sa != service_account {
        return Err(ReviewError::ServiceAccount {
            got: sa.to_string(),
            want: service_account.into(),
        });
    }
    Ok(username.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: Value) -> Value {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})
    }

    #[test]
    fn review_answers_are_checked_like_upstream() {
        let ok = answer(json!({"authenticated": true,
            "user": {"username": "system:serviceaccount:kube-system:konnectivity-agent"}}));
        assert_eq!(
            check_review(&ok, "kube-system", "konnectivity-agent").unwrap(),
            "system:serviceaccount:kube-system:konnectivity-agent"
        );
        let cases = [
            (
                answer(json!({"authenticated": false})),
                "service account jwt not valid",
            ),
            (answer(json!({})), "service account jwt not valid"),
            (
                answer(json!({"authenticated": "true"})),
                "service account jwt not valid",
            ),
            (
                answer(json!({"authenticated": true, "error": "token expired"})),
                "lookup failed: token expired",
            ),
            (
                answer(json!({"authenticated": true, "user": {"username": "alice"}})),
                "unexpected username format",
            ),
            (
                answer(
                    json!({"authenticated": true, "user": {"username": "system:node:kube-system:x"}}),
                ),
                "not a service account",
            ),
            (
                answer(json!({"authenticated": true,
                    "user": {"username": "system:serviceaccount:default:konnectivity-agent"}})),
                "incoming request from \"default\" namespace. Expected \"kube-system\"",
            ),
            (
                answer(json!({"authenticated": true,
                    "user": {"username": "system:serviceaccount:kube-system:other"}})),
                "incoming request from \"other\" service account. Expected \"konnectivity-agent\"",
            ),
            (
                json!({"kind": "Status", "status": "Failure"}),
                "instead of a TokenReview",
            ),
            (json!("garbage"), "instead of a TokenReview"),
        ];
        for (a, want) in cases {
            let e = check_review(&a, "kube-system", "konnectivity-agent")
                .expect_err(&a.to_string())
                .to_string();
            assert!(e.contains(want), "{a}: {e}");
        }
    }
}
