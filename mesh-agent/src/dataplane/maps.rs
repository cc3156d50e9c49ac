//! The agent's handles on the kernel maps, and writing the mesh model into
//! them. Writes are diffs: entries that did not change are left alone, so a
//! reload never opens a window where a live destination is missing.

use std::{collections::HashMap as StdHashMap, net::Ipv4Addr};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use mesh_common::{
    ConnKey, ConnValue, DirectEndpoint, DirectEndpointKey, DirectKey, DirectValue, PodStats,
    ServiceKey, ServiceValue, Settings, WORKLOAD_LOCAL, WORKLOAD_STRICT, WorkloadValue, counter,
    ipv4_from_raw, ipv4_to_raw,
};

use super::direct::DirectServices;
use crate::model::{MeshState, Quota, WorkloadMode};

/// A map was missing from the object or had an unexpected type.
#[derive(Debug, thiserror::Error)]
pub enum KernelMapError {
    #[error("map {0} is missing from the kernel object")]
    Missing(&'static str),
    #[error("opening pinned map {path}: {source}")]
    Pinned {
        path: std::path::PathBuf,
        source: MapError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    /// The model needs more entries than the map holds: nothing was
    /// written, the maps keep the last good model.
    #[error(
        "map {name} would need {wanted} entries and holds {capacity}; raise maps.{setting} (nothing was changed)"
    )]
    Full {
        name: &'static str,
        setting: &'static str,
        wanted: usize,
        capacity: u32,
    },
}

/// How many entries the destination maps hold (`maps:` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub workloads: u32,
}

/// Entries and capacity of one map, for readiness.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Fill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

impl Destinations {
    /// How full the destination maps are once this plan is written.
    pub fn fill(&self, capacity: Capacity) -> [Fill; 2] {
        use mesh_common::maps::{SERVICES, WORKLOADS};
        [
            Fill {
                name: SERVICES,
                entries: self.services.len(),
                capacity: capacity.services,
            },
            Fill {
                name: WORKLOADS,
                entries: self.workloads.len(),
                capacity: capacity.workloads,
            },
        ]
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> KernelMapError {
    move |source| KernelMapError::Map { name, source }
}

pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    workloads: HashMap<MapData, u32, WorkloadValue>,
    pod_stats: PerCpuHashMap<MapData, u32, PodStats>,
    conns: HashMap<MapData, ConnKey, ConnValue>,
    settings: Array<MapData, Settings>,
    counters: PerCpuArray<MapData, u64>,
    if_flags: HashMap<MapData, u32, u32>,
    direct: HashMap<MapData, DirectKey, DirectValue>,
    direct_services: HashMap<MapData, ServiceKey, u32>,
    direct_endpoints: HashMap<MapData, DirectEndpointKey, DirectEndpoint>,
}

impl KernelMaps {
    /// Opens the maps a running (or crashed) agent pinned under `pins`.
    pub fn open_pinned(pins: &super::PinLayout) -> Result<Self, KernelMapError> {
        Self::take(|name| {
            let path = pins.map(name);
            MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .map_err(|source| KernelMapError::Pinned { path, source })
        })
    }

