//! Active health checks: a TCP connect probe per endpoint of every service
//! that asks for them, on the service's first target port. Thresholds turn
//! probe results into the endpoint's `healthy` flag, which the balancers
//! read. Reconciled on every config change; probes stop when dropped.

use std::{collections::HashMap, net::SocketAddrV4, sync::Arc, time::Duration};

use tokio::{net::TcpStream, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    lb::{EndpointState, Registry},
    model::{HealthCheck, MeshState},
};

#[derive(Default)]
pub struct HealthChecks {
    probes: HashMap<SocketAddrV4, (HealthCheck, JoinHandle<()>)>,
}

impl HealthChecks {
    pub fn sync(&mut self, state: &MeshState, registry: &Registry) {
        let mut wanted: HashMap<SocketAddrV4, (HealthCheck, Arc<EndpointState>)> = HashMap::new();
        for service in &state.services {
            let (Some(check), Some(port)) =
                (&service.resilience.health_check, service.ports.first())
            else {
                continue;
            };
            for endpoint in &service.endpoints {
                let target = SocketAddrV4::new(endpoint.ip, port.target_port);
                wanted
                    .entry(target)
                    .or_insert_with(|| (check.clone(), registry.endpoint(endpoint.ip)));
            }
        }
        self.probes.retain(|target, (check, task)| {
            let keep = wanted.get(target).is_some_and(|(want, _)| want == check);
            if !keep {
                task.abort();
                // No longer probed: nothing vouches against it any more.
                registry.endpoint(*target.ip()).set_healthy(true);
            }
            keep
        });
        for (target, (check, endpoint)) in wanted {
            self.probes
                .entry(target)
                .or_insert_with(|| (check.clone(), tokio::spawn(probe(endpoint, target, check))));
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.probes.values().for_each(|(_, task)| task.abort());
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
