//! The `kubernetes:` section: learn workloads, services and endpoints from
//! the API server instead of the file's `workloads:` and `services:`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Label (on a namespace or a pod) that opts pods into the mesh with the
/// value `enabled`; as a pod annotation with the value `disabled`, it opts
/// that pod out.
pub const MESH_LABEL: &str = "mesh-agent.io/mesh";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// API server URL. Default: in-cluster (the pod's service account),
    /// else `KUBECONFIG` / `~/.kube/config`. A plain `http://` URL talks to
    /// the server without credentials (for `kubectl proxy` and tests).
    pub api_server: Option<String>,
    /// Where cgroup v2 is mounted on the node (the agent's view of it). A
    /// hybrid host mounts it at `<cgroup_root>/unified`; both are found.
    pub cgroup_root: PathBuf,
    /// The host's IPv4 routes, to find each pod's host-side interface.
    pub proc_net_route: PathBuf,
    /// The host's interfaces (to tell a bridge from a pod veth).
    pub sys_class_net: PathBuf,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api_server: None,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_net_route: PathBuf::from("/proc/net/route"),
            sys_class_net: PathBuf::from("/sys/class/net"),
        }
    }
}

impl KubernetesConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(url) = &self.api_server
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err((
                "kubernetes.api_server".into(),
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }
        Ok(())
    }
}
