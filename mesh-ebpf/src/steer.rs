//! Handing a TCP segment to one of the agent's sockets without rewriting it
//! (what Cilium does for its proxy):
//! - a segment of a flow the agent already holds goes to that socket (one
//!   in TIME_WAIT too, see [`crate::listener_lookup`]);
//! - a SYN with no such socket goes to the agent's transparent listener on
//!   `listener_port`, so the accepted socket's local address is the
//!   original destination; so does any other segment of no flow (a SYN
//!   cookie's ACK completes its handshake there).
//!
//! Assigned packets get the steer mark so the node routes them locally.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use mesh_common::{SETTING_TIME_WAIT_HANDOFF, Settings, counter};

use crate::{counters, packet::TcpV4};

const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
const IPV4_TUPLE_LEN: u32 = 12;

pub enum Steered {
    /// Not ours: an unrelated segment, or no listener.
    No,
    /// Joined a flow the agent already holds.
    Existing,
    /// A new connection handed to the listener.
    New,
}

#[inline(always)]
pub fn steer(ctx: &TcContext, settings: &Settings, tcp: &TcpV4, listener_port: u16) -> Steered {
    if assign_existing(ctx, settings, tcp) {
        return Steered::Existing;
    }
    to_listener(ctx, settings, tcp, listener_port)
}

/// The second half of [`steer`], for a segment no agent socket owns.
#[inline(always)]
pub fn to_listener(
    ctx: &TcContext,
    settings: &Settings,
    tcp: &TcpV4,
    listener_port: u16,
) -> Steered {
    // A segment of no flow goes to the listener too: a SYN opens one, and
    // an ACK may complete a handshake the listener answered with a SYN
    // cookie (its backlog was full, as in a SYN flood), which only the
    // listener can check. Anything else it answers as TCP does (a reset).
    match (
        tcp.is_syn(),
        assign_listener(ctx, settings, tcp, listener_port),
    ) {
        (true, true) => Steered::New,
        (false, true) => Steered::Existing,
        (_, false) => Steered::No,
    }
}

/// Hands the segment to the socket that already owns its flow, if any.
#[inline(always)]
pub fn assign_existing(ctx: &TcContext, settings: &Settings, tcp: &TcpV4) -> bool {
    let mut tuple = tuple_v4(tcp.saddr, tcp.daddr, tcp.sport, tcp.dport);
    let Some(sk) = lookup(ctx, &mut tuple) else {
        return false;
    };
    // SAFETY: sk is a valid socket reference until released below.
    let state = unsafe { (*sk).state };
    let assigned = match state {
        // Handled below: it may be some other socket on the port.
        TCP_LISTEN => false,
        // A SYN handed to the listener beside a TIME_WAIT socket on its
        // tuple is dropped. Handed to the TIME_WAIT socket, it meets the
        // kernel's TIME_WAIT rules: a newer SYN ends TIME_WAIT and goes
        // to the listener `mesh_listener_lookup` names; an old duplicate
        // or a retransmitted FIN is answered as TIME_WAIT answers it.
        // Without that program a SYN would find no listener there.
        TCP_TIME_WAIT => {
            settings.flags & SETTING_TIME_WAIT_HANDOFF != 0 && {
                let assigned = assign(ctx, sk, settings);
                if assigned {
                    counters::bump(counter::TIME_WAIT_HANDOFF);
                }
                assigned
            }
        }
        _ => assign(ctx, sk, settings),
    };
    release(sk);
    assigned
}

/// Hands a segment to the agent's transparent listener on `port`.
#[inline(always)]
fn assign_listener(ctx: &TcContext, settings: &Settings, tcp: &TcpV4, port: u16) -> bool {
    let mut tuple = tuple_v4(tcp.saddr, tcp.daddr, tcp.sport, port);
    let Some(sk) = lookup(ctx, &mut tuple) else {
        if tcp.is_syn() {
            counters::bump(counter::NO_LISTENER);
        }
        return false;
    };
    // SAFETY: sk is a valid socket reference until released below.
    let state = unsafe { (*sk).state };
    let assigned = state == TCP_LISTEN && assign(ctx, sk, settings);
    release(sk);
    assigned
}

#[inline(always)]
fn tuple_v4(saddr: u32, daddr: u32, sport: u16, dport: u16) -> bpf_sock_tuple {
    // SAFETY: an all-zero tuple is valid; the IPv4 arm is filled in below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: writing the IPv4 arm of a plain-data union.
    let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
    v4.saddr = saddr;
    v4.daddr = daddr;
    v4.sport = sport.to_be();
    v4.dport = dport.to_be();
    tuple
}

/// `bpf_skc_lookup_tcp` in the skb's namespace. skc (not sk) lookup, because
/// sk lookup reports a half-open connection as its listener.
#[inline(always)]
fn lookup(ctx: &TcContext, tuple: &mut bpf_sock_tuple) -> Option<*mut bpf_sock> {
    // SAFETY: helper call with a valid context and tuple; result checked.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            tuple,
            IPV4_TUPLE_LEN,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    (!sk.is_null()).then_some(sk)
}

#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock, settings: &Settings) -> bool {
    // SAFETY: sk is a referenced socket from lookup().
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) };
    if ret != 0 {
        counters::bump(counter::ASSIGN_FAILED);
        return false;
    }
    // set_mark replaces the whole mark: keep the bits that are not ours.
    // SAFETY: reading a field of the context the kernel handed us.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark((mark & !settings.mark_mask) | settings.mark);
    true
}

#[inline(always)]
fn release(sk: *mut bpf_sock) {
    // SAFETY: every successful lookup is released exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
}
