//! Same-node connections that need no agent: pod to pod in the kernel.
//!
//! The agent evaluates its authorization policy for every pair of this
//! node's meshed pods ahead of time and writes the pairs it allows into
//! `MESH_DIRECT` (only when `proxy.same_node_direct` is on). A SYN from
//! an allowed client to an allowed server port is then neither handed to
//! the agent by `mesh_from_pod` nor dropped as plaintext by a strict
//! server's `mesh_to_pod`: the two pods' own sockets talk over the veths,
//! and the bytes never cross a third and fourth TCP socket in the agent.
//!
//! Addresses are tied to interfaces: an entry names the client's and the
//! server's host-side ifindex, and a segment claiming an allowed address
//! passes only when it comes from that pod's own interface (a pod cannot
//! borrow another pod's pass by spoofing its address, and nothing from
//! outside the node can).
//!
//! The SYN is decided from `MESH_DIRECT`; an admitted connection's two
//! directions then enter `MESH_DIR_FLOWS`, so every later segment passes
//! on one lookup (without looking for an agent socket, which runs the
//! listener lookup and its sk_lookup program for every segment). Like a
//! connection through the agent, an admitted connection is not judged
//! again when the policy changes; new ones are. The flow table is only a
//! cache: a segment it misses is decided from `MESH_DIRECT` again, after
//! the agent's own sockets, and a SYN that is not admitted (one the
//! agent will carry, from the pod or from the agent itself) clears any
//! entry an earlier connection on the same addresses and ports left.
//!
//! The first segment the node delivers to the receiving pod teaches
//! `mesh_to_pod` that pod's interface and the Ethernet addresses the node writes for it; from then
//! on `mesh_from_pod` writes those addresses itself and hands the segment
//! straight to the receiving pod, past the node's routing and the
//! receiver's tc egress. That is shorter than what plain pods' traffic
//! takes.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_redirect_peer, programs::TcContext};
use mesh_common::{ConnKey, DIRECT_ALLOW, DirectFlow, DirectKey, DirectValue, counter};

use crate::{
    counters,
    maps::{MESH_DIR_FLOWS, MESH_DIRECT},
    packet::TcpV4,
};

/// The entry letting `client` reach `server:port`, if the policy does: the
/// port's own entry if the policy names the port, else the pair's port-0
/// entry.
#[inline(always)]
fn allowed(client: u32, server: u32, port: u16) -> Option<DirectValue> {
    let mut key = DirectKey {
        client,
        server,
        port,
        pad: 0,
    };
    // SAFETY: values are copied out before the map can change them.
    let value = match unsafe { MESH_DIRECT.get(key) } {
        Some(value) => *value,
        None => {
            key.port = 0;
            // SAFETY: as above.
            *unsafe { MESH_DIRECT.get(key) }?
        }
    };
    (value.verdict == DIRECT_ALLOW).then_some(value)
}

/// A segment the client pod behind `ifindex` sends to the server.
#[inline(always)]
pub fn client_sends(ifindex: u32, tcp: &TcpV4) -> bool {
    allowed_from(ifindex, tcp).is_some()
}

/// Admits a SYN the client pod behind `ifindex` sends, if its pair is
/// allowed: both directions of the connection enter the flow table.
#[inline(always)]
pub fn admit_syn(ifindex: u32, tcp: &TcpV4) -> bool {
    let Some(value) = allowed_from(ifindex, tcp) else {
        return false;
    };
    let (forward, backward) = flow_keys(tcp);
    let flow = |sender_ifindex| DirectFlow {
        sender_ifindex,
        ..DirectFlow::default()
    };
    // If the table cannot take them, the segments are decided from
    // MESH_DIRECT one by one instead: slower, still right.
    let _ = MESH_DIR_FLOWS.insert(forward, flow(value.client_ifindex), 0);
    let _ = MESH_DIR_FLOWS.insert(backward, flow(value.server_ifindex), 0);
    true
}

/// The flow of a segment of an admitted connection, sent from the pod
/// behind `ifindex`.
#[inline(always)]
pub fn admitted_flow(ifindex: u32, tcp: &TcpV4) -> Option<DirectFlow> {
    let (forward, _) = flow_keys(tcp);
    // SAFETY: the value is copied out before the map can change it.
    unsafe { MESH_DIR_FLOWS.get(forward) }
        .copied()
        .filter(|flow| flow.sender_ifindex == ifindex)
}

