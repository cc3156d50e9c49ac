//! Prometheus metrics on `:15020/metrics` (text exposition, prometheus-client).
//!
//! - Istio's TCP metrics, same names and labels so existing dashboards
//!   work: `istio_tcp_connections_opened_total`,
//!   `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total`,
//!   `istio_tcp_received_bytes_total`. Only the labels listed in
//!   `metrics.labels` are kept (fewer labels, fewer series).
//! - The agent's own: balancer state per endpoint, breaker overflows,
//!   retries, denials, certificate expiry, reloads, and what the kernel
//!   counted (per-pod traffic, capture events, map fill levels).
//!
//! Everything is rebuilt from current state at each scrape, and the TCP
//! series of a workload that left the config are dropped at the reload, so
//! a deleted pod's series are gone at the next scrape.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::locks::lock;

/// Labels of the Istio TCP metrics, in Istio's names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct TcpLabels {
    /// `source` (the client's node agent) or `destination`.
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    /// `-` (fine), `UF` (upstream connect failure), `UO` (circuit breaker
    /// overflow), `NR` (no endpoint), `DENY` (authorization).
    pub response_flags: &'static str,
}

/// Every label of [`TcpLabels`], the default of `metrics.labels`.
pub const TCP_LABELS: [&str; 10] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
    "response_flags",
];

impl TcpLabels {
    fn pairs(&self, keep: &[String]) -> Vec<(String, String)> {
        let all: [(&str, &str); 10] = [
            ("reporter", self.reporter),
            ("source_workload", &self.source_workload),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("destination_workload", &self.destination_workload),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_service", &self.destination_service),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
            ("response_flags", self.response_flags),
        ];
        all.iter()
            .filter(|(name, _)| keep.iter().any(|k| k == name))
            .map(|(name, value)| ((*name).to_owned(), value_or_unknown(value)))
            .collect()
    }
}

fn value_or_unknown(value: &str) -> String {
    if value.is_empty() {
        "unknown".into()
    } else {
        value.to_owned()
    }
}

