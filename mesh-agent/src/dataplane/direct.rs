//! Which pairs of this node's pods may talk without the agent
//! (`proxy.same_node_direct`): the entries of `MESH_DIRECT`.
//!
//! For a connection between two pods of one node the agent does nothing
//! the kernel cannot do ahead of time: it checks the authorization policy
//! (a function of the client's identity and address and the server's
//! workload and port, all known before any connection) and moves bytes.
//! So the policy is evaluated here for every (client address, server
//! address) pair, and the pairs it allows go pod to pod (see the kernel's
//! `direct` module); everything else is captured as before, so a denial
//! is still refused and logged by the agent, and a dry-run denial still
//! logged.
//!
//! A pair's ports come in two kinds: those some rule names, each decided
//! on its own, and every other port, which no rule can tell apart and
//! which is decided once (port 0 in the map).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use mesh_common::{
    DIRECT_ALLOW, DirectEndpoint, DirectEndpointKey, DirectKey, DirectValue, ServiceKey,
    ipv4_to_raw,
};

use crate::{
    authz::{Decision, Request},
    model::{CircuitBreaker, MeshState, Policy, Service},
};

/// The entries `MESH_DIRECT` should hold.
#[derive(Debug, Default, PartialEq)]
pub struct DirectPlan {
    pub entries: HashMap<DirectKey, DirectValue>,
    /// Pairs left to the agent because the map was full.
    pub left_out: usize,
}

impl DirectPlan {
    /// The plan for `state`, given the host-side ifindex of each attached
    /// pod interface (a pod whose interface carries no programs is left
    /// to the agent), holding at most `capacity` entries. When the
    /// entries do not fit, whole pairs are left out (their connections
    /// go through the agent, as with the setting off) and counted.
    pub fn of(state: &MeshState, ifindex: impl Fn(&str) -> Option<u32>, capacity: usize) -> Self {
        let named_ports: BTreeSet<u16> = state
            .authorization
            .rules
            .iter()
            .flat_map(|rule| rule.to.ports.iter().copied())
            .filter(|&port| port != 0)
            .collect();
        let pods: Vec<_> = state
            .local_workloads()
            .filter_map(|(_, workload, local)| Some((workload, ifindex(&local.interface)?)))
            .collect();
        let mut plan = Self::default();
        for &(client, client_ifindex) in &pods {
            let principal = state.identity(client);
            for &(server, server_ifindex) in &pods {
                // A pod calling itself never leaves its namespace; a pod
                // with a quota has its connections counted by the agent.
                if std::ptr::eq(client, server) || server.quota.is_some() {
                    continue;
                }
                for &source_ip in &client.ips {
                    let allowed = |port: u16| {
                        let request = Request {
                            principal: Some(&principal),
                            trust_domain: &state.trust_domain,
                            source_ip,
                            workload_namespace: &server.namespace,
                            workload_name: &server.name,
                            port,
                        };
                        state.authorization.check(&request) == Decision::Allow
                    };
                    // Port 0 is no rule's port: it stands for all the others.
                    let others = allowed(0);
                    let mut pair: Vec<(u16, u32)> = named_ports
                        .iter()
                        .map(|&port| (port, allowed(port)))
                        .filter(|&(_, allow)| allow != others)
                        .map(|(port, allow)| (port, verdict(allow)))
                        .collect();
                    if others {
                        pair.push((0, DIRECT_ALLOW));
                    } else {
                        // Absent means "through the agent": the denied
                        // ports need no entries.
                        pair.retain(|&(_, v)| v == DIRECT_ALLOW);
                    }
                    if pair.is_empty() {
                        continue;
                    }
                    for &server_ip in &server.ips {
                        if plan.entries.len() + pair.len() > capacity {
                            plan.left_out += 1;
                            continue;
                        }
                        for &(port, verdict) in &pair {
                            let key = DirectKey {
                                client: ipv4_to_raw(source_ip.octets()),
                                server: ipv4_to_raw(server_ip.octets()),
                                port,
                                pad: 0,
                            };
                            let value = DirectValue {
                                client_ifindex,
                                server_ifindex,
                                verdict,
                            };
                            plan.entries.insert(key, value);
                        }
                    }
                }
            }
        }
        plan
    }
}

