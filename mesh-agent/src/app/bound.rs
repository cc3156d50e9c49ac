//! Building an agent: every part made and every port bound, nothing served
//! yet but the HTTP endpoints (readiness says 503 until [`Bound::run`]).

use std::{
    future::Future,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    pin::pin,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use tokio::sync::{Notify, watch};
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};
use tracing::{info, warn};

use super::{
    RunOptions, arrivals,
    direct_log::DirectLog,
    handing_over::{Conversation, Conversations},
    memory,
    reload::{Reloader, hooked_pods, map_fill, report_cert_problems, report_problems},
};
use crate::{
    admin::{self, AdminState, AdminView, AgentView},
    config::{Config, any_addr},
    dataplane::{Capacity, Dataplane, DataplaneSettings},
    handover::{HandoverServer, Lifecycle, ListenerRole, Predecessor, Successor},
    hbone::{
        client::HboneClient,
        server::{Inbound, InboundStats},
    },
    identity::{CertManager, CertificateAuthority, EmbeddedCa},
    io::transparent_listener,
    lb::{Registry, health::HealthChecks},
    locks::lock,
    observability::{
        access::Sinks,
        live::Live,
        metrics::Metrics,
        spans::{Tracer, export},
    },
    proxy::{Outbound, OutboundSettings, OutboundStats},
    routes::{OwnListeners, Routes},
    source::{ModelSource, file_watch},
};

/// Where a bound agent listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// Captured outbound connections (`proxy.outbound_port`, any address).
    pub outbound: SocketAddr,
    /// Inbound HBONE (`proxy.inbound_port`, any address).
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub ready: SocketAddr,
    pub metrics: SocketAddr,
}

/// Asks a running agent to read its config file again (what SIGHUP does).
#[derive(Clone)]
pub struct ReloadHandle(Arc<Notify>);

impl ReloadHandle {
    pub fn request(&self) {
        self.0.notify_one();
    }
}

/// An agent with every part built and every port bound: the kernel
/// programs attached and steering, the model in the maps, the listeners
/// queueing connections. [`Bound::run`] serves them. Dropped without
/// running, it detaches and unpins what it loaded.
pub struct Bound {
    addresses: Addresses,
    stop: CancellationToken,
    /// Stops the HTTP endpoints if the agent is dropped without running.
    _stop_on_drop: DropGuard,
    reload: ReloadHandle,
    /// Keeps the config file watched; `changes` fires on each change.
    _config_watcher: notify::RecommendedWatcher,
    config_changes: tokio::sync::mpsc::Receiver<()>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    reloader: Reloader,
    unmapped: Vec<crate::source::kubernetes::model::Unmapped>,
    inbound: Inbound,
    outbound: Outbound,
    /// For the allocator's quiet-time release: connections carried now.
    load: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Access-log lines for same-node direct connections, when they exist.
    direct_log: Option<DirectLog>,
    handover: HandoverState,
}

/// What a handover needs, on either side.
struct HandoverState {
    /// The agent this one takes over from, until it has.
    predecessor: Option<Predecessor>,
    /// Endpoints whose listeners came from the predecessor: served once
    /// it stops accepting on them.
    inherited_endpoints: Vec<(tokio::net::TcpListener, admin::Role)>,
    admin_state: AdminState,
    /// Copies of this agent's listeners, for its successor.
    listeners: Arc<Vec<(ListenerRole, OwnedFd)>>,
    socket: PathBuf,
    pin_root: PathBuf,
    lifecycle: Arc<Lifecycle>,
    /// Where connections passed on by the predecessor are recorded.
    sinks: Arc<Sinks>,
}

/// How [`Bound::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Drained and removed everything it put in the kernel.
    Cleaned,
    /// Handed the kernel state and the listeners to a new agent, then
    /// drained: the kernel state, the routing and the handover socket are
    /// the new agent's now.
    HandedOver,
}

