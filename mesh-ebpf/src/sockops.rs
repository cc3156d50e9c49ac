//! sock_ops on the node's pod cgroup subtree: tracks meshed connections.
//!
//! A meshed pod's socket enters `MESH_CONNS` when it is established:
//! outbound when it connected to a meshed destination, inbound when it
//! accepted. The state callback removes it on close, so the map holds live
//! connections only; LRU eviction is the safety net. The same entries are
//! what a same-node fast path needs to pair sockets later.
//!
//! A pod-to-pod connection (see [`crate::direct`]) never reaches the
//! agent; when its client socket closes, a record of it goes to
//! `MESH_DIR_CLOSED` for the agent's access log.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{CONN_INBOUND, CONN_OUTBOUND, ConnKey, ConnValue, DirectClosed, counter};

use crate::{counters, direct, maps, packet::remote_port_from_field};

const AF_INET: u32 = 2;
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => track(&ctx, CONN_OUTBOUND),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => track(&ctx, CONN_INBOUND),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => forget(&ctx, ctx.arg(0)),
        _ => {}
    }
    // sock_ops programs return 1 for "ok".
    1
}

#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    ConnKey {
        local_addr: ctx.local_ip4(),
        remote_addr: ctx.remote_ip4(),
        local_port: ctx.local_port() as u16,
        remote_port: remote_port_from_field(ctx.remote_port()),
    }
}

#[inline(always)]
fn track(ctx: &SockOpsContext, direction: u32) {
    let key = conn_key(ctx);
    let Some(workload_id) = maps::local_workload(key.local_addr) else {
        return;
    };
    if direction == CONN_OUTBOUND && !maps::is_meshed_destination(key.remote_addr, key.remote_port)
    {
        return;
    }
    let value = ConnValue {
        // SAFETY: helpers valid in sock_ops with the context the kernel gave us.
        cookie: unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) },
        // SAFETY: as above.
        established_ns: unsafe { bpf_ktime_get_ns() },
        workload_id,
        direction,
    };
    if maps::MESH_CONNS.insert(key, value, 0).is_ok() {
        counters::bump(counter::CONN_TRACKED);
        // Ask for the state callback so the entry leaves with the socket.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn forget(ctx: &SockOpsContext, last_state: u32) {
    let key = conn_key(ctx);
    // SAFETY: the value is copied out before the map can change it.
    if let Some(conn) = unsafe { maps::MESH_CONNS.get(key) }.copied()
        && conn.direction == CONN_OUTBOUND
        && let Some(reset) = direct::admitted(&key)
    {
        report_direct(ctx, &key, &conn, last_state, reset);
    }
    if maps::MESH_CONNS.remove(key).is_ok() {
        counters::bump(counter::CONN_CLOSED);
    }
}

/// A pod-to-pod connection's client socket closes: the agent never saw
/// the connection, so this record is its access-log line.
#[inline(always)]
fn report_direct(
    ctx: &SockOpsContext,
    key: &ConnKey,
    conn: &ConnValue,
    last_state: u32,
    reset: bool,
) {
    // SAFETY: fields of the context the kernel handed us, readable in
    // every sock_ops callback.
    let (sent, received) = unsafe { ((*ctx.ops).bytes_acked, (*ctx.ops).bytes_received) };
    let record = DirectClosed {
        established_ns: conn.established_ns,
        // SAFETY: helper without arguments.
        closed_ns: unsafe { bpf_ktime_get_ns() },
        sent,
        received,
        client: key.local_addr,
        server: key.remote_addr,
        client_port: key.local_port,
        server_port: key.remote_port,
        last_state,
        reset: u32::from(reset),
        pad: 0,
    };
    if maps::MESH_DIR_CLOSED.output(record, 0).is_err() {
        counters::bump(counter::DIRECT_RECORDS_LOST);
    }
}
