//! Quotas at the SYN: a client over its quota of new connections is
//! refused before any socket exists, with the reset the agent would have
//! sent. Two places:
//! - a client pod of this node, to a service with a quota
//!   (`mesh_from_pod`): the reset goes back out to the pod. The agent's
//!   own bucket (`lb/quota.rs`) stays behind this one: it keys on the
//!   client's identity, counts open connections too, and settles what
//!   this one cannot be exact about;
//! - plaintext from outside the mesh to a workload with a quota
//!   (`mesh_to_pod`): the reset goes back into the node, as if the pod
//!   had sent it, and the node routes it to the client. Mesh traffic
//!   reaches the pod from the agent's socket and is counted by the agent.
//!
//! The bucket is GCRA (a token bucket in one number): the theoretical
//! arrival time of the next conforming SYN, per service and client
//! address. A SYN that comes no earlier than `TAT - tolerance` conforms
//! and moves TAT one interval on. The update is a plain read and write:
//! kernels from 5.10 on have no 64-bit compare-and-swap for BPF, so two
//! SYNs of one client on two CPUs at the same instant may both pass;
//! the agent's bucket then refuses the extra one.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    programs::TcContext,
};
use mesh_common::{QUOTA_WORKLOAD, QuotaKey, ServiceKey, WorkloadValue, counter};

use crate::{
    counters,
    maps::{MESH_QUOTA_TAT, MESH_SERVICES},
    packet::{TCP_FLAG_ACK, TCP_FLAG_RST, TcpV4},
};

const ETH_HDR_LEN: usize = 14;
/// Only IPv4 headers without options are answered here (others go to
/// the agent, whose bucket applies): the offsets below are fixed.
const IPV4_HDR_LEN: usize = 20;
const TCP: usize = ETH_HDR_LEN + IPV4_HDR_LEN;
const TCP_SEQ: usize = TCP + 4;
const TCP_ACK: usize = TCP + 8;
const TCP_DOFF: usize = TCP + 12;
const TCP_FLAGS: usize = TCP + 13;
const TCP_WINDOW: usize = TCP + 14;
const TCP_CHECKSUM: usize = TCP + 16;

/// For a SYN to a service: `Some(action)` when it is over its client's
/// quota and has become the reset that answers it, on its way back to the
/// pod; `None` to carry on.
#[inline(always)]
pub fn refuse_over_quota(ctx: &TcContext, ifindex: u32, tcp: &TcpV4) -> Option<i32> {
    let key = ServiceKey {
        addr: tcp.daddr,
        port: tcp.dport,
        pad: 0,
    };
    // SAFETY: the value is copied out before the map can change it.
    let service = unsafe { MESH_SERVICES.get(key) }.copied()?;
    let bucket = Bucket {
        subject: service.service_id,
        interval_ns: service.quota_interval_ns,
        tolerance_ns: service.quota_tolerance_ns,
    };
    refuse_over(ctx, ifindex, tcp, bucket, 0)
}

/// For a plaintext SYN from outside the mesh to `workload`, on its way
/// into the pod behind `ifindex`: as [`refuse_over_quota`], the reset
/// going back into the node instead.
#[inline(always)]
pub fn refuse_plaintext_over_quota(
    ctx: &TcContext,
    ifindex: u32,
    tcp: &TcpV4,
    workload: &WorkloadValue,
) -> Option<i32> {
    let bucket = Bucket {
        subject: QUOTA_WORKLOAD | workload.workload_id,
        interval_ns: workload.quota_interval_ns,
        tolerance_ns: workload.quota_tolerance_ns,
    };
    refuse_over(ctx, ifindex, tcp, bucket, u64::from(BPF_F_INGRESS))
}

/// One quota, as the agent wrote it.
struct Bucket {
    subject: u32,
    interval_ns: u64,
    tolerance_ns: u64,
}

