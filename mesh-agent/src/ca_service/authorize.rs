//! Who may have which identity signed, decided from what the API server
//! says (a TokenReview of the caller's token, the pods of the asked-for
//! identity) without calling it: the caller must be a node agent's
//! ServiceAccount, its token bound to a pod (which names the caller's
//! node), and the identity must belong to a meshed pod scheduled on that
//! same node. A stolen node credential thus mints only the identities
//! already running on that node, as with istiod's node authorizer.

use k8s_openapi::api::authentication::v1::TokenReviewStatus;

use super::csr::CsrError;
use crate::{identity::SpiffeId, source::kubernetes::records::PodRecord};

/// TokenReview `extra` keys of a pod-bound ServiceAccount token.
pub const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The pod its token is bound to: `(name, uid)`.
    pub pod: Option<(String, String)>,
    /// The node named in the token (Kubernetes 1.32+ adds it to pod-bound
    /// tokens), checked against the pod's.
    pub node: Option<String>,
}

impl Caller {
    /// `namespace/name`, as the trusted node accounts are written.
    pub fn account(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

/// Why a request was refused. [`Refusal::reason`] labels the metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token in the request")]
    NoToken,
    #[error("the token is not accepted: {0}")]
    Unauthenticated(String),
    #[error("{0} is not a node agent's ServiceAccount")]
    NotANodeAgent(String),
    #[error("the token of {0} is not bound to a pod, so its node is unknown")]
    NotBoundToAPod(String),
    #[error("the caller's pod {0}: {1}")]
    CallerPod(String, String),
    #[error("no ImpersonatedIdentity in the request's metadata")]
    NoIdentity,
    #[error("identity {0:?}: {1}")]
    BadIdentity(String, String),
    #[error("no pod with identity {identity} is scheduled on node {node}")]
    NotOnNode { identity: String, node: String },
    #[error("no pod with identity {identity} on node {node} is meshed")]
    NotMeshed { identity: String, node: String },
    #[error(transparent)]
    Csr(#[from] CsrError),
}

impl Refusal {
    /// A short, fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken | Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::NotANodeAgent(_) => "not_a_node_agent",
            Refusal::NotBoundToAPod(_) | Refusal::CallerPod(..) => "caller_node_unknown",
            Refusal::NoIdentity | Refusal::BadIdentity(..) => "bad_identity",
            Refusal::NotOnNode { .. } => "not_on_callers_node",
            Refusal::NotMeshed { .. } => "not_meshed",
            Refusal::Csr(_) => "bad_csr",
        }
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Refusal::NoToken | Refusal::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Refusal::NoIdentity | Refusal::BadIdentity(..) | Refusal::Csr(_) => {
                tonic::Code::InvalidArgument
            }
            _ => tonic::Code::PermissionDenied,
        }
    }
}

/// The caller a TokenReview (made with `audience`) authenticated.
pub fn caller(status: &TokenReviewStatus, audience: &str) -> Result<Caller, Refusal> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".into());
        return Err(Refusal::Unauthenticated(why));
    }
    // The API server checks the audience itself; a reviewer that ignored
    // the requested audience answers without it.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|audiences| audiences.iter().any(|a| a == audience))
    {
        return Err(Refusal::Unauthenticated(format!(
            "not a token for {audience}"
        )));
    }
    let user = status.user.as_ref();
    let name = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    let Some((namespace, service_account)) = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(Refusal::Unauthenticated(format!(
            "{name:?} is not a ServiceAccount"
        )));
    };
    let extra = |key: &str| -> Option<String> { user?.extra.as_ref()?.get(key)?.first().cloned() };
    let pod = extra(POD_NAME).zip(extra(POD_UID));
    Ok(Caller {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod,
        node: extra(NODE_NAME),
    })
}

/// The caller is one of `node_accounts` (`namespace/name`).
pub fn node_agent(caller: &Caller, node_accounts: &[String]) -> Result<(), Refusal> {
    let account = caller.account();
    if node_accounts.contains(&account) {
        Ok(())
    } else {
        Err(Refusal::NotANodeAgent(account))
    }
}

/// The caller's node, from the pod its token is bound to (`pod`, as the
/// API server has it now; `None` when it is gone).
pub fn caller_node(caller: &Caller, pod: Option<&PodRecord>) -> Result<String, Refusal> {
    let Some((name, uid)) = &caller.pod else {
        return Err(Refusal::NotBoundToAPod(caller.account()));
    };
    let key = format!("{}/{name}", caller.namespace);
    let pod = pod.ok_or_else(|| Refusal::CallerPod(key.clone(), "not found".into()))?;
    if pod.uid != *uid {
        return Err(Refusal::CallerPod(key, "replaced by another pod".into()));
    }
    if pod.node.is_empty() {
        return Err(Refusal::CallerPod(key, "not scheduled".into()));
    }
    if let Some(node) = &caller.node
        && *node != pod.node
    {
        return Err(Refusal::CallerPod(
            key,
            format!("the token names node {node}, the pod runs on {}", pod.node),
        ));
    }
    Ok(pod.node.clone())
}

/// The identity asked for: a SPIFFE ID in `trust_domain`.
pub fn requested(impersonated: Option<&str>, trust_domain: &str) -> Result<SpiffeId, Refusal> {
    let text = impersonated.ok_or(Refusal::NoIdentity)?;
    let id: SpiffeId = text.parse().map_err(|e: crate::identity::IdentityError| {
        Refusal::BadIdentity(text.into(), e.to_string())
    })?;
    if id.trust_domain != trust_domain {
        return Err(Refusal::BadIdentity(
            text.into(),
            format!("trust domain is not {trust_domain}"),
        ));
    }
    Ok(id)
}

