//! Opening the path from a captured connection to its endpoint:
//! - a meshed workload on another node: an HBONE stream, presenting the
//!   client workload's identity and expecting the endpoint's;
//! - a meshed workload on this node: plain TCP (both ends are on this host,
//!   no wire to protect), after the same authorization check the
//!   destination's agent would make;
//! - anything else (not in the mesh): plain TCP.

use std::{
    io,
    net::SocketAddrV4,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::net::TcpStream;

use super::{OutboundStats, Routes, splice};
use crate::{
    authz::Request,
    dataplane::fast_path::FastPath,
    hbone::{
        self,
        client::{Destination, HboneClient, StreamGuard},
    },
};

pub enum Upstream {
    Tcp(TcpStream),
    Tunnel(hbone::Tunnel, StreamGuard),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Authorization refused it: retrying elsewhere is pointless.
    #[error("denied by {0}")]
    Denied(String),
    #[error("{0}")]
    Failed(String),
}

/// What a finished splice moved and how it ended.
pub struct Finished {
    pub sent: u64,
    pub received: u64,
    pub error: Option<(splice::Side, io::Error)>,
}

pub struct Opener<'a> {
    pub routes: &'a Routes,
    pub hbone: &'a Arc<HboneClient>,
    pub inbound_port: u16,
    pub timeout: Duration,
    pub stats: &'a OutboundStats,
}

impl Opener<'_> {
    pub async fn open(
        &self,
        target: SocketAddrV4,
        client: SocketAddrV4,
    ) -> Result<Upstream, OpenError> {
        let state = &self.routes.state;
        let source = state
            .workload_by_ip(*client.ip())
            .filter(|(_, w)| w.local.is_some())
            .map(|(_, w)| state.identity(w));
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
                };
                // Boxed: the TLS and HTTP/2 handshakes are large futures,
                // and every connection's task would carry their size.
                match Box::pin(self.hbone.open(&destination)).await {
                    Ok((stream, guard)) => Ok(Upstream::Tunnel(stream, guard)),
                    Err(error) if error.is_denied() => Err(OpenError::Denied(error.to_string())),
                    Err(error) => Err(OpenError::Failed(error.to_string())),
                }
            }
            Some((_, workload)) => {
                let request = Request {
                    principal: source.as_ref(),
                    source_ip: *client.ip(),
                    workload_namespace: &workload.namespace,
                    workload_name: &workload.name,
                    port: target.port(),
                };
                if let Err(rule) = state.authorization.check(&request).enforce(&request) {
                    self.stats.denied.fetch_add(1, Ordering::Relaxed);
                    return Err(OpenError::Denied(rule));
                }
                self.tcp(target).await
            }
            None => self.tcp(target).await,
        }
    }

    async fn tcp(&self, target: SocketAddrV4) -> Result<Upstream, OpenError> {
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(target))
            .await
            .map_err(|_| OpenError::Failed("connect timed out".into()))?
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        Ok(Upstream::Tcp(stream))
    }
}

/// Splices the client with whichever upstream it got, counting bytes into
/// `counted` as they go.
pub async fn splice(
    client: TcpStream,
    upstream: Upstream,
    idle: Option<Duration>,
    counted: &crate::live::Bytes,
    first_response: &(dyn Fn(Duration) + Sync),
    fast_path: Option<&FastPath>,
) -> Finished {
    match upstream {
        Upstream::Tcp(upstream) => {
            let done =
                splice::splice(client, upstream, idle, counted, first_response, fast_path).await;
            Finished {
                sent: done.sent,
                received: done.received,
                error: done.error,
            }
        }
        Upstream::Tunnel(stream, _guard) => {
            let watch = hbone::Watch {
                to_tunnel: &counted.sent,
                from_tunnel: &counted.received,
                idle,
                first_data: first_response,
            };
            let done = hbone::splice_tunnel(client, stream, &watch).await;
            Finished {
                sent: counted.sent.load(Ordering::Relaxed),
                received: counted.received.load(Ordering::Relaxed),
                error: done.error,
            }
        }
    }
}