    /// Takes typed handles on the maps, given a way to take each by name.
    pub fn take(
        mut get: impl FnMut(&'static str) -> Result<Map, KernelMapError>,
    ) -> Result<Self, KernelMapError> {
        use mesh_common::maps::*;
        Ok(Self {
            services: HashMap::try_from(get(SERVICES)?).map_err(map_err(SERVICES))?,
            workloads: HashMap::try_from(get(WORKLOADS)?).map_err(map_err(WORKLOADS))?,
            pod_stats: PerCpuHashMap::try_from(get(POD_STATS)?).map_err(map_err(POD_STATS))?,
            conns: HashMap::try_from(get(CONNS)?).map_err(map_err(CONNS))?,
            settings: Array::try_from(get(SETTINGS)?).map_err(map_err(SETTINGS))?,
            counters: PerCpuArray::try_from(get(COUNTERS)?).map_err(map_err(COUNTERS))?,
            if_flags: HashMap::try_from(get(IF_FLAGS)?).map_err(map_err(IF_FLAGS))?,
            direct: HashMap::try_from(get(DIRECT)?).map_err(map_err(DIRECT))?,
            direct_services: HashMap::try_from(get(DIRECT_SERVICES)?)
                .map_err(map_err(DIRECT_SERVICES))?,
            direct_endpoints: HashMap::try_from(get(DIRECT_ENDPOINTS)?)
                .map_err(map_err(DIRECT_ENDPOINTS))?,
        })
    }

    pub fn write_settings(&mut self, settings: Settings) -> Result<(), KernelMapError> {
        use mesh_common::maps::SETTINGS;
        self.settings.set(0, settings, 0).map_err(map_err(SETTINGS))
    }

    /// Makes the service and workload maps say exactly what `plan` says:
    /// all of it or, when a write fails, none of it (the maps keep what
    /// they had).
    pub fn sync_destinations(&mut self, plan: &Destinations) -> Result<(), KernelMapError> {
        use mesh_common::maps::{SERVICES, WORKLOADS};
        let undo_services =
            sync_hash(&mut self.services, &plan.services).map_err(map_err(SERVICES))?;
        if let Err(error) = sync_hash(&mut self.workloads, &plan.workloads) {
            undo_services.apply(&mut self.services);
            return Err(map_err(WORKLOADS)(error));
        }
        Ok(())
    }
}

/// The service and workload map entries a model calls for.
#[derive(Default)]
pub struct Destinations {
    services: StdHashMap<ServiceKey, ServiceValue>,
    workloads: StdHashMap<u32, WorkloadValue>,
}

impl Destinations {
    /// The entries `state` calls for, if the maps can hold them. Nothing
    /// is written: a model too large is refused before the kernel (or an
    /// attachment) is touched.
    pub fn plan(state: &MeshState, capacity: Capacity) -> Result<Self, KernelMapError> {
        use mesh_common::maps::{SERVICES, WORKLOADS};
        let plan = Self::of(state);
        for (name, setting, wanted, capacity) in [
            (SERVICES, "services", plan.services.len(), capacity.services),
            (
                WORKLOADS,
                "workloads",
                plan.workloads.len(),
                capacity.workloads,
            ),
        ] {
            if wanted > capacity as usize {
                return Err(KernelMapError::Full {
                    name,
                    setting,
                    wanted,
                    capacity,
                });
            }
        }
        Ok(plan)
    }

    fn of(state: &MeshState) -> Self {
        let services: StdHashMap<ServiceKey, ServiceValue> = state
            .service_addrs()
            .map(|(addr, id)| {
                let key = ServiceKey {
                    addr: ipv4_to_raw(addr.ip().octets()),
                    port: addr.port(),
                    pad: 0,
                };
                let (quota_interval_ns, quota_tolerance_ns) =
                    syn_quota(state.services[id].resilience.quota.as_ref());
                (
                    key,
                    ServiceValue {
                        service_id: id as u32,
                        flags: 0,
                        quota_interval_ns,
                        quota_tolerance_ns,
                    },
                )
            })
            .collect();
        let workloads: StdHashMap<u32, WorkloadValue> = state
            .workload_addrs()
            .map(|(ip, id, local)| {
                let workload = &state.workloads[id];
                let strict = workload.mode == WorkloadMode::Strict;
                let flags = if local { WORKLOAD_LOCAL } else { 0 }
                    | if strict { WORKLOAD_STRICT } else { 0 };
                // Its quota on plaintext from outside the mesh, which only
                // this node's kernel sees.
                let (quota_interval_ns, quota_tolerance_ns) =
                    syn_quota(workload.quota.as_ref().filter(|_| local));
                (
                    ipv4_to_raw(ip.octets()),
                    WorkloadValue {
                        workload_id: id as u32,
                        flags,
                        quota_interval_ns,
                        quota_tolerance_ns,
                    },
                )
            })
            .collect();
        Self {
            services,
            workloads,
        }
    }
}

impl KernelMaps {
    /// Makes the interface flags say exactly `flags` (host ifindex ->
    /// `WORKLOAD_*` bits of the pod behind it).
    pub fn sync_interface_flags(
        &mut self,
        flags: &StdHashMap<u32, u32>,
    ) -> Result<(), KernelMapError> {
        use mesh_common::maps::IF_FLAGS;
        sync_hash(&mut self.if_flags, flags)
            .map(drop)
            .map_err(map_err(IF_FLAGS))
    }

