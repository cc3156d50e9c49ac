//! A simulated node of a cluster served by the real API server
//! ([`crate::cluster`]): pods created through the API with their sandboxes
//! made on the node, and the agent started as the DaemonSet runs it.

use std::{net::Ipv4Addr, path::Path};

use crate::{
    agent::{Agent, Launch},
    apiserver::objects::{PodSpec, besteffort_cgroup},
    cluster::Cluster,
    manifest,
    topology::Node,
};

/// Starts the agent on `node` as the DaemonSet would (its node name from
/// the environment, one config for every node, the manifest's
/// capabilities and seccomp), on the ServiceAccount token in
/// `kubeconfig`, with `more` appended to its config.
pub fn start_agent(node: &Node, kubeconfig: &Path, more: &str) -> Agent {
    let identity = format!("{{ ca_dir: {} }}", node.ca_dir.display());
    start_agent_with_identity(node, kubeconfig, &identity, more)
}

/// [`start_agent`] with `identity` (YAML) as its identity settings.
pub fn start_agent_with_identity(
    node: &Node,
    kubeconfig: &Path,
    identity: &str,
    more: &str,
) -> Agent {
    let agent = spawn_with_identity(node, kubeconfig, identity, more);
    agent.wait_ready();
    agent
}

/// [`start_agent`] without waiting until the agent is ready (a new agent
/// taking over waits for the API server's first lists).
pub fn spawn_agent(node: &Node, kubeconfig: &Path, more: &str) -> Agent {
    let identity = format!("{{ ca_dir: {} }}", node.ca_dir.display());
    spawn_with_identity(node, kubeconfig, &identity, more)
}

fn spawn_with_identity(node: &Node, kubeconfig: &Path, identity: &str, more: &str) -> Agent {
    let config = format!(
        "node: {{ uplinks: [{}] }}\nidentity: {identity}\nkubernetes: {{ cgroup_root: {} }}\n{more}",
        node.uplinks.join(", "),
        node.cgroup.path().display()
    );
    let kubeconfig = kubeconfig.display().to_string();
    let capabilities = manifest::daemonset_capabilities();
    let capabilities: Vec<&str> = capabilities.iter().map(String::as_str).collect();
    Agent::spawn_with(
        node,
        &config,
        &Launch {
            env: &[
                ("NODE_NAME", node.name.as_str()),
                ("KUBECONFIG", kubeconfig.as_str()),
            ],
            capabilities: Some(&capabilities),
            runtime_default_seccomp: manifest::daemonset_uses_runtime_default_seccomp(),
        },
    )
}

/// Creates pod `name` through the API, bound to `node` and running as
/// `service_account`, makes its sandbox (cgroup named after the server's
/// uid, veth), then writes its status as kubelet would. Returns the uid.
pub fn run_pod(cluster: &Cluster, node: &mut Node, name: &str, service_account: &str) -> String {
    let node_name = node.name.clone();
    let placeholder = PodSpec {
        namespace: "shop",
        name,
        uid: "",
        node: &node_name,
        ip: Ipv4Addr::UNSPECIFIED,
        service_account,
        version: None,
    };
    let uid = cluster.create_pod(&placeholder);
    node.add_pod_in_cgroup(name, &besteffort_cgroup(&uid));
    cluster.pod_running(&PodSpec {
        uid: &uid,
        ip: node.pod(name).ip,
        ..placeholder
    });
    uid
}
