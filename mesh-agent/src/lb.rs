//! Endpoint selection. Today: smooth weighted round robin per service (the
//! nginx algorithm: the same spread as plain round robin for equal weights,
//! and no bursts to one endpoint for unequal ones).

use std::sync::Mutex;

use crate::model::{MeshState, Service};

/// One balancer per service, built for one `MeshState`.
pub struct Balancers {
    per_service: Vec<WeightedRoundRobin>,
}

impl Balancers {
    pub fn new(state: &MeshState) -> Self {
        Self {
            per_service: state.services.iter().map(WeightedRoundRobin::new).collect(),
        }
    }

    /// Index of the endpoint of `service` for the next connection.
    pub fn pick(&self, service: usize) -> Option<usize> {
        self.per_service.get(service)?.pick()
    }
}

pub struct WeightedRoundRobin {
    weights: Vec<i64>,
    total: i64,
    current: Mutex<Vec<i64>>,
}

impl WeightedRoundRobin {
    pub fn new(service: &Service) -> Self {
        let weights: Vec<i64> = service
            .endpoints
            .iter()
            .map(|e| i64::from(e.weight))
            .collect();
        Self {
            total: weights.iter().sum(),
            current: Mutex::new(vec![0; weights.len()]),
            weights,
        }
    }

    pub fn pick(&self) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best = 0;
        for (index, weight) in self.weights.iter().enumerate() {
            current[index] += weight;
            if current[index] > current[best] {
                best = index;
            }
        }
        current[best] -= self.total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Endpoint, ServicePort};

    fn service(weights: &[u32]) -> Service {
        Service {
            name: "s".into(),
            namespace: "default".into(),
            vip: Ipv4Addr::new(10, 96, 0, 1),
            ports: vec![ServicePort {
                port: 80,
                target_port: 80,
            }],
            endpoints: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Endpoint {
                    ip: Ipv4Addr::new(10, 0, 0, i as u8),
                    weight,
                })
                .collect(),
        }
    }

    fn counts(weights: &[u32], picks: usize) -> Vec<usize> {
        let rr = WeightedRoundRobin::new(&service(weights));
        let mut counts = vec![0; weights.len()];
        for _ in 0..picks {
            counts[rr.pick().unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn equal_weights_rotate_evenly() {
        assert_eq!(counts(&[1, 1, 1], 300), vec![100, 100, 100]);
    }

    #[test]
    fn weights_split_exactly() {
        assert_eq!(counts(&[9, 1], 1000), vec![900, 100]);
        assert_eq!(counts(&[1, 0, 1], 10), vec![5, 0, 5]);
    }

    #[test]
    fn no_endpoints_picks_nothing() {
        assert_eq!(WeightedRoundRobin::new(&service(&[])).pick(), None);
        assert_eq!(WeightedRoundRobin::new(&service(&[0])).pick(), None);
    }
}
