//! Active health checks: a TCP connect probe per endpoint of every service
//! that asks for them, on the service's first target port. Thresholds turn
//! probe results into the `healthy` flag of the endpoint as a member of that
//! service, which its balancer reads. Reconciled on every config change;
//! probes stop when dropped.

use std::{collections::HashMap, net::SocketAddrV4, sync::Arc, time::Duration};

use tokio::{net::TcpStream, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    lb::{EndpointState, Registry, state::ServiceName},
    model::{HealthCheck, MeshState},
};

/// A probe: whose endpoint it judges, and where it connects.
type ProbeKey = (ServiceName, SocketAddrV4);

#[derive(Default)]
pub struct HealthChecks {
    probes: HashMap<ProbeKey, Probe>,
}

struct Probe {
    check: HealthCheck,
    endpoint: Arc<EndpointState>,
    task: JoinHandle<()>,
}

impl HealthChecks {
    pub fn sync(&mut self, state: &MeshState, registry: &Registry) {
        let mut wanted: HashMap<ProbeKey, &HealthCheck> = HashMap::new();
        for service in &state.services {
            let (Some(check), Some(port)) =
                (&service.resilience.health_check, service.ports.first())
            else {
                continue;
            };
            for endpoint in &service.endpoints {
                let target = SocketAddrV4::new(endpoint.ip, port.target_port);
                wanted.insert((service.key(), target), check);
            }
        }
        self.probes.retain(|key, probe| {
            let keep = wanted.get(key).is_some_and(|&want| *want == probe.check);
            if !keep {
                probe.task.abort();
                // No longer probed: nothing vouches against it any more.
                probe.endpoint.set_healthy(true);
            }
            keep
        });
        for (key, check) in wanted {
            self.probes
                .entry(key)
                .or_insert_with_key(|(service, target)| {
                    let endpoint = registry.endpoint(service, *target.ip());
                    Probe {
                        check: check.clone(),
                        endpoint: endpoint.clone(),
                        task: tokio::spawn(probe(endpoint, *target, check.clone())),
                    }
                });
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.probes.values().for_each(|probe| probe.task.abort());
    }
}

async fn probe(endpoint: Arc<EndpointState>, target: SocketAddrV4, check: HealthCheck) {
    let timeout = Duration::from_millis(check.timeout_ms);
    let mut interval = tokio::time::interval(Duration::from_millis(check.interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0u32, 0u32);
    loop {
        interval.tick().await;
        let ok = matches!(
            tokio::time::timeout(timeout, TcpStream::connect(target)).await,
            Ok(Ok(_))
        );
        if ok {
            successes += 1;
            failures = 0;
            if !endpoint.is_healthy() && successes >= check.healthy_threshold {
                endpoint.set_healthy(true);
                info!(endpoint = %target, "health check: healthy");
            }
        } else {
            failures += 1;
            successes = 0;
            if endpoint.is_healthy() && failures >= check.unhealthy_threshold {
                endpoint.set_healthy(false);
                warn!(endpoint = %target, failures, "health check: unhealthy");
            }
        }
    }
}
