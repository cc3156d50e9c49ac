//! Types and names shared by the kernel programs (`mesh-ebpf`) and the agent.
//!
//! Every map value is `#[repr(C)]`, `Copy`, made of fixed-width integers and
//! free of implicit padding, so the kernel, the agent and `bpftool` (through
//! BTF) all see the same layout.
//!
//! Conventions:
//! - IPv4 addresses are stored as the four address bytes in network order,
//!   read as a native `u32` (what the packet and `bpf_sock_ops` carry);
//!   [`ipv4_to_raw`] / [`ipv4_from_raw`] convert.
//! - Ports are stored in host byte order.
#![no_std]

/// Names of the kernel programs, as `bpftool prog show` lists them.
pub mod programs {
    /// tc ingress on a pod's host-side interface: traffic the pod sends.
    pub const FROM_POD: &str = "mesh_from_pod";
    /// tc egress on a pod's host-side interface: traffic the pod receives.
    pub const TO_POD: &str = "mesh_to_pod";
    /// sock_ops on the node's pod cgroup subtree: tracks meshed connections.
    pub const SOCKOPS: &str = "mesh_sockops";
    /// tc ingress on the node's uplinks: hands inbound HBONE to the agent.
    pub const UPLINK: &str = "mesh_uplink";
    /// sk_skb stream verdict on the sockets in [`super::maps::SPLICE_ON`]:
    /// the same-node fast path, moving bytes between the two sockets of a
    /// proxied connection inside the kernel.
    pub const SPLICE: &str = "mesh_splice";
    /// sk_lookup on the node's network namespace: finds the agent's
    /// listener for a SYN the kernel took over from a TIME_WAIT socket.
    pub const LISTENER_LOOKUP: &str = "mesh_listener_lookup";
    /// cgroup/connect4 on the node's pod cgroup subtree: a pod's connect()
    /// to a service whose endpoints all run on this node picks one and
    /// connects there directly (only with `proxy.same_node_direct`).
    pub const CONNECT4: &str = "mesh_connect4";
    /// Every program, in load order.
    pub const ALL: [&str; 7] = [
        FROM_POD,
        TO_POD,
        SOCKOPS,
        UPLINK,
        SPLICE,
        LISTENER_LOOKUP,
        CONNECT4,
    ];
}

