//! How a service chooses and protects its endpoints: the balancing policy,
//! locality, subset splits and the resilience knobs. Plain data, with serde
//! so the config file can carry it as is; [`crate::lb`] acts on it.

use serde::{Deserialize, Serialize};

/// How an endpoint is chosen among the eligible ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// Fewest active plus pending connections, relative to weight.
    LeastConnections,
    /// Power of two choices over peak-EWMA connect latency times load.
    #[default]
    P2cEwma,
    /// Maglev consistent hashing on the client IP (session affinity).
    ConsistentHash,
}

/// Whether endpoints on this node are preferred.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    /// Same-node endpoints while any is available, then same-zone ones,
    /// then the rest.
    #[default]
    Prefer,
    /// Same-node endpoints only.
    Strict,
    /// No preference.
    Off,
}

/// A share of new connections for the endpoints of one subset (version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub subset: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resilience {
    /// Per-attempt connect timeout; default: `proxy.connect_timeout_ms`.
    pub connect_timeout_ms: Option<u64>,
    /// Close connections idle this long in both directions; default: never.
    pub idle_timeout_ms: Option<u64>,
    pub retry: Retry,
    pub circuit_breaker: CircuitBreaker,
    pub outlier_detection: OutlierDetection,
    /// Active TCP connect probes; default: off.
    pub health_check: Option<HealthCheck>,
    /// Limits per client; default: none.
    pub quota: Option<Quota>,
}

/// Limits per client of a service or workload (its identity when proven,
/// else its address): new connections a second, as a token bucket
/// holding `burst` (default: `rate`), and connections open at once; and,
/// optionally, the same limits on all clients together (`overall`). A
/// connection over a limit is reset at once and counted (`rate_limited`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub rate: Option<u32>,
    pub burst: Option<u32>,
    pub concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overall: Option<Overall>,
}

/// A quota's limits on all its clients together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overall {
    pub rate: Option<u32>,
    pub burst: Option<u32>,
    pub concurrent: Option<u32>,
}

impl Quota {
    /// Per-client limits only.
    pub fn per_client(rate: Option<u32>, burst: Option<u32>, concurrent: Option<u32>) -> Self {
        Self {
            rate,
            burst,
            concurrent,
            overall: None,
        }
    }

    /// The bucket's size: `burst`, else one second's worth.
    pub fn bucket(&self) -> u32 {
        self.burst.or(self.rate).unwrap_or(0).max(1)
    }

    /// The overall limits as a quota of one client (everyone).
    pub fn overall(&self) -> Option<Quota> {
        self.overall
            .as_ref()
            .map(|o| Quota::per_client(o.rate, o.burst, o.concurrent))
    }
}

/// A failed connect is retried on another endpoint, at most `retries`
/// times, and only while the retries in flight stay within the budget:
/// `max(min_concurrency, budget_percent% of the service's live connections)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    pub retries: u32,
    pub budget_percent: u32,
    pub min_concurrency: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            retries: 2,
            budget_percent: 20,
            min_concurrency: 3,
        }
    }
}

/// Limits; a connection over a limit is refused at once (the client is
/// reset) and counted. Unset means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    pub max_connections: Option<u64>,
    pub max_pending: Option<u64>,
    pub max_connections_per_endpoint: Option<u64>,
    pub max_pending_per_endpoint: Option<u64>,
}

/// Passive ejection: `consecutive_failures` connect failures or upstream
/// resets in a row eject an endpoint for `base_ejection_ms`, doubled on each
/// repeat up to `max_ejection_ms`; at most `max_ejection_percent` of a
/// service's endpoints are ejected at once. `consecutive_failures: 0` is off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 5_000,
            max_ejection_ms: 60_000,
            max_ejection_percent: 50,
        }
    }
}

/// TCP connect probes to each endpoint's target port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Successes in a row that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Failures in a row that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval_ms: 1_000,
            timeout_ms: 500,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

/// Whether a workload also accepts plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadMode {
    /// Plaintext from outside the mesh is let in (and counted).
    #[default]
    Permissive,
    /// Plaintext from outside the mesh is dropped in the kernel.
    Strict,
}
