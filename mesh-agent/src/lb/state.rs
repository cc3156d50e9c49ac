//! Balancer state that outlives a config reload: per service (by
//! namespace/name) and per endpoint of a service (by service and IP). A
//! reload builds new balancers over the same state, so EWMAs, ejections,
//! health and live counts carry over.
//!
//! Endpoint state is kept per service, not per pod: a pod behind two
//! services serves them on different ports, often from different
//! processes, so failures, health and latency seen through one service say
//! nothing about the other (Envoy keeps outlier detection per cluster too).

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{ewma::PeakEwma, quota::Quotas};
use crate::locks::lock;

/// Latency assumed for an endpoint before its first connect.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// How fast the latency estimate forgets. Connect latency is normally well
/// under a millisecond, so one scheduling hiccup on a busy node is a large
/// peak; a long decay would let it steer traffic for many seconds (and
/// favour endpoints that are rarely measured). Two seconds forgives that
/// quickly while a slow endpoint, measured again and again, stays slow.
const EWMA_DECAY: Duration = Duration::from_secs(2);

pub struct EndpointState {
    pub ip: Ipv4Addr,
    active: AtomicU64,
    pending: AtomicU64,
    healthy: AtomicBool,
    ewma: Mutex<PeakEwma>,
    outlier: Mutex<Outlier>,
    connections: AtomicU64,
    failures: AtomicU64,
}

#[derive(Default)]
struct Outlier {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl EndpointState {
    fn new(ip: Ipv4Addr) -> Self {
        Self {
            ip,
            active: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            ewma: Mutex::new(PeakEwma::new(DEFAULT_RTT, EWMA_DECAY, Instant::now())),
            outlier: Mutex::new(Outlier::default()),
            connections: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.outlier)
            .ejected_until
            .is_some_and(|until| until > now)
    }

    /// Healthy and not ejected.
    pub fn is_available(&self, now: Instant) -> bool {
        self.is_healthy() && !self.is_ejected(now)
    }

    /// P2C cost: latency estimate times the load this connection would join.
    pub fn cost(&self, now: Instant) -> f64 {
        let load = (self.active() + self.pending() + 1) as f64;
        lock(&self.ewma).estimate_ns(now) * load
    }

    /// Counts a connect in progress until the guard drops.
    pub fn begin_connect(self: &Arc<Self>) -> CountGuard<Self> {
        CountGuard::new(self.clone(), |e| &e.pending)
    }

    /// Counts an established connection until the guard drops.
    pub fn begin_active(self: &Arc<Self>) -> CountGuard<Self> {
        self.connections.fetch_add(1, Ordering::Relaxed);
        CountGuard::new(self.clone(), |e| &e.active)
    }

    pub fn connect_succeeded(&self, latency: Duration) {
        let now = Instant::now();
        lock(&self.ewma).observe(latency, now);
        let mut outlier = lock(&self.outlier);
        outlier.consecutive_failures = 0;
        // A long healthy stretch forgets earlier ejections.
        if outlier
            .ejected_until
            .is_some_and(|until| now > until + Duration::from_secs(60))
        {
            outlier.ejections = 0;
            outlier.ejected_until = None;
        }
    }

    /// How long after connecting the endpoint sent its first byte. Peak-EWMA
    /// takes it like a connect latency, so an endpoint slow to answer loses
    /// P2C comparisons even when it accepts at once.
    pub fn response_observed(&self, latency: Duration) {
        lock(&self.ewma).observe(latency, Instant::now());
    }

    /// Counts a failure; returns the failures in a row so far.
    pub fn record_failure(&self) -> u32 {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut outlier = lock(&self.outlier);
        outlier.consecutive_failures += 1;
        outlier.consecutive_failures
    }

    /// Ejects for `base * 2^(earlier ejections)`, at most `max`.
    pub fn eject(&self, now: Instant, base: Duration, max: Duration) -> Duration {
        let mut outlier = lock(&self.outlier);
        let factor = 1u32 << outlier.ejections.min(16);
        let duration = (base * factor).min(max);
        outlier.ejections += 1;
        outlier.consecutive_failures = 0;
        outlier.ejected_until = Some(now + duration);
        duration
    }