impl Bound {
    /// Builds every part from `config` and binds every port: the HTTP
    /// endpoints first (they answer at once), then, once the source has a
    /// model (under `kubernetes:`, after the API server's first lists), the
    /// proxy listeners and the kernel programs.
    pub async fn bind(options: &RunOptions, config: Config) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let stop_on_drop = stop.clone().drop_guard();
        let admin_state = AdminState::default();
        // How full the kernel maps are, and whether the last model was
        // refused: part of the readiness answer.
        let kernel_status = Arc::new(Mutex::new(String::new()));
        // Before binding anything: a running agent on this pin root hands
        // its listeners over (it holds the ports).
        let mut predecessor = match Predecessor::find(
            &options.handover_socket,
            &options.pin_root,
            config.proxy.fast_path,
        )
        .await
        {
            Ok(found) => found,
            Err(error) => {
                warn!(%error, "not taking over from the running agent: starting on its own");
                None
            }
        };
        let mut inherit = |role: ListenerRole, addr: SocketAddr| {
            predecessor
                .as_mut()
                .and_then(|p| p.take_listener(role, addr))
        };
        let mut handover_listeners = Vec::with_capacity(5);
        let mut inherited_endpoints = Vec::new();
        let mut bound_endpoints = Vec::with_capacity(3);
        for (role, addr, handover_role) in [
            (admin::Role::Admin, options.admin, ListenerRole::Admin),
            (admin::Role::Readiness, options.ready, ListenerRole::Ready),
            (admin::Role::Metrics, options.metrics, ListenerRole::Metrics),
        ] {
            let inherited = inherit(handover_role, addr);
            let was_inherited = inherited.is_some();
            let listener = match inherited {
                Some(listener) => admin::adopt(role, listener)?,
                None => admin::bind(role, addr).await?,
            };
            bound_endpoints.push(listener.local_addr()?);
            handover_listeners.push((handover_role, listener.as_fd().try_clone_to_owned()?));
            if was_inherited {
                inherited_endpoints.push((listener, role));
            } else {
                tokio::spawn(admin::serve(
                    listener,
                    role,
                    admin_state.clone(),
                    stop.clone(),
                ));
            }
        }
        let [admin_addr, ready_addr, metrics_addr] = bound_endpoints[..] else {
            unreachable!("three endpoints bound");
        };

        let (config_watcher, config_changes) = file_watch::config_file(&options.config)
            .with_context(|| format!("watching {}", options.config.display()))?;
        let source = ModelSource::start(&config).await?;
        let _ = admin_state.details.set(Arc::new({
            let (source, kernel) = (source.clone(), kernel_status.clone());
            move || source.readiness() + &lock(&kernel)
        }));
        let state = loop {
            if let Some(state) = source.state(&config).await {
                break Arc::new(state);
            }
            info!("waiting for the API server's first lists");
            source.changed().await;
        };
        let unmapped = source.report_unmapped(&[]);
        let certs = CertManager::new(
            certificate_authority(&config)?,
            config.identity.cert_lifetime(),
        );
        report_cert_problems(certs.ensure(&state.local_identities()).await);
        let tls = Arc::new(
            crate::tls::TlsFactory::new(
                certs.clone(),
                &config.identity.trust_domain,
                crate::tls::KernelTls::new(config.hbone.kernel_tls),
            )
            .context("trust roots")?
            .with_aliases(config.identity.trust_domain_aliases.clone()),
        );
        let outbound_addr = any_addr(config.proxy.outbound_port);
        let outbound_listener = match inherit(ListenerRole::Outbound, outbound_addr) {
            Some(listener) => tokio::net::TcpListener::from_std(listener)?,
            None => transparent_listener(outbound_addr)
                .with_context(|| format!("outbound listener on {outbound_addr}"))?,
        };
        let inbound_addr = any_addr(config.proxy.inbound_port);
        let inbound_listener = match inherit(ListenerRole::Inbound, inbound_addr) {
            Some(listener) => tokio::net::TcpListener::from_std(listener)?,
            None => transparent_listener(inbound_addr)
                .with_context(|| format!("inbound listener on {inbound_addr}"))?,
        };
        handover_listeners.push((
            ListenerRole::Outbound,
            outbound_listener.as_fd().try_clone_to_owned()?,
        ));
        handover_listeners.push((
            ListenerRole::Inbound,
            inbound_listener.as_fd().try_clone_to_owned()?,
        ));
        if let Some(predecessor) = predecessor.as_mut() {
            predecessor
                .take_kernel()
                .await
                .context("taking the kernel state over from the running agent")?;
        }

