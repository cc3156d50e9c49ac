//! The composition root: builds every part from the config, runs them, and
//! takes them down in the right order.
//!
//! Start: routing, listener, kernel programs, then the model into the maps
//! (so the first captured SYN finds a listener). Stop (SIGTERM/SIGINT): stop
//! accepting, let open connections drain while capture stays attached,
//! then detach and unpin everything and remove the routing. A change to the
//! config file (or SIGHUP) reloads it; a bad config is logged and the last
//! good one stays. Under `kubernetes:`, workloads and services come from
//! the API server's watches instead, and every change there is applied the
//! same way (debounced by 50 ms).

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use anyhow::Context;
use futures::FutureExt;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    access::Sinks,
    admin::{self, AdminState, AdminView},
    config::{Config, Overrides, any_addr},
    dataplane::{Capacity, Dataplane, DataplaneSettings, KernelMaps, PinLayout, conn_json},
    hbone::{
        client::HboneClient,
        server::{Inbound, InboundStats},
    },
    health::HealthChecks,
    identity::{CertManager, CertificateAuthority, EmbeddedCa, SpiffeId, ca::CaError},
    kubernetes::{KubeSource, KubeStatus, mapping, model::Unmapped},
    lb::Registry,
    live::Live,
    locks::lock,
    memory,
    metrics::Metrics,
    model::MeshState,
    proxy::{self, Outbound, OutboundSettings, OutboundStats, OwnListeners, Routes},
    routing,
    tls::TlsFactory,
    watch,
};

/// Changes the log filter at run time (tracing EnvFilter syntax).
pub type LogControl = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

pub struct RunOptions {
    pub log: LogControl,
    pub config: PathBuf,
    pub overrides: Overrides,
    pub pin_root: PathBuf,
    pub admin: SocketAddr,
    pub ready: SocketAddr,
    pub metrics: SocketAddr,
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    // Refuse a bad config before touching the kernel.
    let config = Config::load_with(&options.config, &options.overrides)?;
    info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        pin_root = %options.pin_root.display(),
        "starting with effective config"
    );
    routing::install()
        .await
        .context("installing the steer routing")?;
    // A panic unwinds through the dataplane (whose drop unpins and
    // detaches) but would skip the routing below: catch it here, so a bug
    // at start or at run time leaves no rule behind either.
    let result = match std::panic::AssertUnwindSafe(serve(&options, config))
        .catch_unwind()
        .await
    {
        Ok(result) => result,
        Err(panic) => Err(anyhow::anyhow!(
            "the agent panicked: {}",
            panic_message(panic.as_ref())
        )),
    };
    if let Err(error) = routing::remove().await {
        warn!(%error, "removing the steer routing");
    }
    result
}

