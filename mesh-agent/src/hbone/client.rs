//! The HBONE client: a CONNECT stream to `target` through the destination
//! node's agent, over a pooled mutual-TLS HTTP/2 connection.
//!
//! Pool key: (source identity, destination identity, destination node), as
//! HBONE requires one tunnel per identity pair. Several busy streams must
//! not share one TCP connection's window and one core: a new connection is
//! opened once every pooled one carries `streams_per_connection` streams,
//! up to `max_connections_per_peer`; beyond that the least loaded is shared.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{Reason, client::SendRequest};
use http::{Method, Request, StatusCode};
use rustls::{pki_types::ServerName, sign::CertifiedKey};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::{
    CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME, MAX_STREAMS_PER_CONNECTION, SEND_BUFFER,
    STREAM_WINDOW, TLS_SEND_BUFFER, Tunnel,
};
use crate::{
    config::HboneConfig,
    identity::SpiffeId,
    locks::lock,
    observability::spans::TraceParent,
    tls::{TlsFactory, kernel::KernelTlsStats},
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddrV4, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Tls(SocketAddrV4, String),
    #[error("HTTP/2 with {0}: {1}")]
    Http(SocketAddrV4, h2::Error),
    /// The destination refused the stream (authorization: 401/403).
    #[error("{0} answered {1}")]
    Refused(SocketAddrV4, StatusCode),
    #[error("{0} answered {1}")]
    Status(SocketAddrV4, StatusCode),
    /// The destination refused the stream over its workload's quota (429).
    #[error("{0} answered {1}: over the workload's quota")]
    RateLimited(SocketAddrV4, StatusCode),
    /// No answer to the CONNECT in time: the peer is gone or stuck.
    #[error("{0} did not answer the CONNECT within {1:?} (timed out)")]
    NoAnswer(SocketAddrV4, Duration),
    /// The peer did not process the stream: it was above the last one a
    /// GOAWAY let through, or reset with REFUSED_STREAM (RFC 9113, 8.7).
    /// Nothing reached the pod, so the same request may go again.
    #[error("HTTP/2 with {0}: stream not processed ({1})")]
    Unprocessed(SocketAddrV4, h2::Error),
}

impl HboneError {
    /// Refused by policy: retrying elsewhere would only be refused again.
    pub fn is_denied(&self) -> bool {
        matches!(self, HboneError::Refused(..))
    }

    /// Over the destination workload's quota: the endpoint is healthy,
    /// and this client may not open more there for now.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, HboneError::RateLimited(..))
    }

    /// Safe to send again, on another connection to the same peer.
    pub fn is_unprocessed(&self) -> bool {
        matches!(self, HboneError::Unprocessed(..))
    }
}

/// Whether the peer left a stream unprocessed: a graceful GOAWAY's error
/// reaches only the streams above its last stream id, and REFUSED_STREAM
/// means the same. Any other error may come after the pod got bytes.
fn unprocessed(error: &h2::Error) -> bool {
    let remote = error.is_remote();
    (remote && error.is_go_away() && error.reason() == Some(Reason::NO_ERROR))
        || (remote && error.is_reset() && error.reason() == Some(Reason::REFUSED_STREAM))
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    destination: SpiffeId,
    node: String,
}

struct Pooled {
    sender: SendRequest<Bytes>,
    /// Set once the connection's task ended: it takes no more streams.
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
    /// The source certificate this connection authenticated with. Once it
    /// is renewed the connection takes no new streams (its open ones run
    /// on), so new connections always present the current certificate.
    cert: Option<Arc<CertifiedKey>>,
}

