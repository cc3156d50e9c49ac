//! Opening the path from a captured connection to its endpoint:
//! - a meshed workload on another node: an HBONE stream, presenting the
//!   client workload's identity and expecting the endpoint's;
//! - a meshed workload on this node: plain TCP (both ends are on this host,
//!   no wire to protect), after the same authorization check the
//!   destination's agent would make;
//! - anything else (not in the mesh): plain TCP.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tracing::debug;

use super::OutboundStats;
use crate::{
    authz::Request,
    dataplane::fast_path::FastPath,
    hbone::{
        self,
        client::{Destination, HboneClient, StreamGuard},
    },
    io::splice::{self, Spliced},
    lb::quota::QuotaGuard,
    observability::spans::TraceContext,
    routes::Routes,
};

pub enum Upstream {
    /// With the destination workload's quota guard, if it has a quota.
    Tcp(TcpStream, Option<QuotaGuard>),
    /// The tunnel, and how many of the client's bytes went ahead of its
    /// answer ([`EarlyData`]).
    Tunnel(hbone::Tunnel, StreamGuard, u64),
}

/// How many times a stream the peer did not process is sent again.
const UNPROCESSED_AGAIN: usize = 2;

/// Most of the client's first bytes sent ahead of an HBONE answer.
const EARLY_LIMIT: usize = 16 * 1024;

/// The client's first bytes, when they arrived before an HBONE stream was
/// answered: sent ahead of the answer, and kept (a shared `Bytes`, no copy)
/// so that a retry on another endpoint sends them again.
#[derive(Default)]
pub struct EarlyData(Option<Bytes>);

impl EarlyData {
    /// What to send ahead of the answer: the bytes read for an earlier
    /// attempt, or else the client's first read if it comes before the
    /// answer does.
    async fn take_or_read(&mut self, client: &TcpStream) -> Option<Bytes> {
        if let Some(data) = &self.0 {
            return Some(data.clone());
        }
        client.readable().await.ok()?;
        let mut buffer = BytesMut::with_capacity(EARLY_LIMIT);
        match client.try_read_buf(&mut buffer) {
            Ok(n) if n > 0 => {
                let data = buffer.freeze();
                self.0 = Some(data.clone());
                Some(data)
            }
            // End of stream stays for the splice to read; a spurious
            // wake-up just means nothing goes early.
            _ => None,
        }
    }

    fn len(&self) -> u64 {
        self.0.as_ref().map_or(0, |data| data.len() as u64)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Authorization refused it: retrying elsewhere is pointless.
    #[error("denied by {0}")]
    Denied(String),
    /// Over the destination workload's quota: not the endpoint's failure.
    #[error("{0}")]
    RateLimited(String),
    #[error("{0}")]
    Failed(String),
}

pub struct Opener<'a> {
    pub routes: &'a Routes,
    pub hbone: &'a Arc<HboneClient>,
    pub inbound_port: u16,
    pub timeout: Duration,
    pub stats: &'a OutboundStats,
    /// The connection's span, the parent of the destination agent's.
    pub trace: Option<TraceContext>,
}

