//! The user-space proxy: accepts the connections the kernel captured,
//! decides where each goes, connects there and splices the two.

mod connect;
mod outbound;
mod own_listeners;
pub mod splice;
mod upstream;

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpListener;

pub use self::{
    connect::connect,
    outbound::{Outbound, OutboundSettings, OutboundStats},
    own_listeners::OwnListeners,
};
use crate::{
    lb::{Balancers, Registry},
    model::MeshState,
};

/// One consistent view for routing decisions: the model and the balancers
/// built for it. Swapped whole on reload; connections keep the one they began with.
pub struct Routes {
    pub state: Arc<MeshState>,
    pub balancers: Balancers,
    /// IPs of this node's workloads whose interface carries the capture
    /// hook (empty when `proxy.preserve_client_ip` is off).
    hooked: HashSet<Ipv4Addr>,
    /// Where the agent itself listens: never a destination.
    pub own: Arc<OwnListeners>,
}

impl Routes {
    pub fn new(
        state: Arc<MeshState>,
        registry: &Arc<Registry>,
        hooked: HashSet<Ipv4Addr>,
        own: Arc<OwnListeners>,
    ) -> Self {
        let balancers = Balancers::new(&state, registry);
        Self {
            state,
            balancers,
            hooked,
            own,
        }
    }

    /// The address to connect to `target` from, for a connection from
    /// `client`: the client's own when the target's replies are sure to
    /// come back to the agent, else `None` (the node's).
    ///
    /// They come back when `target` is a pod here whose interface carries
    /// the capture hook and `client` is a meshed workload: the hook hands
    /// what the pod sends to a meshed address to the agent socket that owns
    /// the flow (`mesh_from_pod`, existing-flow lookup). Never for a pod
    /// calling itself through a service: a packet from its own address
    /// arriving from outside is a martian to it.
    pub fn upstream_source(&self, client: Ipv4Addr, target: Ipv4Addr) -> Option<Ipv4Addr> {
        let returns = self.hooked.contains(&target)
            && client != target
            && self.state.workload_by_ip(client).is_some();
        returns.then_some(client)
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