async fn serve(options: &RunOptions, mut config: Config) -> anyhow::Result<()> {
    // The endpoints answer from the start: readiness says 503 until the
    // programs are attached, the rest "starting".
    let stop = CancellationToken::new();
    let admin_state = AdminState::default();
    // How full the kernel maps are, and whether the last model was refused:
    // part of the readiness answer.
    let kernel_status = Arc::new(std::sync::Mutex::new(String::new()));
    let ready = admin_state.ready.clone();
    // Before anything waits: SIGTERM must always reach the clean-up.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    for (role, addr) in [
        (admin::Role::Admin, options.admin),
        (admin::Role::Readiness, options.ready),
        (admin::Role::Metrics, options.metrics),
    ] {
        let listener = admin::bind(role, addr).await?;
        tokio::spawn(admin::serve(
            listener,
            role,
            admin_state.clone(),
            stop.clone(),
        ));
    }
    let source = ModelSource::start(&config).await?;
    if let Some(kube) = source.kube.clone() {
        let _ = admin_state.details.set(Arc::new({
            let kernel = kernel_status.clone();
            move || readiness_details(&kube.status()) + &lock(&kernel)
        }));
    } else {
        let _ = admin_state.details.set(Arc::new({
            let kernel = kernel_status.clone();
            move || lock(&kernel).clone()
        }));
    }
    let state = loop {
        if let Some(state) = source.state(&config).await {
            break Arc::new(state);
        }
        info!("waiting for the API server's first lists");
        tokio::select! {
            _ = source.changed() => {}
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    };
    let mut unmapped = report_cluster(&source, &[]);
    let certs = CertManager::new(
        certificate_authority(&config)?,
        config.identity.cert_lifetime(),
    );
    report_cert_problems(certs.ensure(&state.local_identities()).await);
    let tls = Arc::new(
        TlsFactory::new(certs.clone(), &config.identity.trust_domain).context("trust roots")?,
    );
    let outbound_addr = any_addr(config.proxy.outbound_port);
    let listener = proxy::transparent_listener(outbound_addr)
        .with_context(|| format!("outbound listener on {outbound_addr}"))?;
    let inbound_addr = any_addr(config.proxy.inbound_port);
    let inbound_listener = proxy::transparent_listener(inbound_addr)
        .with_context(|| format!("inbound listener on {inbound_addr}"))?;

    let mut dataplane = Dataplane::load(&DataplaneSettings {
        pin_root: &options.pin_root,
        outbound_port: config.proxy.outbound_port,
        inbound_port: config.proxy.inbound_port,
        cgroup: source.tracked_cgroup(&config).as_deref(),
        uplinks: &config.node.uplinks,
        listeners: [listener.as_fd(), inbound_listener.as_fd()],
        capacity: Capacity {
            services: config.maps.services,
            workloads: config.maps.workloads,
        },
    })?;
    report_problems(dataplane.sync(&state)?);
    *lock(&kernel_status) = map_fill(&dataplane, None);
    // Loading parsed the kernel's BTF (several MB of types) for relocations.
    memory::release();

    let tracker = TaskTracker::new();
    let stats = Arc::new(OutboundStats::default());
    let registry = Arc::new(Registry::default());
    let mut health = HealthChecks::default();
    health.sync(&state, &registry);
    let preserve_client_ip = config.proxy.preserve_client_ip;
    let hooked = hooked_pods(&dataplane, &state, preserve_client_ip);
    let own = Arc::new(OwnListeners::new([
        config.proxy.outbound_port,
        config.proxy.inbound_port,
        options.admin.port(),
        options.ready.port(),
        options.metrics.port(),
    ]));
    let (routes_tx, routes_rx) =
        tokio::sync::watch::channel(Arc::new(Routes::new(state, &registry, hooked, own.clone())));

    let inbound_stats = Arc::new(InboundStats::default());
    tokio::spawn(memory::release_when_quiet(
        {
            let (outbound, inbound) = (stats.clone(), inbound_stats.clone());
            move || {
                let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                load(&outbound.accepted)
                    + load(&outbound.active)
                    + load(&inbound.connections)
                    + load(&inbound.streams)
            }
        },
        stop.clone(),
    ));
    let metrics = Arc::new(Metrics::default());
    metrics.set_labels(&config.metrics.labels);
    let sinks = Arc::new(Sinks {
        metrics: metrics.clone(),
        live: Arc::new(Live::default()),
    });
    let (config_tx, config_rx) = tokio::sync::watch::channel(Arc::new(config.clone()));
    let hbone = Arc::new(HboneClient::new(
        tls.clone(),
        config.hbone.clone(),
        config.proxy.connect_timeout(),
    ));
    let view: Arc<dyn AdminView> = Arc::new(AgentView {
        pins: dataplane.pins().clone(),
        outbound: stats.clone(),
        inbound: inbound_stats.clone(),
        hbone: hbone.clone(),
        certs: certs.clone(),
        routes: routes_rx.clone(),
        sinks: sinks.clone(),
        config: config_rx,
        log: options.log.clone(),
        kube: source.kube.clone(),
    });
    let _ = admin_state.view.set(view);
    let inbound = Inbound::new(
        inbound_listener,
        routes_rx.clone(),
        tls,
        config.proxy.connect_timeout(),
        inbound_stats,
        sinks.clone(),
    );
    let inbound_accepting = tokio::spawn(inbound.serve(stop.clone(), tracker.clone()));
    let outbound = Outbound::new(
        listener,
        routes_rx,
        OutboundSettings {
            connect_timeout: config.proxy.connect_timeout(),
            inbound_port: config.proxy.inbound_port,
            fast_path: config
                .proxy
                .fast_path
                .then(|| dataplane.fast_path())
                .flatten(),
        },
        hbone,
        stats,
        sinks,
    );
    let accepting = tokio::spawn(outbound.serve(stop.clone(), tracker.clone()));

    ready.store(true, Ordering::Release);
    info!(node = %config.node.name, outbound = %outbound_addr, "agent ready");

    let (_watcher, mut changed) = watch::config_file(&options.config)
        .with_context(|| format!("watching {}", options.config.display()))?;
    let mut remap = tokio::time::interval(std::time::Duration::from_secs(2));
    // Pod interfaces can be deleted and made again under the same name
    // without any change to the model: look every second.
    let mut interfaces = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut reloader = Reloader {
        path: &options.config,
        overrides: &options.overrides,
        source: &source,
        dataplane: &mut dataplane,
        routes: &routes_tx,
        preserve_client_ip,
        own,
        kernel_status: &kernel_status,
        registry: &registry,
        health: &mut health,
        certs: &certs,
        metrics: &metrics,
        config: &config_tx,
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => reloader.reload(&mut config).await,
            Some(()) = changed.recv() => {
                // Let a burst of writes settle before reading the file.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                while changed.try_recv().is_ok() {}
                reloader.reload(&mut config).await;
            }
            _ = source.changed() => {
                // Let a burst of events (a rollout) settle into one update.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                reloader.refresh(&config).await;
                unmapped = report_cluster(&source, &unmapped);
            }
            _ = interfaces.tick() => {
                if reloader.dataplane.interfaces_changed() {
                    reloader.reattach(&config).await;
                }
            }
            // Pods whose interface or cgroup was not there yet (the CNI
            // and kubelet may lag the API server) are looked for again.
            _ = remap.tick(), if !unmapped.is_empty() => {
                reloader.refresh(&config).await;
                unmapped = report_cluster(&source, &unmapped);
            }
        }
    }

    info!("draining");
    ready.store(false, Ordering::Release);
    stop.cancel();
    let _ = accepting.await;
    let _ = inbound_accepting.await;
    tracker.close();
    if tokio::time::timeout(config.proxy.drain_timeout(), tracker.wait())
        .await
        .is_err()
    {
        warn!("drain timeout: closing the remaining connections");
    }
    dataplane.close().context("removing pins")?;
    info!("stopped; kernel state removed");
    Ok(())
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Where workloads and services come from: the config file, or the API
/// server's watches.
struct ModelSource {
    kube: Option<Arc<KubeSource>>,
}