/// The services `mesh_connect4` balances at connect time: those whose
/// endpoints all run on this node behind interfaces with the programs,
/// and that ask for nothing the kernel cannot give. Everything else keeps
/// the agent's balancer.
#[derive(Debug, Default, PartialEq)]
pub struct DirectServices {
    /// VIP:port -> number of endpoints.
    pub services: HashMap<ServiceKey, u32>,
    pub endpoints: HashMap<DirectEndpointKey, DirectEndpoint>,
}

impl DirectServices {
    /// `attached`: addresses of this node's pods whose interfaces carry
    /// the programs. At most `capacity` (services, endpoints) entries.
    pub fn of(state: &MeshState, attached: &HashSet<Ipv4Addr>, capacity: (usize, usize)) -> Self {
        let mut plan = Self::default();
        for service in state
            .services
            .iter()
            .filter(|s| kernel_can_balance(s, attached))
        {
            for port in &service.ports {
                let count = service.endpoints.len();
                if plan.services.len() + 1 > capacity.0 || plan.endpoints.len() + count > capacity.1
                {
                    continue;
                }
                let vip = ipv4_to_raw(service.vip.octets());
                for (index, endpoint) in service.endpoints.iter().enumerate() {
                    let key = DirectEndpointKey {
                        vip,
                        port: port.port,
                        index: index as u16,
                    };
                    let value = DirectEndpoint {
                        addr: ipv4_to_raw(endpoint.ip.octets()),
                        port: port.target_port,
                        pad: 0,
                    };
                    plan.endpoints.insert(key, value);
                }
                let key = ServiceKey {
                    addr: vip,
                    port: port.port,
                    pad: 0,
                };
                plan.services.insert(key, count as u32);
            }
        }
        plan
    }
}

/// A uniform pick at connect time does what the agent would: every
/// endpoint here and reachable directly, equal weights, and none of
/// splits, session affinity, health checks, circuit breakers, quotas or
/// injected faults, which only the agent applies (retries and outlier
/// ejection, on by default, are what such a service gives up;
/// docs/performance.md says so).
fn kernel_can_balance(service: &Service, attached: &HashSet<Ipv4Addr>) -> bool {
    let Some(first) = service.endpoints.first() else {
        return false;
    };
    service.splits.is_empty()
        && service.policy != Policy::ConsistentHash
        && service.resilience.health_check.is_none()
        && service.resilience.circuit_breaker == CircuitBreaker::default()
        && service.resilience.quota.is_none()
        && service.faults.is_empty()
        && service.endpoints.len() <= usize::from(u16::MAX)
        && service.endpoints.iter().all(|endpoint| {
            endpoint.local && endpoint.weight == first.weight && attached.contains(&endpoint.ip)
        })
        && first.weight > 0
}