/// Names of the maps, as `bpftool map show` lists them (at most 15 bytes).
pub mod maps {
    /// [`super::ServiceKey`] -> [`super::ServiceValue`]: meshed service VIP:ports.
    pub const SERVICES: &str = "MESH_SERVICES";
    /// IPv4 (raw) -> [`super::WorkloadValue`]: meshed workload addresses.
    pub const WORKLOADS: &str = "MESH_WORKLOADS";
    /// ifindex -> [`super::PodStats`], per CPU: traffic on meshed pod interfaces.
    pub const POD_STATS: &str = "MESH_POD_STATS";
    /// [`super::ConnKey`] -> [`super::ConnValue`], LRU: live meshed connections.
    pub const CONNS: &str = "MESH_CONNS";
    /// index 0 -> [`super::Settings`]: what the agent tells the programs.
    pub const SETTINGS: &str = "MESH_SETTINGS";
    /// [`super::counter`] index -> u64, per CPU: program-wide event counters.
    pub const COUNTERS: &str = "MESH_COUNTERS";
    /// [`super::TcFilterKey`] -> [`super::TcFilterValue`]: tc filters the
    /// agent attached over netlink (kernels before 6.6 have no tc link to
    /// pin), so `cleanup` can find and remove them after a crash. Programs
    /// never touch it.
    pub const TC_FILTERS: &str = "MESH_TC_FILTERS";
    /// [`super::ConnKey`] of one of the agent's sockets -> the *other*
    /// socket of the same proxied connection (sockhash): where the fast
    /// path sends what arrives. No program runs on it.
    pub const SPLICE_TO: &str = "MESH_SPLICE_TO";
    /// [`super::ConnKey`] -> the same socket (sockhash), with
    /// `mesh_splice` attached: sockets whose incoming bytes the kernel
    /// moves. Entered only once the peer is in [`SPLICE_TO`].
    pub const SPLICE_ON: &str = "MESH_SPLICE_ON";
    /// [`super::LISTENER_OUTBOUND`] / [`super::LISTENER_INBOUND`] -> the
    /// agent's listening socket (sockmap), for `mesh_listener_lookup`.
    pub const LISTENERS: &str = "MESH_LISTENERS";
    /// Host-side ifindex of a meshed pod -> `WORKLOAD_*` bits: the pod's
    /// mode where no IPv4 address says it (IPv6, fragments). Strict mode
    /// is enforced from here and [`WORKLOADS`], never from [`POD_STATS`].
    pub const IF_FLAGS: &str = "MESH_IF_FLAGS";
    /// [`super::ConnKey`] of a socket in [`SPLICE_ON`] -> bytes
    /// `mesh_splice` redirected from it (u64). Entered and removed by the
    /// agent with the socket's pairing; it tells when the kernel has
    /// delivered everything it took, before a connection leaves the fast
    /// path.
    pub const REDIRECTED: &str = "MESH_REDIRECTED";
    /// [`super::DirectKey`] -> [`super::DirectValue`]: same-node pod pairs
    /// whose connections go pod to pod without the agent (written by the
    /// agent from the authorization policy when `proxy.same_node_direct`
    /// is on; empty otherwise).
    pub const DIRECT: &str = "MESH_DIRECT";
    /// [`super::ConnKey`] of a segment's sender (local) and receiver
    /// (remote) -> [`super::DirectFlow`], LRU: both directions of
    /// connections admitted pod to pod, so their segments pass on one
    /// lookup, and, once learnt, go straight into the receiving pod.
    /// Written by the programs only; a cache, since a segment it misses is
    /// decided from [`DIRECT`] again.
    pub const DIRECT_FLOWS: &str = "MESH_DIR_FLOWS";
    /// [`super::ServiceKey`] -> number of endpoints (u32): services whose
    /// endpoints all run on this node and that `mesh_connect4` balances
    /// at connect time (`proxy.same_node_direct`).
    pub const DIRECT_SERVICES: &str = "MESH_DIR_SVCS";
    /// [`super::DirectEndpointKey`] -> [`super::DirectEndpoint`]: the
    /// endpoints of [`DIRECT_SERVICES`], by index.
    pub const DIRECT_ENDPOINTS: &str = "MESH_DIR_EPS";
    /// Ring buffer of [`super::DirectClosed`]: `mesh_sockops` reports each
    /// pod-to-pod connection when its client socket closes, for the
    /// agent's access log and metrics.
    pub const DIRECT_CLOSED: &str = "MESH_DIR_CLOSED";
    /// [`super::QuotaKey`] -> u64, LRU: per service and client address,
    /// the theoretical arrival time (ns, `bpf_ktime_get_ns`) of the next
    /// conforming SYN under the service's quota (GCRA).
    pub const QUOTA_TAT: &str = "MESH_QUOTA_TAT";
    /// Every map, in a stable order.
    pub const ALL: [&str; 18] = [
        SERVICES,
        WORKLOADS,
        POD_STATS,
        CONNS,
        SETTINGS,
        COUNTERS,
        TC_FILTERS,
        SPLICE_TO,
        SPLICE_ON,
        LISTENERS,
        IF_FLAGS,
        REDIRECTED,
        DIRECT,
        DIRECT_FLOWS,
        DIRECT_SERVICES,
        DIRECT_ENDPOINTS,
        DIRECT_CLOSED,
        QUOTA_TAT,
    ];
}

/// Layout of one agent's pin root (default [`DEFAULT_PIN_ROOT`]).
pub mod pins {
    /// Sub-directory holding the pinned maps, by map name.
    pub const MAPS_DIR: &str = "maps";
    /// Sub-directory holding the pinned programs, by program name.
    pub const PROGS_DIR: &str = "progs";
    /// Sub-directory holding the pinned links (attachments).
    pub const LINKS_DIR: &str = "links";
}

/// Where an agent pins everything unless told otherwise.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/mesh";

/// Capacity of [`maps::SPLICE_TO`] and [`maps::SPLICE_ON`]: two sockets
/// per kernel-spliced connection.
pub const MAX_SPLICED_SOCKETS: u32 = 131_072;