impl ModelSource {
    async fn start(config: &Config) -> anyhow::Result<Self> {
        let kube = match &config.kubernetes {
            Some(settings) => Some(Arc::new(
                KubeSource::start(settings, &config.node.name).await?,
            )),
            None => None,
        };
        Ok(Self { kube })
    }

    /// The model under `config`; None until the API server listed
    /// everything once.
    async fn state(&self, config: &Config) -> Option<MeshState> {
        match &self.kube {
            None => Some(MeshState::from_config(config)),
            Some(kube) => {
                // Thousands of pods and services: build on the blocking
                // pool, not on a worker the proxy needs.
                let kube = kube.clone();
                let built = tokio::task::spawn_blocking(move || kube.build())
                    .await
                    .ok()??;
                Some(MeshState::from_parts(
                    config,
                    built.workloads,
                    built.services,
                ))
            }
        }
    }

    /// Fires when the cluster changed; never without `kubernetes:`.
    async fn changed(&self) {
        match &self.kube {
            Some(kube) => kube.changed().await,
            None => std::future::pending().await,
        }
    }

    /// The cgroup the connection tracker attaches to: `node.cgroup`, or
    /// kubelet's kubepods cgroup.
    fn tracked_cgroup(&self, config: &Config) -> Option<PathBuf> {
        config.node.cgroup.clone().or_else(|| {
            let settings = config.kubernetes.as_ref()?;
            match mapping::kubepods_root(&settings.cgroup_root) {
                Ok(root) => Some(root.path),
                Err(error) => {
                    warn!(%error, "no kubepods cgroup: connections are not tracked");
                    None
                }
            }
        })
    }
}

/// Logs meshed pods that newly cannot be mapped to the kernel, and
/// returns the current set.
fn report_cluster(source: &ModelSource, before: &[Unmapped]) -> Vec<Unmapped> {
    let Some(kube) = &source.kube else {
        return Vec::new();
    };
    let status = kube.status();
    for pod in status.unmapped.iter().filter(|p| !before.contains(p)) {
        warn!(pod = %pod.pod, reason = %pod.reason, "meshed pod not mapped to the kernel; it stays outside the mesh until it is");
    }
    status.unmapped
}

/// The readiness answer's line on the kernel maps: how full, and why the
/// last model was refused if it was.
fn map_fill(dataplane: &Dataplane, refused: Option<&dyn std::fmt::Display>) -> String {
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

/// The readiness answer's details under `kubernetes:`.
fn readiness_details(status: &KubeStatus) -> String {
    let mut text = match (status.synced, status.disconnected_for_s) {
        (false, _) => "kubernetes: waiting for the first lists\n".to_owned(),
        (true, None) => "kubernetes: connected\n".to_owned(),
        (true, Some(seconds)) => format!(
            "kubernetes: API server unreachable for {seconds} s, serving the last state ({})\n",
            status.last_error.as_deref().unwrap_or("no answer")
        ),
    };
    for pod in &status.unmapped {
        text.push_str(&format!("unmapped pod {}: {}\n", pod.pod, pod.reason));
    }
    text
}

/// The pods the agent may connect to from their clients' addresses: none
/// unless `preserve_client_ip`.
fn hooked_pods(
    dataplane: &Dataplane,
    state: &MeshState,
    preserve_client_ip: bool,
) -> std::collections::HashSet<std::net::Ipv4Addr> {
    if preserve_client_ip {
        dataplane.hooked_workload_ips(state)
    } else {
        Default::default()
    }
}

/// Everything a reload touches.
struct Reloader<'a> {
    path: &'a Path,
    overrides: &'a Overrides,
    source: &'a ModelSource,
    dataplane: &'a mut Dataplane,
    routes: &'a tokio::sync::watch::Sender<Arc<Routes>>,
    /// `proxy.preserve_client_ip` as at start.
    preserve_client_ip: bool,
    own: Arc<OwnListeners>,
    kernel_status: &'a std::sync::Mutex<String>,
    registry: &'a Arc<Registry>,
    health: &'a mut HealthChecks,
    certs: &'a Arc<CertManager>,
    metrics: &'a Metrics,
    config: &'a tokio::sync::watch::Sender<Arc<Config>>,
}

