//! Applying a change while the agent runs: a new config file, a cluster
//! change from the source, or pod interfaces made again under the model.
//! Each one goes into the kernel maps first; if they refuse it, nothing
//! else changes and the last good model stays.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    config::{Config, Overrides},
    dataplane::Dataplane,
    identity::{CertManager, SpiffeId, ca::CaError},
    lb::{Registry, health::HealthChecks},
    locks::lock,
    model::MeshState,
    observability::{metrics::Metrics, spans::Tracer},
    routes::{OwnListeners, Routes},
    source::ModelSource,
};

/// Everything a change touches, and the config in force.
pub(super) struct Reloader {
    pub path: PathBuf,
    pub overrides: Overrides,
    pub source: ModelSource,
    pub dataplane: Dataplane,
    pub routes: watch::Sender<Arc<Routes>>,
    /// `proxy.preserve_client_ip` as at start.
    pub preserve_client_ip: bool,
    pub own: Arc<OwnListeners>,
    pub kernel_status: Arc<Mutex<String>>,
    pub registry: Arc<Registry>,
    pub health: HealthChecks,
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    pub tracer: Arc<Tracer>,
    pub config: watch::Sender<Arc<Config>>,
    pub current: Config,
}

impl Reloader {
    /// Applies the config file if it is valid; otherwise keeps the current one.
    pub async fn reload(&mut self) {
        let config = match Config::load_with(&self.path, &self.overrides) {
            Ok(config) => config,
            Err(error) => {
                self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                error!(%error, "config rejected; keeping the last good config");
                return;
            }
        };
        let current = &self.current;
        if config.node != current.node
            || config.identity != current.identity
            || config.proxy != current.proxy
            || config.kubernetes != current.kubernetes
            || config.maps != current.maps
        {
            warn!(
                "node, identity, proxy, maps and kubernetes settings change only on restart; applying the rest"
            );
        }
        let Some(state) = self.source.state(&config).await else {
            return;
        };
        if self.apply(state, &config).await {
            self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
            info!("config reloaded");
            self.current = config;
        }
    }

    /// Applies what the API server says now, if it changes the model.
    pub async fn refresh(&mut self) {
        let config = self.current.clone();
        let Some(state) = self.source.state(&config).await else {
            return;
        };
        if state.same_mesh(&self.routes.borrow().state) {
            return;
        }
        if self.apply(state, &config).await {
            info!(
                workloads = self.routes.borrow().state.workloads.len(),
                services = self.routes.borrow().state.services.len(),
                "cluster change applied"
            );
        }
    }

    /// Applies the current model again, after pod interfaces changed
    /// under it (see `Dataplane::interfaces_changed`).
    pub async fn reattach(&mut self) {
        let state = MeshState::clone(&self.routes.borrow().state);
        let config = self.current.clone();
        if self.apply(state, &config).await {
            info!("pod interfaces changed; programs re-attached");
        }
    }

    /// Puts a new model into the maps, balancers and certificates; false
    /// (with the old model kept) when the kernel maps refused it.
    async fn apply(&mut self, state: MeshState, config: &Config) -> bool {
        let state = Arc::new(state);
        let live = state
            .workloads
            .iter()
            .map(|w| (w.namespace.clone(), w.name.clone()))
            .collect();
        match self.dataplane.sync(&state) {
            Ok(problems) => {
                report_problems(problems);
                *lock(&self.kernel_status) = map_fill(&self.dataplane, None);
            }
            Err(error) => {
                self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                error!(%error, "updating the kernel maps; keeping the last good model");
                *lock(&self.kernel_status) = map_fill(&self.dataplane, Some(&error));
                return false;
            }
        }
        self.health.sync(&state, &self.registry);
        report_cert_problems(self.certs.ensure(&state.local_identities()).await);
        let hooked = hooked_pods(&self.dataplane, &state, self.preserve_client_ip);
        self.routes.send_replace(Arc::new(Routes::new(
            state,
            &self.registry,
            hooked,
            self.own.clone(),
        )));
        self.metrics.set_labels(&config.metrics.labels);
        self.metrics.retain_workloads(&live);
        self.tracer
            .configure(config.tracing.as_ref(), &config.node.name);
        self.config.send_replace(Arc::new(config.clone()));
        true
    }
}

/// The readiness answer's line on the kernel maps: how full, and why the
/// last model was refused if it was.
pub(super) fn map_fill(dataplane: &Dataplane, refused: Option<&dyn std::fmt::Display>) -> String {
    let mut text = String::from("kernel maps:");
    for fill in dataplane.fill() {
        text.push_str(&format!(
            " {} {}/{}",
            fill.name, fill.entries, fill.capacity
        ));
    }
    text.push('\n');
    if let Some(error) = refused {
        text.push_str(&format!(
            "last model refused, serving the one before: {error}\n"
        ));
    }
    text
}

/// The pods the agent may connect to from their clients' addresses: none
/// unless `preserve_client_ip`.
pub(super) fn hooked_pods(
    dataplane: &Dataplane,
    state: &MeshState,
    preserve_client_ip: bool,
) -> HashSet<Ipv4Addr> {
    if preserve_client_ip {
        dataplane.hooked_workload_ips(state)
    } else {
        Default::default()
    }
}

pub(super) fn report_cert_problems(problems: Vec<(SpiffeId, CaError)>) {
    for (identity, error) in problems {
        error!(%identity, %error, "no certificate for workload; retrying at the next config change");
    }
}

pub(super) fn report_problems(problems: Vec<String>) {
    for problem in problems {
        error!(problem, "workload not attached");
    }
}