/// Capacity of [`maps::SERVICES`].
pub const MAX_SERVICES: u32 = 16_384;
/// Capacity of [`maps::WORKLOADS`].
pub const MAX_WORKLOADS: u32 = 65_536;
/// Capacity of [`maps::POD_STATS`] (local pod interfaces).
pub const MAX_POD_INTERFACES: u32 = 1_024;
/// Capacity of [`maps::CONNS`]. Entries are removed on close; LRU eviction is
/// the safety net if a close is ever missed.
pub const MAX_CONNS: u32 = 65_536;
/// Capacity of [`maps::DIRECT`]: pairs of this node's pod addresses, times
/// the ports the policy names.
pub const MAX_DIRECT: u32 = 65_536;
/// Capacity of [`maps::DIRECT_FLOWS`]: two entries per direct connection.
pub const MAX_DIRECT_FLOWS: u32 = 131_072;
/// Bytes of [`maps::DIRECT_CLOSED`] (a power of two of pages): about
/// 5,000 records the agent has not read yet.
pub const DIRECT_CLOSED_BYTES: u32 = 256 * 1024;
/// Capacity of [`maps::DIRECT_SERVICES`].
pub const MAX_DIRECT_SERVICES: u32 = 4_096;
/// Capacity of [`maps::DIRECT_ENDPOINTS`].
pub const MAX_DIRECT_ENDPOINTS: u32 = 65_536;
/// Capacity of [`maps::QUOTA_TAT`]: clients of quota'd services (the
/// least recently seen go first; one evicted starts with a full bucket).
pub const MAX_QUOTA_CLIENTS: u32 = 16_384;

/// Indices into [`maps::COUNTERS`].
pub mod counter {
    /// A SYN to a meshed destination was handed to the agent's listener.
    pub const CAPTURED: u32 = 0;
    /// A SYN to a meshed destination found no agent listener (agent down).
    pub const NO_LISTENER: u32 = 1;
    /// `bpf_sk_assign` refused a socket.
    pub const ASSIGN_FAILED: u32 = 2;
    /// sock_ops started tracking a meshed connection.
    pub const CONN_TRACKED: u32 = 3;
    /// sock_ops saw a tracked connection close and forgot it.
    pub const CONN_CLOSED: u32 = 4;
    /// An HBONE SYN from another node was handed to the inbound listener.
    pub const INBOUND_CAPTURED: u32 = 5;
    /// Bytes the fast path moved between two of the agent's sockets.
    pub const SPLICED_BYTES: u32 = 6;
    /// Segments the fast path found no peer for (left to the agent).
    pub const SPLICE_NO_PEER: u32 = 7;
    /// A segment of a flow whose agent socket is in TIME_WAIT was handed
    /// to that socket, so the kernel's TIME_WAIT rules apply (a new SYN
    /// ends it and reaches the listener through `mesh_listener_lookup`).
    pub const TIME_WAIT_HANDOFF: u32 = 8;
    /// `mesh_listener_lookup` handed a SYN to one of the agent's listeners.
    pub const LISTENER_LOOKUP: u32 = 9;
    /// IPv4 TCP to a strict pod whose TCP header could not be read (a
    /// later fragment, or a first one too short), dropped.
    pub const STRICT_FRAGMENT_DROPPED: u32 = 10;
    /// Traffic to a strict pod that is neither IPv4 nor ARP (IPv6: the
    /// mesh carries IPv4 only), dropped.
    pub const STRICT_NON_IPV4_DROPPED: u32 = 11;
    /// A SYN between two pods of this node went pod to pod (an allowed
    /// pair in [`super::maps::DIRECT`]), not through the agent.
    pub const DIRECT_ADMITTED: u32 = 12;
    /// A segment of a pod-to-pod connection went straight into the
    /// receiving pod (`bpf_redirect_peer`), past the node's routing.
    pub const DIRECT_REDIRECTED: u32 = 13;
    /// `mesh_connect4` sent a pod's connect() to a service VIP straight
    /// to one of its endpoints on this node.
    pub const DIRECT_BALANCED: u32 = 14;
    /// A closed pod-to-pod connection's record found the ring buffer full
    /// (the agent fell behind): it has no access-log line.
    pub const DIRECT_RECORDS_LOST: u32 = 15;
    /// A SYN over its client's quota was answered with a reset: by
    /// `mesh_from_pod` (a service's quota, a client on this node) or by
    /// `mesh_to_pod` (a workload's, plaintext from outside the mesh). No
    /// socket was made; the agent never saw it.
    pub const QUOTA_REFUSED: u32 = 16;
    /// Number of counters.
    pub const LEN: u32 = 17;
    /// Human names, by index.
    pub const NAMES: [&str; LEN as usize] = [
        "captured",
        "no_listener",
        "assign_failed",
        "conn_tracked",
        "conn_closed",
        "inbound_captured",
        "spliced_bytes",
        "splice_no_peer",
        "time_wait_handoff",
        "listener_lookup",
        "strict_fragment_dropped",
        "strict_non_ipv4_dropped",
        "direct_admitted",
        "direct_redirected",
        "direct_balanced",
        "direct_records_lost",
        "quota_refused",
    ];
}

