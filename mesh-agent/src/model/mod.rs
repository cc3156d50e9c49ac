//! The agent's model of the mesh: workloads, services and their endpoints.
//!
//! It does not know where it came from: the config file builds it today
//! ([`MeshState::from_config`]) and a Kubernetes watch can build the same
//! thing. The proxy and the dataplane only ever read a `MeshState`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

mod policy;

use serde::Serialize;

pub use self::policy::{
    CircuitBreaker, HealthCheck, Locality, OutlierDetection, Policy, Resilience, Retry, Split,
    WorkloadMode,
};
use crate::{authz::Authorization, config::Config, identity::SpiffeId};

#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshState {
    pub node_name: String,
    pub trust_domain: String,
    pub authorization: Authorization,
    /// Indexed by workload id (the id the kernel maps carry).
    pub workloads: Vec<Workload>,
    /// Indexed by service id.
    pub services: Vec<Service>,
    #[serde(skip)]
    workload_by_ip: HashMap<Ipv4Addr, usize>,
    #[serde(skip)]
    service_by_vip: HashMap<SocketAddrV4, (usize, usize)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ips: Vec<Ipv4Addr>,
    pub node: String,
    pub mode: WorkloadMode,
    /// Set when the workload runs on this node.
    pub local: Option<LocalWorkload>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalWorkload {
    /// Host-side interface (the pod's veth peer in the node namespace).
    pub interface: String,
    /// Absolute cgroup path, when known.
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    pub policy: Policy,
    pub locality: Locality,
    /// Empty: every endpoint by its weight.
    pub splits: Vec<Split>,
    pub resilience: Resilience,
}

impl Service {
    /// Namespace and name: what keeps a service's balancer state.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub weight: u32,
    /// The subset (version) the endpoint belongs to, for splits.
    pub subset: Option<String>,
    /// The node it runs on, when known.
    pub node: Option<String>,
    /// Runs on this node.
    pub local: bool,
    /// The zone it runs in, when known.
    pub zone: Option<String>,
    /// Runs in this node's zone (both zones known and equal).
    pub same_zone: bool,
}

/// What a captured connection's original destination means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Destination {
    /// A service VIP:port: balance over its endpoints.
    Service { service: usize, port: ServicePort },
    /// A meshed workload's own address.
    Workload(usize),
    /// Nothing we know (the model changed since the kernel captured it).
    Unknown,
}

impl MeshState {
    pub fn new(
        node_name: String,
        trust_domain: String,
        authorization: Authorization,
        workloads: Vec<Workload>,
        services: Vec<Service>,
    ) -> Self {
        let workload_by_ip = workloads
            .iter()
            .enumerate()
            .flat_map(|(id, w)| w.ips.iter().map(move |ip| (*ip, id)))
            .collect();
        let service_by_vip = services
            .iter()
            .enumerate()
            .flat_map(|(id, s)| {
                s.ports.iter().enumerate().map(move |(port_index, p)| {
                    (SocketAddrV4::new(s.vip, p.port), (id, port_index))
                })
            })
            .collect();
        Self {
            node_name,
            trust_domain,
            authorization,
            workloads,
            services,
            workload_by_ip,
            service_by_vip,
        }
    }

    /// The SPIFFE ID of a workload.
    pub fn identity(&self, workload: &Workload) -> SpiffeId {
        SpiffeId::new(
            &self.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
    }

    /// Identities of this node's workloads: the certificates the agent holds.
    pub fn local_identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self
            .local_workloads()
            .map(|(_, w, _)| self.identity(w))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The model of workloads and services learnt elsewhere (the API
    /// server), with the node and policy from `config`.
    pub fn from_parts(config: &Config, workloads: Vec<Workload>, services: Vec<Service>) -> Self {
        Self::new(
            config.node.name.clone(),
            config.identity.trust_domain.clone(),
            config.authorization.clone(),
            workloads,
            services,
        )
    }

    /// Workloads and services are the same as `other`'s.
    pub fn same_mesh(&self, other: &MeshState) -> bool {
        self.workloads == other.workloads
            && self.services == other.services
            && self.authorization == other.authorization
            && self.trust_domain == other.trust_domain
    }

    /// Builds the model from a validated config file.
    pub fn from_config(config: &Config) -> Self {
        let node = &config.node;
        let workloads = config
            .workloads
            .iter()
            .map(|w| {
                let on_node = w.node.clone().unwrap_or_else(|| node.name.clone());
                let local = (on_node == node.name).then(|| LocalWorkload {
                    interface: w.interface.clone().unwrap_or_default(),
                    cgroup: w.cgroup.as_ref().map(|c| match &node.cgroup {
                        Some(root) if c.is_relative() => root.join(c),
                        _ => c.clone(),
                    }),
                });
                Workload {
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    ips: w.ips.clone(),
                    node: on_node,
                    mode: w.mode,
                    local,
                }
            })
            .collect();
        let node_of = |ip: Ipv4Addr| {
            config
                .workloads
                .iter()
                .find(|w| w.ips.contains(&ip))
                .map(|w| w.node.clone().unwrap_or_else(|| node.name.clone()))
        };
        let services = config
            .services
            .iter()
            .map(|s| Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                vip: s.vip,
                policy: s.policy,
                locality: s.locality,
                splits: s.splits.clone(),
                resilience: s.resilience.clone(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        port: p.port,
                        target_port: p.target(),
                    })
                    .collect(),
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let on_node = e.node.clone().or_else(|| node_of(e.ip));
                        Endpoint {
                            ip: e.ip,
                            weight: e.weight,
                            subset: e.subset.clone(),
                            local: on_node.as_deref() == Some(node.name.as_str()),
                            node: on_node,
                            same_zone: e.zone.is_some() && e.zone == node.zone,
                            zone: e.zone.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        Self::new(
            node.name.clone(),
            config.identity.trust_domain.clone(),
            config.authorization.clone(),
            workloads,
            services,
        )
    }

    pub fn destination(&self, addr: SocketAddrV4) -> Destination {
        if let Some(&(service, port_index)) = self.service_by_vip.get(&addr) {
            return Destination::Service {
                service,
                port: self.services[service].ports[port_index],
            };
        }
        match self.workload_by_ip.get(addr.ip()) {
            Some(&id) => Destination::Workload(id),
            None => Destination::Unknown,
        }
    }

    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<(usize, &Workload)> {
        let id = *self.workload_by_ip.get(&ip)?;
        Some((id, &self.workloads[id]))
    }

    /// Every service VIP:port with its service id.
    pub fn service_addrs(&self) -> impl Iterator<Item = (SocketAddrV4, usize)> + '_ {
        self.service_by_vip
            .iter()
            .map(|(addr, (id, _))| (*addr, *id))
    }

    /// Every workload IP with its workload id and whether it runs here.
    pub fn workload_addrs(&self) -> impl Iterator<Item = (Ipv4Addr, usize, bool)> + '_ {
        self.workload_by_ip
            .iter()
            .map(|(ip, id)| (*ip, *id, self.workloads[*id].local.is_some()))
    }

    /// Workloads running on this node.
    pub fn local_workloads(&self) -> impl Iterator<Item = (usize, &Workload, &LocalWorkload)> {
        self.workloads
            .iter()
            .enumerate()
            .filter_map(|(id, w)| w.local.as_ref().map(|local| (id, w, local)))
    }
}
