//! What the agent keeps of each Kubernetes object: the few fields the mesh
//! model needs, so a node's memory does not grow with the size of the
//! cluster's full object specs.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::ResourceExt;

use crate::config::MESH_LABEL;

/// Pod label that names the version (the subset of `splits`).
pub const VERSION_LABEL: &str = "version";
/// Pod annotation: `strict` or `permissive` (the workload's mode).
pub const MODE_ANNOTATION: &str = "mesh-agent.io/mode";
/// Service annotations for the balancer.
pub const POLICY_ANNOTATION: &str = "mesh-agent.io/lb-policy";
pub const LOCALITY_ANNOTATION: &str = "mesh-agent.io/locality";
/// `v1=90,v2=10`: shares of new connections per version.
pub const SPLITS_ANNOTATION: &str = "mesh-agent.io/splits";
/// `rate=100,burst=50,concurrent=20`: limits per client (a Service's
/// `resilience.quota`, or on a pod the workload's `quota`).
pub const QUOTA_ANNOTATION: &str = "mesh-agent.io/quota";
/// `refuse=10,delay=20:300,cut=5:65536`: faults injected (`faults`).
pub const FAULTS_ANNOTATION: &str = "mesh-agent.io/faults";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// `namespace/name`, the key of every namespaced record.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The labels or annotations carry `mesh-agent.io/mesh: <value>`.
fn mesh_mark(map: &BTreeMap<String, String>, value: &str) -> bool {
    map.get(MESH_LABEL).is_some_and(|v| v == value)
}

/// Kubernetes: a port without a protocol is TCP.
fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.unwrap_or("TCP") == "TCP"
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<Ipv4Addr>,
    /// The pod opts in by label (`mesh-agent.io/mesh: enabled`).
    pub opted_in: bool,
    /// The pod opts out by annotation (`mesh-agent.io/mesh: disabled`).
    pub opted_out: bool,
    pub host_network: bool,
    /// Succeeded or Failed: its IP may already belong to another pod.
    pub finished: bool,
    pub version: Option<String>,
    pub mode: Option<String>,
    /// The pod's `mesh-agent.io/quota` annotation.
    pub quota: Option<String>,
    pub qos_class: Option<String>,
    /// Running containers as `(runtime, id)`, e.g. `("containerd", "4f…")`.
    pub containers: Vec<(String, String)>,
}

impl PodRecord {
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<Ipv4Addr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref())
            && let Ok(ip) = ip.parse()
        {
            ips.push(ip);
        }
        let phase = status.and_then(|s| s.phase.as_deref());
        let containers = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.container_id.as_deref())
            .filter_map(|id| id.split_once("://"))
            .map(|(runtime, id)| (runtime.to_owned(), id.to_owned()))
            .collect();
        Self {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ips,
            opted_in: mesh_mark(pod.labels(), "enabled"),
            opted_out: mesh_mark(pod.annotations(), "disabled"),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            version: pod.labels().get(VERSION_LABEL).cloned(),
            mode: pod.annotations().get(MODE_ANNOTATION).cloned(),
            quota: pod.annotations().get(QUOTA_ANNOTATION).cloned(),
            qos_class: status.and_then(|s| s.qos_class.clone()),
            containers,
        }
    }
}

impl PodRecord {
    /// Whether the mesh carries this pod: running with an address of its
    /// own, not opted out, and opted in by its label or its namespace's.
    /// The agent's model and the CA service (which signs only meshed
    /// pods' identities) decide it the same way.
    pub fn is_meshed(&self, namespace_opted_in: bool) -> bool {
        !self.host_network
            && !self.finished
            && !self.ips.is_empty()
            && !self.opted_out
            && (self.opted_in || namespace_opted_in)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceRecord {
    pub opted_in: bool,
}

impl NamespaceRecord {
    pub fn from_namespace(namespace: &Namespace) -> Self {
        Self {
            opted_in: mesh_mark(namespace.labels(), "enabled"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub zone: Option<String>,
    /// Its IPv4 `InternalIP` and `ExternalIP` addresses, at most
    /// [`MAX_NODE_ADDRESSES`]: where its agent's HBONE connections come from.
    pub addresses: Vec<Ipv4Addr>,
}

/// More addresses than a node has interfaces are noise, or an attempt to
/// claim other nodes' addresses.
pub const MAX_NODE_ADDRESSES: usize = 16;

impl NodeRecord {
    pub fn from_node(node: &Node) -> Self {
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .take(MAX_NODE_ADDRESSES)
            .collect();
        Self {
            zone: node.labels().get(ZONE_LABEL).cloned(),
            addresses,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved through the EndpointSlices.
    Name(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePortRecord {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    pub namespace: String,
    pub name: String,
    /// None for headless and ExternalName services (nothing to balance).
    pub vip: Option<Ipv4Addr>,
    /// TCP ports only.
    pub ports: Vec<ServicePortRecord>,
    pub annotations: BTreeMap<String, String>,
}

impl ServiceRecord {
    pub fn from_service(service: &Service) -> Self {
        let spec = service.spec.as_ref();
        let vip = spec
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target = match &p.target_port {
                    None => TargetPort::Number(port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
                    Some(IntOrString::String(name)) => TargetPort::Name(name.clone()),
                };
                Some(ServicePortRecord {
                    name: p.name.clone().unwrap_or_default(),
                    port,
                    target,
                })
            })
            .collect();
        let annotations = service
            .annotations()
            .iter()
            .filter(|(k, _)| k.starts_with("mesh-agent.io/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self {
            namespace: service.namespace().unwrap_or_default(),
            name: service.name_any(),
            vip,
            ports,
            annotations,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SliceEndpoint {
    pub ips: Vec<Ipv4Addr>,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// `namespace/name` of the pod behind it.
    pub pod: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SliceRecord {
    /// `namespace/name` of the service it belongs to.
    pub service: String,
    /// Service port name to endpoint port.
    pub ports: BTreeMap<String, u16>,
    /// Ready endpoints only.
    pub endpoints: Vec<SliceEndpoint>,
}

impl SliceRecord {
    /// None for slices that are not IPv4 or belong to no service.
    pub fn from_slice(slice: &EndpointSlice) -> Option<Self> {
        if slice.address_type != "IPv4" {
            return None;
        }
        let namespace = slice.namespace().unwrap_or_default();
        let service = slice.labels().get(SERVICE_NAME_LABEL)?;
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            // Kubernetes: a missing `ready` means ready.
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .map(|e| SliceEndpoint {
                ips: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                node: e.node_name.clone(),
                zone: e.zone.clone(),
                pod: e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        Some(key(
                            r.namespace.as_deref().unwrap_or(&namespace),
                            r.name.as_deref()?,
                        ))
                    }),
            })
            .collect();
        Some(Self {
            service: key(&namespace, service),
            ports,
            endpoints,
        })
    }
}
