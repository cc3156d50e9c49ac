//! tc egress on a meshed pod's host-side interface: what the pod receives.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

use crate::counters;

#[classifier]
pub fn mesh_to_pod(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some(stats) = counters::pod_stats(ifindex) {
        stats.packets_to_pod += 1;
        stats.bytes_to_pod += u64::from(ctx.len());
    }
    TC_ACT_OK
}