        let mut dataplane = Dataplane::load(&DataplaneSettings {
            pin_root: &options.pin_root,
            outbound_port: config.proxy.outbound_port,
            inbound_port: config.proxy.inbound_port,
            cgroup: source.tracked_cgroup(&config).as_deref(),
            uplinks: &config.node.uplinks,
            listeners: [outbound_listener.as_fd(), inbound_listener.as_fd()],
            capacity: Capacity {
                services: config.maps.services,
                workloads: config.maps.workloads,
            },
            fast_path: config.proxy.fast_path,
            same_node_direct: config.proxy.same_node_direct,
        })?;
        report_problems(dataplane.sync(&state)?);
        let lifecycle = Arc::new(Lifecycle::new(dataplane.adoption().clone()));
        *lock(&kernel_status) = map_fill(&dataplane, None);
        // Loading parsed the kernel's BTF (several MB of types) for
        // relocations.
        memory::release();

        let addresses = Addresses {
            outbound: outbound_listener.local_addr()?,
            inbound: inbound_listener.local_addr()?,
            admin: admin_addr,
            ready: ready_addr,
            metrics: metrics_addr,
        };
        let outbound_stats = Arc::new(OutboundStats::default());
        let inbound_stats = Arc::new(InboundStats::default());
        let registry = Arc::new(Registry::default());
        let mut health = HealthChecks::default();
        health.sync(&state, &registry);
        let preserve_client_ip = config.proxy.preserve_client_ip;
        let hooked = hooked_pods(&dataplane, &state, preserve_client_ip);
        let own = Arc::new(OwnListeners::new([
            config.proxy.outbound_port,
            config.proxy.inbound_port,
            addresses.admin.port(),
            addresses.ready.port(),
            addresses.metrics.port(),
        ]));
        let (routes_tx, routes_rx) =
            watch::channel(Arc::new(Routes::new(state, &registry, hooked, own.clone())));
        let metrics = Arc::new(Metrics::default());
        metrics.set_labels(&config.metrics.labels);
        let tracer = Arc::new(Tracer::default());
        tracer.configure(config.tracing.as_ref(), &config.node.name);
        let sinks = Arc::new(Sinks {
            metrics: metrics.clone(),
            live: Arc::new(Live::default()),
            tracer: tracer.clone(),
        });
        let handover_sinks = sinks.clone();
        let direct_log = dataplane.take_direct_records().map(|ring| {
            DirectLog::new(
                ring,
                routes_rx.clone(),
                sinks.clone(),
                dataplane.pins().map(mesh_common::maps::DIRECT_CLOSED),
            )
        });
        let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
        let hbone = Arc::new(HboneClient::new(
            tls.clone(),
            config.hbone.clone(),
            config.proxy.connect_timeout(),
        ));
        let view: Arc<dyn AdminView> = Arc::new(AgentView {
            pins: dataplane.pins().clone(),
            outbound: outbound_stats.clone(),
            inbound: inbound_stats.clone(),
            hbone: hbone.clone(),
            certs: certs.clone(),
            routes: routes_rx.clone(),
            sinks: sinks.clone(),
            config: config_rx,
            log: options.log.clone(),
            kube: source.kube().cloned(),
            fast_path: dataplane.fast_path(),
            lifecycle: lifecycle.clone(),
        });
        let _ = admin_state.view.set(view);
        let inbound = Inbound::new(
            inbound_listener,
            routes_rx.clone(),
            tls,
            config.proxy.connect_timeout(),
            inbound_stats.clone(),
            sinks.clone(),
        );
        let outbound = Outbound::new(
            outbound_listener,
            routes_rx,
            OutboundSettings {
                connect_timeout: config.proxy.connect_timeout(),
                inbound_port: config.proxy.inbound_port,
                fast_path: dataplane.fast_path(),
            },
            hbone,
            outbound_stats.clone(),
            sinks,
        );
        let load = Arc::new(move || {
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            load(&outbound_stats.accepted)
                + load(&outbound_stats.active)
                + load(&inbound_stats.connections)
                + load(&inbound_stats.streams)
        });
        Ok(Self {
            addresses,
            stop,
            _stop_on_drop: stop_on_drop,
            reload: ReloadHandle(Arc::new(Notify::new())),
            _config_watcher: config_watcher,
            config_changes,
            ready: admin_state.ready.clone(),
            reloader: Reloader {
                overrides: options.overrides.clone(),
                path: options.config.clone(),
                source,
                dataplane,
                routes: routes_tx,
                preserve_client_ip,
                own,
                kernel_status,
                registry,
                health,
                certs,
                metrics,
                tracer,
                config: config_tx,
                current: config,
            },
            unmapped,
            inbound,
            outbound,
            load,
            direct_log,
            handover: HandoverState {
                predecessor,
                inherited_endpoints,
                admin_state,
                listeners: Arc::new(handover_listeners),
                socket: options.handover_socket.clone(),
                pin_root: options.pin_root.clone(),
                lifecycle,
                sinks: handover_sinks,
            },
        })
    }

    /// Where this agent listens (ports the options gave as 0 resolved).
    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// Reloads the config file while [`Bound::run`] runs.
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// Serves until `shutdown` resolves, then drains (up to
    /// `proxy.drain_timeout`) and removes everything it put in the kernel;
    /// or until a new agent takes over, then drains (up to
    /// `proxy.handover_drain_timeout`) and leaves the kernel to it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<Stopped> {
        // Spans go out until the last connection has ended, and what is
        // queued then is flushed before the agent exits.
        let tracer = self.reloader.tracer.clone();
        let exporter_stop = CancellationToken::new();
        let exporter = tracer
            .take_queue()
            .map(|queue| tokio::spawn(export::run(tracer, queue, exporter_stop.clone())));
        let stopped = self.serve(shutdown).await;
        exporter_stop.cancel();
        if let Some(exporter) = exporter {
            let _ = exporter.await;
        }
        stopped
    }

    async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<Stopped> {
        let Self {
            addresses,
            stop,
            _stop_on_drop,
            reload,
            _config_watcher,
            config_changes: mut changed,
            ready,
            mut reloader,
            mut unmapped,
            inbound,
            outbound,
            load,
            mut direct_log,
            handover,
        } = self;
        if let Some(direct_log) = direct_log.as_mut() {
            direct_log.resume();
        }
        let tracker = TaskTracker::new();
        let quiet_load = load.clone();
        tokio::spawn(memory::release_when_quiet(
            move || quiet_load(),
            stop.clone(),
        ));
        let inbound_accepting = tokio::spawn(inbound.serve(stop.clone(), tracker.clone()));
        let outbound_accepting = tokio::spawn(outbound.serve(stop.clone(), tracker.clone()));
        ready.store(true, Ordering::Release);
        let HandoverState {
            predecessor,
            inherited_endpoints,
            admin_state,
            listeners,
            socket,
            pin_root,
            lifecycle,
            sinks,
        } = handover;
        for (listener, role) in inherited_endpoints {
            tokio::spawn(admin::serve(
                listener,
                role,
                admin_state.clone(),
                stop.clone(),
            ));
        }
        let took_over = predecessor.is_some();
        if let Some(predecessor) = predecessor {
            let pid = predecessor.pid();
            // This agent serves from here on, whatever the old one answers.
            match predecessor.taken().await {
                Ok((stats, arrivals)) => {
                    lifecycle.took_over(pid, stats);
                    tokio::spawn(arrivals::carry_on(
                        arrivals,
                        reloader.dataplane.fast_path(),
                        sinks,
                        tracker.clone(),
                    ));
                }
                Err(error) => warn!(pid, %error, "telling the old agent to drain"),
            }
        }
        info!(
            node = %reloader.current.node.name,
            outbound = %addresses.outbound,
            kernel = ?reloader.dataplane.adoption(),
            "agent ready"
        );
        let mut handover_server = match HandoverServer::bind(&socket, took_over).await {
            Ok(server) => Some(server),
            Err(error) => {
                warn!(%error, "no handover socket: a new agent will not be able to take over from this one");
                None
            }
        };
        let (successors_tx, mut successors) =
            tokio::sync::mpsc::channel::<(Successor, Conversation)>(1);
        let conversations = Conversations::new(ready.clone());
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDOVER_CONVERSATIONS));

        let mut remap = tokio::time::interval(Duration::from_secs(2));
        // Pod interfaces can be deleted and made again under the same name
        // without any change to the model: look every second.
        let mut interfaces = tokio::time::interval(Duration::from_secs(1));
        let mut shutdown = pin!(shutdown);
        let mut successor = None;
        // Told to stop while a new agent talks to this one (kubelet stops
        // the old pod of a rollout, or a user deletes it): the handover
        // ends first, else the drain below would remove the kernel state
        // the new agent is about to adopt. In a pod, told to stop with no
        // new agent yet: one may be about to connect (the rollout's new
        // pod can count as ready before its agent has said hello, this
        // agent having answered its probe on the shared port), so it is
        // given a moment before this one drains and cleans up.
        let mut stop_requested: Option<tokio::time::Instant> = None;
        let mut told_to_stop = false;
        let successor_grace = if reloader.current.kubernetes.is_some() {
            SUCCESSOR_GRACE
        } else {
            Duration::ZERO
        };
        loop {
            tokio::select! {
                () = &mut shutdown, if stop_requested.is_none() => {
                    told_to_stop = true;
                    conversations.stop();
                    if conversations.open() > 0 {
                        info!("told to stop while a new agent takes over: finishing the handover first");
                    } else if successor_grace.is_zero() {
                        break;
                    } else {
                        info!(grace_ms = successor_grace.as_millis() as u64, "told to stop: a new agent may be starting, waiting for it before draining");
                    }
                    stop_requested = Some(tokio::time::Instant::now());
                }
                () = tokio::time::sleep(Duration::from_millis(100)), if stop_requested.is_some() => {
                    let waited = stop_requested.map(|at| at.elapsed()).unwrap_or_default();
                    let talking = conversations.open() > 0;
                    if (!talking && waited > successor_grace) || waited > STOP_DURING_HANDOVER {
                        info!(waited_ms = waited.as_millis() as u64, "no new agent took over: stopping");
                        break;
                    }
                }
                stream = next_successor(handover_server.as_ref()) => {
                    let (listeners, pin_root, ready) =
                        (listeners.clone(), pin_root.clone(), successors_tx.clone());
                    // At most a few at once, each a task until it asks for
                    // the kernel state or goes.
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        warn!("handover: too many new agents at once, turned one away");
                        continue;
                    };
                    let conversation = conversations.begin();
                    // The new agent may take its time (its API server's
                    // lists) before it wants the kernel state: talk to it
                    // aside, and serve meanwhile.
                    tokio::spawn(async move {
                        let _permit = permit;
                        let borrowed: Vec<_> =
                            listeners.iter().map(|(role, fd)| (*role, fd.as_fd())).collect();
                        match Successor::greet(stream, &pin_root, &borrowed).await {
                            Ok(successor) => drop(ready.send((successor, conversation)).await),
                            Err(error) => warn!(%error, "handover to a new agent abandoned"),
                        }
                    });
                }
                Some((mut next, conversation)) = successors.recv() => {
                    // Lend the kernel state: no map or link changes from
                    // here until the new agent has it or has failed.
                    if let Some(direct_log) = direct_log.as_mut() {
                        direct_log.stop();
                    }
                    reloader.dataplane.unlock();
                    info!(pid = next.pid, "handing the kernel state to the new agent");
                    match next.release().await {
                        Ok(()) => {
                            conversation.handed_over();
                            successor = Some(next);
                            break;
                        }
                        Err(error) => {
                            warn!(%error, "the new agent did not take over: keeping the kernel state");
                            lifecycle.handovers_failed.fetch_add(1, Ordering::Relaxed);
                            if let Err(error) = reloader.dataplane.relock() {
                                warn!(%error, "taking the pin root back");
                            }
                            if let Some(direct_log) = direct_log.as_mut() {
                                direct_log.resume();
                            }
                        }
                    }
                }
                () = reload.0.notified() => reloader.reload().await,
                Some(()) = changed.recv() => {
                    // Let a burst of writes settle before reading the file.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while changed.try_recv().is_ok() {}
                    reloader.reload().await;
                }
                () = reloader.source.changed() => {
                    // Let a burst of events (a rollout) settle into one update.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    reloader.refresh().await;
                    unmapped = reloader.source.report_unmapped(&unmapped);
                }
                _ = interfaces.tick() => {
                    if reloader.dataplane.interfaces_changed() {
                        reloader.reattach().await;
                    }
                }
                // Pods whose interface or cgroup was not there yet (the CNI
                // and kubelet may lag the API server) are looked for again.
                _ = remap.tick(), if !unmapped.is_empty() => {
                    reloader.refresh().await;
                    unmapped = reloader.source.report_unmapped(&unmapped);
                }
            }
        }

        ready.store(false, Ordering::Release);
        // Stop accepting (the successor, if any, accepts on the same
        // sockets), GOAWAY to HBONE peers.
        stop.cancel();
        let _ = outbound_accepting.await;
        let _ = inbound_accepting.await;
        drop(listeners);
        tracker.close();
        let Some(successor) = successor else {
            info!("draining");
            if tokio::time::timeout(reloader.current.proxy.drain_timeout(), tracker.wait())
                .await
                .is_err()
            {
                warn!("drain timeout: closing the remaining connections");
            }
            if let Some(server) = &handover_server {
                server.remove();
            }
            reloader.dataplane.close().context("removing pins")?;
            info!("stopped; kernel state removed");
            return Ok(Stopped::Cleaned);
        };
        reloader.dataplane.relinquish();
        lifecycle.draining.store(true, Ordering::Release);
        // New agents find the successor from now on.
        handover_server.take();
        // This agent's own numbers stay readable while it drains, on a
        // port of its own: the new agent has the configured one.
        let drain_stop = CancellationToken::new();
        let stats = match admin::bind(admin::Role::Admin, (addresses.admin.ip(), 0).into()).await {
            Ok(listener) => {
                let at = listener.local_addr()?;
                tokio::spawn(admin::serve(
                    listener,
                    admin::Role::Admin,
                    admin_state.clone(),
                    drain_stop.clone(),
                ));
                at
            }
            Err(error) => {
                warn!(%error, "no stats while draining");
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        };
        let successor = successor.draining(stats).await;
        // Fast-path connections go on in the new agent: they leave this
        // one as soon as nothing of theirs is in its hands.
        let (sink, departures) = tokio::sync::mpsc::unbounded_channel();
        // Only to a new agent that runs the fast path itself (one that
        // does not could not carry them: they stay here).
        let fast = reloader.dataplane.fast_path();
        let takes = successor.takes_fast_path;
        let migrating = fast.as_ref().filter(|_| takes);
        if let Some(fast) = migrating {
            fast.migrations.request(sink);
        }
        let migrations = migrating.map(|fast| &fast.migrations);
        let (moved, mut kept) = successor.pass_connections(departures, migrations).await;
        if !takes {
            kept = fast
                .as_ref()
                .map_or(0, |fast| fast.migrations.pending() as u64);
        }
        info!(
            moved,
            kept, takes, "fast-path connections passed to the new agent"
        );
        let deadline = reloader.current.proxy.handover_drain_timeout();
        info!(
            %stats,
            connections = load(),
            deadline_s = deadline.as_secs(),
            "handed over to the new agent: serving the open connections until they end"
        );
        if tokio::time::timeout(deadline, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                connections = load(),
                "handover drain deadline: closing the remaining connections"
            );
        } else {
            info!("handover drain finished: every connection ended");
        }
        drain_stop.cancel();
        // In a pod, an exit before kubelet stops it would be restarted: the
        // same old agent would start again and take over from the new one.
        // It waits for the rollout to delete its pod instead.
        if reloader.current.kubernetes.is_some() && !told_to_stop {
            info!("handed over and drained: waiting to be stopped");
            shutdown.as_mut().await;
        }
        Ok(Stopped::HandedOver)
    }
}