impl Reloader<'_> {
    /// Applies the config file if it is valid; otherwise keeps `current`.
    async fn reload(&mut self, current: &mut Config) {
        let config = match Config::load_with(self.path, self.overrides) {
            Ok(config) => config,
            Err(error) => {
                self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                error!(%error, "config rejected; keeping the last good config");
                return;
            }
        };
        if config.node != current.node
            || config.proxy != current.proxy
            || config.kubernetes != current.kubernetes
            || config.maps != current.maps
        {
            warn!(
                "node, proxy, maps and kubernetes settings change only on restart; applying the rest"
            );
        }
        let Some(state) = self.source.state(&config).await else {
            return;
        };
        if self.apply(state, &config).await {
            self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
            info!("config reloaded");
            *current = config;
        }
    }

    /// Applies what the API server says now, if it changes the model.
    async fn refresh(&mut self, config: &Config) {
        let Some(state) = self.source.state(config).await else {
            return;
        };
        if state.same_mesh(&self.routes.borrow().state) {
            return;
        }
        if self.apply(state, config).await {
            info!(
                workloads = self.routes.borrow().state.workloads.len(),
                services = self.routes.borrow().state.services.len(),
                "cluster change applied"
            );
        }
    }

    /// Applies the current model again, after pod interfaces changed
    /// under it (see `Dataplane::interfaces_changed`).
    async fn reattach(&mut self, config: &Config) {
        let state = MeshState::clone(&self.routes.borrow().state);
        if self.apply(state, config).await {
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
                *lock(self.kernel_status) = map_fill(self.dataplane, None);
            }
            Err(error) => {
                self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                error!(%error, "updating the kernel maps; keeping the last good model");
                *lock(self.kernel_status) = map_fill(self.dataplane, Some(&error));
                return false;
            }
        }
        self.health.sync(&state, self.registry);
        report_cert_problems(self.certs.ensure(&state.local_identities()).await);
        let hooked = hooked_pods(self.dataplane, &state, self.preserve_client_ip);
        self.routes.send_replace(Arc::new(Routes::new(
            state,
            self.registry,
            hooked,
            self.own.clone(),
        )));
        self.metrics.set_labels(&config.metrics.labels);
        self.metrics.retain_workloads(&live);
        self.config.send_replace(Arc::new(config.clone()));
        true
    }
}

/// The CA named in the config: signing files, or the embedded CA's directory.
fn certificate_authority(config: &Config) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    let ca = match &config.identity.ca {
        Some(files) => EmbeddedCa::load(&files.cert, &files.key, &files.roots)?,
        None => EmbeddedCa::load_or_create(&config.identity.ca_dir)?,
    };
    Ok(Arc::new(ca))
}

fn report_cert_problems(problems: Vec<(SpiffeId, CaError)>) {
    for (identity, error) in problems {
        error!(%identity, %error, "no certificate for workload; retrying at the next config change");
    }
}

fn report_problems(problems: Vec<String>) {
    for problem in problems {
        error!(problem, "workload not attached");
    }
}

/// What the admin endpoints report on.
pub(crate) struct AgentView {
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
}

impl AdminView for AgentView {
    fn stats(&self) -> serde_json::Value {
        stats(self)
    }

    fn metrics(&self) -> String {
        crate::telemetry::render_metrics(self)
    }

    fn config_dump(&self) -> serde_json::Value {
        let routes = self.routes.borrow().clone();
        json!({
            "config": &*self.config.borrow().clone(),
            "workloads": routes.state.workloads,
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

    fn set_log_filter(&self, filter: &str) -> Result<String, String> {
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
        ..
    } = view;
    {
        let services = routes.borrow().balancers.snapshot();
        let kernel = match KernelMaps::open_pinned(pins) {
            Ok(maps) => {
                let conns = maps.conns();
                json!({
                    "counters": maps.counters_json(),
                    "pods": maps.pods_json(),
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
            "hbone": { "connections_opened": hbone.connections_opened.load(Ordering::Relaxed) },
            "certificates": certs.snapshot(),
            "services": services,
            "kernel": kernel,
        })
    }
}
