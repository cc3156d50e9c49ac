//! The admin endpoints:
//! - `127.0.0.1:15000` (localhost only): `/stats`, a JSON snapshot of what
//!   the proxy and the kernel counted;
//! - `0.0.0.0:15021`: `/healthz/ready`, 200 once the programs are attached
//!   and the config is loaded, 503 before.
//! - `0.0.0.0:15020`: `/metrics`, for Prometheus.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Produces the body of `/stats`.
pub type StatsFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
/// Produces the body of `/metrics` (Prometheus text exposition).
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub struct AdminState {
    pub ready: Arc<AtomicBool>,
    pub stats: StatsFn,
    pub metrics: MetricsFn,
}

/// Serves `routes` on `listener` until `stop` fires.
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

fn respond(state: &AdminState, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/healthz/ready" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/stats" => {
            let body = serde_json::to_vec_pretty(&(state.stats)()).unwrap_or_default();
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts")
        }
        "/metrics" => {
            let openmetrics = (state.metrics)();
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
            Response::builder()
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts")
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
