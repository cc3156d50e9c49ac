//! Endpoint selection and resilience: balancing policies, subset splits,
//! locality, circuit breakers, outlier ejection, retry budgets.
//!
//! [`state`] holds what must survive a reload (per service and per
//! endpoint of a service); [`Balancers`] is rebuilt for each config snapshot on top of it.

mod ewma;
pub mod health;
mod maglev;
pub mod quota;
mod service;
pub mod state;

use std::{collections::HashSet, net::Ipv4Addr, sync::Arc};

pub use self::{
    service::{
        Admission, MemberSnapshot, PickError, RetryPermit, ServiceBalancer, ServiceSnapshot,
    },
    state::{EndpointState, Registry, ServiceName},
};
use crate::model::{MeshState, Service};

/// One balancer per service, for one `MeshState`.
pub struct Balancers {
    per_service: Vec<ServiceBalancer>,
}

impl Balancers {
    pub fn new(state: &MeshState, registry: &Arc<Registry>) -> Self {
        let per_service = state
            .services
            .iter()
            .map(|s| ServiceBalancer::new(s, registry))
            .collect();
        let endpoints: HashSet<(ServiceName, Ipv4Addr)> = state
            .services
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| (s.key(), e.ip)))
            .collect();
        let services: HashSet<ServiceName> = state.services.iter().map(Service::key).collect();
        registry.retain(&endpoints, &services);
        Self { per_service }
    }

    pub fn service(&self, id: usize) -> Option<&ServiceBalancer> {
        self.per_service.get(id)
    }

    pub fn snapshot(&self) -> Vec<ServiceSnapshot> {
        self.per_service
            .iter()
            .map(ServiceBalancer::snapshot)
            .collect()
    }
}