/// One line of the who-talks-to-whom graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub connections: u64,
    pub sent: u64,
    pub received: u64,
    pub mutual_tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Labels kept on the Istio TCP metrics.
    pub labels: Vec<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            labels: TCP_LABELS.iter().map(|l| (*l).to_owned()).collect(),
        }
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (index, label) in self.labels.iter().enumerate() {
            if !TCP_LABELS.contains(&label.as_str()) {
                return Err((
                    format!("metrics.labels[{index}]"),
                    format!("{label:?} is not one of {}", TCP_LABELS.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

/// `(metric name, help, which total)` of one Istio TCP family.
type TcpFamily = (&'static str, &'static str, fn(&TcpTotals) -> u64);

#[derive(Debug, Default, Clone, Copy)]
struct TcpTotals {
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
}

/// The counters the proxy feeds; the rest is read at scrape time.
#[derive(Debug, Default)]
pub struct Metrics {
    tcp: Mutex<HashMap<TcpLabels, TcpTotals>>,
    /// Labels kept on the TCP metrics (from the config).
    labels: Mutex<Vec<String>>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl Metrics {
    pub fn opened(&self, labels: &TcpLabels) {
        self.update(labels, |t| t.opened += 1);
    }

    pub fn closed(&self, labels: &TcpLabels, sent: u64, received: u64) {
        self.update(labels, |t| {
            t.closed += 1;
            t.sent += sent;
            t.received += received;
        });
    }

    fn update(&self, labels: &TcpLabels, change: impl FnOnce(&mut TcpTotals)) {
        let mut tcp = lock(&self.tcp);
        change(tcp.entry(labels.clone()).or_default());
    }

    /// Who talked to whom, summed over everything else: one edge per
    /// (source workload, destination workload or service).
    pub fn edges(&self) -> Vec<Edge> {
        let tcp = lock(&self.tcp);
        let mut edges: HashMap<(String, String), Edge> = HashMap::new();
        let name = |ns: &str, workload: &str, fallback: &str| {
            if workload.is_empty() {
                fallback.to_owned()
            } else {
                format!("{ns}/{workload}")
            }
        };
        for (labels, totals) in tcp.iter() {
            let source = name(
                &labels.source_workload_namespace,
                &labels.source_workload,
                "unknown",
            );
            let destination = name(
                &labels.destination_workload_namespace,
                &labels.destination_workload,
                if labels.destination_service.is_empty() {
                    "unknown"
                } else {
                    &labels.destination_service
                },
            );
            let edge = edges
                .entry((source.clone(), destination.clone()))
                .or_insert_with(|| Edge {
                    source,
                    destination,
                    connections: 0,
                    sent: 0,
                    received: 0,
                    mutual_tls: false,
                });
            edge.connections += totals.closed;
            edge.sent += totals.sent;
            edge.received += totals.received;
            edge.mutual_tls |= labels.connection_security_policy == "mutual_tls";
        }
        let mut edges: Vec<Edge> = edges.into_values().collect();
        edges.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
        edges
    }

    /// Drops the series of workloads no longer in the config, given as
    /// `(namespace, name)`.
    pub fn retain_workloads(&self, live: &HashSet<(String, String)>) {
        let known = |ns: &str, name: &str| {
            name.is_empty() || live.contains(&(ns.to_owned(), name.to_owned()))
        };
        lock(&self.tcp).retain(|labels, _| {
            known(&labels.source_workload_namespace, &labels.source_workload)
                && known(
                    &labels.destination_workload_namespace,
                    &labels.destination_workload,
                )
        });
    }

    pub fn set_labels(&self, labels: &[String]) {
        *lock(&self.labels) = labels.to_vec();
    }

    /// Registers the Istio TCP families (with the configured labels) and
    /// the reload counters.
    pub fn register(&self, registry: &mut Registry) {
        let keep = lock(&self.labels).clone();
        let keep = &keep;
        let families: [TcpFamily; 4] = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened",
                |t| t.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed",
                |t| t.closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent by the client to the server, per connection at close",
                |t| t.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes the server sent back to the client, per connection at close",
                |t| t.received,
            ),
        ];
        let tcp = lock(&self.tcp).clone();
        for (name, help, value) in families {
            let family = Family::<Vec<(String, String)>, Counter>::default();
            for (labels, totals) in &tcp {
                family
                    .get_or_create(&labels.pairs(keep))
                    .inc_by(value(totals));
            }
            registry.register(name, help, family);
        }
        let reloads = Counter::<u64>::default();
        reloads.inc_by(self.reloads.load(Ordering::Relaxed));
        registry.register("mesh_config_reloads", "Config reloads applied", reloads);
        let failures = Counter::<u64>::default();
        failures.inc_by(self.reload_failures.load(Ordering::Relaxed));
        registry.register(
            "mesh_config_reload_failures",
            "Config reloads rejected",
            failures,
        );
    }
}

/// A family of counters or gauges built at scrape time from `(labels, value)`.
pub fn counter_family<'a>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Vec<(&'a str, String)>, u64)>,
) {
    let family = Family::<Vec<(String, String)>, Counter>::default();
    for (labels, value) in values {
        family.get_or_create(&owned(labels)).inc_by(value);
    }
    registry.register(name, help, family);
}

pub fn gauge_family<'a>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Vec<(&'a str, String)>, f64)>,
) {
    let family = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
    for (labels, value) in values {
        family.get_or_create(&owned(labels)).set(value);
    }
    registry.register(name, help, family);
}

fn owned(labels: Vec<(&str, String)>) -> Vec<(String, String)> {
    labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The text exposition of a registry.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

/// Converts OpenMetrics text to the classic Prometheus text format
/// (0.0.4): counter families are named with their `_total` suffix in HELP
/// and TYPE, and there is no `# EOF`.
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total() {
        let open = "# HELP a Some a.\n# TYPE a counter\na_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1.5\n# EOF\n";
        let classic = to_classic_text(open);
        assert_eq!(
            classic,
            "# HELP a_total Some a.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1.5\n"
        );
    }
}
