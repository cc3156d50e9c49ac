//! Tracing: each proxied connection is an OpenTelemetry span, exported
//! over OTLP to a configured collector. Off unless `tracing` is in the
//! config; a reload turns it on, off or elsewhere.
//!
//! The proxy never waits for the collector: a finished span goes into a
//! bounded queue with `try_send`, and when the queue is full (the collector
//! is slow or down) the span is dropped and counted. The exporter task
//! ([`export`]) empties the queue in batches.
//!
//! Sampling is decided once per trace, at its head: the source agent
//! draws it from the trace id ([`context::sampled_at`]); a span whose
//! parent came from a peer (the `traceparent` of an HBONE CONNECT, ours or
//! a ztunnel's) follows the parent's decision.

pub mod context;
pub mod export;
mod otlp;

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::info;

pub use self::context::{TraceContext, TraceParent};

/// Spans waiting for the exporter at most; more are dropped. A span is
/// about a kilobyte, so this bounds the queue near 4 MiB.
pub const QUEUE_CAPACITY: usize = 4096;

/// `tracing` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector: `http://host:port` (gRPC; port 4317 when absent) or,
    /// for `http/protobuf`, `http://host:port[/path]` (port 4318 and path
    /// `/v1/traces` when absent).
    pub otlp_endpoint: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// The share of new traces recorded, 0 to 1. Traces begun by a peer
    /// keep the peer's decision.
    #[serde(default = "default_ratio")]
    pub sampling_ratio: f64,
    /// The spans' `service.name`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

/// OTLP's transports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

fn default_ratio() -> f64 {
    0.01
}

fn default_service_name() -> String {
    "mesh-agent".to_owned()
}

const MAX_SERVICE_NAME_LEN: usize = 255;

impl TracingConfig {
    /// Checks every field; the error names the field (under `tracing.`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let field = |name: &str, message: String| Err((format!("tracing.{name}"), message));
        if let Err(message) = export::Target::parse(&self.otlp_endpoint, self.protocol) {
            return field("otlp_endpoint", message);
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return field(
                "sampling_ratio",
                format!("{} is not between 0 and 1", self.sampling_ratio),
            );
        }
        let name = &self.service_name;
        if name.is_empty()
            || name.len() > MAX_SERVICE_NAME_LEN
            || name.chars().any(char::is_control)
        {
            return field(
                "service_name",
                format!(
                    "must be 1 to {MAX_SERVICE_NAME_LEN} characters without control characters"
                ),
            );
        }
        Ok(())
    }
}

/// What the tracer runs with: the config, and the node the spans come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub config: TracingConfig,
    pub node: String,
}

/// How many spans went where.
#[derive(Default)]
pub struct SpanStats {
    /// Sampled spans handed to the exporter's queue.
    pub queued: AtomicU64,
    /// Dropped: the queue was full (or the exporter gone), or tracing was
    /// turned off before they were sent.
    pub dropped: AtomicU64,
    /// Accepted by the collector.
    pub exported: AtomicU64,
    /// Lost in an export the collector refused or never answered.
    pub failed: AtomicU64,
    /// Export attempts that failed.
    pub export_errors: AtomicU64,
}

/// A snapshot of [`SpanStats`] and the settings, for `/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct TracingSnapshot {
    pub enabled: bool,
    pub otlp_endpoint: Option<String>,
    pub sampling_ratio: Option<f64>,
    pub queued: u64,
    pub dropped: u64,
    pub exported: u64,
    pub failed: u64,
    pub export_errors: u64,
    pub queue_capacity: usize,
}

/// Starts spans and takes finished ones; shared by everything that
/// writes connection records.
pub struct Tracer {
    settings: RwLock<Option<Arc<Settings>>>,
    queue: mpsc::Sender<FinishedSpan>,
    /// The queue's other end, until the exporter takes it.
    receiver: std::sync::Mutex<Option<mpsc::Receiver<FinishedSpan>>>,
    pub stats: SpanStats,
}

impl Default for Tracer {
    fn default() -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        Self {
            settings: RwLock::default(),
            queue,
            receiver: std::sync::Mutex::new(Some(receiver)),
            stats: SpanStats::default(),
        }
    }
}

impl Tracer {
    /// Applies `tracing` from a (re)loaded config.
    pub fn configure(&self, config: Option<&TracingConfig>, node: &str) {
        let next = config.map(|config| {
            Arc::new(Settings {
                config: config.clone(),
                node: node.to_owned(),
            })
        });
        let mut settings = self.settings.write().unwrap_or_else(|e| e.into_inner());
        if settings.as_deref() == next.as_deref() {
            return;
        }
        match &next {
            Some(next) => info!(
                endpoint = %next.config.otlp_endpoint,
                protocol = ?next.config.protocol,
                sampling_ratio = next.config.sampling_ratio,
                "tracing on"
            ),
            None => info!("tracing off"),
        }
        *settings = next;
    }