/// Counts a stream on its pooled connection until dropped.
pub struct StreamGuard {
    streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

impl StreamGuard {
    /// The connection is unusable: it takes no more streams.
    fn connection_closed(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens a stream on a connection: once it may take one, sends the
/// request's headers.
async fn start(
    sender: SendRequest<Bytes>,
    request: Request<()>,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
    let mut sender = sender.ready().await?;
    sender.send_request(request, false)
}

pub struct HboneClient {
    tls: Arc<TlsFactory>,
    config: HboneConfig,
    connect_timeout: Duration,
    pool: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// One connection attempt per key at a time: a burst of new streams
    /// waits for the connection being made instead of each making its own.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    pub connections_opened: AtomicU64,
}

/// Where a stream goes.
pub struct Destination<'a> {
    pub source: &'a SpiffeId,
    pub identity: &'a SpiffeId,
    pub node: &'a str,
    /// The destination pod's IP on the HBONE port.
    pub gateway: SocketAddrV4,
    /// The CONNECT authority: the endpoint the stream is for.
    pub target: SocketAddrV4,
    /// The original client, for the `Forwarded` header.
    pub client: IpAddr,
    /// Sent as `traceparent`: the destination agent's span is its child.
    pub trace: Option<TraceParent>,
    /// The client workload's namespace and name, sent as `baggage` with
    /// the trace context (as ztunnel's experimental baggage does).
    pub baggage: Option<(&'a str, &'a str)>,
}

impl HboneClient {
    /// Kernel TLS counters, inbound and outbound connections together.
    pub fn kernel_tls(&self) -> &KernelTlsStats {
        &self.tls.kernel.stats
    }

    pub fn new(tls: Arc<TlsFactory>, config: HboneConfig, connect_timeout: Duration) -> Self {
        Self {
            tls,
            config,
            connect_timeout,
            pool: Mutex::default(),
            dialing: Mutex::default(),
            connections_opened: AtomicU64::new(0),
        }
    }