/// Key of [`maps::SERVICES`]: a service's virtual IP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Virtual IP, raw (network order).
    pub addr: u32,
    /// Service port, host order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub pad: u16,
}

/// Value of [`maps::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// The agent's index for the service (stable while the config is).
    pub service_id: u32,
    /// Reserved for per-service behaviour; zero today.
    pub flags: u32,
    /// The service's quota of new connections per client address, as
    /// GCRA: one SYN per `quota_interval_ns` on average (0: no quota in
    /// the kernel)...
    pub quota_interval_ns: u64,
    /// ...with up to `quota_tolerance_ns / quota_interval_ns` more at once
    /// (the burst less one).
    pub quota_tolerance_ns: u64,
}

/// [`QuotaKey::subject`]: the bucket is a workload's, not a service's.
pub const QUOTA_WORKLOAD: u32 = 1 << 31;

/// Key of [`maps::QUOTA_TAT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QuotaKey {
    /// [`ServiceValue::service_id`], or [`QUOTA_WORKLOAD`] with
    /// [`WorkloadValue::workload_id`].
    pub subject: u32,
    /// The client's address, raw.
    pub source: u32,
}

/// The workload runs on this node (its interface carries our tc programs).
pub const WORKLOAD_LOCAL: u32 = 1 << 0;
/// Plaintext connections from outside the mesh to this workload are dropped.
pub const WORKLOAD_STRICT: u32 = 1 << 1;

/// Value of [`maps::WORKLOADS`], keyed by a raw IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadValue {
    /// The agent's index for the workload.
    pub workload_id: u32,
    /// `WORKLOAD_*` bits.
    pub flags: u32,
    /// The workload's quota on plaintext SYNs from outside the mesh, per
    /// client address, as [`ServiceValue::quota_interval_ns`] (0: none).
    pub quota_interval_ns: u64,
    /// As [`ServiceValue::quota_tolerance_ns`].
    pub quota_tolerance_ns: u64,
}

/// Value of [`maps::POD_STATS`], keyed by the pod's host-side ifindex.
/// "from pod" is what the pod sent, "to pod" what it received.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    pub packets_from_pod: u64,
    pub bytes_from_pod: u64,
    pub packets_to_pod: u64,
    pub bytes_to_pod: u64,
    /// Connections (SYNs) of this pod handed to the agent.
    pub captured: u64,
    /// Connections from outside the mesh (forwarded, not from this host)
    /// let in to a permissive pod.
    pub plaintext_in: u64,
    /// The same, dropped because the pod is strict; also counts IPv6 and
    /// TCP fragments dropped for a strict pod.
    pub plaintext_dropped: u64,
}

impl PodStats {
    /// Adds another CPU's share.
    pub fn add(&mut self, other: &PodStats) {
        self.packets_from_pod += other.packets_from_pod;
        self.bytes_from_pod += other.bytes_from_pod;
        self.packets_to_pod += other.packets_to_pod;
        self.bytes_to_pod += other.bytes_to_pod;
        self.captured += other.captured;
        self.plaintext_in += other.plaintext_in;
        self.plaintext_dropped += other.plaintext_dropped;
    }
}

/// Key of [`maps::CONNS`]: a meshed pod's socket, seen from the pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The pod's address, raw.
    pub local_addr: u32,
    /// The peer's address, raw (for outbound: the original destination).
    pub remote_addr: u32,
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
}

/// The pod opened the connection.
pub const CONN_OUTBOUND: u32 = 1;
/// The pod accepted the connection.
pub const CONN_INBOUND: u32 = 2;

/// Value of [`maps::CONNS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnValue {
    /// The kernel's socket cookie of the pod's socket.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` when the connection was established.
    pub established_ns: u64,
    /// The pod's workload index.
    pub workload_id: u32,
    /// [`CONN_OUTBOUND`] or [`CONN_INBOUND`].
    pub direction: u32,
}