/// Hands a segment of `flow` straight to the receiving pod: the
/// Ethernet addresses the node would have written, then the receiver's
/// side of its veth. Counted as the receiver's traffic, since its
/// `mesh_to_pod` does not see it.
#[inline(always)]
pub fn redirect(ctx: &TcContext, flow: &DirectFlow) -> i32 {
    let eth = [flow.eth_0, flow.eth_1, flow.eth_2];
    if ctx.store(0, &eth, 0).is_err() {
        return TC_ACT_SHOT;
    }
    if let Some(stats) = counters::pod_stats(flow.receiver_ifindex) {
        stats.packets_to_pod += 1;
        stats.bytes_to_pod += u64::from(ctx.len());
    }
    counters::bump(counter::DIRECT_REDIRECTED);
    // SAFETY: helper call with a plain ifindex; it returns a tc action.
    unsafe { bpf_redirect_peer(flow.receiver_ifindex, 0) as i32 }
}

/// Learns, from a segment the node delivers to the pod behind
/// `ifindex`, where later segments of its flow can go directly: if it
/// belongs to an admitted flow whose sender's interface it came from.
#[inline(always)]
pub fn learn(ctx: &TcContext, ifindex: u32, ingress_ifindex: u32, tcp: &TcpV4) {
    let (forward, _) = flow_keys(tcp);
    let Some(flow) = MESH_DIR_FLOWS.get_ptr_mut(forward) else {
        return;
    };
    // SAFETY: a pointer into the map's value; fields are plain integers
    // and a concurrent writer could only write the same values.
    let flow = unsafe { &mut *flow };
    if flow.receiver_ifindex != 0 || flow.sender_ifindex != ingress_ifindex {
        return;
    }
    let Ok(eth) = ctx.load::<[u32; 3]>(0) else {
        return;
    };
    flow.eth_0 = eth[0];
    flow.eth_1 = eth[1];
    flow.eth_2 = eth[2];
    flow.receiver_ifindex = ifindex;
}

/// Notes that a reset went along a flow, for its access record.
#[inline(always)]
pub fn note_reset(tcp: &TcpV4) {
    let (forward, _) = flow_keys(tcp);
    if let Some(flow) = MESH_DIR_FLOWS.get_ptr_mut(forward) {
        // SAFETY: a pointer into the map's value, a plain integer.
        unsafe { (*flow).reset = 1 };
    }
}

/// Whether a socket's connection (its key as sock_ops builds it: this
/// side local) was admitted pod to pod, and if so whether a reset went
/// either way.
#[inline(always)]
pub fn admitted(key: &ConnKey) -> Option<bool> {
    // SAFETY: values are copied out before the map can change them.
    let forward = unsafe { MESH_DIR_FLOWS.get(*key) }.copied()?;
    let backward = ConnKey {
        local_addr: key.remote_addr,
        remote_addr: key.local_addr,
        local_port: key.remote_port,
        remote_port: key.local_port,
    };
    // SAFETY: as above.
    let back_reset = unsafe { MESH_DIR_FLOWS.get(backward) }.is_some_and(|f| f.reset != 0);
    Some(forward.reset != 0 || back_reset)
}

/// Forgets what an earlier connection on the same addresses and ports
/// left in the flow table: this one goes through the agent.
#[inline(always)]
pub fn forget_flow(tcp: &TcpV4) {
    let (forward, backward) = flow_keys(tcp);
    let _ = MESH_DIR_FLOWS.remove(forward);
    let _ = MESH_DIR_FLOWS.remove(backward);
}

#[inline(always)]
fn allowed_from(ifindex: u32, tcp: &TcpV4) -> Option<DirectValue> {
    allowed(tcp.saddr, tcp.daddr, tcp.dport).filter(|v| v.client_ifindex == ifindex)
}

/// The segment's own direction (sender local) and the reverse.
#[inline(always)]
fn flow_keys(tcp: &TcpV4) -> (ConnKey, ConnKey) {
    (
        ConnKey {
            local_addr: tcp.saddr,
            remote_addr: tcp.daddr,
            local_port: tcp.sport,
            remote_port: tcp.dport,
        },
        ConnKey {
            local_addr: tcp.daddr,
            remote_addr: tcp.saddr,
            local_port: tcp.dport,
            remote_port: tcp.sport,
        },
    )
}

/// A segment the server pod behind `ifindex` sends back to the client.
#[inline(always)]
pub fn server_answers(ifindex: u32, tcp: &TcpV4) -> bool {
    allowed(tcp.daddr, tcp.saddr, tcp.sport).is_some_and(|v| v.server_ifindex == ifindex)
}

/// A SYN that arrived on host interface `from_ifindex` and leaves on
/// `to_ifindex` towards the server.
#[inline(always)]
pub fn syn_reaches_server(from_ifindex: u32, to_ifindex: u32, tcp: &TcpV4) -> bool {
    allowed_from(from_ifindex, tcp).is_some_and(|v| v.server_ifindex == to_ifindex)
}