/// How long a stop waits for a new agent that is taking over (it may be
/// waiting for its API server's first lists).
const STOP_DURING_HANDOVER: Duration = Duration::from_secs(30);

/// How long a stopped agent in a pod waits for a new agent to connect:
/// a rollout's new agent says hello within milliseconds of its start.
const SUCCESSOR_GRACE: Duration = Duration::from_secs(3);

/// New agents talking to this one at once (a rollout has one).
const MAX_HANDOVER_CONVERSATIONS: usize = 4;

/// The next new agent at the handover socket (never, without one).
async fn next_successor(server: Option<&HandoverServer>) -> tokio::net::UnixStream {
    match server {
        Some(server) => server.accept().await,
        None => std::future::pending().await,
    }
}

/// The CA named in the config: a CA service (no key on the node), signing
/// files, or the embedded CA's directory.
fn certificate_authority(config: &Config) -> anyhow::Result<Arc<dyn CertificateAuthority>> {
    if let Some(istio) = &config.identity.istio {
        return Ok(Arc::new(crate::identity::istio::IstioCa::new(istio)?));
    }
    let ca = match &config.identity.ca {
        Some(files) => EmbeddedCa::load(&files.cert, &files.key, &files.roots)?,
        None => EmbeddedCa::load_or_create(&config.identity.ca_dir)?,
    };
    Ok(Arc::new(ca))
}
