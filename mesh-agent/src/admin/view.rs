//! What the admin endpoints report on: one [`AgentView`] over the running
//! agent's parts, built by the app once they exist. `/stats` and
//! `/config_dump` are assembled here, `/metrics` in [`super::scrape`].

use std::sync::{Arc, atomic::Ordering};

use serde_json::json;
use tracing::info;

use super::AdminView;
use crate::{
    config::Config,
    dataplane::{KernelMaps, PinLayout, conn_json, fast_path::FastPath},
    hbone::{client::HboneClient, server::InboundStats},
    identity::CertManager,
    observability::access::Sinks,
    proxy::OutboundStats,
    routes::Routes,
    source::kubernetes::KubeSource,
};

/// Changes the log filter at run time (tracing EnvFilter syntax); returns
/// the filter now in force.
pub type LogControl = Arc<dyn Fn(&str) -> Result<String, LogFilterError> + Send + Sync>;

/// Why `POST /logging` refused a filter.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    #[error("log filter {filter:?}: {reason}")]
    Invalid { filter: String, reason: String },
    #[error("the logger is gone: {0}")]
    Reload(String),
}

/// What the admin endpoints report on.
pub struct AgentView {
    pub pins: PinLayout,
    pub outbound: Arc<OutboundStats>,
    pub inbound: Arc<InboundStats>,
    pub hbone: Arc<HboneClient>,
    pub certs: Arc<CertManager>,
    pub routes: tokio::sync::watch::Receiver<Arc<Routes>>,
    pub sinks: Arc<Sinks>,
    pub config: tokio::sync::watch::Receiver<Arc<Config>>,
    pub log: LogControl,
    pub kube: Option<Arc<KubeSource>>,
    /// The same-node fast path, when it is on.
    pub fast_path: Option<Arc<FastPath>>,
    pub lifecycle: Arc<crate::handover::Lifecycle>,
}

impl AdminView for AgentView {
    fn stats(&self) -> serde_json::Value {
        stats(self)
    }

    fn metrics(&self) -> String {
        super::scrape::render_metrics(self)
    }

    fn config_dump(&self) -> serde_json::Value {
        let routes = self.routes.borrow().clone();
        json!({
            "config": &*self.config.borrow().clone(),
            "workloads": routes.state.workloads,
            "nodes": routes.state.nodes,
            "services": routes.balancers.snapshot(),
            "certificates": self.certs.snapshot(),
            "kubernetes": self.kube.as_ref().map(|k| k.status()),
        })
    }

    fn connections(&self) -> serde_json::Value {
        json!(self.sinks.live.snapshot())
    }

    fn graph(&self) -> serde_json::Value {
        json!(self.sinks.metrics.edges())
    }

    fn events(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.sinks.live.subscribe()
    }

    fn set_log_filter(&self, filter: &str) -> Result<String, LogFilterError> {
        let applied = (self.log)(filter)?;
        info!(filter = %applied, "log filter changed");
        Ok(applied)
    }
}

/// Tracked kernel connections `/stats` lists at most (`mesh-agent
/// inspect` dumps them all).
const STATS_CONNS_LISTED: usize = 1000;

/// `/stats`: the proxy's counters and what the kernel maps hold, read from
/// the pins so the admin server needs no access to the dataplane.
fn stats(view: &AgentView) -> serde_json::Value {
    let AgentView {
        pins,
        outbound,
        inbound,
        hbone,
        certs,
        routes,
        fast_path,
        lifecycle,
        sinks,
        ..
    } = view;
    {
        let services = routes.borrow().balancers.snapshot();
        let workload_quotas = routes.borrow().balancers.workload_quotas();
        let kernel = match KernelMaps::open_pinned(pins) {
            Ok(maps) => {
                let conns = maps.conns();
                json!({
                    "counters": maps.counters_json(),
                    "pods": maps.pods_json(),
                    // Same-node pod pairs (and ports) that go pod to pod.
                    "direct_entries": maps.direct_entries(),
                    "conns_tracked": conns.len(),
                    // A sample: the whole list of a busy node (tens of
                    // thousands) would make every call cost megabytes.
                    "conns": conns
                        .iter()
                        .take(STATS_CONNS_LISTED)
                        .map(|(key, value)| conn_json(key, value))
                        .collect::<Vec<_>>(),
                })
            }
            Err(error) => json!({ "error": error.to_string() }),
        };
        json!({
            "outbound": outbound.snapshot(),
            "inbound": inbound.snapshot(),
            "hbone": {
                "connections_opened": hbone.connections_opened.load(Ordering::Relaxed),
                "kernel_tls": hbone.kernel_tls().snapshot(),
            },
            "certificates": certs.snapshot(),
            "services": services,
            "workload_quotas": workload_quotas,
            "kernel": kernel,
            "fast_path": fast_path.as_ref().map(|fast| fast.stats.snapshot()),
            "lifecycle": lifecycle.snapshot(),
            "tracing": sinks.tracer.snapshot(),
        })
    }
}
