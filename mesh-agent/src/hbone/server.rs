//! The HBONE server: connections to a local pod's IP on port 15008, steered
//! here by `mesh_uplink`. The accepted socket's local address says which
//! pod was addressed, so the agent presents that workload's certificate.
//! Only clients whose certificate chains to the trust roots get through the
//! handshake, and only with an identity a workload on the peer's node has
//! (where the model knows the peer's node); each CONNECT must name a local
//! workload, passes authorization, and is spliced to the pod.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::{
    CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME, MAX_STREAMS_PER_CONNECTION, SEND_BUFFER,
    STREAM_WINDOW, TLS_SEND_BUFFER, Tunnel, Watch,
    request::{Connect, RequestError},
    splice_tunnel,
};
use crate::{
    authz::{Denied, Request as AuthzRequest},
    identity::SpiffeId,
    io::{self, splice},
    locks::lock,
    model::PeerCheck,
    observability::access::{Outcome, Record, Sinks},
    observability::log_budget::LogBudget,
    routes::Routes,
    tls::{ALPN_H2, TlsFactory, kernel::SecretCapture},
};

/// TLS handshakes in progress at once, overall and from one source
/// address. Anyone who reaches a pod's port 15008 can start one; past the
/// cap a connection is reset at once instead of holding a task, a socket
/// and memory for the handshake's timeout.
pub const MAX_HANDSHAKES: usize = 512;
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 32;

/// Largest header block a peer may send on a stream (h2's default is
/// 16 MiB): a CONNECT needs a few hundred bytes, trace context included.
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// How long a peer's identity not (yet) seen on its node waits for the
/// model: a pod just started there may be newer than this node's view.
const PEER_NODE_CATCH_UP: Duration = Duration::from_secs(1);

/// Refusals are logged a few times a second; the counters count them all.
static REFUSED_LOG: LogBudget = LogBudget::new(5);
/// Streams over a workload's quota: a peer can cause as many as it likes.
static QUOTA_LOG: LogBudget = LogBudget::new(5);

#[derive(Debug, Default)]
pub struct InboundStats {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    /// Refused before the handshake: too many in progress.
    pub handshake_limited: AtomicU64,
    /// Refused after the handshake: no workload with the client's identity
    /// runs on the peer's node.
    pub not_on_peer_node: AtomicU64,
    pub streams: AtomicU64,
    pub denied: AtomicU64,
    pub dry_run_denied: AtomicU64,
    /// Streams refused over the destination workload's quota (429).
    pub rate_limited: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct InboundStatsSnapshot {
    pub connections: u64,
    pub refused: u64,
    pub handshake_limited: u64,
    pub not_on_peer_node: u64,
    pub streams: u64,
    pub denied: u64,
    pub dry_run_denied: u64,
    pub rate_limited: u64,
}

impl InboundStats {
    pub fn snapshot(&self) -> InboundStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        InboundStatsSnapshot {
            connections: get(&self.connections),
            refused: get(&self.refused),
            handshake_limited: get(&self.handshake_limited),
            not_on_peer_node: get(&self.not_on_peer_node),
            streams: get(&self.streams),
            denied: get(&self.denied),
            dry_run_denied: get(&self.dry_run_denied),
            rate_limited: get(&self.rate_limited),
        }
    }
}

pub struct Inbound {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    routes: watch::Receiver<Arc<Routes>>,
    tls: Arc<TlsFactory>,
    acceptors: Mutex<HashMap<SpiffeId, Arc<rustls::ServerConfig>>>,
    connect_timeout: Duration,
    stats: Arc<InboundStats>,
    sinks: Arc<Sinks>,
    handshakes: Mutex<Handshakes>,
}

/// TLS handshakes in progress.
#[derive(Default)]
struct Handshakes {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One handshake's place under the caps, given back when dropped.
struct HandshakeSlot {
    shared: Arc<Shared>,
    source: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut handshakes = lock(&self.shared.handshakes);
        handshakes.total -= 1;
        if let Some(count) = handshakes.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                handshakes.by_source.remove(&self.source);
            }
        }
    }
}

