//! The agent's HTTP endpoints, one router per listener, each answering
//! only its own paths:
//! - admin (`127.0.0.1:15000`, loopback only): `GET /stats` (JSON
//!   snapshot; of the tracked kernel connections, the count and at most
//!   1,000), `GET /config_dump` (effective config, model, endpoint health,
//!   certificates without keys), `GET /connections` (live connections),
//!   `GET /events` (a stream of finished connections, one JSON line each),
//!   `GET /graph` (who talks to whom), `POST /logging?level=…` (log filter
//!   at run time; state changes take POST, never GET);
//! - readiness (`0.0.0.0:15021`): `GET /healthz/ready` only, 200 once the
//!   programs are attached and the config is loaded, 503 before (it
//!   answers from the very start);
//! - metrics (`0.0.0.0:15020`): `GET /metrics` only, for Prometheus.
//!
//! Pods can reach the last two on the node's address, so they expose
//! nothing that reveals or changes the agent's state beyond counters.
//! Every listener caps its connections and how long a client may take to
//! send its request head, and work that walks kernel maps runs on the
//! blocking pool, so a scrape never holds a proxy worker.

mod scrape;
mod view;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, broadcast},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use self::view::{AgentView, LogControl, LogFilterError};

/// What the endpoints show; the app implements it once everything is up.
pub trait AdminView: Send + Sync {
    fn stats(&self) -> serde_json::Value;
    /// OpenMetrics text.
    fn metrics(&self) -> String;
    fn config_dump(&self) -> serde_json::Value;
    fn connections(&self) -> serde_json::Value;
    fn graph(&self) -> serde_json::Value;
    fn events(&self) -> broadcast::Receiver<String>;
    /// Sets the log filter (tracing EnvFilter syntax); returns the new one.
    fn set_log_filter(&self, filter: &str) -> Result<String, LogFilterError>;
}

/// More about readiness than yes or no (e.g. the API server's reachability).
pub type ReadinessDetails = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone, Default)]
pub struct AdminState {
    pub ready: Arc<AtomicBool>,
    pub view: Arc<OnceLock<Arc<dyn AdminView>>>,
    /// Appended to the readiness answer, ready or not.
    pub details: Arc<OnceLock<ReadinessDetails>>,
}

/// Which paths a listener answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Introspection and state changes: loopback only.
    Admin,
    /// `/metrics`.
    Metrics,
    /// `/healthz/ready`.
    Readiness,
}

/// Connections one listener serves at once; more are closed at accept.
/// `/events` streams hold theirs for as long as they watch.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, Infallible>;

/// Serves `role`'s paths on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, role: Role, state: AdminState, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, ?role, "endpoint accept failed");
                    // EMFILE and the like: do not spin on them.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, ?role, "endpoint connection cap reached; closing");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(role, &state, request).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, %peer, ?role, "endpoint connection");
            }
            drop(slot);
        });
    }
}

/// The answer of `role`'s router to `request`.
async fn respond<B>(role: Role, state: &AdminState, request: Request<B>) -> Response<Body> {
    let path = request.uri().path();
    let route = match (role, path) {
        (Role::Readiness, "/healthz/ready") => Route::Ready,
        (Role::Metrics, "/metrics") => Route::Metrics,
        (Role::Admin, "/stats") => Route::Stats,
        (Role::Admin, "/config_dump") => Route::ConfigDump,
        (Role::Admin, "/connections") => Route::Connections,
        (Role::Admin, "/graph") => Route::Graph,
        (Role::Admin, "/events") => Route::Events,
        (Role::Admin, "/logging") => Route::Logging,
        _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let allowed = route.method();
    let method = request.method();
    if method != allowed && !(allowed == Method::GET && method == Method::HEAD) {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} takes {allowed}\n"),
        );
        let allow = if allowed == Method::POST {
            "POST"
        } else {
            "GET, HEAD"
        };
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static(allow),
        );
        return response;
    }
    if route == Route::Ready {
        let details = state.details.get().map(|d| d()).unwrap_or_default();
        return if state.ready.load(Ordering::Acquire) {
            text(StatusCode::OK, format!("ready\n{details}"))
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready\n{details}"),
            )
        };
    }
    let Some(view) = state.view.get().cloned() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
    };
    match route {
        Route::Ready => unreachable!("answered above"),
        Route::Stats => match blocking(move || view.stats()).await {
            Some(stats) => json(&stats),
            None => unavailable(),
        },
        Route::Metrics => {
            let wants_openmetrics = request
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            match blocking(move || view.metrics()).await {
                Some(text) => metrics(text, wants_openmetrics),
                None => unavailable(),
            }
        }
        Route::ConfigDump => json(&view.config_dump()),
        Route::Connections => json(&view.connections()),
        Route::Graph => json(&view.graph()),
        Route::Events => events(view.events()),
        Route::Logging => logging(view.as_ref(), request.uri().query()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Ready,
    Metrics,
    Stats,
    ConfigDump,
    Connections,
    Graph,
    Events,
    Logging,
}

impl Route {
    /// The one method the route takes (GET routes take HEAD as well).
    fn method(self) -> Method {
        match self {
            Route::Logging => Method::POST,
            _ => Method::GET,
        }
    }
}

/// Runs `work` (a walk of the pinned maps) on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => Some(value),
        Err(error) => {
            warn!(%error, "endpoint work failed");
            None
        }
    }
}

