//! The admin endpoints:
//! - `127.0.0.1:15000` (localhost only): `/stats` (JSON snapshot; of the
//!   tracked kernel connections, the count and at most 1,000),
//!   `/config_dump` (effective config, model, endpoint health,
//!   certificates without keys), `/connections` (live connections),
//!   `/events` (a stream of finished connections, one JSON line each),
//!   `/graph` (who talks to whom), `/logging?level=…` (log filter at run
//!   time);
//! - `0.0.0.0:15021`: `/healthz/ready`, 200 once the programs are attached
//!   and the config is loaded, 503 before (it answers from the very start);
//! - `0.0.0.0:15020`: `/metrics`, for Prometheus.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::broadcast};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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
    fn set_log_filter(&self, filter: &str) -> Result<String, String>;
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

type Body = BoxBody<Bytes, Infallible>;

/// Serves on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, request)) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "admin connection");
            }
        });
    }
}

fn respond(state: &AdminState, request: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = request.uri().path();
    if path == "/healthz/ready" {
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
    let Some(view) = state.view.get() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
    };
    match path {
        "/stats" => json(&view.stats()),
        "/config_dump" => json(&view.config_dump()),
        "/connections" => json(&view.connections()),
        "/graph" => json(&view.graph()),
        "/metrics" => metrics(view.as_ref(), &request),
        "/events" => events(view.events()),
        "/logging" => {
            let level = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
            match level {
                Some(level) => {
                    match view.set_log_filter(&level.replace("%2C", ",").replace("%3D", "=")) {
                        Ok(filter) => text(StatusCode::OK, format!("log filter: {filter}\n")),
                        Err(error) => text(StatusCode::BAD_REQUEST, format!("{error}\n")),
                    }
                }
                None => text(
                    StatusCode::BAD_REQUEST,
                    "use /logging?level=<filter>, e.g. level=debug\n".into(),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn metrics<B>(view: &dyn AdminView, request: &Request<B>) -> Response<Body> {
    let openmetrics = view.metrics();
    // Prometheus asks for OpenMetrics; other tools get the classic format.
    let wants_openmetrics = request
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let (content_type, body) = if wants_openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            openmetrics,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::to_classic_text(&openmetrics),
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

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