/// Some pod of `pods` (the identity's namespace, with whether that
/// namespace opts in) runs as `id` on `node` and is meshed.
pub fn on_node(
    id: &SpiffeId,
    node: &str,
    pods: &[PodRecord],
    namespace_opted_in: bool,
) -> Result<(), Refusal> {
    let mut here = pods
        .iter()
        .filter(|p| p.namespace == id.namespace && p.service_account == id.service_account)
        .filter(|p| p.node == node)
        .peekable();
    if here.peek().is_none() {
        return Err(Refusal::NotOnNode {
            identity: id.to_string(),
            node: node.into(),
        });
    }
    if here.any(|p| p.is_meshed(namespace_opted_in)) {
        Ok(())
    } else {
        Err(Refusal::NotMeshed {
            identity: id.to_string(),
            node: node.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn review(user: &str, extra: &[(&str, &str)], audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    fn pod(name: &str, uid: &str, node: &str, account: &str) -> PodRecord {
        PodRecord {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
            service_account: account.into(),
            node: node.into(),
            ips: vec!["10.1.0.2".parse().unwrap()],
            opted_in: false,
            opted_out: false,
            host_network: false,
            finished: false,
            version: None,
            mode: None,
            quota: None,
            qos_class: None,
            containers: Vec::new(),
        }
    }

    const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

    #[test]
    fn a_pod_bound_node_agent_token_names_its_pod_and_node() {
        let status = review(
            AGENT,
            &[(POD_NAME, "agent-x"), (POD_UID, "u1"), (NODE_NAME, "n1")],
            &["istio-ca"],
        );
        let caller = caller(&status, "istio-ca").unwrap();
        assert_eq!(caller.account(), "mesh-system/mesh-agent");
        assert_eq!(caller.pod, Some(("agent-x".into(), "u1".into())));
        assert_eq!(caller.node.as_deref(), Some("n1"));
        assert!(node_agent(&caller, &["mesh-system/mesh-agent".into()]).is_ok());
        assert_eq!(
            node_agent(&caller, &["kube-system/ztunnel".into()]),
            Err(Refusal::NotANodeAgent("mesh-system/mesh-agent".into()))
        );
        let agent_pod = PodRecord {
            namespace: "mesh-system".into(),
            ..pod("agent-x", "u1", "n1", "mesh-agent")
        };
        assert_eq!(caller_node(&caller, Some(&agent_pod)), Ok("n1".into()));
        // The pod was replaced (a new uid), moved, or is gone.
        let replaced = PodRecord {
            uid: "u2".into(),
            ..agent_pod.clone()
        };
        assert_eq!(
            caller_node(&caller, Some(&replaced)).unwrap_err().reason(),
            "caller_node_unknown"
        );
        let moved = PodRecord {
            node: "n2".into(),
            ..agent_pod
        };
        assert!(
            matches!(caller_node(&caller, Some(&moved)), Err(Refusal::CallerPod(_, m)) if m.contains("names node n1"))
        );
        assert!(caller_node(&caller, None).is_err());
    }

    #[test]
    fn other_tokens_are_refused_with_their_reason() {
        let mut failed = review(AGENT, &[], &[]);
        failed.authenticated = Some(false);
        failed.error = Some("token has expired".into());
        assert_eq!(
            caller(&failed, "istio-ca"),
            Err(Refusal::Unauthenticated("token has expired".into()))
        );
        let elsewhere = review(AGENT, &[], &["https://kubernetes.default.svc"]);
        assert!(
            matches!(caller(&elsewhere, "istio-ca"), Err(Refusal::Unauthenticated(m)) if m.contains("istio-ca"))
        );
        let user = review("alice", &[], &["istio-ca"]);
        assert_eq!(
            caller(&user, "istio-ca").unwrap_err().reason(),
            "unauthenticated"
        );
        let unbound = caller(&review(AGENT, &[], &["istio-ca"]), "istio-ca").unwrap();
        assert_eq!(
            caller_node(&unbound, None).unwrap_err().reason(),
            "caller_node_unknown"
        );
    }

    #[test]
    fn only_meshed_pods_on_the_callers_node_in_the_trust_domain() {
        let id = requested(
            Some("spiffe://cluster.local/ns/shop/sa/api"),
            "cluster.local",
        )
        .unwrap();
        let pods = [pod("a", "1", "n1", "api"), pod("b", "2", "n2", "web")];
        assert_eq!(on_node(&id, "n1", &pods, true), Ok(()));
        assert_eq!(
            on_node(&id, "n2", &pods, true).unwrap_err().reason(),
            "not_on_callers_node"
        );
        assert_eq!(
            on_node(&id, "n1", &pods, false).unwrap_err().reason(),
            "not_meshed"
        );
        let opted_out = [PodRecord {
            opted_out: true,
            ..pod("a", "1", "n1", "api")
        }];
        assert_eq!(
            on_node(&id, "n1", &opted_out, true).unwrap_err().reason(),
            "not_meshed"
        );
        for (asked, reason) in [
            (None, "bad_identity"),
            (Some("spiffe://other.domain/ns/shop/sa/api"), "bad_identity"),
            (Some("spiffe://cluster.local/ns/shop"), "bad_identity"),
        ] {
            assert_eq!(
                requested(asked, "cluster.local").unwrap_err().reason(),
                reason
            );
        }
    }
}
