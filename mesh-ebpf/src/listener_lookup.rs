//! sk_lookup on the node's network namespace: the kernel's own TIME_WAIT
//! rules for the agent's sockets.
//!
//! When a server closes first, the agent's socket facing the client closes
//! first too, and sits in TIME_WAIT on the client's 4-tuple. A client that
//! reuses its port sends a SYN on that same tuple. Handed straight to the
//! listener, that SYN is dropped: the kernel refuses a second socket on a
//! tuple that a TIME_WAIT socket holds, until TIME_WAIT ends (60 s). So
//! [`crate::steer`] hands such a SYN to the TIME_WAIT socket instead, and
//! the kernel does what it does for any SYN that meets TIME_WAIT: if the
//! SYN is newer than the old connection, it ends TIME_WAIT and looks up a
//! listener for the SYN's destination. The destination is the service or
//! workload the pod dialled, where nothing listens; this program answers
//! that lookup with the agent's listener.
//!
//! It only answers for what the agent steers: a pod of this node dialling
//! a meshed destination (outbound), or HBONE to a pod of this node
//! (inbound). Every other lookup in the namespace passes untouched.

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{LISTENER_INBOUND, LISTENER_OUTBOUND, counter};

use crate::{counters, maps};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn mesh_listener_lookup(ctx: SkLookupContext) -> u32 {
    if let Some(listener) = agent_listener(&ctx) {
        match maps::MESH_LISTENERS.redirect_sk_lookup(&ctx, listener, 0) {
            Ok(()) => counters::bump(counter::LISTENER_LOOKUP),
            Err(_) => counters::bump(counter::ASSIGN_FAILED),
        }
    }
    SK_PASS
}

/// Which of the agent's listeners the lookup is for, if any.
#[inline(always)]
fn agent_listener(ctx: &SkLookupContext) -> Option<u32> {
    // SAFETY: reading fields of the context the kernel handed us.
    let (family, protocol, remote, local, port) = unsafe {
        let lookup = &*ctx.lookup;
        (
            lookup.family,
            lookup.protocol,
            lookup.remote_ip4,
            lookup.local_ip4,
            lookup.local_port,
        )
    };
    if family != AF_INET || protocol != IPPROTO_TCP {
        return None;
    }
    let settings = maps::settings()?;
    // local_port is in host order, like the ports in the maps.
    let port = port as u16;
    if port == settings.inbound_port {
        return maps::local_workload(local).map(|_| LISTENER_INBOUND);
    }
    let outbound = settings.outbound_port != 0
        && maps::local_workload(remote).is_some()
        && maps::is_meshed_destination(local, port);
    outbound.then_some(LISTENER_OUTBOUND)
}