    /// Makes the same-node direct pairs say exactly what `entries` says.
    pub fn sync_direct(
        &mut self,
        entries: &StdHashMap<DirectKey, DirectValue>,
    ) -> Result<(), KernelMapError> {
        use mesh_common::maps::DIRECT;
        sync_hash(&mut self.direct, entries)
            .map(drop)
            .map_err(map_err(DIRECT))
    }

    /// Makes the services `mesh_connect4` balances say exactly what
    /// `plan` says. Endpoints first: a service entry never names an index
    /// without its endpoint; a service leaving goes before its endpoints.
    pub fn sync_direct_services(&mut self, plan: &DirectServices) -> Result<(), KernelMapError> {
        use mesh_common::maps::{DIRECT_ENDPOINTS, DIRECT_SERVICES};
        let stale: Vec<ServiceKey> = self
            .direct_services
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !plan.services.contains_key(key))
            .collect();
        for key in stale {
            let _ = self.direct_services.remove(&key);
        }
        // A service whose count shrinks: the smaller count first.
        for (key, &count) in &plan.services {
            if self
                .direct_services
                .get(key, 0)
                .is_ok_and(|old| old > count)
            {
                self.direct_services
                    .insert(*key, count, 0)
                    .map_err(map_err(DIRECT_SERVICES))?;
            }
        }
        sync_hash(&mut self.direct_endpoints, &plan.endpoints)
            .map(drop)
            .map_err(map_err(DIRECT_ENDPOINTS))?;
        sync_hash(&mut self.direct_services, &plan.services)
            .map(drop)
            .map_err(map_err(DIRECT_SERVICES))
    }

    /// Entries in the same-node direct map.
    pub fn direct_entries(&self) -> usize {
        self.direct.keys().filter(Result::is_ok).count()
    }

    /// Starts counting for a pod interface (the programs only count
    /// interfaces that have an entry).
    pub fn add_pod_interface(&mut self, ifindex: u32) -> Result<(), KernelMapError> {
        use mesh_common::maps::POD_STATS;
        let cpus =
            aya::util::nr_cpus().map_err(|(_, e)| map_err(POD_STATS)(MapError::IoError(e)))?;
        let zero = PerCpuValues::try_from(vec![PodStats::default(); cpus])
            .map_err(|e| map_err(POD_STATS)(MapError::IoError(e)))?;
        // BPF_NOEXIST: an interface adopted from a previous agent keeps
        // the counts it has.
        match self.pod_stats.insert(ifindex, zero, 1 /* BPF_NOEXIST */) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            result => result.map_err(map_err(POD_STATS)),
        }
    }

    pub fn remove_pod_interface(&mut self, ifindex: u32) {
        let _ = self.pod_stats.remove(&ifindex);
    }

    /// Removes the counters of interfaces not in `keep`: what a previous
    /// agent counted for pods that are gone.
    pub fn retain_pod_interfaces(&mut self, keep: &std::collections::HashSet<u32>) {
        let gone: Vec<u32> = self
            .pod_stats
            .keys()
            .filter_map(Result::ok)
            .filter(|ifindex| !keep.contains(ifindex))
            .collect();
        for ifindex in gone {
            let _ = self.pod_stats.remove(&ifindex);
        }
    }

