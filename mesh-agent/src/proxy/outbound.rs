//! Outbound: connections a meshed pod opened to a meshed destination, handed
//! to us by the `mesh_from_pod` tc program.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    faults::{self, FaultStats, FaultStatsSnapshot},
    upstream::{self, EarlyData, OpenError, Opener},
};
use crate::{
    dataplane::fast_path::{Departure, FastPath},
    hbone::client::HboneClient,
    io::splice::{self, Side, Spliced},
    lb::{PickError, RetryPermit, ServiceBalancer},
    model::{Destination, ServicePort},
    observability::access::{Outcome, Record, Sinks},
    observability::log_budget::LogBudget,
    routes::Routes,
};

/// Counters the outbound proxy keeps.
#[derive(Debug, Default)]
pub struct OutboundStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub connect_failures: AtomicU64,
    pub denied: AtomicU64,
    pub tunnelled: AtomicU64,
    /// Tunnelled connections whose first bytes went ahead of the CONNECT
    /// answer.
    pub early_data: AtomicU64,
    /// Connections made to the outbound port directly (not steered by the
    /// kernel), refused.
    pub not_captured: AtomicU64,
    /// Connections that got a service's injected faults.
    pub faults: FaultStats,
}

#[derive(Debug, Serialize)]
pub struct OutboundStatsSnapshot {
    pub accepted: u64,
    pub active: u64,
    pub connect_failures: u64,
    pub denied: u64,
    pub tunnelled: u64,
    pub early_data: u64,
    pub not_captured: u64,
    pub faults: FaultStatsSnapshot,
}

impl OutboundStats {
    pub fn snapshot(&self) -> OutboundStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OutboundStatsSnapshot {
            accepted: get(&self.accepted),
            active: get(&self.active),
            connect_failures: get(&self.connect_failures),
            denied: get(&self.denied),
            tunnelled: get(&self.tunnelled),
            early_data: get(&self.early_data),
            not_captured: get(&self.not_captured),
            faults: self.faults.snapshot(),
        }
    }
}

pub struct Outbound {
    listener: TcpListener,
    routes: watch::Receiver<Arc<Routes>>,
    connect_timeout: Duration,
    inbound_port: u16,
    hbone: Arc<HboneClient>,
    stats: Arc<OutboundStats>,
    sinks: Arc<Sinks>,
    /// The kernel moves admitted plaintext connections' bytes, when set.
    fast_path: Option<Arc<FastPath>>,
}

/// How the outbound proxy reaches endpoints.
pub struct OutboundSettings {
    pub connect_timeout: Duration,
    /// The HBONE port of other nodes' agents.
    pub inbound_port: u16,
    /// The kernel moves admitted plaintext connections' bytes, when set.
    pub fast_path: Option<Arc<FastPath>>,
}

impl Outbound {
    pub fn new(
        listener: TcpListener,
        routes: watch::Receiver<Arc<Routes>>,
        settings: OutboundSettings,
        hbone: Arc<HboneClient>,
        stats: Arc<OutboundStats>,
        sinks: Arc<Sinks>,
    ) -> Self {
        Self {
            listener,
            routes,
            connect_timeout: settings.connect_timeout,
            inbound_port: settings.inbound_port,
            hbone,
            stats,
            sinks,
            fast_path: settings.fast_path,
        }
    }

    /// Accepts until `stop` fires; each connection runs on `tracker` so the
    /// caller can wait for them to drain.
    pub async fn serve(self, stop: CancellationToken, tracker: TaskTracker) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (client, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    warn!(%error, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let routes = self.routes.borrow().clone();
            let connection = Connection {
                routes,
                connect_timeout: self.connect_timeout,
                inbound_port: self.inbound_port,
                hbone: self.hbone.clone(),
                stats: self.stats.clone(),
                sinks: self.sinks.clone(),
                fast_path: self.fast_path.clone(),
            };
            tracker.spawn(connection.run(client, peer));
        }
        debug!("outbound listener closed");
    }
}

