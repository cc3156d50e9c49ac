//! Cluster records to the mesh model: which pods are meshed (and with which
//! identity), which of them run here and where they are in the kernel, and
//! each Service's VIP, ports and endpoints.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
};

use serde::Serialize;

use super::{
    mapping::{self, KubepodsRoot, MappingError, Route},
    records::{
        FAULTS_ANNOTATION, LOCALITY_ANNOTATION, MODE_ANNOTATION, POLICY_ANNOTATION, PodRecord,
        QUOTA_ANNOTATION, SPLITS_ANNOTATION, ServiceRecord, SliceRecord, TargetPort,
    },
    store::ClusterState,
};
use crate::config;
use crate::model::{
    Cut, Delay, Endpoint, Faults, LocalWorkload, Overall, Quota, Refuse, Resilience, Service,
    ServicePort, Split, Workload, WorkloadMode,
};

/// What the node offers for mapping pods to the kernel, read once per build.
pub struct NodeView {
    pub name: String,
    pub kubepods: Result<KubepodsRoot, MappingError>,
    pub routes: Vec<Route>,
    pub sys_class_net: PathBuf,
}

/// A meshed pod on this node that could not be found in the kernel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unmapped {
    pub pod: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Built {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub unmapped: Vec<Unmapped>,
    /// Objects the model could not use as they are (bad annotations, IP
    /// clashes), each naming the object and field.
    pub problems: Vec<String>,
    pub zone: Option<String>,
    /// Every node's addresses by name.
    pub nodes: BTreeMap<String, Vec<Ipv4Addr>>,
    /// (namespace, service account) of meshed pods scheduled here but not
    /// (yet) in the kernel: their certificates are fetched ahead.
    pub upcoming: Vec<(String, String)>,
}

/// Builds workloads and services from what the watches hold.
pub fn build(cluster: &ClusterState, node: &NodeView) -> Built {
    let mut built = Built {
        zone: cluster
            .nodes
            .live
            .get(&node.name)
            .and_then(|n| n.zone.clone()),
        nodes: cluster
            .nodes
            .live
            .iter()
            .filter(|(name, n)| !n.addresses.is_empty() && config::check_name(name).is_ok())
            .map(|(name, n)| (name.clone(), n.addresses.clone()))
            .collect(),
        ..Built::default()
    };
    // The node-local watch is the authority for pods here; the
    // cluster-wide one for the rest.
    let mut pods: BTreeMap<&str, &PodRecord> = cluster
        .pods
        .live
        .iter()
        .filter(|(_, p)| p.node != node.name)
        .map(|(k, p)| (k.as_str(), p))
        .collect();
    pods.extend(cluster.local_pods.live.iter().map(|(k, p)| (k.as_str(), p)));

    let namespace_meshed = |ns: &str| cluster.namespaces.live.get(ns).is_some_and(|n| n.opted_in);
    let mut owner_of_ip: HashMap<Ipv4Addr, &str> = HashMap::new();
    for (pod_key, pod) in &pods {
        if !pod.is_meshed(namespace_meshed(&pod.namespace)) {
            continue;
        }
        // What a buggy or hostile API server could say, which no real one
        // lets through: refused here, with the reason.
        if let Err(problem) = [&pod.namespace, &pod.name, &pod.service_account]
            .into_iter()
            .try_for_each(|name| config::check_name(name))
            .and_then(|()| pod.ips.iter().try_for_each(|ip| config::check_address(*ip)))
        {
            built
                .problems
                .push(format!("pod {pod_key}: {problem}; left out"));
            continue;
        }
        if let Some(clash) = pod.ips.iter().find_map(|ip| owner_of_ip.get(ip)) {
            built.problems.push(format!(
                "pod {pod_key}: an IP of it is also the IP of pod {clash}; left out"
            ));
            continue;
        }
        let local = if pod.node == node.name {
            match map_pod(pod, node) {
                Ok(local) => Some(local),
                Err(reason) => {
                    built
                        .upcoming
                        .push((pod.namespace.clone(), pod.service_account.clone()));
                    built.unmapped.push(Unmapped {
                        pod: pod_key.to_string(),
                        reason,
                    });
                    continue;
                }
            }
        } else {
            None
        };
        let mode: WorkloadMode = parse_annotation(
            pod.mode.as_deref(),
            annotation,
            &format!("pod {pod_key}: annotation {MODE_ANNOTATION}"),
            &mut built.problems,
        );
        let quota = parse_annotation(
            pod.quota.as_deref(),
            parse_quota,
            &format!("pod {pod_key}: annotation {QUOTA_ANNOTATION}"),
            &mut built.problems,
        );
        for ip in &pod.ips {
            owner_of_ip.insert(*ip, pod_key);
        }
        built.workloads.push(Workload {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            ips: pod.ips.clone(),
            node: pod.node.clone(),
            mode,
            local,
            quota,
        });
    }

    // Indexes built once, not per service: endpoints without a targetRef
    // are matched to their pod by IP, and slices to their service.
    let by_ip: HashMap<Ipv4Addr, &PodRecord> = pods
        .values()
        .flat_map(|p| p.ips.iter().map(move |ip| (*ip, *p)))
        .collect();
    let pods = PodIndex {
        by_key: &pods,
        by_ip: &by_ip,
    };
    let mut slices: HashMap<&str, Vec<&SliceRecord>> = HashMap::new();
    for slice in cluster.slices.live.values() {
        slices
            .entry(slice.service.as_str())
            .or_default()
            .push(slice);
    }
    for (service_key, service) in &cluster.services.live {
        let slices = slices
            .get(service_key.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some(service) = build_service(service_key, service, slices, &pods, node, &mut built)
        {
            built.services.push(service);
        }
    }
    built
}

/// The pods behind endpoints, found by `namespace/name` or by IP.
struct PodIndex<'a> {
    by_key: &'a BTreeMap<&'a str, &'a PodRecord>,
    by_ip: &'a HashMap<Ipv4Addr, &'a PodRecord>,
}

