//! HBONE: TCP connections tunnelled between nodes as HTTP/2 CONNECT streams
//! over mutual TLS (1.3, ALPN `h2`) to the destination pod's IP on port
//! 15008, with SPIFFE identities on both ends. Wire-compatible with Istio
//! ambient's ztunnel.
//!
//! [`client`] opens streams from a local workload to a remote one, pooling
//! HTTP/2 connections per (source identity, destination identity, node);
//! [`server`] accepts them for this node's workloads; `tunnel` splices a
//! stream with the pod's TCP connection.

pub mod client;
pub mod request;
pub mod server;
mod tunnel;

use std::time::Duration;

pub use tunnel::{Tunnel, Watch, splice_tunnel};

/// HTTP/2 flow-control windows: large enough that one stream can fill a
/// fast link without waiting for WINDOW_UPDATEs.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame we accept (fewer, larger frames per byte moved).
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Bytes h2 buffers per stream before it stops taking writes (h2's
/// default, 400 KiB, caps one stream below what the window allows).
pub const SEND_BUFFER: usize = 4 * 1024 * 1024;
/// Encrypted bytes rustls queues before a write must wait for the socket:
/// room for a whole DATA frame, so one frame goes out in one `writev`
/// (rustls's default, 64 KiB, cut each frame's write in two).
pub const TLS_SEND_BUFFER: usize = 256 * 1024;

/// Hard cap on streams per HTTP/2 connection (the server's
/// SETTINGS_MAX_CONCURRENT_STREAMS); the client opens more connections well
/// before it (see `HboneConfig::streams_per_connection`).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// How long a TLS (or HTTP/2) handshake may take. Anyone who can reach a
/// pod's port 15008 can start one, so it is short.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keepalive on HBONE connections: a peer that vanished (its node
/// lost, a partition) is found within about 25 s of silence (10 s idle,
/// then 3 probes 5 s apart), and unacknowledged data gives up after 30 s,
/// so pooled connections do not outlive their peer.
pub fn keep_alive(stream: &tokio::net::TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(error) = socket
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| socket.set_tcp_user_timeout(Some(Duration::from_secs(30))))
    {
        tracing::debug!(%error, "TCP keepalive on an HBONE connection");
    }
}