    /// Per-pod traffic, summed over CPUs, by ifindex.
    pub fn pod_stats(&self) -> Vec<(u32, PodStats)> {
        self.pod_stats
            .iter()
            .filter_map(Result::ok)
            .map(|(ifindex, per_cpu)| {
                let mut total = PodStats::default();
                per_cpu.iter().for_each(|s| total.add(s));
                (ifindex, total)
            })
            .collect()
    }

    /// Program-wide counters, summed over CPUs, with their names.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        (0..counter::LEN)
            .map(|index| {
                let total = self
                    .counters
                    .get(&index, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (counter::NAMES[index as usize], total)
            })
            .collect()
    }

    /// `(map name, entries, capacity)` of the maps that grow with the cluster.
    /// Entries and capacity of the maps that fill up, with the capacity
    /// the kernel says (the destination maps' is set at load).
    pub fn fill_levels(&self, pins: &super::PinLayout) -> Vec<(&'static str, usize, u32)> {
        use mesh_common::maps::{CONNS, POD_STATS, SERVICES, WORKLOADS};
        let capacity = |name: &'static str, compiled: u32| {
            aya::maps::MapInfo::from_pin(pins.map(name))
                .map(|info| info.max_entries())
                .unwrap_or(compiled)
        };
        vec![
            (
                SERVICES,
                self.services.keys().count(),
                capacity(SERVICES, mesh_common::MAX_SERVICES),
            ),
            (
                WORKLOADS,
                self.workloads.keys().count(),
                capacity(WORKLOADS, mesh_common::MAX_WORKLOADS),
            ),
            (
                POD_STATS,
                self.pod_stats.keys().count(),
                capacity(POD_STATS, mesh_common::MAX_POD_INTERFACES),
            ),
            (
                CONNS,
                self.conns.keys().count(),
                capacity(CONNS, mesh_common::MAX_CONNS),
            ),
        ]
    }

    /// The event counters as a JSON object, by name.
    pub fn counters_json(&self) -> serde_json::Value {
        let counters: serde_json::Map<String, serde_json::Value> = self
            .counters()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.into()))
            .collect();
        counters.into()
    }

    /// Every pod interface's counters (see [`pod_json`]).
    pub fn pods_json(&self) -> serde_json::Value {
        self.pod_stats()
            .into_iter()
            .map(|(i, s)| pod_json(i, &s))
            .collect()
    }

    /// Every tracked connection (see [`conn_json`]).
    pub fn conns_json(&self) -> serde_json::Value {
        self.conns()
            .into_iter()
            .map(|(k, v)| conn_json(&k, &v))
            .collect()
    }

    /// Every map's entries, with the raw fields bpftool shows and decoded
    /// addresses beside them.
    pub fn dump(&self) -> serde_json::Value {
        use serde_json::json;
        let services: Vec<_> = self
            .services
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                json!({
                    "key": { "addr": k.addr, "port": k.port, "pad": k.pad, "ip": raw_ip(k.addr).to_string() },
                    "value": {
                        "service_id": v.service_id,
                        "flags": v.flags,
                        "quota_interval_ns": v.quota_interval_ns,
                        "quota_tolerance_ns": v.quota_tolerance_ns,
                    },
                })
            })
            .collect();
        let workloads: Vec<_> = self
            .workloads
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                json!({
                    "key": k, "ip": raw_ip(k).to_string(),
                    "value": {
                        "workload_id": v.workload_id,
                        "flags": v.flags,
                        "quota_interval_ns": v.quota_interval_ns,
                        "quota_tolerance_ns": v.quota_tolerance_ns,
                    },
                })
            })
            .collect();
        let settings = self.settings.get(&0, 0).ok().map(|s| {
            json!({ "outbound_port": s.outbound_port, "inbound_port": s.inbound_port, "mark": s.mark, "mark_mask": s.mark_mask })
        });
        json!({
            mesh_common::maps::SERVICES: services,
            mesh_common::maps::WORKLOADS: workloads,
            mesh_common::maps::POD_STATS: self.pods_json(),
            mesh_common::maps::CONNS: self.conns_json(),
            mesh_common::maps::SETTINGS: settings,
            mesh_common::maps::COUNTERS: self.counters_json(),
        })
    }

    /// Live tracked connections.
    pub fn conns(&self) -> Vec<(ConnKey, ConnValue)> {
        self.conns.iter().filter_map(Result::ok).collect()
    }
}