fn verdict(allow: bool) -> u32 {
    if allow { DIRECT_ALLOW } else { 0 }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        authz::Authorization,
        model::{LocalWorkload, Workload, WorkloadMode},
        model::{Quota, Refuse},
    };

    use std::collections::HashSet;

    fn pod(name: &str, ip: [u8; 4], interface: Option<&str>) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            ips: vec![Ipv4Addr::from(ip)],
            node: "n1".into(),
            mode: WorkloadMode::Strict,
            local: interface.map(|interface| LocalWorkload {
                interface: interface.into(),
                cgroup: None,
            }),
            quota: None,
        }
    }

    const A: [u8; 4] = [10, 1, 0, 1];
    const B: [u8; 4] = [10, 1, 0, 2];
    const REMOTE: [u8; 4] = [10, 2, 0, 1];

    fn state(policy: &str) -> MeshState {
        let authorization: Authorization = serde_yaml::from_str(policy).unwrap();
        MeshState::new(
            "n1".into(),
            "td".into(),
            authorization,
            vec![
                pod("a", A, Some("veth-a")),
                pod("b", B, Some("veth-b")),
                pod("remote", REMOTE, None),
            ],
            Vec::new(),
        )
    }

    fn ifindex(name: &str) -> Option<u32> {
        match name {
            "veth-a" => Some(11),
            "veth-b" => Some(12),
            _ => None,
        }
    }

    fn key(client: [u8; 4], server: [u8; 4], port: u16) -> DirectKey {
        DirectKey {
            client: ipv4_to_raw(client),
            server: ipv4_to_raw(server),
            port,
            pad: 0,
        }
    }

    /// What the kernel decides for `client` -> `server:port` (its lookup order).
    fn direct(plan: &DirectPlan, client: [u8; 4], server: [u8; 4], port: u16) -> bool {
        plan.entries
            .get(&key(client, server, port))
            .or_else(|| plan.entries.get(&key(client, server, 0)))
            .is_some_and(|v| v.verdict == DIRECT_ALLOW)
    }

    #[test]
    fn with_no_rules_every_local_pair_goes_direct_both_ways_and_remote_pods_never() {
        let plan = DirectPlan::of(&state("{}"), ifindex, 100);
        assert!(direct(&plan, A, B, 80));
        assert!(direct(&plan, B, A, 9999));
        assert_eq!(plan.entries.len(), 2, "{plan:?}");
        let value = plan.entries[&key(A, B, 0)];
        assert_eq!((value.client_ifindex, value.server_ifindex), (11, 12));
        assert!(!direct(&plan, A, REMOTE, 80));
        assert!(!direct(&plan, A, A, 80));
    }

    #[test]
    fn a_denied_port_stays_with_the_agent_while_the_others_go_direct() {
        let plan = DirectPlan::of(
            &state("rules: [{action: deny, to: {ports: [22]}}]"),
            ifindex,
            100,
        );
        assert!(!direct(&plan, A, B, 22));
        assert!(direct(&plan, A, B, 80));
    }

    #[test]
    fn default_deny_goes_direct_only_where_a_rule_allows() {
        let plan = DirectPlan::of(
            &state(
                "default_action: deny
rules:
  - {action: allow, from: {principals: ['spiffe://td/ns/default/sa/a']}, to: {workloads: [b], ports: [8080]}}",
            ),
            ifindex,
            100,
        );
        assert!(direct(&plan, A, B, 8080));
        assert!(!direct(&plan, A, B, 80));
        assert!(!direct(&plan, B, A, 8080));
        assert_eq!(plan.entries.len(), 1, "{plan:?}");
    }

    #[test]
    fn source_address_rules_and_dry_run_denials_are_honoured() {
        let by_ip = DirectPlan::of(
            &state("rules: [{action: deny, from: {ip_blocks: ['10.1.0.1/32']}}]"),
            ifindex,
            100,
        );
        assert!(!direct(&by_ip, A, B, 80));
        assert!(direct(&by_ip, B, A, 80));
        // A dry-run denial must reach the agent, which logs it.
        let dry = DirectPlan::of(
            &state("dry_run: true\nrules: [{action: deny, to: {workloads: [b]}}]"),
            ifindex,
            100,
        );
        assert!(!direct(&dry, A, B, 80));
        assert!(direct(&dry, B, A, 80));
    }

    #[test]
    fn a_pod_without_programs_on_its_interface_is_left_to_the_agent() {
        let plan = DirectPlan::of(&state("{}"), |name| (name == "veth-a").then_some(11), 100);
        assert!(plan.entries.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_pod_with_a_quota_is_reached_through_the_agent() {
        let mut with_quota = state("{}");
        with_quota.workloads[1].quota = Some(Quota::per_client(None, None, Some(2)));
        let plan = DirectPlan::of(&with_quota, ifindex, 100);
        // b (the quota'd one) may still call a directly; nobody calls b.
        assert!(plan.entries.contains_key(&key(B, A, 0)), "{plan:?}");
        assert!(!plan.entries.contains_key(&key(A, B, 0)), "{plan:?}");
    }

    fn service(endpoints: &[([u8; 4], bool)], tweak: impl FnOnce(&mut Service)) -> MeshState {
        use crate::model::{Endpoint, Faults, Locality, Resilience, ServicePort};
        let mut service = Service {
            name: "web".into(),
            namespace: "default".into(),
            vip: Ipv4Addr::new(10, 96, 0, 1),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints: endpoints
                .iter()
                .map(|&(ip, local)| Endpoint {
                    ip: Ipv4Addr::from(ip),
                    weight: 1,
                    subset: None,
                    node: None,
                    local,
                    zone: None,
                    same_zone: false,
                })
                .collect(),
            policy: Policy::default(),
            locality: Locality::default(),
            splits: Vec::new(),
            resilience: Resilience::default(),
            faults: Faults::default(),
        };
        tweak(&mut service);
        let mut state = state("{}");
        state = MeshState::new(
            state.node_name.clone(),
            state.trust_domain.clone(),
            state.authorization.clone(),
            state.workloads.clone(),
            vec![service],
        );
        state
    }

    fn attached() -> HashSet<Ipv4Addr> {
        [A, B].into_iter().map(Ipv4Addr::from).collect()
    }

    #[test]
    fn a_service_with_every_endpoint_here_is_balanced_at_connect() {
        let plan = DirectServices::of(
            &service(&[(A, true), (B, true)], |_| {}),
            &attached(),
            (10, 10),
        );
        let vip = ipv4_to_raw([10, 96, 0, 1]);
        let key = ServiceKey {
            addr: vip,
            port: 80,
            pad: 0,
        };
        assert_eq!(plan.services.get(&key), Some(&2));
        let second = plan.endpoints[&DirectEndpointKey {
            vip,
            port: 80,
            index: 1,
        }];
        assert_eq!((second.addr, second.port), (ipv4_to_raw(B), 8080));
    }

    #[test]
    fn a_service_that_needs_the_agent_keeps_it() {
        let cases: [(&str, MeshState); 8] = [
            (
                "remote endpoint",
                service(&[(A, true), (REMOTE, false)], |_| {}),
            ),
            (
                "unattached endpoint",
                service(&[(A, true), ([10, 1, 0, 9], true)], |_| {}),
            ),
            (
                "split",
                service(&[(A, true)], |s| {
                    s.splits = vec![crate::model::Split {
                        subset: "v2".into(),
                        weight: 10,
                    }];
                }),
            ),
            (
                "affinity",
                service(&[(A, true)], |s| s.policy = Policy::ConsistentHash),
            ),
            (
                "health check",
                service(&[(A, true)], |s| {
                    s.resilience.health_check = Some(Default::default());
                }),
            ),
            (
                "weights",
                service(&[(A, true), (B, true)], |s| s.endpoints[1].weight = 3),
            ),
            (
                "quota",
                service(&[(A, true)], |s| {
                    s.resilience.quota = Some(Quota::per_client(Some(10), None, None));
                }),
            ),
            (
                "faults",
                service(&[(A, true)], |s| {
                    s.faults.refuse = Some(Refuse { percent: 10 });
                }),
            ),
        ];
        for (why, state) in cases {
            let plan = DirectServices::of(&state, &attached(), (10, 10));
            assert!(plan.services.is_empty(), "{why}: {plan:?}");
        }
        let breaker = service(&[(A, true)], |s| {
            s.resilience.circuit_breaker.max_connections = Some(10);
        });
        assert!(
            DirectServices::of(&breaker, &attached(), (10, 10))
                .services
                .is_empty()
        );
        assert!(
            DirectServices::of(&service(&[], |_| {}), &attached(), (10, 10))
                .services
                .is_empty()
        );
    }

    #[test]
    fn pairs_that_do_not_fit_are_left_out_whole_and_counted() {
        let plan = DirectPlan::of(
            &state("rules: [{action: deny, to: {ports: [22]}}]"),
            ifindex,
            3,
        );
        // Each pair needs two entries (port 0 and port 22): one fits.
        assert_eq!(plan.entries.len(), 2, "{plan:?}");
        assert_eq!(plan.left_out, 1);
    }
}
