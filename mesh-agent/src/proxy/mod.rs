//! The user-space proxy: accepts the connections the kernel captured,
//! decides where each goes, connects there and splices the two.

mod outbound;
pub mod splice;
mod upstream;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;

pub use self::outbound::{Outbound, OutboundSettings, OutboundStats};
use crate::{
    lb::{Balancers, Registry},
    model::MeshState,
};

/// One consistent view for routing decisions: the model and the balancers
/// built for it. Swapped whole on reload; connections keep the one they began with.
pub struct Routes {
    pub state: Arc<MeshState>,
    pub balancers: Balancers,
}

impl Routes {
    pub fn new(state: Arc<MeshState>, registry: &Arc<Registry>) -> Self {
        let balancers = Balancers::new(&state, registry);
        Self { state, balancers }
    }
}

/// A listener that accepts connections addressed to any IP: the kernel hands
/// it captured flows whose destination is not a local address, and the
/// accepted socket's local address is the original destination.
pub fn transparent_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // Without IP_TRANSPARENT the kernel sends no SYN-ACK from a foreign address.
    socket.set_ip_transparent_v4(true)?;
    // Accepted sockets inherit it. A proxy forwards writes as they come:
    // with Nagle, a short write behind another waits for the peer's
    // delayed ACK (40 ms); HTTP/2 writes many small frames.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}