/// Value of [`maps::SETTINGS`] at index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Port of the agent's transparent outbound listener; 0 = capture off.
    pub outbound_port: u16,
    /// Port of the agent's inbound (HBONE) listener, never captured as outbound.
    pub inbound_port: u16,
    /// Mark set on steered packets (the node routes them to the local table).
    pub mark: u32,
    /// Bits of the mark that belong to the mesh.
    pub mark_mask: u32,
    /// `SETTING_*` bits.
    pub flags: u32,
    /// [`LAYOUT_VERSION`] of the agent that wrote this: a new agent
    /// adopts the pinned maps only when it is its own.
    pub layout: u32,
}

/// The meaning of the pinned maps' entries. Sizes and types a new agent
/// compares itself; bump this when an entry changes meaning without
/// changing size, so an agent never adopts maps it would misread.
pub const LAYOUT_VERSION: u32 = 1;

/// [`Settings::flags`]: `mesh_listener_lookup` is attached and the
/// listeners are in [`maps::LISTENERS`], so segments that meet an agent
/// socket in TIME_WAIT may go to it.
pub const SETTING_TIME_WAIT_HANDOFF: u32 = 1 << 0;
/// [`Settings::flags`]: consult [`maps::DIRECT`] (`proxy.same_node_direct`);
/// off, the programs skip its lookups.
pub const SETTING_SAME_NODE_DIRECT: u32 = 1 << 1;

/// Key of [`maps::DIRECT`]: a client pod's address, a server pod's address
/// on the same node, and the server's port (0: every port the policy does
/// not name).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirectKey {
    /// Raw.
    pub client: u32,
    /// Raw.
    pub server: u32,
    /// Host order; 0 for "any other port".
    pub port: u16,
    /// Explicit padding; always zero.
    pub pad: u16,
}

/// Value of [`maps::DIRECT`]. The interfaces tie the addresses to the pods
/// that own them: a segment claiming the client's address is admitted only
/// when it arrives from the client's own interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectValue {
    /// Host-side ifindex of the client pod.
    pub client_ifindex: u32,
    /// Host-side ifindex of the server pod.
    pub server_ifindex: u32,
    /// [`DIRECT_ALLOW`] or 0 (this port is not allowed, whatever the
    /// pair's port-0 entry says).
    pub verdict: u32,
}

/// Value of [`maps::DIRECT_FLOWS`]: one direction of a pod-to-pod
/// connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectFlow {
    /// Host-side ifindex of the sending pod: segments claiming this
    /// direction pass only from there.
    pub sender_ifindex: u32,
    /// Host-side ifindex of the receiving pod, learnt from the first
    /// segment the node delivered to it (0 until then); from then on
    /// segments go straight to the pod (`bpf_redirect_peer`) past the
    /// node's routing.
    pub receiver_ifindex: u32,
    /// The Ethernet addresses (destination, source: 12 bytes as three
    /// words) the node wrote on that segment, written on every segment
    /// sent straight to the pod.
    pub eth_0: u32,
    pub eth_1: u32,
    pub eth_2: u32,
    /// 1 once a reset went this way (for the connection's access record).
    pub reset: u32,
}

/// Key of [`maps::DIRECT_ENDPOINTS`]: one endpoint of a service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirectEndpointKey {
    /// The service's VIP, raw.
    pub vip: u32,
    /// The service port, host order.
    pub port: u16,
    /// 0 .. the count in [`maps::DIRECT_SERVICES`].
    pub index: u16,
}

/// Value of [`maps::DIRECT_ENDPOINTS`]: where a connection goes instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectEndpoint {
    /// The endpoint pod's address, raw.
    pub addr: u32,
    /// The target port, host order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub pad: u16,
}

/// One record of [`maps::DIRECT_CLOSED`]: a pod-to-pod connection, seen
/// from its client's socket as it closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectClosed {
    /// `bpf_ktime_get_ns()` when it was established.
    pub established_ns: u64,
    /// The same clock when it closed.
    pub closed_ns: u64,
    /// Bytes the client sent that the server acknowledged.
    pub sent: u64,
    /// Bytes the client received.
    pub received: u64,
    /// Raw addresses.
    pub client: u32,
    pub server: u32,
    /// Host order.
    pub client_port: u16,
    pub server_port: u16,
    /// The TCP state it left for CLOSE.
    pub last_state: u32,
    /// 1 if a reset went either way.
    pub reset: u32,
    /// Explicit padding; always zero.
    pub pad: u32,
}

/// [`DirectValue::verdict`]: connections go pod to pod.
pub const DIRECT_ALLOW: u32 = 1;