/// Refusals of unsteered connections are logged a few times a second.
static NOT_CAPTURED_LOG: LogBudget = LogBudget::new(5);
/// So are injected refusals (the access log has every one).
static FAULT_LOG: LogBudget = LogBudget::new(5);
/// And refusals over a quota.
static QUOTA_LOG: LogBudget = LogBudget::new(5);

struct Connection {
    routes: Arc<Routes>,
    connect_timeout: Duration,
    inbound_port: u16,
    hbone: Arc<HboneClient>,
    stats: Arc<OutboundStats>,
    sinks: Arc<Sinks>,
    fast_path: Option<Arc<FastPath>>,
}

impl Connection {
    async fn run(self, client: TcpStream, peer: SocketAddr) {
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        self.proxy(client, peer).await;
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }

    async fn proxy(&self, client: TcpStream, peer: SocketAddr) {
        // The transparent socket's local address is where the pod connected to.
        let (original, peer) = match (client.local_addr(), peer) {
            (Ok(SocketAddr::V4(original)), SocketAddr::V4(peer)) => (original, peer),
            (local, _) => {
                warn!(%peer, ?local, "captured connection that is not IPv4");
                return splice::reset(client);
            }
        };
        if self.routes.own.reaches_agent(original) {
            // A pod connected to the agent's port itself: proxying it
            // would make the agent dial its own listener.
            self.stats.not_captured.fetch_add(1, Ordering::Relaxed);
            if NOT_CAPTURED_LOG.allow() {
                warn!(%peer, destination = %original, "connection to an agent port that the kernel did not steer; refused");
            }
            return splice::reset(client);
        }
        match self.routes.state.destination(original) {
            Destination::Service { service, port } => {
                self.proxy_service(client, peer, original, service, port)
                    .await;
            }
            // A workload's own address, or something the model no longer
            // has (it was meshed when the kernel captured it): go where the
            // pod wanted to go.
            Destination::Workload(_) | Destination::Unknown => {
                self.proxy_direct(client, peer, original).await;
            }
        }
    }

