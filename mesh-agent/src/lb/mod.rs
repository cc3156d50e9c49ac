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

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use serde::Serialize;

pub use self::{
    service::{
        Admission, MemberSnapshot, PickError, RetryPermit, ServiceBalancer, ServiceSnapshot,
    },
    state::{EndpointState, Registry, ServiceName},
};
use crate::model::{MeshState, Quota, Service};
use quota::{OverQuota, QuotaGuard, Quotas};

/// One balancer per service, for one `MeshState`, and the quotas of the
/// workloads on this node that have one.
pub struct Balancers {
    per_service: Vec<ServiceBalancer>,
    per_workload: HashMap<usize, WorkloadGate>,
}

/// A local workload's quota: limits per client on the connections that
/// arrive at it, from any node, through any service or none.
struct WorkloadGate {
    name: ServiceName,
    quota: Quota,
    quotas: Arc<Quotas>,
}

/// `/stats` of a workload's quota.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadQuotaSnapshot {
    pub namespace: String,
    pub name: String,
    pub quota: Quota,
    pub rate_limited: u64,
    pub untracked: u64,
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
        let per_workload: HashMap<usize, WorkloadGate> = state
            .workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| w.local.is_some())
            .filter_map(|(id, w)| {
                let quota = w.quota.clone()?;
                let name = (w.namespace.clone(), w.name.clone());
                let quotas = registry.workload(&name);
                Some((
                    id,
                    WorkloadGate {
                        name,
                        quota,
                        quotas,
                    },
                ))
            })
            .collect();
        registry.retain_workloads(&per_workload.values().map(|g| g.name.clone()).collect());
        Self {
            per_service,
            per_workload,
        }
    }

    /// Admits a connection of `client` (identity or address) arriving at
    /// local workload `id` under its quota, if it has one; the guard
    /// counts it open until dropped.
    pub fn admit_to_workload(
        &self,
        id: usize,
        client: &str,
    ) -> Result<Option<QuotaGuard>, OverQuota> {
        let Some(gate) = self.per_workload.get(&id) else {
            return Ok(None);
        };
        gate.quotas
            .admit(&gate.quota, client, Instant::now())
            .map(Some)
    }

    pub fn workload_quotas(&self) -> Vec<WorkloadQuotaSnapshot> {
        let mut snapshots: Vec<_> = self
            .per_workload
            .values()
            .map(|gate| WorkloadQuotaSnapshot {
                namespace: gate.name.0.clone(),
                name: gate.name.1.clone(),
                quota: gate.quota.clone(),
                rate_limited: gate.quotas.refused.load(Ordering::Relaxed),
                untracked: gate.quotas.untracked.load(Ordering::Relaxed),
            })
            .collect();
        snapshots.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        snapshots
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
