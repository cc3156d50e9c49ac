//! tc egress on a meshed pod's host-side interface: what the pod receives.
//!
//! Also strict mode. A connection that reaches a pod from this host (the
//! agent, the kubelet) carries its sending socket; one forwarded from
//! elsewhere does not, and did not come through the mesh. To a strict pod
//! such a SYN is dropped; to a permissive one it is let in and counted.
//! For a strict pod, forwarded traffic that could hide a SYN is dropped
//! too: TCP fragments whose header cannot be read here (the pod would
//! reassemble them), and everything that is neither IPv4 nor ARP (the
//! mesh carries IPv4 only, so IPv6 would be plaintext around it).
//! A SYN from a pod of this node whose pair the policy allows directly
//! (see [`crate::direct`]) is mesh traffic and passes.
//! Enforcement reads the workload and interface maps only: a pod is
//! strict whether or not its counters exist.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use mesh_common::{PodStats, SETTING_SAME_NODE_DIRECT, WORKLOAD_STRICT, counter};

use crate::{
    counters, direct, maps,
    packet::{self, Frame},
    quota,
};

#[classifier]
pub fn mesh_to_pod(ctx: TcContext) -> i32 {
    // SAFETY: reading fields of the context the kernel handed us.
    let (ifindex, ingress_ifindex, from_this_host) = unsafe {
        let skb = &*ctx.skb.skb;
        (
            skb.ifindex,
            skb.ingress_ifindex,
            !skb.__bindgen_anon_2.sk.is_null(),
        )
    };
    let direct = maps::settings().is_some_and(|s| s.flags & SETTING_SAME_NODE_DIRECT != 0);
    let mut stats = counters::pod_stats(ifindex);
    if let Some(stats) = stats.as_deref_mut() {
        stats.packets_to_pod += 1;
        stats.bytes_to_pod += u64::from(ctx.len());
    }
    if from_this_host {
        if direct {
            forget_direct_flow(&ctx);
        }
        return TC_ACT_OK;
    }
    let strict = |flags: Option<u32>| flags.is_some_and(|f| f & WORKLOAD_STRICT != 0);
    let frame = packet::classify(&ctx);
    if let Frame::Tcp(tcp) = &frame
        && direct
    {
        direct::learn(&ctx, ifindex, ingress_ifindex, tcp);
    }
    let drop = match frame {
        Frame::Tcp(tcp) if tcp.is_syn() => {
            let Some(workload) = maps::workload(tcp.daddr) else {
                return TC_ACT_OK;
            };
            let flags = workload.flags;
            // From a pod of this node the policy lets reach this one
            // directly: mesh traffic, admitted ahead of time.
            if direct && direct::syn_reaches_server(ingress_ifindex, ifindex, &tcp) {
                return TC_ACT_OK;
            }
            if !strict(Some(flags)) {
                // Plaintext is let in, within the workload's quota.
                if let Some(action) =
                    quota::refuse_plaintext_over_quota(&ctx, ifindex, &tcp, &workload)
                {
                    return action;
                }
                if let Some(stats) = stats {
                    stats.plaintext_in += 1;
                }
                return TC_ACT_OK;
            }
            None
        }
        Frame::Tcp(_) | Frame::Ipv4OtherOrArp => return TC_ACT_OK,
        Frame::HiddenTcp { daddr } => {
            if !strict(maps::workload_flags(daddr)) {
                return TC_ACT_OK;
            }
            Some(counter::STRICT_FRAGMENT_DROPPED)
        }
        Frame::Other => {
            if !strict(maps::interface_flags(ifindex)) {
                return TC_ACT_OK;
            }
            Some(counter::STRICT_NON_IPV4_DROPPED)
        }
    };
    dropped(stats, drop)
}

/// A SYN from the agent opens a connection it carries: what an earlier
/// pod-to-pod connection on the same addresses and ports left in the flow
/// table must not divert the pod's answers from the agent's socket.
#[inline(always)]
fn forget_direct_flow(ctx: &TcContext) {
    if let Frame::Tcp(tcp) = packet::classify(ctx)
        && tcp.is_syn()
    {
        direct::forget_flow(&tcp);
    }
}

/// Counts a strict-mode drop, for the pod and, with its reason, overall.
#[inline(always)]
fn dropped(stats: Option<&mut PodStats>, reason: Option<u32>) -> i32 {
    if let Some(stats) = stats {
        stats.plaintext_dropped += 1;
    }
    if let Some(reason) = reason {
        counters::bump(reason);
    }
    TC_ACT_SHOT
}
