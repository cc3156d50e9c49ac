//! The exporter task: takes finished spans off the queue in batches and
//! sends them to the collector over OTLP, gRPC or HTTP/protobuf. A batch
//! the collector refuses, or does not answer within `EXPORT_TIMEOUT`, is
//! counted lost and not sent again: meanwhile the queue keeps filling, and
//! once full it drops (in the proxy, which never waits for this task).

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{FinishedSpan, Protocol, Settings, Tracer, otlp};
use crate::observability::log_budget::LogBudget;

/// Most spans sent in one request.
const BATCH: usize = 512;
/// How long a batch waits for more spans once it has one.
const LINGER: Duration = Duration::from_millis(200);
/// How long one export may take, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long spans still queued at exit may take to go out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

static EXPORT_LOG: LogBudget = LogBudget::new(1);

/// Where spans go: the collector's URI, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// gRPC: `http://host:port`; HTTP: the authority.
    pub authority: String,
    /// HTTP/protobuf only: the request's path.
    pub path: String,
}

impl Target {
    pub fn parse(endpoint: &str, protocol: Protocol) -> Result<Self, String> {
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| format!("{endpoint:?} is not a URI: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{endpoint:?}: only http:// is supported (a collector on the node or cluster network)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{endpoint:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{endpoint:?}: credentials in the URI are not supported"
            ));
        }
        let default_port = match protocol {
            Protocol::Grpc => 4317,
            Protocol::HttpProtobuf => 4318,
        };
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(default_port);
        if port == 0 {
            return Err(format!("{endpoint:?}: port 0"));
        }
        let path = match (protocol, uri.path()) {
            (Protocol::Grpc, "/" | "") => String::new(),
            (Protocol::Grpc, path) => {
                return Err(format!(
                    "{endpoint:?}: a gRPC endpoint has no path ({path:?})"
                ));
            }
            (Protocol::HttpProtobuf, "/" | "") => "/v1/traces".to_owned(),
            (Protocol::HttpProtobuf, path) => path.to_owned(),
        };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        Ok(Self {
            authority: format!("{host}:{port}"),
            path,
        })
    }
}

/// Sends spans until `stop`, then what is still queued, for at most
/// `FLUSH_TIMEOUT`.
pub async fn run(
    tracer: Arc<Tracer>,
    mut queue: mpsc::Receiver<FinishedSpan>,
    stop: CancellationToken,
) {
    let mut client = None;
    loop {
        let first = tokio::select! {
            span = queue.recv() => match span {
                Some(span) => span,
                None => return,
            },
            _ = stop.cancelled() => break,
        };
        let mut batch = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            tokio::select! {
                span = queue.recv() => match span {
                    Some(span) => batch.push(span),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        send(&tracer, &mut client, batch).await;
    }
    // Stopping: what finished before the stop still goes out.
    let flush = async {
        let mut batch = Vec::new();
        while let Ok(span) = queue.try_recv() {
            batch.push(span);
            if batch.len() == BATCH {
                send(&tracer, &mut client, std::mem::take(&mut batch)).await;
            }
        }
        if !batch.is_empty() {
            send(&tracer, &mut client, batch).await;
        }
    };
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, flush).await;
}

/// A connection to the collector, kept while its settings hold.
struct Client {
    settings: Arc<Settings>,
    target: Target,
    grpc: Option<TraceServiceClient<tonic::transport::Channel>>,
}

async fn send(tracer: &Tracer, client: &mut Option<Client>, batch: Vec<FinishedSpan>) {
    let count = batch.len() as u64;
    let stats = &tracer.stats;
    let Some(settings) = tracer.settings() else {
        // Turned off since these were queued.
        stats.dropped.fetch_add(count, Ordering::Relaxed);
        return;
    };
    if client.as_ref().is_none_or(|c| c.settings != settings) {
        *client = match connect(&settings) {
            Ok(connected) => Some(connected),
            Err(error) => {
                // Validation accepted the endpoint; this is tonic refusing
                // it, which should not happen: count, log and go on.
                stats.failed.fetch_add(count, Ordering::Relaxed);
                stats.export_errors.fetch_add(1, Ordering::Relaxed);
                warn!(%error, "tracing: cannot use the collector's endpoint");
                return;
            }
        };
    }
    let Some(client) = client.as_mut() else {
        return;
    };
    let request = otlp::request(&settings, batch);
    let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await;
    match sent {
        Ok(Ok(())) => {
            stats.exported.fetch_add(count, Ordering::Relaxed);
        }
        failed => {
            stats.failed.fetch_add(count, Ordering::Relaxed);
            stats.export_errors.fetch_add(1, Ordering::Relaxed);
            if EXPORT_LOG.allow() {
                let error = match failed {
                    Ok(Err(error)) => error,
                    _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
                };
                warn!(endpoint = %settings.config.otlp_endpoint, spans = count, %error, "tracing: export failed; spans lost");
            }
        }
    }
}

fn connect(settings: &Arc<Settings>) -> Result<Client, String> {
    let config = &settings.config;
    let target = Target::parse(&config.otlp_endpoint, config.protocol)?;
    let grpc = match config.protocol {
        Protocol::Grpc => {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", target.authority))
                    .map_err(|e| e.to_string())?
                    .connect_timeout(EXPORT_TIMEOUT)
                    .timeout(EXPORT_TIMEOUT)
                    .connect_lazy();
            Some(TraceServiceClient::new(channel))
        }
        Protocol::HttpProtobuf => None,
    };
    Ok(Client {
        settings: settings.clone(),
        target,
        grpc,
    })
}

impl Client {
    async fn export(&mut self, request: ExportTraceServiceRequest) -> Result<(), String> {
        match &mut self.grpc {
            Some(grpc) => grpc
                .export(request)
                .await
                .map(drop)
                .map_err(|status| format!("gRPC {}: {}", status.code(), status.message())),
            None => post(&self.target, request.encode_to_vec()).await,
        }
    }
}

/// OTLP/HTTP: one POST of the protobuf body on a new connection (one
/// connection per batch of up to `BATCH` spans costs little beside them).
async fn post(target: &Target, body: Vec<u8>) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("connecting to {}: {e}", target.authority))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let request = http::Request::post(&target.path)
        .header(http::header::HOST, &target.authority)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string());
    connection.abort();
    let status = response?.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let grpc = |e| Target::parse(e, Protocol::Grpc);
        let http = |e| Target::parse(e, Protocol::HttpProtobuf);
        assert_eq!(grpc("http://10.0.0.1").unwrap().authority, "10.0.0.1:4317");
        assert_eq!(
            grpc("http://jaeger.tracing:14317").unwrap().authority,
            "jaeger.tracing:14317"
        );
        let target = http("http://10.0.0.1").unwrap();
        assert_eq!(
            (target.authority.as_str(), target.path.as_str()),
            ("10.0.0.1:4318", "/v1/traces")
        );
        assert_eq!(
            http("http://10.0.0.1:9/otlp/v1/traces").unwrap().path,
            "/otlp/v1/traces"
        );
        for bad in [
            "10.0.0.1:4317",
            "https://10.0.0.1:4317",
            "http://",
            "http://10.0.0.1:0",
            "http://10.0.0.1:4317/v1/traces",
            "http://user:pw@10.0.0.1:4317",
            "not a uri",
        ] {
            assert!(grpc(bad).is_err(), "{bad}");
        }
    }
}
