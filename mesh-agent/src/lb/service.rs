//! One service's balancer, built per config snapshot over the shared state.
//!
//! A pick goes: subset split → available endpoints (healthy, not ejected,
//! under their breaker limits, not already tried) → locality → policy.
//! When nothing is available, every endpoint under its limits is a
//! candidate again (panic routing): trying a possibly bad endpoint beats
//! refusing outright.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    maglev::Maglev,
    quota::{OverQuota, QuotaGuard},
    state::{CountGuard, EndpointSnapshot, EndpointState, Registry, ServiceCounters, ServiceState},
};
use crate::{
    locks::lock,
    model::{Faults, Locality, Policy, Quota, Resilience, Service, ServicePort, Split},
};

/// Why no endpoint was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// A circuit breaker limit is reached.
    #[error("circuit breaker open")]
    Overflow,
    /// No endpoint is eligible (none configured, all tried, or strict
    /// locality with no local endpoint).
    #[error("no endpoint available")]
    NoEndpoint,
}

struct Member {
    state: Arc<EndpointState>,
    weight: u32,
    subset: Option<String>,
    local: bool,
    zone: Option<String>,
    same_zone: bool,
}

pub struct ServiceBalancer {
    pub name: String,
    pub namespace: String,
    policy: Policy,
    locality: Locality,
    splits: Vec<(String, u32)>,
    pub resilience: Resilience,
    pub faults: Faults,
    members: Vec<Member>,
    state: Arc<ServiceState>,
    /// Consistent hashing tables: all members, and one per split subset,
    /// each built on its first use. Every agent builds every Service's
    /// balancer at each cluster change, and most never route to most
    /// Services: an eager table for each would cost all of them.
    maglev: Vec<(Option<String>, OnceLock<Option<Maglev>>)>,
}

/// A connection admitted by the service's breaker; counts as pending until
/// [`Admission::established`].
pub struct Admission {
    service: Arc<ServiceState>,
    pending: Option<CountGuard<ServiceState>>,
    active: Option<CountGuard<ServiceState>>,
}

impl Admission {
    pub fn established(&mut self) {
        self.pending = None;
        self.active = Some(CountGuard::new(self.service.clone(), |s| &s.active));
    }
}

