//! tc egress on a meshed pod's host-side interface: what the pod receives.
//!
//! Also strict mode. A connection that reaches a pod from this host (the
//! agent, the kubelet) carries its sending socket; one forwarded from
//! elsewhere does not, and did not come through the mesh. To a strict pod
//! such a SYN is dropped; to a permissive one it is let in and counted.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use mesh_common::WORKLOAD_STRICT;

use crate::{counters, maps, packet};

#[classifier]
pub fn mesh_to_pod(ctx: TcContext) -> i32 {
    // SAFETY: reading fields of the context the kernel handed us.
    let (ifindex, from_this_host) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.ifindex, !skb.__bindgen_anon_2.sk.is_null())
    };
    let mut verdict = TC_ACT_OK;
    if let Some(stats) = counters::pod_stats(ifindex) {
        stats.packets_to_pod += 1;
        stats.bytes_to_pod += u64::from(ctx.len());
        if !from_this_host
            && let Some(tcp) = packet::parse_tcp_v4(&ctx)
            && tcp.is_syn()
            && let Some(flags) = maps::workload_flags(tcp.daddr)
        {
            if flags & WORKLOAD_STRICT != 0 {
                stats.plaintext_dropped += 1;
                verdict = TC_ACT_SHOT;
            } else {
                stats.plaintext_in += 1;
            }
        }
    }
    verdict
}