    /// Opens a CONNECT stream; the returned tunnel carries the connection's
    /// bytes. `early` runs while the answer is awaited: bytes it yields
    /// before the answer are sent right behind the request, so the client's
    /// first message does not wait a round trip for the 200 (the server
    /// holds them until it has connected to the pod; if it refuses, they
    /// are dropped with the stream).
    pub async fn open(
        &self,
        to: &Destination<'_>,
        early: impl Future<Output = Option<Bytes>>,
    ) -> Result<(Tunnel, StreamGuard), HboneError> {
        let key = PoolKey {
            source: to.source.clone(),
            destination: to.identity.clone(),
            node: to.node.to_owned(),
        };
        let traceparent = to.trace.map(|trace| trace.to_string());
        let baggage = to.trace.and(to.baggage).and_then(|(namespace, name)| {
            // Names are checked where the model is built; a value that
            // would not be a header is left out, never a panic here.
            let safe = |v: &str| {
                !v.is_empty()
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            };
            (safe(namespace) && safe(name))
                .then(|| format!("k8s.namespace.name={namespace},service.name={name}"))
        });
        let request = || {
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri(to.target.to_string())
                .header("forwarded", format!("for={}", to.client));
            if let Some(traceparent) = &traceparent {
                request = request.header("traceparent", traceparent);
            }
            if let Some(baggage) = &baggage {
                request = request.header("baggage", baggage);
            }
            request.body(()).expect("static request parts")
        };
        // From here the peer must answer within `answer_timeout`: a pooled
        // connection whose peer vanished (or froze) would otherwise hold
        // the caller for ever. Such a connection takes no more streams.
        let answer_timeout = self.answer_timeout();
        let deadline = tokio::time::Instant::now() + answer_timeout;
        let no_answer = |guard: &StreamGuard| {
            guard.connection_closed();
            HboneError::NoAnswer(to.gateway, answer_timeout)
        };
        let (mut response, mut send, guard) = loop {
            let (sender, guard, pooled) = self.checkout(&key, to).await?;
            match tokio::time::timeout_at(deadline, start(sender, request())).await {
                Ok(Ok((response, send))) => break (response, send, guard),
                // The peer closed this pooled connection, or sent GOAWAY on
                // it (its agent is stopping), since it was last used:
                // nothing was sent on it. Forget it and take another; a
                // stopping agent's every pooled connection may be in that
                // state, and each turn retires one, so at worst this ends
                // with a connection dialled now.
                Ok(Err(_)) if pooled => guard.connection_closed(),
                Ok(Err(error)) => return Err(HboneError::Http(to.gateway, error)),
                Err(_) => return Err(no_answer(&guard)),
            }
        };
        let http = |e: h2::Error| {
            if unprocessed(&e) {
                if e.is_go_away() {
                    guard.connection_closed();
                }
                HboneError::Unprocessed(to.gateway, e)
            } else {
                HboneError::Http(to.gateway, e)
            }
        };
        let mut early = std::pin::pin!(early);
        let mut early_done = false;
        let response = loop {
            tokio::select! {
                response = &mut response => break response.map_err(http)?,
                data = &mut early, if !early_done => {
                    early_done = true;
                    if let Some(data) = data {
                        send.send_data(data, false).map_err(http)?;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Err(no_answer(&guard)),
            }
        };
        match response.status() {
            StatusCode::OK => {}
            status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Err(HboneError::Refused(to.gateway, status));
            }
            status @ StatusCode::TOO_MANY_REQUESTS => {
                return Err(HboneError::RateLimited(to.gateway, status));
            }
            status => return Err(HboneError::Status(to.gateway, status)),
        }
        let recv = response.into_body();
        Ok((Tunnel { send, recv }, guard))
    }

    /// How long a CONNECT may wait for its answer: the peer's agent itself
    /// takes up to its connect timeout (the same setting, as a rule) to
    /// reach the pod, so twice ours, and at least one handshake's time.
    fn answer_timeout(&self) -> Duration {
        (2 * self.connect_timeout).max(HANDSHAKE_TIMEOUT)
    }

    /// A connection for a new stream: pooled (the flag says so), or else
    /// dialled now.
    async fn checkout(
        &self,
        key: &PoolKey,
        to: &Destination<'_>,
    ) -> Result<(SendRequest<Bytes>, StreamGuard, bool), HboneError> {
        if let Some((sender, guard)) = self.pooled(key) {
            return Ok((sender, guard, true));
        }
        let dialing = lock(&self.dialing).entry(key.clone()).or_default().clone();
        let _turn = dialing.lock().await;
        // Whoever dialled before us may have made room.
        if let Some((sender, guard)) = self.pooled(key) {
            return Ok((sender, guard, true));
        }
        let (sender, guard) = self.connect(key.clone(), to).await?;
        Ok((sender, guard, false))
    }

    /// A pooled connection with room, unless the pool should grow.
    fn pooled(&self, key: &PoolKey) -> Option<(SendRequest<Bytes>, StreamGuard)> {
        let mut pool = lock(&self.pool);
        let connections = pool.get_mut(key)?;
        let current = self.tls.current_cert(&key.source);
        connections.retain(|c| {
            let same_cert = match (&c.cert, &current) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            same_cert && !c.closed.load(Ordering::Relaxed)
        });
        let least = connections
            .iter()
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))?;
        let streams = least.streams.load(Ordering::Relaxed);
        let busy = streams >= self.config.streams_per_connection;
        // A connection at the peer's cap on concurrent streams would only
        // queue a new one on our side, unanswered: past every pooled
        // connection's cap another is dialled, whatever
        // `max_connections_per_peer` says (it spreads load; it must not
        // refuse the connection over a thousand held streams).
        let full = streams
            >= least
                .sender
                .current_max_send_streams()
                .min(MAX_STREAMS_PER_CONNECTION as usize);
        if full || (busy && connections.len() < self.config.max_connections_per_peer) {
            return None;
        }
        least.streams.fetch_add(1, Ordering::Relaxed);
        let guard = StreamGuard {
            streams: least.streams.clone(),
            closed: least.closed.clone(),
        };
        Some((least.sender.clone(), guard))
    }