impl Inbound {
    pub fn new(
        listener: TcpListener,
        routes: watch::Receiver<Arc<Routes>>,
        tls: Arc<TlsFactory>,
        connect_timeout: Duration,
        stats: Arc<InboundStats>,
        sinks: Arc<Sinks>,
    ) -> Self {
        Self {
            listener,
            shared: Arc::new(Shared {
                routes,
                tls,
                acceptors: Mutex::default(),
                connect_timeout,
                stats,
                sinks,
                handshakes: Mutex::default(),
            }),
        }
    }

    pub async fn serve(self, stop: CancellationToken, tracker: TaskTracker) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "inbound accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            self.shared
                .stats
                .connections
                .fetch_add(1, Ordering::Relaxed);
            let shared = self.shared.clone();
            let stop = stop.clone();
            tracker.spawn(async move { shared.connection(stream, peer, stop).await });
        }
    }
}

impl Shared {
    /// A place for one more handshake from `source`, if the caps allow.
    fn begin_handshake(self: &Arc<Self>, source: IpAddr) -> Option<HandshakeSlot> {
        let mut handshakes = lock(&self.handshakes);
        let from_source = handshakes.by_source.get(&source).copied().unwrap_or(0);
        if handshakes.total >= MAX_HANDSHAKES || from_source >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        handshakes.total += 1;
        *handshakes.by_source.entry(source).or_default() += 1;
        Some(HandshakeSlot {
            shared: self.clone(),
            source,
        })
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) {
        let refuse = |reason: String, stream: Option<TcpStream>| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            if REFUSED_LOG.allow() {
                warn!(%peer, reason, "inbound HBONE refused");
            }
            if let Some(stream) = stream {
                splice::reset(stream);
            }
        };
        let Some(slot) = self.begin_handshake(peer.ip()) else {
            self.stats.handshake_limited.fetch_add(1, Ordering::Relaxed);
            return refuse("too many TLS handshakes in progress".into(), Some(stream));
        };
        super::keep_alive(&stream);
        let Ok(SocketAddr::V4(local)) = stream.local_addr() else {
            return refuse("no IPv4 destination".into(), Some(stream));
        };
        // Only the addressed workload's identity is needed: the connection
        // may outlive many reloads, so it keeps no snapshot of the routes.
        let identity = {
            let routes = self.routes.borrow();
            let state = &routes.state;
            state
                .workload_by_ip(*local.ip())
                .filter(|(_, w)| w.local.is_some())
                .map(|(_, workload)| state.identity(workload))
        };
        let Some(identity) = identity else {
            return refuse(
                format!("{} is not a workload on this node", local.ip()),
                Some(stream),
            );
        };
        let secrets = self.tls.kernel.secret_capture();
        let acceptor = match self.acceptor(&identity, secrets.as_ref()) {
            Ok(acceptor) => acceptor,
            Err(error) => {
                return refuse(format!("TLS config for {identity}: {error}"), Some(stream));
            }
        };
        let accept = acceptor.accept(self.tls.kernel.handshake_io(stream));
        let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return refuse(format!("TLS handshake failed: {error}"), None),
            Err(_) => return refuse("TLS handshake timed out".into(), None),
        };
        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            return refuse("client did not negotiate ALPN h2".into(), None);
        }
        let presented = match session.peer_certificates().and_then(|certs| certs.first()) {
            Some(cert) => match SpiffeId::from_cert(cert) {
                Ok(id) => id,
                Err(error) => return refuse(format!("client certificate: {error}"), None),
            },
            None => return refuse("no client certificate".into(), None),
        };
        // A trust domain alias names the same workload as ours would:
        // policies, logs and the node check see one name.
        let Some(client) = self.tls.canonical(&presented) else {
            return refuse(format!("{presented} is of no trusted domain"), None);
        };
        if let Err(node) = self.on_peer_node(peer.ip(), &client).await {
            self.stats.not_on_peer_node.fetch_add(1, Ordering::Relaxed);
            return refuse(
                format!("{client} is the identity of no workload on the peer's node {node}"),
                None,
            );
        }
        debug!(%peer, %client, server = %identity, "inbound HBONE connection");
        let tls = match self.tls.kernel.take_over(tls.into(), secrets.as_deref()) {
            Ok(tls) => tls,
            Err(error) => return refuse(format!("kernel TLS: {error}"), None),
        };
        let handshake = h2::server::Builder::new()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .handshake::<_, Bytes>(tls);
        let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return refuse(format!("HTTP/2 handshake failed: {error}"), None),
            Err(_) => return refuse("HTTP/2 handshake timed out".into(), None),
        };
        // Both handshakes done: the connection holds no handshake place.
        drop(slot);
        // Accepting drives the whole connection, its open streams included:
        // the loop runs until the peer closes it, or, once the agent is
        // stopping, until its last stream ended. A peer's pooled connection
        // would otherwise hold the drain for its whole timeout; GOAWAY
        // tells the peer to take new streams elsewhere.
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
            match accepted {
                Some(Ok((request, respond))) => {
                    let this = self.clone();
                    let client = client.clone();
                    tokio::spawn(async move { this.stream(request, respond, client, peer).await });
                }
                Some(Err(error)) => {
                    debug!(%peer, %error, "inbound HBONE connection ended");
                    return;
                }
                None => return,
            }
        }
    }

    /// Whether a workload with `client`'s identity runs on the node at
    /// `peer`, waiting a moment for the model to catch up; Err names the
    /// node. A certificate belongs on the node of its workload: one shown
    /// from elsewhere was stolen or wrongly issued (a node holding a
    /// signing key can mint any identity).
    async fn on_peer_node(&self, peer: IpAddr, client: &SpiffeId) -> Result<(), String> {
        let IpAddr::V4(peer) = peer else {
            return Ok(());
        };
        let mut routes = self.routes.clone();
        let deadline = Instant::now() + PEER_NODE_CATCH_UP;
        loop {
            let node = match routes.borrow_and_update().state.peer_may_be(peer, client) {
                PeerCheck::Holds | PeerCheck::NodeUnknown => return Ok(()),
                PeerCheck::NotOnNode(node) => node.to_owned(),
            };
            match tokio::time::timeout_at(deadline, routes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Err(node),
            }
        }
    }

    /// One CONNECT stream: admitted and spliced to the pod, or answered
    /// with the status that says why not.
    async fn stream(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        client: SpiffeId,
        peer: SocketAddr,
    ) {
        let mut refuse = |code: StatusCode| {
            let response = Response::builder()
                .status(code)
                .body(())
                .expect("static response parts");
            // The peer may have gone meanwhile: nothing is left to tell.
            let _ = respond.send_response(response, true);
        };
        let client = &client;
        let connect = match Connect::parse(&request) {
            Ok(connect) => connect,
            Err(RequestError::NotConnect(_)) => return refuse(StatusCode::METHOD_NOT_ALLOWED),
            Err(error) => {
                debug!(%client, %error, "bad CONNECT");
                return refuse(StatusCode::BAD_REQUEST);
            }
        };
        let target = connect.target;
        let routes = self.routes.borrow().clone();
        let state = &routes.state;
        let Some((workload_id, workload)) = state
            .workload_by_ip(*target.ip())
            .filter(|(_, w)| w.local.is_some())
        else {
            warn!(%client, %target, "CONNECT to something that is not a workload on this node");
            return refuse(StatusCode::BAD_REQUEST);
        };
        // The address the peer says it carries for, if it is the address
        // of a workload elsewhere (on the peer's node, where known) whose
        // identity the peer proved; else the
        // peer's own. A peer may not borrow another workload's address, not
        // for IP allow-lists, not for the pod's view, not for metrics.
        let peer_ip = match peer.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
        };
        let peer_node = state.node_at(peer_ip);
        let claimed = connect.forwarded_for.filter(|&ip| {
            state.workload_by_ip(ip).is_some_and(|(_, w)| {
                w.local.is_none()
                    && state.identity(w) == *client
                    && peer_node.is_none_or(|node| node == w.node)
            })
        });
        let source_ip = claimed.unwrap_or(peer_ip);
        let mut record = Record::new(
            "destination",
            state,
            SocketAddrV4::new(source_ip, 0),
            target,
        );
        record.source_principal = client.to_string();
        record.mutual_tls = true;
        record.endpoint = Some(target);
        // The source's span (ours or a ztunnel's) is this one's parent.
        record.trace = self.sinks.tracer.start(connect.trace);
        if record.trace.is_some() {
            record.baggage = connect.baggage;
        }
        let asking = AuthzRequest {
            principal: Some(client),
            trust_domain: &state.trust_domain,
            source_ip,
            workload_namespace: &workload.namespace,
            workload_name: &workload.name,
            port: target.port(),
        };
        match state.authorization.check(&asking).enforce(&asking) {
            Ok(false) => {}
            Ok(true) => {
                self.stats.dry_run_denied.fetch_add(1, Ordering::Relaxed);
            }
            Err(Denied { rule }) => {
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                warn!(%client, %source_ip, %target, rule, "denied");
                record.finish(&self.sinks, Outcome::Denied, 0, 0, Some(rule));
                return refuse(StatusCode::UNAUTHORIZED);
            }
        }
        // The workload's quota, per proven identity: held for the
        // stream's life (open connections).
        let _quota = match routes
            .balancers
            .admit_to_workload(workload_id, &client.to_string())
        {
            Ok(guard) => guard,
            Err(over) => {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                if QUOTA_LOG.allow() {
                    warn!(%client, %target, %over, "over the workload's quota; refused");
                }
                let error = Some(over.to_string());
                record.finish(&self.sinks, Outcome::RateLimited, 0, 0, error);
                return refuse(StatusCode::TOO_MANY_REQUESTS);
            }
        };
        // The pod sees the remote client's address when the claim held.
        let source = claimed.and_then(|ip| routes.upstream_source(ip, *target.ip()));
        if routes.own.reaches_agent(target) {
            warn!(%client, %target, "CONNECT to the agent's own listener");
            return refuse(StatusCode::BAD_REQUEST);
        }
        let upstream = match io::connect(target, source, self.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {
                return refuse(StatusCode::GATEWAY_TIMEOUT);
            }
            Err(error) => {
                warn!(%client, %target, %error, "connect to the workload failed");
                return refuse(StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        self.stats.streams.fetch_add(1, Ordering::Relaxed);
        let registration = record.opened(&self.sinks);
        let ok = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("static response parts");
        let send = match respond.send_response(ok, false) {
            Ok(send) => send,
            Err(error) => {
                warn!(%client, %target, %error, "CONNECT answer failed");
                drop(registration);
                splice::reset(upstream);
                record.finish(&self.sinks, Outcome::Reset, 0, 0, Some(error.to_string()));
                return;
            }
        };
        let recv = request.into_body();
        // Seen from the client: what it sent is what reached the pod.
        let watch = Watch {
            to_tunnel: &registration.bytes.received,
            from_tunnel: &registration.bytes.sent,
            idle: None,
            first_data: &|_| {},
        };
        let ended = splice_tunnel(upstream, Tunnel { send, recv }, &watch).await;
        debug!(%client, %source_ip, %target, "inbound stream closed");
        let outcome = if ended.is_some() {
            Outcome::Reset
        } else {
            Outcome::Ok
        };
        let error = ended.map(|(_, e)| e.to_string());
        let sent = registration.bytes.sent.load(Ordering::Relaxed);
        let received = registration.bytes.received.load(Ordering::Relaxed);
        drop(registration);
        record.finish(&self.sinks, outcome, sent, received, error);
    }

    /// The TLS acceptor for `identity`; with `secrets`, one of its own
    /// that records the connection's traffic secrets for kernel TLS.
    fn acceptor(
        &self,
        identity: &SpiffeId,
        secrets: Option<&Arc<SecretCapture>>,
    ) -> Result<TlsAcceptor, rustls::Error> {
        let config = {
            let mut acceptors = lock(&self.acceptors);
            match acceptors.get(identity) {
                Some(config) => config.clone(),
                None => {
                    let config = Arc::new(self.tls.server(identity.clone())?);
                    acceptors.insert(identity.clone(), config.clone());
                    config
                }
            }
        };
        Ok(match secrets {
            None => TlsAcceptor::from(config),
            Some(secrets) => {
                let mut own = (*config).clone();
                own.key_log = secrets.clone();
                TlsAcceptor::from(Arc::new(own))
            }
        })
    }
}