/// Index of the outbound (captured connections) listener in [`maps::LISTENERS`].
pub const LISTENER_OUTBOUND: u32 = 0;
/// Index of the inbound (HBONE) listener in [`maps::LISTENERS`].
pub const LISTENER_INBOUND: u32 = 1;

/// Key of [`maps::TC_FILTERS`]: where a netlink tc filter sits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcFilterKey {
    pub ifindex: u32,
    /// [`TC_INGRESS`] or [`TC_EGRESS`].
    pub direction: u32,
}

/// [`TcFilterKey::direction`] of an ingress filter.
pub const TC_INGRESS: u32 = 0;
/// [`TcFilterKey::direction`] of an egress filter.
pub const TC_EGRESS: u32 = 1;

/// Value of [`maps::TC_FILTERS`]: what identifies the filter to netlink.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcFilterValue {
    pub priority: u32,
    pub handle: u32,
    /// Index of the filter's program in [`programs::ALL`].
    pub program: u32,
}

/// Mark the tc program sets on packets it hands to the agent, and the mask it
/// owns. The node's routing sends marked packets to the local table.
pub const STEER_MARK: u32 = 0x200;
/// See [`STEER_MARK`].
pub const STEER_MARK_MASK: u32 = 0xf00;
/// Routing table holding the "everything is local" route for steered packets.
pub const STEER_ROUTE_TABLE: u32 = 100;

/// Converts an address to the raw form the maps use.
pub const fn ipv4_to_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// Converts a raw map address back to its octets.
pub const fn ipv4_from_raw(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// Stops the build if a shared type has implicit padding: its size must be
/// the sum of its fields' sizes. The value lists every field (a field
/// added and not listed does not compile) and `size_of_val` follows a
/// field whose type changes. All fields are integers, so `0` fits each.
macro_rules! assert_no_padding {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        const _: () = {
            let value = $ty { $($field: 0),+ };
            assert!(core::mem::size_of::<$ty>() == 0 $(+ core::mem::size_of_val(&value.$field))+);
        };
    };
}

// The kernel, the agent and bpftool (through BTF) read these by their
// byte layout.
assert_no_padding!(ServiceKey { addr, port, pad });
assert_no_padding!(ServiceValue {
    service_id,
    flags,
    quota_interval_ns,
    quota_tolerance_ns
});
assert_no_padding!(QuotaKey { subject, source });
assert_no_padding!(WorkloadValue {
    workload_id,
    flags,
    quota_interval_ns,
    quota_tolerance_ns
});
assert_no_padding!(PodStats {
    packets_from_pod,
    bytes_from_pod,
    packets_to_pod,
    bytes_to_pod,
    captured,
    plaintext_in,
    plaintext_dropped,
});
assert_no_padding!(ConnKey {
    local_addr,
    remote_addr,
    local_port,
    remote_port,
});
assert_no_padding!(ConnValue {
    cookie,
    established_ns,
    workload_id,
    direction,
});
assert_no_padding!(Settings {
    outbound_port,
    inbound_port,
    mark,
    mark_mask,
    flags,
    layout,
});
assert_no_padding!(TcFilterKey { ifindex, direction });
assert_no_padding!(DirectKey {
    client,
    server,
    port,
    pad
});
assert_no_padding!(DirectFlow {
    sender_ifindex,
    receiver_ifindex,
    eth_0,
    eth_1,
    eth_2,
    reset
});
assert_no_padding!(DirectEndpointKey { vip, port, index });
assert_no_padding!(DirectClosed {
    established_ns,
    closed_ns,
    sent,
    received,
    client,
    server,
    client_port,
    server_port,
    last_state,
    reset,
    pad
});
assert_no_padding!(DirectEndpoint { addr, port, pad });
assert_no_padding!(DirectValue {
    client_ifindex,
    server_ifindex,
    verdict
});
assert_no_padding!(TcFilterValue {
    priority,
    handle,
    program,
});

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are repr(C), Copy, without padding or pointers.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for QuotaKey {}
    unsafe impl aya::Pod for WorkloadValue {}
    unsafe impl aya::Pod for PodStats {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ConnValue {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for TcFilterKey {}
    unsafe impl aya::Pod for TcFilterValue {}
    unsafe impl aya::Pod for DirectKey {}
    unsafe impl aya::Pod for DirectValue {}
    unsafe impl aya::Pod for DirectFlow {}
    unsafe impl aya::Pod for DirectEndpointKey {}
    unsafe impl aya::Pod for DirectEndpoint {}
    unsafe impl aya::Pod for DirectClosed {}
}
