//! The agent's model of the mesh: workloads, services and their endpoints.
//!
//! It does not know where it came from: [`crate::source`] builds it from
//! the config file or from the API server's watches. The proxy and the
//! dataplane only ever read a `MeshState`.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

mod faults;
mod policy;

use serde::Serialize;

pub use self::faults::{Cut, Delay, Faults, Injected, Refuse};
pub use self::policy::{
    CircuitBreaker, HealthCheck, Locality, OutlierDetection, Overall, Policy, Quota, Resilience,
    Retry, Split, WorkloadMode,
};
use crate::{authz::Authorization, identity::SpiffeId};

#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshState {
    pub node_name: String,
    pub trust_domain: String,
    pub authorization: Authorization,
    /// Indexed by workload id (the id the kernel maps carry).
    pub workloads: Vec<Workload>,
    /// Indexed by service id.
    pub services: Vec<Service>,
    /// Other nodes' addresses by node name, as far as the source knows
    /// them: what tells which node an HBONE peer is.
    pub nodes: BTreeMap<String, Vec<Ipv4Addr>>,
    /// (namespace, service account) of workloads about to run here
    /// (scheduled, not yet in the kernel): certificates fetched ahead, so
    /// their first connection does not wait for the CA.
    pub upcoming: Vec<(String, String)>,
    #[serde(skip)]
    node_by_ip: HashMap<Ipv4Addr, String>,
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
    /// Limits per client on connections that arrive at the workload
    /// (whichever service they came through, or none).
    pub quota: Option<Quota>,
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
    /// Injected into a share of new connections (testing); none by default.
    pub faults: Faults,
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

/// What the model says of a peer's identity (see [`MeshState::peer_may_be`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCheck<'a> {
    /// A workload with that identity runs on the peer's node.
    Holds,
    /// The peer's address is no node the model knows: nothing to check.
    NodeUnknown,
    /// The peer is that node, and none of its workloads has the identity.
    NotOnNode(&'a str),
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
            nodes: BTreeMap::new(),
            upcoming: Vec::new(),
            node_by_ip: HashMap::new(),
            workload_by_ip,
            service_by_vip,
        }
    }

    /// The same model, knowing the nodes' addresses. An address claimed
    /// by two nodes names neither.
    pub fn with_nodes(mut self, nodes: BTreeMap<String, Vec<Ipv4Addr>>) -> Self {
        let mut owners: HashMap<Ipv4Addr, Vec<&String>> = HashMap::new();
        for (name, ips) in &nodes {
            for ip in ips {
                owners.entry(*ip).or_default().push(name);
            }
        }
        self.node_by_ip = owners
            .into_iter()
            .filter(|(_, names)| names.len() == 1)
            .map(|(ip, names)| (ip, names[0].clone()))
            .collect();
        self.nodes = nodes;
        self
    }

    /// The same model, with workloads about to run here.
    pub fn with_upcoming(mut self, mut upcoming: Vec<(String, String)>) -> Self {
        upcoming.sort();
        upcoming.dedup();
        self.upcoming = upcoming;
        self
    }

    /// The node an address belongs to, when the model knows it.
    pub fn node_at(&self, ip: Ipv4Addr) -> Option<&str> {
        self.node_by_ip.get(&ip).map(String::as_str)
    }

    /// Whether a peer at `peer` may present `identity`: no when the model
    /// knows the peer's node and none of that node's workloads has the
    /// identity (only a node's own workloads' certificates belong there).
    pub fn peer_may_be(&self, peer: Ipv4Addr, identity: &SpiffeId) -> PeerCheck<'_> {
        let Some(node) = self.node_at(peer) else {
            return PeerCheck::NodeUnknown;
        };
        // Field by field: the identity of every workload would be an
        // allocation each, on every inbound HBONE connection.
        let runs_there = identity.trust_domain == self.trust_domain
            && self.workloads.iter().any(|w| {
                w.node == node
                    && w.namespace == identity.namespace
                    && w.service_account == identity.service_account
            });
        if runs_there {
            PeerCheck::Holds
        } else {
            PeerCheck::NotOnNode(node)
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

    /// Identities of this node's workloads, running or about to: the
    /// certificates the agent holds.
    pub fn local_identities(&self) -> Vec<SpiffeId> {
        let upcoming = self
            .upcoming
            .iter()
            .map(|(namespace, account)| SpiffeId::new(&self.trust_domain, namespace, account));
        let mut ids: Vec<SpiffeId> = self
            .local_workloads()
            .map(|(_, w, _)| self.identity(w))
            .chain(upcoming)
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Workloads and services are the same as `other`'s.
    pub fn same_mesh(&self, other: &MeshState) -> bool {
        self.workloads == other.workloads
            && self.services == other.services
            && self.authorization == other.authorization
            && self.trust_domain == other.trust_domain
            && self.nodes == other.nodes
            && self.upcoming == other.upcoming
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

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, account: &str, node: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "shop".into(),
            service_account: account.into(),
            ips: Vec::new(),
            node: node.into(),
            mode: WorkloadMode::default(),
            local: None,
            quota: None,
        }
    }

    #[test]
    fn a_peer_may_present_only_identities_of_its_nodes_workloads() {
        let ip = |last| Ipv4Addr::new(192, 168, 0, last);
        let nodes = BTreeMap::from([
            ("n1".to_owned(), vec![ip(1)]),
            ("n2".to_owned(), vec![ip(2), ip(9)]),
            ("n3".to_owned(), vec![ip(9)]),
        ]);
        let state = MeshState::new(
            "n0".into(),
            "cluster.local".into(),
            Authorization::default(),
            vec![
                workload("api-1", "api", "n1"),
                workload("web-1", "web", "n2"),
            ],
            Vec::new(),
        )
        .with_nodes(nodes);
        let id = |account| SpiffeId::new("cluster.local", "shop", account);
        assert_eq!(state.peer_may_be(ip(1), &id("api")), PeerCheck::Holds);
        assert_eq!(state.peer_may_be(ip(2), &id("web")), PeerCheck::Holds);
        assert_eq!(
            state.peer_may_be(ip(1), &id("web")),
            PeerCheck::NotOnNode("n1")
        );
        assert_eq!(
            state.peer_may_be(ip(2), &id("ghost")),
            PeerCheck::NotOnNode("n2")
        );
        // Another trust domain is another identity.
        let elsewhere = SpiffeId::new("elsewhere", "shop", "api");
        assert_eq!(
            state.peer_may_be(ip(1), &elsewhere),
            PeerCheck::NotOnNode("n1")
        );
        // Unknown, or claimed by two nodes: no node to check against.
        assert_eq!(state.peer_may_be(ip(7), &id("api")), PeerCheck::NodeUnknown);
        assert_eq!(state.peer_may_be(ip(9), &id("web")), PeerCheck::NodeUnknown);
    }
}