    fn opener(&self, timeout: Duration, record: &Record) -> Opener<'_> {
        Opener {
            routes: &self.routes,
            hbone: &self.hbone,
            inbound_port: self.inbound_port,
            timeout,
            stats: &self.stats,
            trace: record.trace,
        }
    }

    /// A record for a captured connection, in a new trace when tracing is on.
    fn record(&self, peer: SocketAddrV4, original: SocketAddrV4) -> Record {
        let mut record = Record::new("source", &self.routes.state, peer, original);
        record.trace = self.sinks.tracer.start(None);
        record
    }

    async fn proxy_direct(&self, client: TcpStream, peer: SocketAddrV4, original: SocketAddrV4) {
        let mut record = self.record(peer, original);
        let mut early = EarlyData::default();
        let opened = self
            .opener(self.connect_timeout, &record)
            .open(original, peer, &client, &mut early)
            .await;
        match opened {
            Ok(upstream) => {
                record.endpoint = Some(original);
                record.mutual_tls = matches!(upstream, upstream::Upstream::Tunnel(..));
                self.splice(client, upstream, None, record, &|_| {}, None)
                    .await;
            }
            Err(error) => {
                warn!(%peer, destination = %original, %error, "no path to the destination; resetting client");
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                splice::reset(client);
                record.finish(
                    &self.sinks,
                    failure_outcome(&error),
                    0,
                    0,
                    Some(error.to_string()),
                );
            }
        }
    }

    async fn proxy_service(
        &self,
        client: TcpStream,
        peer: SocketAddrV4,
        original: SocketAddrV4,
        service: usize,
        port: ServicePort,
    ) {
        let state = &self.routes.state;
        let mut record = self.record(peer, original);
        let Some(balancer) = self.routes.balancers.service(service) else {
            return splice::reset(client);
        };
        record.service = format!(
            "{}.{}.svc.{}",
            balancer.name, balancer.namespace, state.trust_domain
        );
        let mut admission = match balancer.admit() {
            Ok(admission) => admission,
            Err(error) => {
                warn!(%peer, destination = %original, service = %balancer.name, %error, "refused");
                splice::reset(client);
                return record.finish(&self.sinks, Outcome::Breaker, 0, 0, Some(error.to_string()));
            }
        };
        // The client's quota: its identity when it has one, else its
        // address. Held for the connection's life (open connections).
        let client_name = if record.source_principal.is_empty() {
            peer.ip().to_string()
        } else {
            record.source_principal.clone()
        };
        let _quota = match balancer.admit_client(&client_name) {
            Ok(guard) => guard,
            Err(over) => {
                if QUOTA_LOG.allow() {
                    warn!(%peer, service = %balancer.name, %over, "over quota; refused");
                }
                splice::reset(client);
                let error = Some(over.to_string());
                return record.finish(&self.sinks, Outcome::RateLimited, 0, 0, error);
            }
        };
        // Injected faults come after admission, so a delayed connection
        // counts against the breaker as a slow endpoint's would.
        let injected = faults::draw(&balancer.faults, state, peer);
        record.fault = injected;
        if let Some(delay) = injected.delay {
            self.stats.faults.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        }
        if injected.refuse {
            self.stats.faults.refused.fetch_add(1, Ordering::Relaxed);
            if FAULT_LOG.allow() {
                info!(%peer, service = %balancer.name, "fault injected: refused");
            }
            splice::reset(client);
            let error = Some("fault injected: refused".to_owned());
            return record.finish(&self.sinks, Outcome::Injected, 0, 0, error);
        }
        let opener = self.opener(balancer.connect_timeout(self.connect_timeout), &record);
        let mut tried = Vec::new();
        let mut early = EarlyData::default();
        let mut _retry: Option<RetryPermit> = None;
        let (upstream, endpoint) = loop {
            let endpoint = match balancer.pick(*peer.ip(), &tried) {
                Ok(endpoint) => endpoint,
                Err(error) => {
                    warn!(%peer, destination = %original, service = %balancer.name, tried = tried.len(), %error, "no endpoint; resetting client");
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    splice::reset(client);
                    let outcome = match error {
                        PickError::Overflow => Outcome::Breaker,
                        PickError::NoEndpoint if tried.is_empty() => Outcome::NoEndpoint,
                        PickError::NoEndpoint => Outcome::Refused,
                    };
                    return record.finish(&self.sinks, outcome, 0, 0, Some(error.to_string()));
                }
            };
            let target = ServiceBalancer::target(&endpoint, port);
            record.endpoint = Some(target);
            record.set_destination_workload(state, endpoint.ip);
            let connecting = endpoint.begin_connect();
            let attempt = Instant::now();
            match opener.open(target, peer, &client, &mut early).await {
                Ok(upstream) => {
                    endpoint.connect_succeeded(attempt.elapsed());
                    break (upstream, endpoint);
                }
                Err(OpenError::Denied(rule)) => {
                    warn!(%peer, service = %balancer.name, endpoint = %target, rule, "denied; resetting client");
                    splice::reset(client);
                    return record.finish(&self.sinks, Outcome::Denied, 0, 0, Some(rule));
                }
                // The workload's quota: no failure of the endpoint, and not
                // retried (a limit that sheds load is not to be dodged).
                Err(OpenError::RateLimited(why)) => {
                    if QUOTA_LOG.allow() {
                        warn!(%peer, service = %balancer.name, endpoint = %target, why, "over the workload's quota; refused");
                    }
                    splice::reset(client);
                    let error = Some(why);
                    return record.finish(&self.sinks, Outcome::RateLimited, 0, 0, error);
                }
                Err(OpenError::Failed(error)) => {
                    drop(connecting);
                    balancer.report_failure(&endpoint);
                    tried.push(endpoint.ip);
                    record.retries = tried.len() as u32;
                    let attempts_left = tried.len() <= balancer.resilience.retry.retries as usize;
                    let permit = if attempts_left {
                        balancer.try_retry()
                    } else {
                        None
                    };
                    warn!(%peer, service = %balancer.name, endpoint = %target, %error, retrying = permit.is_some(), "connect failed");
                    if permit.is_none() {
                        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        splice::reset(client);
                        let outcome = failure_outcome(&OpenError::Failed(error.clone()));
                        return record.finish(&self.sinks, outcome, 0, 0, Some(error));
                    }
                    _retry = permit;
                }
            }
        };
        drop(_retry);
        admission.established();
        let _active = endpoint.begin_active();
        record.mutual_tls = matches!(upstream, upstream::Upstream::Tunnel(..));
        // The first response byte feeds the endpoint's latency estimate too:
        // a server slow to answer is slow, however fast it accepts.
        let observe = |latency| endpoint.response_observed(latency);
        let upstream_failed = self
            .splice(
                client,
                upstream,
                balancer.idle_timeout(),
                record,
                &observe,
                injected.cut_after,
            )
            .await;
        if upstream_failed {
            balancer.report_failure(&endpoint);
        }
    }

    /// Splices, then writes the record. Returns whether the upstream failed.
    /// With `cut_after`, the connection is reset once that many bytes have
    /// passed (an injected fault).
    async fn splice(
        &self,
        client: TcpStream,
        upstream: upstream::Upstream,
        idle: Option<Duration>,
        record: Record,
        first_response: &(dyn Fn(Duration) + Sync),
        cut_after: Option<u64>,
    ) -> bool {
        if record.mutual_tls {
            self.stats.tunnelled.fetch_add(1, Ordering::Relaxed);
        }
        let registration = record.opened(&self.sinks);
        let held = cut_after.and_then(|_| faults::hold_for_cut(&client));
        let spliced = upstream::splice(
            client,
            upstream,
            idle,
            &registration.bytes,
            first_response,
            self.fast_path.as_deref(),
        );
        let done = match (cut_after, held) {
            (Some(limit), Some(held)) => {
                tokio::select! {
                    done = spliced => {
                        drop(held);
                        done
                    }
                    _ = faults::bytes_reach(&registration.bytes, limit) => {
                        // Reset on close from now on; the splice, dropped
                        // with the select, closes the client's socket.
                        faults::cut(held);
                        self.stats.faults.cut.fetch_add(1, Ordering::Relaxed);
                        let sent = registration.bytes.sent.load(Ordering::Relaxed);
                        let received = registration.bytes.received.load(Ordering::Relaxed);
                        let error = format!("fault injected: cut after {limit} bytes");
                        record.finish(&self.sinks, Outcome::Injected, sent, received, Some(error));
                        return false;
                    }
                }
            }
            _ => spliced.await,
        };
        conclude(done, record, &self.sinks, self.fast_path.as_deref())
    }
}