    async fn connect(
        &self,
        key: PoolKey,
        to: &Destination<'_>,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), HboneError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(to.gateway))
            .await
            .map_err(|_| HboneError::Connect(to.gateway, std::io::ErrorKind::TimedOut.into()))?
            .map_err(|e| HboneError::Connect(to.gateway, e))?;
        let _ = tcp.set_nodelay(true);
        super::keep_alive(&tcp);
        let mut config = self
            .tls
            .client(key.source.clone(), key.destination.clone())
            .map_err(|e| HboneError::Tls(to.gateway, e.to_string()))?;
        let secrets = self.tls.kernel.secret_capture();
        if let Some(secrets) = &secrets {
            config.key_log = secrets.clone();
        }
        let name = ServerName::IpAddress((*to.gateway.ip()).into());
        let mut tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::new(config)).connect(name, self.tls.kernel.handshake_io(tcp)),
        )
        .await
        .map_err(|_| HboneError::Tls(to.gateway, "handshake timed out".into()))?
        .map_err(|e| HboneError::Tls(to.gateway, e.to_string()))?;
        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let tls = self
            .tls
            .kernel
            .take_over(tls.into(), secrets.as_deref())
            .map_err(|e| HboneError::Tls(to.gateway, e.to_string()))?;
        let cert = self.tls.current_cert(&key.source);
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .enable_push(false)
            .handshake(tls);
        let (sender, connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| HboneError::Tls(to.gateway, "HTTP/2 handshake timed out".into()))?
            .map_err(|e| HboneError::Http(to.gateway, e))?;
        let gateway = to.gateway;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%gateway, %error, "HBONE connection ended");
            }
            ended.store(true, Ordering::Relaxed);
        });
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        info!(source = %key.source, destination = %key.destination, node = %key.node, %gateway, "HBONE connection opened");
        let streams = Arc::new(AtomicUsize::new(1));
        let guard = StreamGuard {
            streams: streams.clone(),
            closed: closed.clone(),
        };
        lock(&self.pool).entry(key).or_default().push(Pooled {
            sender: sender.clone(),
            closed,
            streams,
            cert,
        });
        Ok((sender, guard))
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::PathBuf};

    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{
        config::KernelTlsMode,
        identity::{CertManager, EmbeddedCa},
        tls::KernelTls,
    };

    /// How the test's peer treats streams.
    #[derive(Clone, Copy)]
    enum Peer {
        /// Answers 200 and holds the stream open.
        Answers,
        /// Resets each stream with REFUSED_STREAM.
        Refuses,
    }

    /// A peer agent on loopback: real TLS with the mesh's certificates,
    /// real HTTP/2. Connections accepted before `stopping` fires go away
    /// gracefully then (GOAWAY, their open streams run on), as a stopping
    /// agent's do; later ones serve as a new agent's would.
    struct TestPeer {
        gateway: SocketAddrV4,
        stopping: CancellationToken,
        _dir: ScratchDir,
    }

    struct ScratchDir(PathBuf);

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ids() -> (SpiffeId, SpiffeId) {
        (
            SpiffeId::new("cluster.local", "default", "client"),
            SpiffeId::new("cluster.local", "default", "server"),
        )
    }

    async fn client_and_peer(
        name: &str,
        config: HboneConfig,
        peer: Peer,
    ) -> (HboneClient, TestPeer) {
        let dir = std::env::temp_dir().join(format!("hbone-{name}-{}", std::process::id()));
        let ca = EmbeddedCa::load_or_create(&dir).expect("CA");
        let certs = CertManager::new(Arc::new(ca), Duration::from_secs(3600));
        let (client, server) = ids();
        assert!(certs.ensure(&[client, server.clone()]).await.is_empty());
        let tls = Arc::new(
            TlsFactory::new(certs, "cluster.local", KernelTls::new(KernelTlsMode::Off)).unwrap(),
        );
        let acceptor = TlsAcceptor::from(Arc::new(tls.server(server).unwrap()));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let std::net::SocketAddr::V4(gateway) = listener.local_addr().unwrap() else {
            unreachable!("bound to IPv4")
        };
        let stopping = CancellationToken::new();
        let stop = stopping.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, stop) = (acceptor.clone(), stop.clone());
                // Only connections that exist when the stop comes go away.
                let stop = if stop.is_cancelled() {
                    CancellationToken::new()
                } else {
                    stop
                };
                tokio::spawn(serve(acceptor, tcp, stop, peer));
            }
        });
        let client = HboneClient::new(tls, config, Duration::from_secs(5));
        let peer = TestPeer {
            gateway,
            stopping,
            _dir: ScratchDir(dir),
        };
        (client, peer)
    }

    async fn serve(acceptor: TlsAcceptor, tcp: TcpStream, stop: CancellationToken, peer: Peer) {
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        let mut held = Vec::new();
        let mut going_away = false;
        loop {
            let accepted = tokio::select! {
                accepted = connection.accept() => accepted,
                _ = stop.cancelled(), if !going_away => {
                    going_away = true;
                    connection.graceful_shutdown();
                    continue;
                }
            };
            let Some(Ok((_request, mut respond))) = accepted else {
                return;
            };
            match peer {
                Peer::Answers => {
                    let response = http::Response::new(());
                    held.push(respond.send_response(response, false).unwrap());
                }
                Peer::Refuses => respond.send_reset(Reason::REFUSED_STREAM),
            }
        }
    }

    async fn open(
        client: &HboneClient,
        peer: &TestPeer,
    ) -> Result<(Tunnel, StreamGuard), HboneError> {
        let (source, identity) = ids();
        let to = Destination {
            source: &source,
            identity: &identity,
            node: "node-2",
            gateway: peer.gateway,
            target: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 8080),
            client: Ipv4Addr::new(10, 0, 0, 1).into(),
            trace: None,
            baggage: None,
        };
        client.open(&to, std::future::pending()).await
    }

    /// Whether every pooled connection has had the peer's GOAWAY.
    async fn all_told_to_go_away(client: &HboneClient) -> bool {
        let senders: Vec<SendRequest<Bytes>> = lock(&client.pool)
            .values()
            .flatten()
            .map(|pooled| pooled.sender.clone())
            .collect();
        for sender in senders {
            if sender.ready().await.is_ok() {
                return false;
            }
        }
        true
    }

    /// A stopping agent's pooled connections all carry a long-lived
    /// stream, so they stay up after its GOAWAY, each with room for
    /// another; a new stream must get past every one of them to a new
    /// connection, not fail on the second.
    #[tokio::test]
    async fn a_new_stream_gets_past_every_connection_told_to_go_away() {
        let config = HboneConfig {
            max_connections_per_peer: 3,
            streams_per_connection: 2,
            kernel_tls: KernelTlsMode::Off,
        };
        let (client, peer) = client_and_peer("goaway", config, Peer::Answers).await;
        // Two streams fill a connection: six make three connections, and
        // every second one ends, leaving each connection one stream.
        let mut streams = Vec::new();
        for _ in 0..6 {
            streams.push(open(&client, &peer).await.expect("stream"));
        }
        assert_eq!(client.connections_opened.load(Ordering::Relaxed), 3);
        let long_lived: Vec<_> = streams.into_iter().step_by(2).collect();
        peer.stopping.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !all_told_to_go_away(&client).await {
            assert!(tokio::time::Instant::now() < deadline, "no GOAWAY came");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let opened = open(&client, &peer).await;
        assert!(opened.is_ok(), "{:?}", opened.err());
        assert_eq!(client.connections_opened.load(Ordering::Relaxed), 4);
        drop(long_lived);
    }

    /// REFUSED_STREAM means the peer did not process the stream: the
    /// caller may send it again (other errors do not say so).
    #[tokio::test]
    async fn a_refused_stream_is_unprocessed() {
        let (client, peer) =
            client_and_peer("refused", HboneConfig::default(), Peer::Refuses).await;
        let error = open(&client, &peer).await.err().expect("refused");
        assert!(error.is_unprocessed(), "{error}");
        assert!(!error.is_denied());
    }
}