fn map_pod(pod: &PodRecord, node: &NodeView) -> Result<LocalWorkload, String> {
    // One interface per pod: every IP of it must route to the same one.
    let mut interface = None;
    for ip in &pod.ips {
        let found = mapping::pod_interface(&node.routes, *ip, &node.sys_class_net)
            .map_err(|e| e.to_string())?;
        match &interface {
            Some(first) if *first != found => {
                return Err(format!(
                    "its IPs route to two interfaces ({first} and {found})"
                ));
            }
            _ => interface = Some(found),
        }
    }
    let kubepods = node.kubepods.as_ref().map_err(ToString::to_string)?;
    let cgroup = mapping::pod_cgroup(
        kubepods,
        &pod.uid,
        pod.qos_class.as_deref(),
        &pod.containers,
    )
    .map_err(|e| e.to_string())?;
    Ok(LocalWorkload {
        interface: interface.expect("a meshed pod has an IP"),
        cgroup: Some(cgroup.path),
    })
}

fn build_service(
    service_key: &str,
    service: &ServiceRecord,
    slices: &[&SliceRecord],
    pods: &PodIndex<'_>,
    node: &NodeView,
    built: &mut Built,
) -> Option<Service> {
    let vip = service.vip?;
    if let Err(problem) = [&service.namespace, &service.name]
        .into_iter()
        .try_for_each(|name| config::check_name(name))
        .and_then(|()| config::check_address(vip))
    {
        built
            .problems
            .push(format!("service {service_key}: {problem}; left out"));
        return None;
    }
    let ports: Vec<ServicePort> = service
        .ports
        .iter()
        .filter_map(|p| {
            // The slices carry the resolved target port under the
            // service port's name, named target ports included.
            let resolved = slices.iter().find_map(|s| s.ports.get(&p.name).copied());
            let target_port = match (&p.target, resolved) {
                (_, Some(port)) => port,
                (TargetPort::Number(port), None) => *port,
                (TargetPort::Name(_), None) => return None,
            };
            Some(ServicePort {
                port: p.port,
                target_port,
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let mut endpoints: Vec<Endpoint> = Vec::new();
    // Several slices may list one address; a set keeps this linear.
    let mut seen = std::collections::HashSet::new();
    for endpoint in slices.iter().flat_map(|s| &s.endpoints) {
        let pod = endpoint
            .pod
            .as_deref()
            .and_then(|k| pods.by_key.get(k).copied())
            .or_else(|| {
                endpoint
                    .ips
                    .first()
                    .and_then(|ip| pods.by_ip.get(ip).copied())
            });
        for ip in &endpoint.ips {
            if let Err(problem) = config::check_address(*ip) {
                built.problems.push(format!(
                    "service {service_key}: endpoint {problem}; left out"
                ));
                continue;
            }
            if !seen.insert(*ip) {
                continue;
            }
            let zone = endpoint.zone.clone();
            endpoints.push(Endpoint {
                ip: *ip,
                weight: 1,
                subset: pod.and_then(|p| p.version.clone()),
                local: endpoint.node.as_deref() == Some(node.name.as_str()),
                node: endpoint.node.clone(),
                same_zone: zone.is_some() && zone == built.zone,
                zone,
            });
        }
    }
    let setting = |name: &str| service.annotations.get(name).map(String::as_str);
    let policy = parse_annotation(
        setting(POLICY_ANNOTATION),
        annotation,
        &format!("service {service_key}: annotation {POLICY_ANNOTATION}"),
        &mut built.problems,
    );
    let locality = parse_annotation(
        setting(LOCALITY_ANNOTATION),
        annotation,
        &format!("service {service_key}: annotation {LOCALITY_ANNOTATION}"),
        &mut built.problems,
    );
    let splits = parse_annotation(
        setting(SPLITS_ANNOTATION),
        parse_splits,
        &format!("service {service_key}: annotation {SPLITS_ANNOTATION}"),
        &mut built.problems,
    );
    let quota = parse_annotation(
        setting(QUOTA_ANNOTATION),
        parse_quota,
        &format!("service {service_key}: annotation {QUOTA_ANNOTATION}"),
        &mut built.problems,
    );
    let faults = parse_annotation(
        setting(FAULTS_ANNOTATION),
        parse_faults,
        &format!("service {service_key}: annotation {FAULTS_ANNOTATION}"),
        &mut built.problems,
    );
    Some(Service {
        name: service.name.clone(),
        namespace: service.namespace.clone(),
        vip,
        ports,
        endpoints,
        policy,
        locality,
        splits,
        resilience: Resilience {
            quota,
            ..Resilience::default()
        },
        faults,
    })
}

/// An annotation's value parsed, or the default when it is absent or bad
/// (then a problem is recorded under `what`).
fn parse_annotation<T: Default>(
    value: Option<&str>,
    parse: impl Fn(&str) -> Result<T, String>,
    what: &str,
    problems: &mut Vec<String>,
) -> T {
    match value.map(parse) {
        None => T::default(),
        Some(Ok(value)) => value,
        Some(Err(message)) => {
            problems.push(format!("{what}: {message}"));
            T::default()
        }
    }
}

/// An annotation value as one of the config's enum values.
fn annotation<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_yaml::from_str(text.trim()).map_err(|e| format!("{text:?}: {e}"))
}

/// `v1=90,v2=10`.
fn parse_splits(text: &str) -> Result<Vec<Split>, String> {
    let splits = text
        .split(',')
        .map(|part| {
            let (subset, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not version=weight"))?;
            let weight = weight
                .trim()
                .parse()
                .map_err(|_| format!("{weight:?} is not a weight"))?;
            Ok(Split {
                subset: subset.trim().to_owned(),
                weight,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if splits.iter().all(|s| s.weight == 0) {
        return Err("at least one weight must be above 0".into());
    }
    Ok(splits)
}

/// `rate=100,burst=50,concurrent=20` (any of them, in any order): the
/// config's `resilience.quota`, with its ranges.
fn parse_quota(text: &str) -> Result<Option<Quota>, String> {
    let mut quota = Quota::per_client(None, None, None);
    let mut overall = Overall::default();
    for part in text.split(',') {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not name=value"))?;
        let value: u32 = value
            .trim()
            .parse()
            .ok()
            .filter(|v| (1..=config::limits::MAX_QUOTA).contains(v))
            .ok_or_else(|| {
                format!(
                    "{value:?} is not a number in 1..={}",
                    config::limits::MAX_QUOTA
                )
            })?;
        let slot = match name.trim() {
            "rate" => &mut quota.rate,
            "burst" => &mut quota.burst,
            "concurrent" => &mut quota.concurrent,
            "overall-rate" => &mut overall.rate,
            "overall-burst" => &mut overall.burst,
            "overall-concurrent" => &mut overall.concurrent,
            other => {
                return Err(format!(
                    "{other:?} is none of rate, burst, concurrent, overall-rate, overall-burst, overall-concurrent"
                ));
            }
        };
        if slot.replace(value).is_some() {
            return Err(format!("{} is given twice", name.trim()));
        }
    }
    if overall != Overall::default() {
        if overall.rate.is_none() && overall.concurrent.is_none() {
            return Err("overall limits need overall-rate or overall-concurrent".into());
        }
        quota.overall = Some(overall);
    }
    if quota.rate.is_none() && quota.concurrent.is_none() && quota.overall.is_none() {
        return Err("needs a rate or a concurrent limit".into());
    }
    Ok(Some(quota))
}

/// `refuse=10,delay=20:300,cut=5:65536` (any of them, in any order):
/// percentages of new connections refused, delayed by so many ms, cut
/// after so many bytes; for every client (the file config's `from`
/// selector has no annotation form).
fn parse_faults(text: &str) -> Result<Faults, String> {
    let mut faults = Faults::default();
    for part in text.split(',') {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not name=value"))?;
        let (percent, argument) = match value.split_once(':') {
            Some((percent, argument)) => (percent, Some(argument.trim())),
            None => (value, None),
        };
        let percent: u32 = percent
            .trim()
            .parse()
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| format!("{percent:?} is not a percentage"))?;
        let number = |what: &str, max: u64| {
            argument
                .and_then(|a| a.parse::<u64>().ok())
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("{name} needs :{what} (1..={max}) after its percentage"))
        };
        let twice = |given: bool| {
            if given {
                Err(format!("{} is given twice", name.trim()))
            } else {
                Ok(())
            }
        };
        match name.trim() {
            "refuse" if argument.is_none() => {
                twice(faults.refuse.is_some())?;
                faults.refuse = Some(Refuse { percent });
            }
            "delay" => {
                twice(faults.delay.is_some())?;
                let ms = number("milliseconds", config::limits::MAX_CONNECT_TIMEOUT_MS)?;
                faults.delay = Some(Delay { percent, ms });
            }
            "cut" => {
                twice(faults.cut.is_some())?;
                let after_bytes = number("bytes", u64::MAX)?;
                faults.cut = Some(Cut {
                    percent,
                    after_bytes,
                });
            }
            other => {
                return Err(format!(
                    "{other:?} is none of refuse=P, delay=P:MS, cut=P:BYTES"
                ));
            }
        }
    }
    Ok(faults)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Locality, Policy};

    #[test]
    fn faults_annotation_parses_and_names_what_is_wrong() {
        let faults = parse_faults("refuse=10, delay=20:300,cut=5:65536").unwrap();
        assert_eq!(faults.refuse, Some(Refuse { percent: 10 }));
        assert_eq!(
            faults.delay,
            Some(Delay {
                percent: 20,
                ms: 300
            })
        );
        assert_eq!(
            faults.cut,
            Some(Cut {
                percent: 5,
                after_bytes: 65536
            })
        );
        assert!(
            parse_faults("refuse=101")
                .unwrap_err()
                .contains("percentage")
        );
        assert!(
            parse_faults("delay=10")
                .unwrap_err()
                .contains(":milliseconds")
        );
        assert!(
            parse_faults("refuse=1,refuse=2")
                .unwrap_err()
                .contains("twice")
        );
        assert!(parse_faults("abort=5").unwrap_err().contains("\"abort\""));
        assert!(parse_faults("refuse=5:3").unwrap_err().contains("none of"));
    }

    #[test]
    fn quota_annotation_parses_and_names_what_is_wrong() {
        assert_eq!(
            parse_quota("rate=100, burst = 50,concurrent=20").unwrap(),
            Some(Quota::per_client(Some(100), Some(50), Some(20)))
        );
        assert!(
            parse_quota("burst=5")
                .unwrap_err()
                .contains("rate or a concurrent")
        );
        assert!(parse_quota("rate=0").unwrap_err().contains("1..="));
        assert!(parse_quota("rate=5,rate=6").unwrap_err().contains("twice"));
        assert!(parse_quota("speed=5").unwrap_err().contains("\"speed\""));
        assert!(parse_quota("100/s").unwrap_err().contains("name=value"));
        let mut overall = Quota::per_client(Some(10), None, None);
        overall.overall = Some(Overall {
            rate: Some(1000),
            burst: None,
            concurrent: Some(500),
        });
        assert_eq!(
            parse_quota("rate=10,overall-rate=1000,overall-concurrent=500").unwrap(),
            Some(overall)
        );
        assert!(
            parse_quota("rate=10,overall-burst=5")
                .unwrap_err()
                .contains("overall-rate or overall-concurrent")
        );
        assert!(parse_quota("overall-concurrent=5").unwrap().is_some());
    }

    #[test]
    fn splits_annotation_parses_and_names_what_is_wrong() {
        let splits = parse_splits("v1=90, v2 = 10").unwrap();
        assert_eq!(
            splits,
            vec![
                Split {
                    subset: "v1".into(),
                    weight: 90
                },
                Split {
                    subset: "v2".into(),
                    weight: 10
                }
            ]
        );
        assert!(parse_splits("v1:90").unwrap_err().contains("\"v1:90\""));
        assert!(parse_splits("v1=x").unwrap_err().contains("\"x\""));
        assert!(parse_splits("v1=0").unwrap_err().contains("above 0"));
    }

    #[test]
    fn enum_annotations_take_the_config_spelling() {
        assert_eq!(annotation::<Policy>("round_robin"), Ok(Policy::RoundRobin));
        assert_eq!(annotation::<Locality>(" strict "), Ok(Locality::Strict));
        assert!(annotation::<WorkloadMode>("lenient").is_err());
    }
}