/// Writes how a splice ended into the connection's record, or, when the
/// connection left for a new agent, hands it on with its record (the new
/// agent writes it at the end). Returns whether the upstream failed.
pub fn conclude(done: Spliced, record: Record, sinks: &Sinks, fast: Option<&FastPath>) -> bool {
    if let Some(migrant) = done.migrant {
        let departure = Departure {
            migrant,
            record: serde_json::to_value(&record).unwrap_or_default(),
        };
        if fast.is_some_and(|fast| fast.migrations.send(departure).is_ok()) {
            return false;
        }
        // The call for connections outlived its receiver: the sockets
        // closed with the departure.
        warn!(client = %record.client, "a connection leaving for the new agent found none; closed");
        record.finish(sinks, Outcome::Reset, done.sent, done.received, None);
        return false;
    }
    let outcome = match &done.error {
        None => Outcome::Ok,
        Some((Side::Idle, _)) => Outcome::Timeout,
        Some(_) => Outcome::Reset,
    };
    let upstream_failed = matches!(done.error, Some((Side::Upstream, _)));
    let error = done.error.map(|(side, e)| format!("{side:?}: {e}"));
    record.finish(sinks, outcome, done.sent, done.received, error);
    upstream_failed
}

fn failure_outcome(error: &OpenError) -> Outcome {
    match error {
        OpenError::Denied(_) => Outcome::Denied,
        OpenError::RateLimited(_) => Outcome::RateLimited,
        OpenError::Failed(message) if message.contains("timed out") => Outcome::Timeout,
        OpenError::Failed(_) => Outcome::Refused,
    }
}
