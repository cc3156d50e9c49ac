//! Per-CPU event counters (`MESH_COUNTERS`) and per-pod traffic counters
//! (`MESH_POD_STATS`). Per-CPU values need no atomics; the agent sums them.

use mesh_common::PodStats;

use crate::maps::{MESH_COUNTERS, MESH_POD_STATS};

#[inline(always)]
pub fn bump(index: u32) {
    add(index, 1);
}

#[inline(always)]
pub fn add(index: u32, amount: u64) {
    if let Some(value) = MESH_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *value += amount };
    }
}

/// This CPU's counters for the pod behind `ifindex`. The agent creates the
/// entry when it attaches to the interface, so the map never grows on its own.
#[inline(always)]
pub fn pod_stats(ifindex: u32) -> Option<&'static mut PodStats> {
    // SAFETY: per-CPU value, only this CPU writes it while we run.
    MESH_POD_STATS
        .get_ptr_mut(ifindex)
        .map(|p| unsafe { &mut *p })
}
