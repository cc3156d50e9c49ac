//! What routing decisions read: the model and the balancers built for it,
//! swapped whole on every change, plus the addresses the agent itself
//! listens on (never a destination). The outbound proxy and the HBONE
//! server both route with it.

mod own_listeners;

use std::{collections::HashSet, net::Ipv4Addr, sync::Arc};

pub use self::own_listeners::OwnListeners;
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
