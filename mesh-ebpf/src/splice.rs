//! The same-node fast path: an sk_skb stream verdict on the two sockets the
//! agent holds for one proxied connection (the one it accepted from the
//! client, the one it opened to the endpoint). Whatever arrives on one is
//! sent out of the other by the kernel; the agent copies nothing.
//!
//! Each socket is in `MESH_SPLICE_TO` under its peer's key, so the
//! segment's own socket key finds where it goes. A segment with no peer
//! (the pair is being torn down) is passed up to the agent, which forwards
//! it itself: nothing is dropped here.
//!
//! FIN and RST are not data: they reach the agent as end of stream or an
//! error, and it carries them across as it does without the fast path.

use aya_ebpf::{bindings::sk_action, macros::stream_verdict, programs::SkBuffContext};
use mesh_common::{ConnKey, counter};

use crate::{
    counters,
    maps::{MESH_REDIRECTED, MESH_SPLICE_TO},
    packet::remote_port_from_field,
};

#[stream_verdict]
pub fn mesh_splice(ctx: SkBuffContext) -> u32 {
    let skb = &ctx.skb;
    let key = ConnKey {
        local_addr: skb.local_ipv4(),
        remote_addr: skb.remote_ipv4(),
        local_port: skb.local_port() as u16,
        remote_port: remote_port_from_field(skb.remote_port()),
    };
    let len = ctx.len();
    // A bare FIN arrives as an empty segment with nothing to move: TCP has
    // already marked the socket shut for reading, which is how the agent
    // sees the end of stream (and carries it across once the data before it
    // is queued on the other side). Redirected, it could reach the other
    // socket after the agent shut that down; passed up, it would sit in the
    // socket's queue ahead of data redirected to it later.
    if len == 0 {
        return sk_action::SK_DROP;
    }
    // On success the helper marks the segment for redirection and returns
    // SK_PASS; without a peer it returns SK_DROP, and we pass it up instead.
    if MESH_SPLICE_TO.redirect_skb(&ctx, key, 0) == sk_action::SK_PASS as i64 {
        counters::add(counter::SPLICED_BYTES, u64::from(len));
        if let Some(moved) = MESH_REDIRECTED.get_ptr_mut(key) {
            // SAFETY: a map value pointer. The verdict runs for one socket
            // at a time and only this program writes a socket's entry, so
            // the read and the store lose no update; the agent only reads.
            unsafe { moved.write_volatile(moved.read_volatile() + u64::from(len)) };
        }
    } else {
        counters::bump(counter::SPLICE_NO_PEER);
    }
    sk_action::SK_PASS
}