/// Inserts what is new or changed and removes what is gone.
/// What a sync changed, to put back: each key with the value it had
/// (`None`: it was not there).
struct Undo<K, V>(Vec<(K, Option<V>)>);

impl<K: aya::Pod, V: aya::Pod> Undo<K, V> {
    /// Puts every changed key back as it was, last change first.
    fn apply(self, map: &mut HashMap<MapData, K, V>) {
        for (key, before) in self.0.into_iter().rev() {
            let _ = match before {
                Some(value) => map.insert(key, value, 0),
                None => map.remove(&key),
            };
        }
    }
}

/// Makes `map` hold exactly `want`. On error, what it had changed is
/// put back; on success, the way to put it back is returned.
fn sync_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    want: &StdHashMap<K, V>,
) -> Result<Undo<K, V>, MapError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !want.contains_key(key))
        .collect();
    let mut undo = Undo(Vec::new());
    // Stale entries first: they free the room new ones need, and no wanted
    // key is among them, so no live entry goes missing meanwhile.
    for key in stale {
        let before = map.get(&key, 0).ok();
        if let Err(error) = map.remove(&key) {
            undo.apply(map);
            return Err(error);
        }
        undo.0.push((key, before));
    }
    for (key, value) in want {
        let before = map.get(key, 0).ok();
        if before.as_ref() != Some(value) {
            if let Err(error) = map.insert(*key, *value, 0) {
                undo.apply(map);
                return Err(error);
            }
            undo.0.push((*key, before));
        }
    }
    Ok(undo)
}

/// One pod interface's counters, as `/stats` and `inspect` show them.
pub fn pod_json(ifindex: u32, s: &PodStats) -> serde_json::Value {
    serde_json::json!({
        "ifindex": ifindex,
        "interface": nix::net::if_::if_indextoname(ifindex)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        "packets_from_pod": s.packets_from_pod,
        "bytes_from_pod": s.bytes_from_pod,
        "packets_to_pod": s.packets_to_pod,
        "bytes_to_pod": s.bytes_to_pod,
        "captured": s.captured,
        "plaintext_in": s.plaintext_in,
        "plaintext_dropped": s.plaintext_dropped,
    })
}

/// One tracked connection, raw fields and decoded addresses.
pub fn conn_json(k: &ConnKey, v: &ConnValue) -> serde_json::Value {
    serde_json::json!({
        "local": format!("{}:{}", raw_ip(k.local_addr), k.local_port),
        "remote": format!("{}:{}", raw_ip(k.remote_addr), k.remote_port),
        "local_addr": k.local_addr,
        "remote_addr": k.remote_addr,
        "cookie": v.cookie,
        "established_ns": v.established_ns,
        "workload_id": v.workload_id,
        "direction": v.direction,
    })
}

/// Formats a raw map address.
/// A service quota's rate and bucket as the kernel's GCRA reads them
/// (`mesh-ebpf/src/quota.rs`): the interval between conforming SYNs and
/// how far ahead of it a burst may run; (0, 0) without a rate.
fn syn_quota(quota: Option<&Quota>) -> (u64, u64) {
    let Some((quota, rate)) = quota.and_then(|q| Some((q, q.rate?))) else {
        return (0, 0);
    };
    let interval = 1_000_000_000 / u64::from(rate.max(1));
    let tolerance = interval * u64::from(quota.bucket() - 1);
    (interval.max(1), tolerance)
}

pub fn raw_ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(ipv4_from_raw(raw))
}
