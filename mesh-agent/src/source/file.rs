//! The config file as a source: `workloads:` and `services:` written out
//! by hand (labs, the demo, nodes without Kubernetes). Workloads without a
//! `node` run on this one; an endpoint's node is its workload's when not
//! given.

use std::net::Ipv4Addr;

use crate::{
    config::Config,
    model::{Endpoint, LocalWorkload, MeshState, Service, ServicePort, Workload},
};

/// The model a validated config file describes.
pub fn mesh_state(config: &Config) -> MeshState {
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
                quota: w.quota.clone(),
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
            faults: s.faults.clone(),
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
    MeshState::new(
        node.name.clone(),
        config.identity.trust_domain.clone(),
        config.authorization.clone(),
        workloads,
        services,
    )
    .with_nodes(
        config
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.addresses.clone()))
            .collect(),
    )
}
