//! tc ingress on the node's uplinks: HBONE from other nodes. A TCP segment
//! to a local meshed pod's IP on the inbound port (15008) is handed to the
//! agent's inbound listener, which learns from the accepted socket which
//! pod was addressed, before any TLS.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use mesh_common::counter;

use crate::{
    counters, maps, packet,
    steer::{self, Steered},
};

#[classifier]
pub fn mesh_uplink(ctx: TcContext) -> i32 {
    if let Some(settings) = maps::settings()
        && settings.inbound_port != 0
        && let Some(tcp) = packet::parse_tcp_v4(&ctx)
        && tcp.dport == settings.inbound_port
        && maps::local_workload(tcp.daddr).is_some()
        && let Steered::New = steer::steer(&ctx, settings, &tcp, settings.inbound_port)
    {
        counters::bump(counter::INBOUND_CAPTURED);
    }
    TC_ACT_OK
}
