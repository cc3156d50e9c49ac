//! Every map the programs share with the agent. Names and value types come
//! from `mesh-common`, so user space opens the same maps by the same names.

use aya_ebpf::{
    btf_maps::{
        Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash, SockMap,
    },
    macros::btf_map,
};
use mesh_common::{
    ConnKey, ConnValue, DIRECT_CLOSED_BYTES, DirectClosed, DirectEndpoint, DirectEndpointKey,
    DirectFlow, DirectKey, DirectValue, MAX_CONNS, MAX_DIRECT, MAX_DIRECT_ENDPOINTS,
    MAX_DIRECT_FLOWS, MAX_DIRECT_SERVICES, MAX_POD_INTERFACES, MAX_QUOTA_CLIENTS, MAX_SERVICES,
    MAX_SPLICED_SOCKETS, MAX_WORKLOADS, PodStats, QuotaKey, ServiceKey, ServiceValue, Settings,
    TcFilterKey, TcFilterValue, WorkloadValue, counter,
};

// BTF map definitions carry the key and value types, so `bpftool map dump`
// prints field names instead of hex.

#[btf_map]
pub static MESH_SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> =
    HashMap::new();

#[btf_map]
pub static MESH_WORKLOADS: HashMap<u32, WorkloadValue, { MAX_WORKLOADS as usize }> = HashMap::new();

#[btf_map]
pub static MESH_POD_STATS: PerCpuHashMap<u32, PodStats, { MAX_POD_INTERFACES as usize }> =
    PerCpuHashMap::new();

#[btf_map]
pub static MESH_CONNS: LruHashMap<ConnKey, ConnValue, { MAX_CONNS as usize }> = LruHashMap::new();

#[btf_map]
pub static MESH_SETTINGS: Array<Settings, 1> = Array::new();

#[btf_map]
pub static MESH_COUNTERS: PerCpuArray<u64, { counter::LEN as usize }> = PerCpuArray::new();

/// Written and read by the agent only (see `mesh_common::maps::TC_FILTERS`);
/// defined here so it is created, pinned and typed like every other map.
#[btf_map]
pub static MESH_TC_FILTERS: HashMap<
    TcFilterKey,
    TcFilterValue,
    { 2 * MAX_POD_INTERFACES as usize },
> = HashMap::new();

#[btf_map]
pub static MESH_SPLICE_TO: SockHash<ConnKey, { MAX_SPLICED_SOCKETS as usize }> = SockHash::new();

#[btf_map]
pub static MESH_SPLICE_ON: SockHash<ConnKey, { MAX_SPLICED_SOCKETS as usize }> = SockHash::new();

/// Bytes `mesh_splice` redirected, by source socket: how the agent knows
/// the kernel has delivered all it took before a connection leaves the
/// fast path.
#[btf_map]
pub static MESH_REDIRECTED: HashMap<ConnKey, u64, { MAX_SPLICED_SOCKETS as usize }> =
    HashMap::new();

/// Same-node pod pairs that talk without the agent (see [`crate::direct`]).
#[btf_map]
pub static MESH_DIRECT: HashMap<DirectKey, DirectValue, { MAX_DIRECT as usize }> = HashMap::new();

/// Both directions of connections admitted pod to pod (see [`crate::direct`]).
#[btf_map]
pub static MESH_DIR_FLOWS: LruHashMap<ConnKey, DirectFlow, { MAX_DIRECT_FLOWS as usize }> =
    LruHashMap::new();

/// Services `mesh_connect4` balances at connect time, with their endpoint
/// count (see [`crate::connect`]).
#[btf_map]
pub static MESH_DIR_SVCS: HashMap<ServiceKey, u32, { MAX_DIRECT_SERVICES as usize }> =
    HashMap::new();

/// Their endpoints, by index.
#[btf_map]
pub static MESH_DIR_EPS: HashMap<
    DirectEndpointKey,
    DirectEndpoint,
    { MAX_DIRECT_ENDPOINTS as usize },
> = HashMap::new();

/// Closed pod-to-pod connections, for the access log (see [`crate::sockops`]).
#[btf_map]
pub static MESH_DIR_CLOSED: RingBuf<DirectClosed, { DIRECT_CLOSED_BYTES as usize }> =
    RingBuf::new();

/// The agent's listening sockets, for `mesh_listener_lookup`.
#[btf_map]
pub static MESH_LISTENERS: SockMap<2> = SockMap::new();

/// Per service and client address, when its next SYN conforms to the
/// service's quota (see [`crate::quota`]).
#[btf_map]
pub static MESH_QUOTA_TAT: LruHashMap<QuotaKey, u64, { MAX_QUOTA_CLIENTS as usize }> =
    LruHashMap::new();

#[btf_map]
pub static MESH_IF_FLAGS: HashMap<u32, u32, { MAX_POD_INTERFACES as usize }> = HashMap::new();

/// The agent's settings, or `None` before the agent has written them.
#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    MESH_SETTINGS.get(0)
}

/// Is `addr:port` a meshed destination (a service VIP:port or a workload)?
#[inline(always)]
pub fn is_meshed_destination(addr: u32, port: u16) -> bool {
    let key = ServiceKey { addr, port, pad: 0 };
    // SAFETY: map lookups return pointers into the map; we only test presence.
    unsafe { MESH_SERVICES.get(key).is_some() || MESH_WORKLOADS.get(addr).is_some() }
}

/// The local workload owning `addr`, if it is meshed and on this node.
#[inline(always)]
pub fn local_workload(addr: u32) -> Option<u32> {
    // SAFETY: the value is copied out before the map can change it.
    let value = unsafe { MESH_WORKLOADS.get(addr) }?;
    (value.flags & mesh_common::WORKLOAD_LOCAL != 0).then_some(value.workload_id)
}

/// The `WORKLOAD_*` flags of the meshed pod behind host interface `ifindex`.
#[inline(always)]
pub fn interface_flags(ifindex: u32) -> Option<u32> {
    // SAFETY: the value is copied out before the map can change it.
    unsafe { MESH_IF_FLAGS.get(ifindex) }.copied()
}

/// A meshed workload address's entry.
#[inline(always)]
pub fn workload(addr: u32) -> Option<WorkloadValue> {
    // SAFETY: the value is copied out before the map can change it.
    unsafe { MESH_WORKLOADS.get(addr) }.copied()
}

/// The `WORKLOAD_*` flags of a meshed workload address.
#[inline(always)]
pub fn workload_flags(addr: u32) -> Option<u32> {
    // SAFETY: the value is copied out before the map can change it.
    unsafe { MESH_WORKLOADS.get(addr) }.map(|value| value.flags)
}