/// A retry in flight, within the budget until dropped.
pub struct RetryPermit(#[expect(dead_code, reason = "held for its Drop")] CountGuard<ServiceState>);

impl ServiceBalancer {
    pub fn new(service: &Service, registry: &Registry) -> Self {
        let key = service.key();
        let members: Vec<Member> = service
            .endpoints
            .iter()
            .map(|e| Member {
                state: registry.endpoint(&key, e.ip),
                weight: e.weight,
                subset: e.subset.clone(),
                local: e.local,
                zone: e.zone.clone(),
                same_zone: e.same_zone,
            })
            .collect();
        let maglev = if service.policy == Policy::ConsistentHash {
            std::iter::once(None)
                .chain(service.splits.iter().map(|s| Some(s.subset.clone())))
                .map(|group| (group, OnceLock::new()))
                .collect()
        } else {
            Vec::new()
        };
        Self {
            name: service.name.clone(),
            namespace: service.namespace.clone(),
            policy: service.policy,
            locality: service.locality,
            splits: service
                .splits
                .iter()
                .map(|s| (s.subset.clone(), s.weight))
                .collect(),
            resilience: service.resilience.clone(),
            faults: service.faults.clone(),
            members,
            state: registry.service(&key),
            maglev,
        }
    }

    /// The service-level breaker: admits a connection or refuses it at once.
    pub fn admit(&self) -> Result<Admission, PickError> {
        let breaker = &self.resilience.circuit_breaker;
        let active = self.state.active.load(Ordering::Relaxed);
        let pending = self.state.pending.load(Ordering::Relaxed);
        if breaker
            .max_connections
            .is_some_and(|max| active + pending >= max)
            || breaker.max_pending.is_some_and(|max| pending >= max)
        {
            self.state.overflows.fetch_add(1, Ordering::Relaxed);
            return Err(PickError::Overflow);
        }
        self.state.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            service: self.state.clone(),
            pending: Some(CountGuard::new(self.state.clone(), |s| &s.pending)),
            active: None,
        })
    }

    /// Admits a new connection of `client` (identity or address) under
    /// the service's quota; the guard counts it open until dropped.
    pub fn admit_client(&self, client: &str) -> Result<Option<QuotaGuard>, OverQuota> {
        let Some(quota) = &self.resilience.quota else {
            return Ok(None);
        };
        self.state
            .quotas
            .admit(quota, client, Instant::now())
            .map(Some)
    }

    /// Chooses an endpoint for a connection from `client`, skipping `tried`.
    pub fn pick(
        &self,
        client: Ipv4Addr,
        tried: &[Ipv4Addr],
    ) -> Result<Arc<EndpointState>, PickError> {
        let now = Instant::now();
        let breaker = &self.resilience.circuit_breaker;
        let under_limits = |m: &Member| {
            let load = m.state.active() + m.state.pending();
            breaker
                .max_connections_per_endpoint
                .is_none_or(|max| load < max)
                && breaker
                    .max_pending_per_endpoint
                    .is_none_or(|max| m.state.pending() < max)
        };
        let eligible: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].weight > 0 && !tried.contains(&self.members[i].state.ip))
            .collect();
        if eligible.is_empty() {
            return Err(self.no_endpoint());
        }
        let within: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&i| under_limits(&self.members[i]))
            .collect();
        if within.is_empty() {
            self.state.overflows.fetch_add(1, Ordering::Relaxed);
            return Err(PickError::Overflow);
        }
        let available: Vec<usize> = within
            .iter()
            .copied()
            .filter(|&i| self.members[i].state.is_available(now))
            .collect();
        let subset = self.choose_subset(if available.is_empty() {
            &within
        } else {
            &available
        });
        let in_subset = |i: &usize| subset.is_none() || self.members[*i].subset == subset;
        let mut candidates: Vec<usize> = available.iter().copied().filter(in_subset).collect();
        if candidates.is_empty() {
            // Panic routing: nothing available, try what is within limits.
            candidates = within.iter().copied().filter(in_subset).collect();
        }
        candidates = self.apply_locality(candidates);
        if candidates.is_empty() {
            return Err(self.no_endpoint());
        }
        let chosen = match self.policy {
            Policy::RoundRobin => self.round_robin(&candidates),
            Policy::Random => self.weighted_random(&candidates),
            Policy::LeastConnections => self.least_connections(&candidates),
            Policy::P2cEwma => self.p2c(&candidates, now),
            Policy::ConsistentHash => self.consistent_hash(&candidates, client, subset.as_deref()),
        };
        Ok(self.members[chosen].state.clone())
    }

    fn no_endpoint(&self) -> PickError {
        self.state.no_endpoint.fetch_add(1, Ordering::Relaxed);
        PickError::NoEndpoint
    }

    /// The subset for this connection: by split weight among the subsets
    /// that have a candidate. `None` without splits.
    fn choose_subset(&self, candidates: &[usize]) -> Option<String> {
        if self.splits.is_empty() {
            return None;
        }
        let live: Vec<&(String, u32)> = self
            .splits
            .iter()
            .filter(|(subset, weight)| {
                *weight > 0
                    && candidates
                        .iter()
                        .any(|&i| self.members[i].subset.as_ref() == Some(subset))
            })
            .collect();
        let total: i64 = live.iter().map(|(_, w)| i64::from(*w)).sum();
        if total == 0 {
            // No weighted subset has a candidate: availability wins over
            // the split, any candidate will do.
            return None;
        }
        // Smooth weighted round robin across subsets: a 90/10 split sends
        // exactly one in ten connections to the canary, not about one in ten.
        let mut current = lock(&self.state.subset_round_robin);
        let mut best: Option<(&String, i64)> = None;
        for (subset, weight) in &live {
            let value = current.entry(subset.clone()).or_insert(0);
            *value += i64::from(*weight);
            if best.is_none_or(|(_, v)| *value > v) {
                best = Some((subset, *value));
            }
        }
        let (chosen, _) = best.expect("live is not empty");
        *current.get_mut(chosen).expect("just inserted") -= total;
        Some(chosen.clone())
    }

    fn apply_locality(&self, candidates: Vec<usize>) -> Vec<usize> {
        let local: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| self.members[i].local)
            .collect();
        match self.locality {
            Locality::Off => candidates,
            Locality::Strict => local,
            Locality::Prefer if local.is_empty() => {
                let zone: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| self.members[i].same_zone)
                    .collect();
                if zone.is_empty() { candidates } else { zone }
            }
            Locality::Prefer => local,
        }
    }

    fn round_robin(&self, candidates: &[usize]) -> usize {
        let mut current = lock(&self.state.round_robin);
        let total: i64 = candidates
            .iter()
            .map(|&i| i64::from(self.members[i].weight))
            .sum();
        let mut best = candidates[0];
        let mut best_value = i64::MIN;
        for &i in candidates {
            let value = current.entry(self.members[i].state.ip).or_insert(0);
            *value += i64::from(self.members[i].weight);
            if *value > best_value {
                best_value = *value;
                best = i;
            }
        }
        *current
            .get_mut(&self.members[best].state.ip)
            .expect("just inserted") -= total;
        best
    }

    fn weighted_random(&self, candidates: &[usize]) -> usize {
        let total: u64 = candidates
            .iter()
            .map(|&i| u64::from(self.members[i].weight))
            .sum();
        let mut ticket = fastrand::u64(0..total.max(1));
        for &i in candidates {
            let weight = u64::from(self.members[i].weight);
            if ticket < weight {
                return i;
            }
            ticket -= weight;
        }
        candidates[candidates.len() - 1]
    }

    fn least_connections(&self, candidates: &[usize]) -> usize {
        let load = |i: usize| {
            let m = &self.members[i];
            (m.state.active() + m.state.pending()) as f64 / f64::from(m.weight)
        };
        let least = candidates
            .iter()
            .map(|&i| load(i))
            .fold(f64::INFINITY, f64::min);
        let tied: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| load(i) <= least)
            .collect();
        tied[fastrand::usize(0..tied.len())]
    }

    /// Two weighted-random candidates; the one with the lower
    /// latency-times-load per unit of weight wins.
    fn p2c(&self, candidates: &[usize], now: Instant) -> usize {
        if candidates.len() == 1 {
            return candidates[0];
        }
        let first = self.weighted_random(candidates);
        let rest: Vec<usize> = candidates.iter().copied().filter(|&i| i != first).collect();
        let second = self.weighted_random(&rest);
        let cost = |i: usize| self.members[i].state.cost(now) / f64::from(self.members[i].weight);
        if cost(second) < cost(first) {
            second
        } else {
            first
        }
    }

    fn consistent_hash(
        &self,
        candidates: &[usize],
        client: Ipv4Addr,
        subset: Option<&str>,
    ) -> usize {
        let table = self
            .maglev
            .iter()
            .find(|(group, _)| group.as_deref() == subset)
            .and_then(|entry| self.built(entry))
            .or_else(|| self.maglev.first().and_then(|entry| self.built(entry)));
        if let Some(table) = table
            && let Some(i) = table
                .lookup(&client.octets())
                .find(|i| candidates.contains(i))
        {
            return i;
        }
        self.weighted_random(candidates)
    }

    /// A group's table, built now if this is its first use.
    fn built<'a>(
        &self,
        (group, table): &'a (Option<String>, OnceLock<Option<Maglev>>),
    ) -> Option<&'a Maglev> {
        table.get_or_init(|| self.maglev_table(group)).as_ref()
    }

    /// The table for the members of `group` (all members for `None`).
    fn maglev_table(&self, group: &Option<String>) -> Option<Maglev> {
        let names: Vec<String> = self
            .members
            .iter()
            .map(|m| m.state.ip.to_string())
            .collect();
        Maglev::new(self.members.iter().zip(&names).map(|(m, name)| {
            let in_group = group.is_none() || m.subset == *group;
            (name.as_str(), if in_group { m.weight } else { 0 })
        }))
    }

    /// Connect timeout for one attempt.
    pub fn connect_timeout(&self, default: Duration) -> Duration {
        self.resilience
            .connect_timeout_ms
            .map_or(default, Duration::from_millis)
    }

    /// Idle timeout of established connections, if any.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.resilience.idle_timeout_ms.map(Duration::from_millis)
    }

    /// A connect to `endpoint` failed, or it reset an established connection:
    /// count it and eject the endpoint if it keeps failing.
    pub fn report_failure(&self, endpoint: &EndpointState) {
        self.state.connect_failures.fetch_add(1, Ordering::Relaxed);
        let failures = endpoint.record_failure();
        let outlier = &self.resilience.outlier_detection;
        if outlier.consecutive_failures == 0 || failures < outlier.consecutive_failures {
            return;
        }
        let now = Instant::now();
        if endpoint.is_ejected(now) {
            return;
        }
        let ejected = self
            .members
            .iter()
            .filter(|m| m.state.is_ejected(now))
            .count();
        let cap = self.members.len() * outlier.max_ejection_percent as usize / 100;
        if ejected < cap {
            let duration = endpoint.eject(
                now,
                Duration::from_millis(outlier.base_ejection_ms),
                Duration::from_millis(outlier.max_ejection_ms),
            );
            tracing::warn!(
                service = %self.name, endpoint = %endpoint.ip, failures, ejected_for_ms = duration.as_millis() as u64,
                "endpoint ejected"
            );
        }
    }

    /// Permission for one more retry, if the budget has room.
    pub fn try_retry(&self) -> Option<RetryPermit> {
        let retry = &self.resilience.retry;
        let live =
            self.state.active.load(Ordering::Relaxed) + self.state.pending.load(Ordering::Relaxed);
        let budget =
            (live * u64::from(retry.budget_percent) / 100).max(u64::from(retry.min_concurrency));
        if self.state.retries_in_flight.load(Ordering::Relaxed) >= budget {
            self.state
                .retry_budget_exhausted
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.state.retries.fetch_add(1, Ordering::Relaxed);
        Some(RetryPermit(CountGuard::new(self.state.clone(), |s| {
            &s.retries_in_flight
        })))
    }

    /// Where to connect for `endpoint` on `port`.
    pub fn target(endpoint: &EndpointState, port: ServicePort) -> SocketAddrV4 {
        SocketAddrV4::new(endpoint.ip, port.target_port)
    }

    pub fn snapshot(&self) -> ServiceSnapshot {
        let now = Instant::now();
        ServiceSnapshot {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            policy: self.policy,
            locality: self.locality,
            splits: self
                .splits
                .iter()
                .map(|(subset, weight)| Split {
                    subset: subset.clone(),
                    weight: *weight,
                })
                .collect(),
            counters: self.state.counters(),
            quota: self.resilience.quota.clone(),
            faults: self.faults.clone(),
            endpoints: self
                .members
                .iter()
                .map(|m| MemberSnapshot {
                    weight: m.weight,
                    subset: m.subset.clone(),
                    local: m.local,
                    zone: m.zone.clone(),
                    same_zone: m.same_zone,
                    state: m.state.snapshot(now),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ServiceSnapshot {
    pub name: String,
    pub namespace: String,
    pub policy: Policy,
    pub locality: Locality,
    pub splits: Vec<Split>,
    pub counters: ServiceCounters,
    /// Limits per client, if any.
    pub quota: Option<Quota>,
    /// Faults injected into new connections (testing): visible, so that
    /// none is left on by mistake.
    pub faults: Faults,
    pub endpoints: Vec<MemberSnapshot>,
}

#[derive(Debug, Serialize)]
pub struct MemberSnapshot {
    pub weight: u32,
    pub subset: Option<String>,
    pub local: bool,
    /// The endpoint's zone, and whether it is this node's (what `prefer`
    /// locality ranks by after the node).
    pub zone: Option<String>,
    pub same_zone: bool,
    #[serde(flatten)]
    pub state: EndpointSnapshot,
}

#[cfg(test)]
mod tests {
    //! The balancer's decisions, without a network: endpoints are only
    //! addresses here, and load is what the guards count.

    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{CircuitBreaker, Endpoint, OutlierDetection};

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 2, 0, last)
    }

    fn endpoint(last: u8) -> Endpoint {
        Endpoint {
            ip: ip(last),
            weight: 1,
            subset: None,
            node: None,
            local: false,
            zone: None,
            same_zone: false,
        }
    }

    fn service(policy: Policy, endpoints: Vec<Endpoint>) -> Service {
        Service {
            name: "echo".into(),
            namespace: "default".into(),
            vip: Ipv4Addr::new(10, 96, 0, 10),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints,
            policy,
            locality: Locality::Off,
            splits: Vec::new(),
            resilience: Resilience::default(),
            faults: Faults::default(),
        }
    }

    fn balancer(service: &Service) -> ServiceBalancer {
        ServiceBalancer::new(service, &Registry::default())
    }

    /// How many of `picks` went to each endpoint (by last octet).
    fn spread(balancer: &ServiceBalancer, picks: usize) -> BTreeMap<u8, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..picks {
            let chosen = balancer.pick(CLIENT, &[]).expect("an endpoint");
            *counts.entry(chosen.ip.octets()[3]).or_default() += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let mut endpoints = vec![endpoint(1), endpoint(2), endpoint(3)];
        endpoints[0].weight = 3;
        let b = balancer(&service(Policy::RoundRobin, endpoints));
        assert_eq!(spread(&b, 50), BTreeMap::from([(1, 30), (2, 10), (3, 10)]));
    }

    #[test]
    fn zero_weight_endpoints_and_tried_ones_are_never_picked() {
        let mut endpoints = vec![endpoint(1), endpoint(2), endpoint(3)];
        endpoints[2].weight = 0;
        let b = balancer(&service(Policy::Random, endpoints));
        for _ in 0..200 {
            let chosen = b.pick(CLIENT, &[ip(1)]).unwrap();
            assert_eq!(chosen.ip, ip(2));
        }
        assert_eq!(
            b.pick(CLIENT, &[ip(1), ip(2)]).err(),
            Some(PickError::NoEndpoint)
        );
        assert_eq!(b.state.no_endpoint.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn least_connections_avoids_the_busy_endpoint() {
        let b = balancer(&service(
            Policy::LeastConnections,
            vec![endpoint(1), endpoint(2)],
        ));
        let busy = b.pick(CLIENT, &[]).unwrap();
        let _held: Vec<_> = (0..3).map(|_| busy.begin_active()).collect();
        for _ in 0..50 {
            assert_ne!(b.pick(CLIENT, &[]).unwrap().ip, busy.ip);
        }
    }

    #[test]
    fn p2c_prefers_the_endpoint_with_lower_latency_and_load() {
        let b = balancer(&service(Policy::P2cEwma, vec![endpoint(1), endpoint(2)]));
        let [slow, fast] = [ip(1), ip(2)].map(|ip| {
            b.members
                .iter()
                .find(|m| m.state.ip == ip)
                .unwrap()
                .state
                .clone()
        });
        for _ in 0..20 {
            slow.connect_succeeded(Duration::from_millis(200));
            fast.connect_succeeded(Duration::from_millis(1));
        }
        // With two endpoints both are always compared: the cheaper wins.
        assert_eq!(spread(&b, 100), BTreeMap::from([(2, 100)]));
    }

    #[test]
    fn consistent_hash_keeps_a_client_on_one_endpoint_and_moves_it_when_tried() {
        let endpoints = (1..=5).map(endpoint).collect();
        let b = balancer(&service(Policy::ConsistentHash, endpoints));
        let first = b.pick(CLIENT, &[]).unwrap().ip;
        for _ in 0..20 {
            assert_eq!(b.pick(CLIENT, &[]).unwrap().ip, first);
        }
        let retry = b.pick(CLIENT, &[first]).unwrap().ip;
        assert_ne!(retry, first);
        // Different clients spread over the endpoints.
        let clients: std::collections::BTreeSet<Ipv4Addr> = (0..=255)
            .map(|i| b.pick(Ipv4Addr::new(10, 1, 1, i), &[]).unwrap().ip)
            .collect();
        assert_eq!(clients.len(), 5);
    }

    #[test]
    fn a_split_sends_exactly_its_share_to_each_subset() {
        let mut endpoints = vec![endpoint(1), endpoint(2), endpoint(3)];
        endpoints[0].subset = Some("v1".into());
        endpoints[1].subset = Some("v1".into());
        endpoints[2].subset = Some("v2".into());
        let mut s = service(Policy::RoundRobin, endpoints);
        s.splits = vec![
            Split {
                subset: "v1".into(),
                weight: 90,
            },
            Split {
                subset: "v2".into(),
                weight: 10,
            },
        ];
        let b = balancer(&s);
        let counts = spread(&b, 100);
        assert_eq!(counts[&3], 10, "{counts:?}");
        assert_eq!(counts[&1] + counts[&2], 90, "{counts:?}");
    }

    #[test]
    fn a_split_gives_way_when_its_subset_has_no_available_endpoint() {
        let mut endpoints = vec![endpoint(1), endpoint(2)];
        endpoints[0].subset = Some("v1".into());
        endpoints[1].subset = Some("v2".into());
        let mut s = service(Policy::RoundRobin, endpoints);
        s.splits = vec![Split {
            subset: "v2".into(),
            weight: 100,
        }];
        let b = balancer(&s);
        assert_eq!(spread(&b, 5), BTreeMap::from([(2, 5)]));
        // v2's only endpoint is down: availability wins over the split.
        b.members[1].state.set_healthy(false);
        assert_eq!(spread(&b, 5), BTreeMap::from([(1, 5)]));
    }

    #[test]
    fn locality_prefers_this_node_then_this_zone_and_strict_never_leaves_the_node() {
        let mut endpoints = vec![endpoint(1), endpoint(2), endpoint(3)];
        endpoints[0].local = true;
        endpoints[1].same_zone = true;
        let mut s = service(Policy::RoundRobin, endpoints);
        s.locality = Locality::Prefer;
        let b = balancer(&s);
        assert_eq!(spread(&b, 10), BTreeMap::from([(1, 10)]));
        // The local one tried: the same zone before the rest.
        for _ in 0..10 {
            assert_eq!(b.pick(CLIENT, &[ip(1)]).unwrap().ip, ip(2));
        }
        assert_eq!(b.pick(CLIENT, &[ip(1), ip(2)]).unwrap().ip, ip(3));

        s.locality = Locality::Strict;
        let strict = balancer(&s);
        assert_eq!(
            strict.pick(CLIENT, &[ip(1)]).err(),
            Some(PickError::NoEndpoint)
        );

        s.locality = Locality::Off;
        let off = balancer(&s);
        assert_eq!(spread(&off, 9).len(), 3);
    }

    #[test]
    fn unhealthy_and_ejected_endpoints_are_skipped_while_others_are_up() {
        let b = balancer(&service(
            Policy::RoundRobin,
            vec![endpoint(1), endpoint(2), endpoint(3)],
        ));
        b.members[0].state.set_healthy(false);
        let now = Instant::now();
        b.members[1]
            .state
            .eject(now, Duration::from_secs(30), Duration::from_secs(60));
        assert_eq!(spread(&b, 6), BTreeMap::from([(3, 6)]));
        // All down: panic routing spreads over all rather than refusing.
        b.members[2].state.set_healthy(false);
        assert_eq!(spread(&b, 6).len(), 3);
    }

    #[test]
    fn the_service_breaker_refuses_past_max_connections_and_max_pending() {
        let mut s = service(Policy::RoundRobin, vec![endpoint(1)]);
        s.resilience.circuit_breaker = CircuitBreaker {
            max_connections: Some(3),
            max_pending: Some(2),
            ..Default::default()
        };
        let b = balancer(&s);
        let mut first = b.admit().unwrap();
        let _second = b.admit().unwrap();
        // Two pending: max_pending reached.
        assert_eq!(b.admit().err(), Some(PickError::Overflow));
        first.established();
        let third = b.admit().unwrap();
        // One active and two pending: max_connections reached.
        assert_eq!(b.admit().err(), Some(PickError::Overflow));
        assert_eq!(b.state.overflows.load(Ordering::Relaxed), 2);
        drop(third);
        assert!(b.admit().is_ok(), "an ended connection frees its slot");
        drop(first);
    }

    #[test]
    fn per_endpoint_limits_move_connections_on_and_overflow_when_all_are_full() {
        let mut s = service(Policy::RoundRobin, vec![endpoint(1), endpoint(2)]);
        s.resilience.circuit_breaker = CircuitBreaker {
            max_connections_per_endpoint: Some(1),
            ..Default::default()
        };
        let b = balancer(&s);
        let one = b.pick(CLIENT, &[]).unwrap();
        let _busy = one.begin_active();
        for _ in 0..5 {
            assert_ne!(b.pick(CLIENT, &[]).unwrap().ip, one.ip);
        }
        let two = b.pick(CLIENT, &[]).unwrap();
        let _also_busy = two.begin_connect();
        assert_eq!(b.pick(CLIENT, &[]).err(), Some(PickError::Overflow));
    }

    #[test]
    fn consecutive_failures_eject_but_never_past_the_ejection_cap() {
        let mut s = service(Policy::RoundRobin, (1..=4).map(endpoint).collect());
        s.resilience.outlier_detection = OutlierDetection {
            consecutive_failures: 3,
            max_ejection_percent: 50,
            ..Default::default()
        };
        let b = balancer(&s);
        let now = Instant::now();
        let states: Vec<_> = b.members.iter().map(|m| m.state.clone()).collect();
        for _ in 0..2 {
            b.report_failure(&states[0]);
        }
        assert!(!states[0].is_ejected(now), "two failures of three");
        b.report_failure(&states[0]);
        assert!(states[0].is_ejected(Instant::now()));
        for state in &states[1..] {
            for _ in 0..3 {
                b.report_failure(state);
            }
        }
        let ejected = states
            .iter()
            .filter(|s| s.is_ejected(Instant::now()))
            .count();
        assert_eq!(ejected, 2, "half of four at most");
        assert_eq!(b.state.connect_failures.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut s = service(Policy::RoundRobin, vec![endpoint(1), endpoint(2)]);
        s.resilience.outlier_detection.consecutive_failures = 2;
        let b = balancer(&s);
        let state = b.members[0].state.clone();
        b.report_failure(&state);
        state.connect_succeeded(Duration::from_millis(1));
        b.report_failure(&state);
        assert!(!state.is_ejected(Instant::now()));
    }

    #[test]
    fn the_retry_budget_is_a_share_of_live_connections_with_a_floor() {
        let mut s = service(Policy::RoundRobin, vec![endpoint(1)]);
        s.resilience.retry = crate::model::Retry {
            retries: 2,
            budget_percent: 50,
            min_concurrency: 1,
        };
        let b = balancer(&s);
        // No traffic: the floor allows one retry at a time.
        let first = b.try_retry().expect("the floor");
        assert!(b.try_retry().is_none());
        drop(first);
        // Six live connections: half of them may be retries at once.
        let _live: Vec<_> = (0..6).map(|_| b.admit().unwrap()).collect();
        let permits: Vec<_> = std::iter::from_fn(|| b.try_retry()).take(10).collect();
        assert_eq!(permits.len(), 3);
        assert_eq!(b.state.retry_budget_exhausted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn timeouts_default_unless_the_service_sets_them() {
        let mut s = service(Policy::RoundRobin, vec![endpoint(1)]);
        let default = Duration::from_secs(5);
        assert_eq!(balancer(&s).connect_timeout(default), default);
        assert_eq!(balancer(&s).idle_timeout(), None);
        s.resilience.connect_timeout_ms = Some(250);
        s.resilience.idle_timeout_ms = Some(60_000);
        assert_eq!(
            balancer(&s).connect_timeout(default),
            Duration::from_millis(250)
        );
        assert_eq!(balancer(&s).idle_timeout(), Some(Duration::from_secs(60)));
    }
}