fn unavailable() -> Response<Body> {
    text(StatusCode::INTERNAL_SERVER_ERROR, "failed\n".into())
}

fn logging(view: &dyn AdminView, query: Option<&str>) -> Response<Body> {
    let level = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
    match level {
        Some(level) => match view.set_log_filter(&level.replace("%2C", ",").replace("%3D", "=")) {
            Ok(filter) => text(StatusCode::OK, format!("log filter: {filter}\n")),
            Err(error) => text(StatusCode::BAD_REQUEST, format!("{error}\n")),
        },
        None => text(
            StatusCode::BAD_REQUEST,
            "use POST /logging?level=<filter>, e.g. level=debug\n".into(),
        ),
    }
}

fn metrics(openmetrics: String, wants_openmetrics: bool) -> Response<Body> {
    // Prometheus asks for OpenMetrics; other tools get the classic format.
    let (content_type, body) = if wants_openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            openmetrics,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            crate::observability::metrics::to_classic_text(&openmetrics),
        )
    };
    response(
        StatusCode::OK,
        content_type,
        Full::new(Bytes::from(body)).boxed(),
    )
}

/// Finished connections as they happen, one JSON object per line.
fn events(receiver: broadcast::Receiver<String>) -> Response<Body> {
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(line) => return Some((Ok(Frame::data(Bytes::from(line + "\n"))), receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    response(
        StatusCode::OK,
        "application/x-ndjson",
        StreamBody::new(stream).boxed(),
    )
}

fn json(value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    response(
        StatusCode::OK,
        "application/json",
        Full::new(Bytes::from(body)).boxed(),
    )
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    response(status, "text/plain", Full::new(Bytes::from(body)).boxed())
}

fn response(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(body)
        .expect("static response parts")
}

/// Binds `role`'s listener; the admin listener only on a loopback address.
pub async fn bind(role: Role, addr: SocketAddr) -> Result<TcpListener, BindError> {
    if role == Role::Admin && !addr.ip().is_loopback() {
        return Err(BindError::AdminNotLoopback(addr));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError::Io { addr, source })
}

/// An endpoint listener a previous agent bound (a handover), held to
/// the same rule as [`bind`].
pub fn adopt(role: Role, listener: std::net::TcpListener) -> Result<TcpListener, BindError> {
    let addr = listener.local_addr().map_err(|source| BindError::Io {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    if role == Role::Admin && !addr.ip().is_loopback() {
        return Err(BindError::AdminNotLoopback(addr));
    }
    TcpListener::from_std(listener).map_err(|source| BindError::Io { addr, source })
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The admin API changes state and shows every connection: pods must
    /// never reach it.
    #[error("--admin {0}: the admin endpoint must be on a loopback address")]
    AdminNotLoopback(SocketAddr),
    #[error("binding {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    async fn status(role: Role, method: Method, path: &str) -> StatusCode {
        let state = AdminState::default();
        state.ready.store(true, Ordering::Release);
        respond(role, &state, request(method, path)).await.status()
    }

    #[tokio::test]
    async fn each_port_answers_only_its_own_paths() {
        for path in [
            "/stats",
            "/config_dump",
            "/connections",
            "/events",
            "/graph",
        ] {
            assert_eq!(
                status(Role::Readiness, Method::GET, path).await,
                404,
                "{path}"
            );
            assert_eq!(
                status(Role::Metrics, Method::GET, path).await,
                404,
                "{path}"
            );
        }
        for role in [Role::Readiness, Role::Metrics] {
            assert_eq!(status(role, Method::POST, "/logging?level=off").await, 404);
            assert_eq!(status(role, Method::GET, "/logging?level=off").await, 404);
        }
        assert_eq!(status(Role::Readiness, Method::GET, "/metrics").await, 404);
        assert_eq!(
            status(Role::Metrics, Method::GET, "/healthz/ready").await,
            404
        );
        assert_eq!(
            status(Role::Admin, Method::GET, "/healthz/ready").await,
            404
        );
        assert_eq!(
            status(Role::Readiness, Method::GET, "/healthz/ready").await,
            200
        );
    }

    #[tokio::test]
    async fn state_changes_take_post() {
        assert_eq!(
            status(Role::Admin, Method::GET, "/logging?level=off").await,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status(Role::Admin, Method::POST, "/stats").await,
            StatusCode::METHOD_NOT_ALLOWED
        );
        // With no view yet the route is right and only the agent is not.
        assert_eq!(
            status(Role::Admin, Method::POST, "/logging?level=off").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn the_admin_endpoint_refuses_an_address_pods_can_reach() {
        let error = bind(Role::Admin, "0.0.0.0:0".parse().unwrap())
            .await
            .unwrap_err();
        assert!(error.to_string().contains("loopback"), "{error}");
        assert!(
            bind(Role::Admin, "127.0.0.1:0".parse().unwrap())
                .await
                .is_ok()
        );
    }
}