impl Opener<'_> {
    /// Opens the path to `target` for `client` (the captured connection
    /// `client_stream`, whose first bytes may go ahead into `early`).
    pub async fn open(
        &self,
        target: SocketAddrV4,
        client: SocketAddrV4,
        client_stream: &TcpStream,
        early: &mut EarlyData,
    ) -> Result<Upstream, OpenError> {
        if self.routes.own.reaches_agent(target) {
            return Err(OpenError::Failed(format!(
                "{target} is the agent's own listener, never an endpoint"
            )));
        }
        let state = &self.routes.state;
        let client_workload = state
            .workload_by_ip(*client.ip())
            .filter(|(_, w)| w.local.is_some())
            .map(|(_, w)| w);
        let source = client_workload.map(|w| state.identity(w));
        match state.workload_by_ip(*target.ip()) {
            Some((_, workload)) if workload.local.is_none() => {
                let source = source.ok_or_else(|| {
                    OpenError::Failed(format!(
                        "client {} is not a workload here: no identity to present",
                        client.ip()
                    ))
                })?;
                let identity = state.identity(workload);
                let destination = Destination {
                    source: &source,
                    identity: &identity,
                    node: &workload.node,
                    gateway: SocketAddrV4::new(*target.ip(), self.inbound_port),
                    target,
                    client: (*client.ip()).into(),
                    trace: self.trace.map(|trace| trace.traceparent()),
                    baggage: client_workload.map(|w| (w.namespace.as_str(), w.name.as_str())),
                };
                // Boxed: the TLS and HTTP/2 handshakes are large futures,
                // and every connection's task would carry their size. A
                // stream the peer left unprocessed (its agent is stopping)
                // goes again at once, its early bytes with it: that is no
                // failure of the endpoint, and a retry elsewhere is not
                // always possible.
                let mut attempts = 0;
                let opened = loop {
                    let ahead = early.take_or_read(client_stream);
                    match Box::pin(self.hbone.open(&destination, ahead)).await {
                        Err(error) if error.is_unprocessed() && attempts < UNPROCESSED_AGAIN => {
                            attempts += 1;
                            debug!(%target, %error, "sending the stream again");
                        }
                        opened => break opened,
                    }
                };
                match opened {
                    Ok((stream, guard)) => {
                        if early.len() > 0 {
                            self.stats.early_data.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Upstream::Tunnel(stream, guard, early.len()))
                    }
                    Err(error) if error.is_denied() => Err(OpenError::Denied(error.to_string())),
                    Err(error) if error.is_rate_limited() => {
                        Err(OpenError::RateLimited(error.to_string()))
                    }
                    Err(error) => Err(OpenError::Failed(error.to_string())),
                }
            }
            Some((workload_id, workload)) => {
                let request = Request {
                    principal: source.as_ref(),
                    trust_domain: &state.trust_domain,
                    source_ip: *client.ip(),
                    workload_namespace: &workload.namespace,
                    workload_name: &workload.name,
                    port: target.port(),
                };
                if let Err(denied) = state.authorization.check(&request).enforce(&request) {
                    self.stats.denied.fetch_add(1, Ordering::Relaxed);
                    return Err(OpenError::Denied(denied.rule));
                }
                // The workload's quota, as its agent applies it to streams
                // from other nodes: per identity, else per address.
                let client_name = source
                    .as_ref()
                    .map_or_else(|| client.ip().to_string(), ToString::to_string);
                let quota = self
                    .routes
                    .balancers
                    .admit_to_workload(workload_id, &client_name)
                    .map_err(|over| OpenError::RateLimited(over.to_string()))?;
                let source = self.routes.upstream_source(*client.ip(), *target.ip());
                self.tcp(target, source, quota).await
            }
            None => self.tcp(target, None, None).await,
        }
    }

    async fn tcp(
        &self,
        target: SocketAddrV4,
        source: Option<Ipv4Addr>,
        quota: Option<QuotaGuard>,
    ) -> Result<Upstream, OpenError> {
        let stream = crate::io::connect(target, source, self.timeout)
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        Ok(Upstream::Tcp(stream, quota))
    }
}

/// Splices the client with whichever upstream it got, counting bytes into
/// `counted` as they go.
pub async fn splice(
    client: TcpStream,
    upstream: Upstream,
    idle: Option<Duration>,
    counted: &crate::observability::live::Bytes,
    first_response: &(dyn Fn(Duration) + Sync),
    fast_path: Option<&FastPath>,
) -> Spliced {
    match upstream {
        Upstream::Tcp(upstream, _quota) => {
            splice::splice(client, upstream, idle, counted, first_response, fast_path).await
        }
        Upstream::Tunnel(stream, _guard, sent_early) => {
            counted.sent.fetch_add(sent_early, Ordering::Relaxed);
            let watch = hbone::Watch {
                to_tunnel: &counted.sent,
                from_tunnel: &counted.received,
                idle,
                first_data: first_response,
            };
            let error = hbone::splice_tunnel(client, stream, &watch).await;
            Spliced {
                sent: counted.sent.load(Ordering::Relaxed),
                received: counted.received.load(Ordering::Relaxed),
                error,
                migrant: None,
            }
        }
    }
}