    pub fn settings(&self) -> Option<Arc<Settings>> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The trace context of a new connection: `None` with tracing off,
    /// else a child of `parent` (a peer's `traceparent`) or a new trace,
    /// sampled at the configured ratio.
    pub fn start(&self, parent: Option<TraceParent>) -> Option<TraceContext> {
        let settings = self.settings()?;
        Some(match parent {
            Some(parent) => TraceContext::child_of(parent),
            None => TraceContext::root(|trace_id| {
                context::sampled_at(settings.config.sampling_ratio, trace_id)
            }),
        })
    }

    /// Queues a finished span for export, or drops and counts it: the
    /// proxy never waits here.
    pub fn submit(&self, span: FinishedSpan) {
        match self.queue.try_send(span) {
            Ok(()) => self.stats.queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// The queue's receiving end, once: for the exporter task.
    pub fn take_queue(&self) -> Option<mpsc::Receiver<FinishedSpan>> {
        self.receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub fn snapshot(&self) -> TracingSnapshot {
        let settings = self.settings();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TracingSnapshot {
            enabled: settings.is_some(),
            otlp_endpoint: settings.as_ref().map(|s| s.config.otlp_endpoint.clone()),
            sampling_ratio: settings.as_ref().map(|s| s.config.sampling_ratio),
            queued: load(&self.stats.queued),
            dropped: load(&self.stats.dropped),
            exported: load(&self.stats.exported),
            failed: load(&self.stats.failed),
            export_errors: load(&self.stats.export_errors),
            queue_capacity: QUEUE_CAPACITY,
        }
    }
}

/// Which end of the connection a span describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// The source agent: it opened the connection to the endpoint.
    Client,
    /// The destination agent: it accepted the connection from a peer.
    Server,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(i64),
    Bool(bool),
}

/// A connection's span, complete, as it waits for export.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub context: TraceContext,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Why it failed, if it did (the span's status).
    pub error: Option<String>,
    pub attributes: Vec<(&'static str, Value)>,
    /// What the peer sent as `baggage`, kept as `baggage.<key>` attributes.
    pub baggage: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ratio: f64) -> TracingConfig {
        TracingConfig {
            otlp_endpoint: "http://127.0.0.1:4317".into(),
            protocol: Protocol::Grpc,
            sampling_ratio: ratio,
            service_name: "mesh".into(),
        }
    }

    fn span(context: TraceContext) -> FinishedSpan {
        FinishedSpan {
            context,
            name: "outbound".into(),
            kind: SpanKind::Client,
            start: SystemTime::now(),
            end: SystemTime::now(),
            error: None,
            attributes: Vec::new(),
            baggage: Vec::new(),
        }
    }

    #[test]
    fn off_until_configured_and_a_peers_decision_is_kept() {
        let tracer = Tracer::default();
        assert_eq!(tracer.start(None), None, "off by default");
        tracer.configure(Some(&config(0.0)), "node-a");
        let root = tracer.start(None).unwrap();
        assert!(!root.sampled, "ratio 0 samples nothing new");
        let parent =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let child = tracer.start(Some(parent)).unwrap();
        assert!(child.sampled, "the peer sampled it");
        assert_eq!(child.trace_id, parent.trace_id);
        tracer.configure(None, "node-a");
        assert_eq!(tracer.start(Some(parent)), None, "off again");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let tracer = Tracer::default();
        tracer.configure(Some(&config(1.0)), "node-a");
        let context = tracer.start(None).unwrap();
        // Nobody takes the queue: it fills, then every span is dropped.
        for _ in 0..QUEUE_CAPACITY + 10 {
            tracer.submit(span(context));
        }
        let snapshot = tracer.snapshot();
        assert_eq!(snapshot.queued, QUEUE_CAPACITY as u64);
        assert_eq!(snapshot.dropped, 10);
        let mut queue = tracer.take_queue().unwrap();
        assert!(tracer.take_queue().is_none(), "one exporter");
        assert!(queue.try_recv().is_ok());
    }

    #[test]
    fn bad_settings_name_their_field() {
        let mut bad = config(1.5);
        assert_eq!(bad.validate().unwrap_err().0, "tracing.sampling_ratio");
        bad.sampling_ratio = f64::NAN;
        assert_eq!(bad.validate().unwrap_err().0, "tracing.sampling_ratio");
        bad = config(0.5);
        bad.service_name = "a\nb".into();
        assert_eq!(bad.validate().unwrap_err().0, "tracing.service_name");
        bad = config(0.5);
        bad.otlp_endpoint = "https://collector:4317".into();
        assert_eq!(bad.validate().unwrap_err().0, "tracing.otlp_endpoint");
        assert!(config(0.5).validate().is_ok());
    }
}
