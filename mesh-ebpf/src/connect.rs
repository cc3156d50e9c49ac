//! cgroup/connect4 on the node's pod cgroup subtree: service VIPs for
//! same-node direct connections (`proxy.same_node_direct`).
//!
//! A connection to a service VIP is balanced by the agent, which means
//! it goes through the agent. For a service whose endpoints all run on
//! this node (and that asks for nothing only the agent can give: splits,
//! health checks, circuit breakers, session affinity, unequal weights;
//! the agent decides which services qualify), balancing by the kernel at
//! connect time is enough: `connect()` is sent to one endpoint picked at
//! random, so the SYN is addressed to the pod itself and the same-node
//! direct path (see [`crate::direct`]) can take it, after the same
//! authorization check. A pair the policy does not allow still goes to
//! the agent, which sees the endpoint as the destination and refuses it.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::cgroup_sock_addr, programs::SockAddrContext};
use mesh_common::{DirectEndpointKey, SETTING_SAME_NODE_DIRECT, ServiceKey, counter};

use crate::{
    counters,
    maps::{self, MESH_DIR_EPS, MESH_DIR_SVCS},
};

const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    balance(&ctx);
    // cgroup/connect4 returns 1 to let the connect() go on.
    1
}

#[inline(always)]
fn balance(ctx: &SockAddrContext) {
    if maps::settings().is_none_or(|s| s.flags & SETTING_SAME_NODE_DIRECT == 0) {
        return;
    }
    // SAFETY: the context the kernel handed us; these fields are
    // readable and user_ip4/user_port writable in connect4.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return;
    }
    let vip = addr.user_ip4;
    let port = u16::from_be(addr.user_port as u16);
    let key = ServiceKey {
        addr: vip,
        port,
        pad: 0,
    };
    // SAFETY: the value is copied out before the map can change it.
    let Some(count) = (unsafe { MESH_DIR_SVCS.get(key) }).copied() else {
        return;
    };
    if count == 0 {
        return;
    }
    // SAFETY: helper without arguments.
    let index = unsafe { bpf_get_prandom_u32() } % count;
    let key = DirectEndpointKey {
        vip,
        port,
        index: index as u16,
    };
    // SAFETY: as above.
    let Some(endpoint) = (unsafe { MESH_DIR_EPS.get(key) }).copied() else {
        return;
    };
    addr.user_ip4 = endpoint.addr;
    addr.user_port = u32::from(endpoint.port.to_be());
    counters::bump(counter::DIRECT_BALANCED);
}
