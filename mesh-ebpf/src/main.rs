//! mesh-agent's kernel programs.
//!
//! - [`from_pod`]: tc ingress on a meshed pod's host-side interface. Counts
//!   what the pod sends and hands its connections to meshed destinations to
//!   the agent's transparent listener (`bpf_sk_assign`).
//! - [`to_pod`]: tc egress on the same interface. Counts what the pod receives.
//! - [`sockops`]: sock_ops on the node's pod cgroup subtree. Tracks meshed
//!   connections in an LRU map and forgets them when they close.
//! - [`uplink`]: tc ingress on the node's uplinks. Hands HBONE from other
//!   nodes to the agent's inbound listener.
//! - [`splice`]: sk_skb stream verdict on the agent's own sockets of a
//!   proxied connection: moves what arrives on one to the other inside the
//!   kernel (the same-node fast path).
//! - [`listener_lookup`]: sk_lookup on the node's namespace. Finds the
//!   agent's listener for a SYN that the kernel took over from one of the
//!   agent's TIME_WAIT sockets.
//! - [`connect`]: cgroup/connect4 on the same subtree. Sends a connect()
//!   to a service whose endpoints all run here to one of them (only with
//!   `proxy.same_node_direct`).
//! - [`direct`]: same-node pod pairs the policy allows talk without the
//!   agent (both tc programs consult it).
//! - [`to_pod`] also enforces strict mode: plaintext from outside the mesh
//!   to a strict pod is dropped.
//!
//! Which pods, services and addresses are meshed is data the agent writes
//! into the maps in [`maps`]; nothing here is specific to one cluster.
#![no_std]
#![no_main]

mod connect;
mod counters;
mod direct;
mod from_pod;
mod listener_lookup;
mod maps;
mod packet;
mod quota;
mod sockops;
mod splice;
mod steer;
mod to_pod;
mod uplink;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves panics unreachable; this only satisfies no_std.
    loop {}
}

/// Kernel programs that use GPL-only helpers (sk_assign, skc_lookup) must say so.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
