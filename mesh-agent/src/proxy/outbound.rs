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

use super::{Routes, splice};
use crate::model::Destination;

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
        let started = Instant::now();
        // The transparent socket's local address is where the pod connected to.
        let original = match client.local_addr() {
            Ok(SocketAddr::V4(addr)) => addr,
            other => {
                warn!(%peer, ?other, "captured connection without an IPv4 destination");
                return splice::reset(client);
            }
        };
        let Some(target) = self.choose(original) else {
            warn!(%peer, destination = %original, "no endpoint available; resetting");
            self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            return splice::reset(client);
        };
        let upstream = match connect(target, self.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                warn!(%peer, destination = %original, endpoint = %target, %error, "connect failed; resetting client");
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                return splice::reset(client);
            }
        };
        let _ = client.set_nodelay(true);
        let spliced = splice::splice(client, upstream).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        match spliced.error {
            None => info!(
                %peer, destination = %original, endpoint = %target,
                sent = spliced.sent, received = spliced.received, duration_ms,
                "connection closed"
            ),
            Some(error) => info!(
                %peer, destination = %original, endpoint = %target,
                sent = spliced.sent, received = spliced.received, duration_ms, %error,
                "connection reset"
            ),
        }
    }

    /// Where a connection to `original` goes: a service endpoint chosen by
    /// the balancer, or the workload itself.
    fn choose(&self, original: SocketAddrV4) -> Option<SocketAddrV4> {
        let state = &self.routes.state;
        match state.destination(original) {
            Destination::Service { service, port } => {
                let endpoint = self.routes.balancers.pick(service)?;
                let ip = state.services[service].endpoints[endpoint].ip;
                Some(SocketAddrV4::new(ip, port.target_port))
            }
            // The kernel captured it, so it was meshed a moment ago: go where
            // the pod wanted to go.
            Destination::Workload(_) | Destination::Unknown => Some(original),
        }
    }
}

async fn connect(target: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