    pub fn snapshot(&self, now: Instant) -> EndpointSnapshot {
        let outlier = lock(&self.outlier);
        EndpointSnapshot {
            ip: self.ip,
            healthy: self.is_healthy(),
            ejected_for_ms: outlier
                .ejected_until
                .and_then(|until| until.checked_duration_since(now))
                .map(|left| left.as_millis() as u64),
            ejections: outlier.ejections,
            consecutive_failures: outlier.consecutive_failures,
            active: self.active(),
            pending: self.pending(),
            ewma_ms: lock(&self.ewma).estimate_ns(now) / 1e6,
            connections: self.connections.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EndpointSnapshot {
    pub ip: Ipv4Addr,
    pub healthy: bool,
    /// Time left in the current ejection.
    pub ejected_for_ms: Option<u64>,
    pub ejections: u32,
    pub consecutive_failures: u32,
    pub active: u64,
    pub pending: u64,
    pub ewma_ms: f64,
    pub connections: u64,
    pub failures: u64,
}

/// Per-service counters and the state the policies keep between picks.
#[derive(Default)]
pub struct ServiceState {
    pub active: AtomicU64,
    pub pending: AtomicU64,
    pub retries_in_flight: AtomicU64,
    pub connections: AtomicU64,
    pub overflows: AtomicU64,
    pub retries: AtomicU64,
    pub retry_budget_exhausted: AtomicU64,
    pub no_endpoint: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Smooth weighted round robin: current weight per endpoint IP.
    pub round_robin: Mutex<HashMap<Ipv4Addr, i64>>,
    /// The same across subsets, for splits.
    pub subset_round_robin: Mutex<HashMap<String, i64>>,
    /// Per-client quotas' buckets and counts.
    pub quotas: Quotas,
}

#[derive(Debug, Serialize)]
pub struct ServiceCounters {
    pub active: u64,
    pub pending: u64,
    pub connections: u64,
    pub overflows: u64,
    pub retries: u64,
    pub retry_budget_exhausted: u64,
    pub no_endpoint: u64,
    pub connect_failures: u64,
    pub rate_limited: u64,
}

impl ServiceState {
    pub fn counters(&self) -> ServiceCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServiceCounters {
            active: get(&self.active),
            pending: get(&self.pending),
            connections: get(&self.connections),
            overflows: get(&self.overflows),
            retries: get(&self.retries),
            retry_budget_exhausted: get(&self.retry_budget_exhausted),
            no_endpoint: get(&self.no_endpoint),
            connect_failures: get(&self.connect_failures),
            rate_limited: get(&self.quotas.refused),
        }
    }
}

/// Holds one count on a counter of `T` (an endpoint's or a service's live
/// or pending connections) and gives it back when dropped.
pub struct CountGuard<T> {
    owner: Arc<T>,
    counter: fn(&T) -> &AtomicU64,
}

impl<T> CountGuard<T> {
    pub fn new(owner: Arc<T>, counter: fn(&T) -> &AtomicU64) -> Self {
        counter(&owner).fetch_add(1, Ordering::Relaxed);
        Self { owner, counter }
    }
}

impl<T> Drop for CountGuard<T> {
    fn drop(&mut self) {
        (self.counter)(&self.owner).fetch_sub(1, Ordering::Relaxed);
    }
}

/// A service: its namespace and name (not the kernel map key
/// `mesh_common::ServiceKey`, which is a VIP and port).
pub type ServiceName = (String, String);

/// All balancer state, shared by every snapshot of the routes.
#[derive(Default)]
pub struct Registry {
    endpoints: Mutex<HashMap<(ServiceName, Ipv4Addr), Arc<EndpointState>>>,
    services: Mutex<HashMap<ServiceName, Arc<ServiceState>>>,
    /// Workloads' quota buckets, by (namespace, name): kept across
    /// reloads like a service's.
    workloads: Mutex<HashMap<ServiceName, Arc<Quotas>>>,
}

impl Registry {
    /// The state of endpoint `ip` as a member of `service`.
    pub fn endpoint(&self, service: &ServiceName, ip: Ipv4Addr) -> Arc<EndpointState> {
        lock(&self.endpoints)
            .entry((service.clone(), ip))
            .or_insert_with(|| Arc::new(EndpointState::new(ip)))
            .clone()
    }

    pub fn workload(&self, workload: &ServiceName) -> Arc<Quotas> {
        lock(&self.workloads)
            .entry(workload.clone())
            .or_default()
            .clone()
    }

    /// Forgets the quota state of workloads that have no quota now.
    pub fn retain_workloads(&self, workloads: &HashSet<ServiceName>) {
        lock(&self.workloads).retain(|key, _| workloads.contains(key));
    }

    pub fn service(&self, service: &ServiceName) -> Arc<ServiceState> {
        lock(&self.services)
            .entry(service.clone())
            .or_default()
            .clone()
    }

    /// Forgets services, and endpoints of services, the current config no
    /// longer has.
    pub fn retain(
        &self,
        endpoints: &HashSet<(ServiceName, Ipv4Addr)>,
        services: &HashSet<ServiceName>,
    ) {
        lock(&self.endpoints).retain(|key, _| endpoints.contains(key));
        lock(&self.services).retain(|key, _| services.contains(key));
    }
}