#[inline(always)]
fn refuse_over(
    ctx: &TcContext,
    ifindex: u32,
    tcp: &TcpV4,
    quota: Bucket,
    redirect_flags: u64,
) -> Option<i32> {
    if quota.interval_ns == 0 {
        return None;
    }
    if ctx.load::<u8>(ETH_HDR_LEN).ok()? != 0x45 {
        return None;
    }
    let key = QuotaKey {
        subject: quota.subject,
        source: tcp.saddr,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the value is copied out before the map can change it.
    let tat = unsafe { MESH_QUOTA_TAT.get(key) }.copied().unwrap_or(0);
    let tat = if tat < now { now } else { tat };
    if tat - now <= quota.tolerance_ns {
        let _ = MESH_QUOTA_TAT.insert(key, tat + quota.interval_ns, 0);
        return None;
    }
    counters::bump(counter::QUOTA_REFUSED);
    Some(reset(ctx, ifindex, tcp, redirect_flags))
}

/// Turns the SYN into the RST|ACK that refuses it and sends it back the
/// way it came: out of the pod's interface to the pod (`redirect_flags`
/// 0, from tc ingress), or into the node as if the pod had sent it
/// (`BPF_F_INGRESS`, from tc egress). Swapping addresses and ports leaves
/// the checksums as they are; the changed words are patched in (a no-op
/// when the sender left the checksum to offload).
#[inline(always)]
fn reset(ctx: &TcContext, ifindex: u32, tcp: &TcpV4, redirect_flags: u64) -> i32 {
    let rewritten = (|| -> Result<(), i64> {
        let destination_mac = ctx.load::<[u8; 6]>(0)?;
        let source_mac = ctx.load::<[u8; 6]>(6)?;
        ctx.store(0, &source_mac, 0)?;
        ctx.store(6, &destination_mac, 0)?;
        ctx.store(ETH_HDR_LEN + 12, &tcp.daddr, 0)?;
        ctx.store(ETH_HDR_LEN + 16, &tcp.saddr, 0)?;
        ctx.store(TCP, &tcp.dport.to_be(), 0)?;
        ctx.store(TCP + 2, &tcp.sport.to_be(), 0)?;
        // seq 0, ack the SYN's sequence number plus one.
        let seq = ctx.load::<u32>(TCP_SEQ)?;
        let ack = ctx.load::<u32>(TCP_ACK)?;
        let new_ack = u32::from_be(seq).wrapping_add(1).to_be();
        ctx.l4_csum_replace(TCP_CHECKSUM, u64::from(seq), 0, 4)?;
        ctx.store(TCP_SEQ, &0u32, 0)?;
        ctx.l4_csum_replace(TCP_CHECKSUM, u64::from(ack), u64::from(new_ack), 4)?;
        ctx.store(TCP_ACK, &new_ack, 0)?;
        // Flags RST|ACK (the data offset byte beside them stays), window 0.
        let doff = ctx.load::<u8>(TCP_DOFF)?;
        let flags = ctx.load::<u8>(TCP_FLAGS)?;
        let old_word = u16::from_ne_bytes([doff, flags]);
        let new_word = u16::from_ne_bytes([doff, TCP_FLAG_RST | TCP_FLAG_ACK]);
        ctx.l4_csum_replace(TCP_CHECKSUM, u64::from(old_word), u64::from(new_word), 2)?;
        ctx.store(TCP_FLAGS, &(TCP_FLAG_RST | TCP_FLAG_ACK), 0)?;
        let window = ctx.load::<u16>(TCP_WINDOW)?;
        ctx.l4_csum_replace(TCP_CHECKSUM, u64::from(window), 0, 2)?;
        ctx.store(TCP_WINDOW, &0u16, 0)?;
        Ok(())
    })();
    if rewritten.is_err() {
        // Half rewritten, it is nobody's packet: the client retries.
        return TC_ACT_SHOT;
    }
    // SAFETY: helper call with a plain ifindex; it returns a tc action.
    unsafe { bpf_redirect(ifindex, redirect_flags) as i32 }
}
