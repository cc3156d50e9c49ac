//! Outbound: connections a meshed pod opened to a meshed destination, handed
//! to us by the `mesh_from_pod` tc program.

use std::{
    io,
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
    Routes,
    splice::{self, Side},
};
use crate::{
    lb::{RetryPermit, ServiceBalancer},
    model::{Destination, ServicePort},
};

/// Counters the outbound proxy keeps.
#[derive(Debug, Default)]
pub struct OutboundStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub connect_failures: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct OutboundStatsSnapshot {
    pub accepted: u64,
    pub active: u64,
    pub connect_failures: u64,
}

impl OutboundStats {
    pub fn snapshot(&self) -> OutboundStatsSnapshot {
        OutboundStatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
        }
    }
}

pub struct Outbound {
    listener: TcpListener,
    routes: watch::Receiver<Arc<Routes>>,
    connect_timeout: Duration,
    stats: Arc<OutboundStats>,
}

impl Outbound {
    pub fn new(
        listener: TcpListener,
        routes: watch::Receiver<Arc<Routes>>,
        connect_timeout: Duration,
        stats: Arc<OutboundStats>,
    ) -> Self {
        Self {
            listener,
            routes,
            connect_timeout,
            stats,
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
                stats: self.stats.clone(),
            };
            tracker.spawn(connection.run(client, peer));
        }
        debug!("outbound listener closed");
    }
}

struct Connection {
    routes: Arc<Routes>,
    connect_timeout: Duration,
    stats: Arc<OutboundStats>,
}

impl Connection {
    async fn run(self, client: TcpStream, peer: SocketAddr) {
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        self.proxy(client, peer).await;
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }

    async fn proxy(&self, client: TcpStream, peer: SocketAddr) {
        // The transparent socket's local address is where the pod connected to.
        let original = match client.local_addr() {
            Ok(SocketAddr::V4(addr)) => addr,
            other => {
                warn!(%peer, ?other, "captured connection without an IPv4 destination");
                return splice::reset(client);
            }
        };
        match self.routes.state.destination(original) {
            Destination::Service { service, port } => {
                self.proxy_service(client, peer, original, service, port)
                    .await
            }
            // A workload's own address, or something the model no longer
            // has (it was meshed when the kernel captured it): go where the
            // pod wanted to go.
            Destination::Workload(_) | Destination::Unknown => {
                self.proxy_direct(client, peer, original).await
            }
        }
    }

    async fn proxy_direct(&self, client: TcpStream, peer: SocketAddr, original: SocketAddrV4) {
        let started = Instant::now();
        match connect(original, self.connect_timeout).await {
            Ok(upstream) => {
                let spliced = splice::splice(client, upstream, None).await;
                log_close(peer, original, original, &spliced, started);
            }
            Err(error) => {
                warn!(%peer, destination = %original, %error, "connect failed; resetting client");
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                splice::reset(client);
            }
        }
    }

    async fn proxy_service(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        original: SocketAddrV4,
        service: usize,
        port: ServicePort,
    ) {
        let started = Instant::now();
        let Some(balancer) = self.routes.balancers.service(service) else {
            return splice::reset(client);
        };
        let mut admission = match balancer.admit() {
            Ok(admission) => admission,
            Err(error) => {
                warn!(%peer, destination = %original, service = %balancer.name, %error, "refused");
                return splice::reset(client);
            }
        };
        let client_ip = match peer {
            SocketAddr::V4(peer) => *peer.ip(),
            SocketAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
        };
        let timeout = balancer.connect_timeout(self.connect_timeout);
        let mut tried = Vec::new();
        let mut _retry: Option<RetryPermit> = None;
        let (upstream, endpoint) = loop {
            let endpoint = match balancer.pick(client_ip, &tried) {
                Ok(endpoint) => endpoint,
                Err(error) => {
                    warn!(%peer, destination = %original, service = %balancer.name, tried = tried.len(), %error, "no endpoint; resetting client");
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    return splice::reset(client);
                }
            };
            let target = ServiceBalancer::target(&endpoint, port);
            let connecting = endpoint.begin_connect();
            let attempt = Instant::now();
            match connect(target, timeout).await {
                Ok(upstream) => {
                    endpoint.connect_succeeded(attempt.elapsed());
                    break (upstream, endpoint);
                }
                Err(error) => {
                    drop(connecting);
                    balancer.report_failure(&endpoint);
                    tried.push(endpoint.ip);
                    let attempts_left = tried.len() <= balancer.resilience.retry.retries as usize;
                    let permit = if attempts_left {
                        balancer.try_retry()
                    } else {
                        None
                    };
                    warn!(%peer, service = %balancer.name, endpoint = %target, %error, retrying = permit.is_some(), "connect failed");
                    if permit.is_none() {
                        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        return splice::reset(client);
                    }
                    _retry = permit;
                }
            }
        };
        drop(_retry);
        admission.established();
        let _active = endpoint.begin_active();
        let target = ServiceBalancer::target(&endpoint, port);
        let spliced = splice::splice(client, upstream, balancer.idle_timeout()).await;
        if matches!(spliced.error, Some((Side::Upstream, _))) {
            balancer.report_failure(&endpoint);
        }
        log_close(peer, original, target, &spliced, started);
    }
}

fn log_close(
    peer: SocketAddr,
    original: SocketAddrV4,
    endpoint: SocketAddrV4,
    spliced: &splice::Spliced,
    started: Instant,
) {
    let duration_ms = started.elapsed().as_millis() as u64;
    match &spliced.error {
        None => info!(
            %peer, destination = %original, %endpoint,
            sent = spliced.sent, received = spliced.received, duration_ms,
            "connection closed"
        ),
        Some((side, error)) => info!(
            %peer, destination = %original, %endpoint,
            sent = spliced.sent, received = spliced.received, duration_ms, ?side, %error,
            "connection reset"
        ),
    }
}

async fn connect(target: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
