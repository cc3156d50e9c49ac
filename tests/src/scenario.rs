//! The scenario most tests start from, and the reading of what its servers
//! answer: one node whose `client` reaches the `echo` service (round robin
//! over backends serving on 8080) through the agent.

use std::net::SocketAddr;

use serde_json::Value;

use crate::topology::Node;

/// The `echo` service's address.
pub const ECHO_VIP: &str = "10.96.0.10:80";

/// A config for `node`: `meshed` pods as workloads, the `echo` service over
/// `backends` (each serving on 8080), then `more_services` (YAML list items
/// under `services:`, possibly empty).
pub fn echo_config(node: &Node, meshed: &[&str], backends: &[&str], more_services: &str) -> String {
    let workloads: String = meshed.iter().map(|pod| node.workload_yaml(pod)).collect();
    let endpoints = backends
        .iter()
        .map(|pod| format!("{{ ip: {} }}", node.pod(pod).ip))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{node_yaml}workloads:\n{workloads}services:
  - name: echo
    vip: {vip}
    policy: round_robin
    ports: [{{ port: 80, target_port: 8080 }}]
    endpoints: [{endpoints}]
{more_services}",
        node_yaml = node.node_yaml(),
        vip = ECHO_VIP.trim_end_matches(":80"),
    )
}

/// `(server name, peer address the server saw)` from a `mesh-pod` report's
/// greeting line, or why there is none.
pub fn try_greeting(report: &Value) -> Result<(String, SocketAddr), String> {
    let text = report["greeting"]
        .as_str()
        .ok_or_else(|| format!("no greeting: {report}"))?;
    let (name, peer) = text
        .split_once(' ')
        .ok_or_else(|| format!("bad greeting {text:?}"))?;
    let peer = peer.parse().map_err(|e| format!("{peer:?}: {e}"))?;
    Ok((name.to_owned(), peer))
}

/// Like [`try_greeting`], for tests: panics with the report.
pub fn greeting(report: &Value) -> (String, SocketAddr) {
    try_greeting(report).unwrap_or_else(|error| panic!("{error}"))
}

/// Which server answered each connection (the greeting starts with its
/// name); a connection that failed fails the test.
pub fn answered_by(reports: &[Value]) -> Vec<String> {
    reports
        .iter()
        .map(|r| {
            assert!(r.get("error").is_none(), "connection failed: {r}");
            r["greeting"]
                .as_str()
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}
