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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Workload, WorkloadMode};

    fn workload(name: &str, ip: Ipv4Addr) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            ips: vec![ip],
            node: "n1".into(),
            mode: WorkloadMode::Permissive,
            local: None,
            quota: None,
        }
    }

    #[test]
    fn the_client_address_is_kept_only_where_the_replies_come_back() {
        let (client, hooked, unhooked, outsider) = (
            Ipv4Addr::new(10, 1, 0, 1),
            Ipv4Addr::new(10, 1, 0, 2),
            Ipv4Addr::new(10, 1, 0, 3),
            Ipv4Addr::new(192, 0, 2, 9),
        );
        let state = Arc::new(MeshState::new(
            "n1".into(),
            "td".into(),
            Default::default(),
            vec![
                workload("client", client),
                workload("hooked", hooked),
                workload("unhooked", unhooked),
            ],
            Vec::new(),
        ));
        let routes = Routes::new(
            state,
            &Arc::new(Registry::default()),
            HashSet::from([hooked, client]),
            Arc::new(OwnListeners::new([15001, 15008])),
        );
        // A meshed client to a pod whose hook hands the replies back.
        assert_eq!(routes.upstream_source(client, hooked), Some(client));
        // No hook on the target: its replies would go to the client.
        assert_eq!(routes.upstream_source(client, unhooked), None);
        // A client outside the mesh: the hook would not take the replies.
        assert_eq!(routes.upstream_source(outsider, hooked), None);
        // A pod calling itself: its own address from outside is a martian.
        assert_eq!(routes.upstream_source(client, client), None);
    }
}
