//! tc ingress on a meshed pod's host-side interface: what the pod sends.
//!
//! Besides counting, this is the outbound capture: a TCP segment to a
//! meshed destination (service VIP:port or meshed workload IP) is handed to
//! the agent's outbound listener or to the agent socket that owns its flow
//! (see [`crate::steer`]).
//!
//! Pairs of this node's pods that the policy lets talk directly are left
//! alone (see [`crate::direct`]); a SYN over its client's quota for a
//! service is answered with a reset here (see [`crate::quota`]).
//!
//! Only this hook sees pod traffic, so the agent's own connections (which
//! start in the node namespace) are never captured.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use mesh_common::{PodStats, SETTING_SAME_NODE_DIRECT, counter};

use crate::{
    counters, direct, maps, packet, quota,
    steer::{self, Steered},
};

#[classifier]
pub fn mesh_from_pod(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut stats = counters::pod_stats(ifindex);
    if let Some(stats) = stats.as_deref_mut() {
        stats.packets_from_pod += 1;
        stats.bytes_from_pod += u64::from(ctx.len());
    }
    capture(&ctx, ifindex, stats)
}

/// What becomes of a segment the pod sends: the tc action.
#[inline(always)]
fn capture(ctx: &TcContext, ifindex: u32, stats: Option<&mut PodStats>) -> i32 {
    let Some(settings) = maps::settings() else {
        return TC_ACT_OK;
    };
    if settings.outbound_port == 0 {
        return TC_ACT_OK;
    }
    let Some(tcp) = packet::parse_tcp_v4(ctx) else {
        return TC_ACT_OK;
    };
    let direct = settings.flags & SETTING_SAME_NODE_DIRECT != 0;
    // The bulk of a pod-to-pod connection: one lookup, and straight into
    // the receiving pod once its way there is known.
    if direct
        && !tcp.is_syn()
        && let Some(flow) = direct::admitted_flow(ifindex, &tcp)
    {
        if tcp.is_rst() {
            direct::note_reset(&tcp);
        }
        if flow.receiver_ifindex != 0 {
            return direct::redirect(ctx, &flow);
        }
        return TC_ACT_OK;
    }
    // HBONE to another node's agent is already mesh traffic.
    if tcp.dport == settings.inbound_port || !maps::is_meshed_destination(tcp.daddr, tcp.dport) {
        return TC_ACT_OK;
    }
    if direct {
        if tcp.is_syn() {
            if direct::admit_syn(ifindex, &tcp) {
                counters::bump(counter::DIRECT_ADMITTED);
                return TC_ACT_OK;
            }
            direct::forget_flow(&tcp);
        } else {
            // A segment of a flow the agent holds goes to its socket (a
            // connection proxied before the pair was allowed keeps its
            // path); one of a pod-to-pod connection the flow table lost
            // passes.
            if !steer::assign_existing(ctx, settings, &tcp)
                && !direct::client_sends(ifindex, &tcp)
                && !direct::server_answers(ifindex, &tcp)
            {
                steer::to_listener(ctx, settings, &tcp, settings.outbound_port);
            }
            return TC_ACT_OK;
        }
    }
    if steer::assign_existing(ctx, settings, &tcp) {
        return TC_ACT_OK;
    }
    // A new connection over its quota is refused before it has a socket.
    if tcp.is_syn()
        && let Some(action) = quota::refuse_over_quota(ctx, ifindex, &tcp)
    {
        return action;
    }
    if let Steered::New = steer::to_listener(ctx, settings, &tcp, settings.outbound_port) {
        counters::bump(counter::CAPTURED);
        if let Some(stats) = stats {
            stats.captured += 1;
        }
    }
    TC_ACT_OK
}
