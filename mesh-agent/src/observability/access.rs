//! One record per connection, written when it ends: to the access log (a
//! structured tracing event with target `access`: JSON with
//! `--log-format json`), to the Istio TCP metrics and, when its trace is
//! sampled, as a span to the tracing collector. All come from the same
//! record, so they always agree.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tracing::info;

use std::sync::Arc;

use crate::{
    model::{Injected, MeshState},
    observability::live::{Live, Registration},
    observability::metrics::{Metrics, TcpLabels},
    observability::spans::{FinishedSpan, SpanKind, TraceContext, Tracer, Value},
};

/// Where connection records go.
#[derive(Default)]
pub struct Sinks {
    pub metrics: Arc<Metrics>,
    pub live: Arc<Live>,
    pub tracer: Arc<Tracer>,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both directions ended cleanly.
    Ok,
    /// Reset by either side (or by an error on the way).
    Reset,
    /// No endpoint could be connected (connect refused or failed).
    Refused,
    /// Authorization said no.
    Denied,
    /// A circuit breaker limit was reached.
    Breaker,
    /// Idle or connect timeout.
    Timeout,
    /// No endpoint available.
    NoEndpoint,
    /// Refused or cut by an injected fault.
    Injected,
    /// Over the client's quota.
    RateLimited,
}

impl Outcome {
    fn response_flags(self) -> &'static str {
        match self {
            Outcome::Ok | Outcome::Reset => "-",
            Outcome::Refused | Outcome::Timeout => "UF",
            Outcome::Denied => "DENY",
            Outcome::Breaker => "UO",
            Outcome::NoEndpoint => "NR",
            Outcome::Injected => "FI",
            Outcome::RateLimited => "RL",
        }
    }
}

/// Who talked to whom, filled in as the connection is set up. Its parts
/// travel as JSON with a connection a new agent takes over.
#[derive(Serialize, serde::Deserialize)]
pub struct Record {
    #[serde(skip, default = "source_reporter")]
    pub reporter: &'static str,
    #[serde(with = "elapsed_ms")]
    pub started: Instant,
    pub client: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub endpoint: Option<SocketAddrV4>,
    pub service: String,
    pub source_workload: String,
    pub source_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_principal: String,
    pub mutual_tls: bool,
    /// Faults injected into it (testing).
    #[serde(skip)]
    pub fault: Injected,
    /// Endpoints that failed before the one used (or before giving up).
    #[serde(default)]
    pub retries: u32,
    /// Its place in a trace, when tracing is on.
    #[serde(default)]
    pub trace: Option<TraceContext>,
    /// The `baggage` an HBONE peer sent with it (bounded by the parser).
    #[serde(skip)]
    pub baggage: Vec<(String, String)>,
}

impl Record {
    /// Starts a record, naming the source and destination from the model.
    pub fn new(
        reporter: &'static str,
        state: &MeshState,
        client: SocketAddrV4,
        destination: SocketAddrV4,
    ) -> Self {
        let mut record = Record {
            reporter,
            started: Instant::now(),
            client,
            destination,
            endpoint: None,
            service: String::new(),
            source_workload: String::new(),
            source_namespace: String::new(),
            source_principal: String::new(),
            destination_workload: String::new(),
            destination_namespace: String::new(),
            destination_principal: String::new(),
            mutual_tls: false,
            fault: Injected::default(),
            retries: 0,
            trace: None,
            baggage: Vec::new(),
        };
        if let Some((_, w)) = state.workload_by_ip(*client.ip()) {
            record.source_workload = w.name.clone();
            record.source_namespace = w.namespace.clone();
            record.source_principal = state.identity(w).to_string();
        }
        record.set_destination_workload(state, *destination.ip());
        record
    }

    /// Names the destination after the workload at `ip`, if it is one.
    pub fn set_destination_workload(&mut self, state: &MeshState, ip: std::net::Ipv4Addr) {
        if let Some((_, w)) = state.workload_by_ip(ip) {
            self.destination_workload = w.name.clone();
            self.destination_namespace = w.namespace.clone();
            self.destination_principal = state.identity(w).to_string();
        }
    }

    fn labels(&self, outcome: Option<Outcome>) -> TcpLabels {
        TcpLabels {
            reporter: self.reporter,
            source_workload: self.source_workload.clone(),
            source_workload_namespace: self.source_namespace.clone(),
            source_principal: self.source_principal.clone(),
            destination_workload: self.destination_workload.clone(),
            destination_workload_namespace: self.destination_namespace.clone(),
            destination_principal: self.destination_principal.clone(),
            destination_service: self.service.clone(),
            connection_security_policy: if self.mutual_tls {
                "mutual_tls"
            } else {
                "none"
            },
            response_flags: outcome.map_or("-", Outcome::response_flags),
        }
    }

    /// The connection is established: count it as opened and list it as
    /// live until the registration drops.
    pub fn opened(&self, sinks: &Sinks) -> Registration {
        sinks.metrics.opened(&self.labels(None));
        sinks.live.register(
            self.client,
            self.destination,
            self.endpoint,
            &self.source_workload,
            &self.destination_workload,
            self.mutual_tls,
        )
    }

    /// The connection is over (or never got going): metrics and access log.
    pub fn finish(
        self,
        sinks: &Sinks,
        outcome: Outcome,
        sent: u64,
        received: u64,
        error: Option<String>,
    ) {
        let metrics = &sinks.metrics;
        let established = matches!(outcome, Outcome::Ok | Outcome::Reset)
            || (matches!(outcome, Outcome::Timeout | Outcome::Injected) && self.endpoint.is_some());
        let labels = self.labels(Some(outcome));
        if !established {
            // Never opened: count it as opened and closed at once, flagged.
            metrics.opened(&labels);
        }
        metrics.closed(&labels, sent, received);
        let elapsed = self.started.elapsed();
        let duration_ms = elapsed.as_millis() as u64;
        let endpoint = self.endpoint.map(|e| e.to_string()).unwrap_or_default();
        // The trace and span ids tie the line to the span (when sampled)
        // and, across nodes, to the peer's line.
        let (trace_id, span_id) = self.trace.map_or_else(Default::default, |trace| {
            (
                format!("{:032x}", trace.trace_id),
                format!("{:016x}", trace.span_id),
            )
        });
        sinks.live.publish(serde_json::json!({
            "time": unix_seconds(),
            "reporter": self.reporter,
            "src": self.client.to_string(),
            "src_workload": self.source_workload,
            "src_namespace": self.source_namespace,
            "src_identity": self.source_principal,
            "dst": self.destination.to_string(),
            "dst_service": self.service,
            "dst_workload": self.destination_workload,
            "dst_namespace": self.destination_namespace,
            "dst_identity": self.destination_principal,
            "endpoint": endpoint,
            "mtls": self.mutual_tls,
            "sent": sent,
            "received": received,
            "duration_ms": duration_ms,
            "result": outcome,
            "fault": self.fault.describe(),
            "retries": self.retries,
            "trace_id": trace_id,
            "span_id": span_id,
        }));
        info!(
            target: "access",
            reporter = self.reporter,
            src = %self.client,
            src_workload = %self.source_workload,
            src_namespace = %self.source_namespace,
            src_identity = %self.source_principal,
            dst = %self.destination,
            dst_service = %self.service,
            dst_workload = %self.destination_workload,
            dst_namespace = %self.destination_namespace,
            dst_identity = %self.destination_principal,
            endpoint,
            mtls = self.mutual_tls,
            sent,
            received,
            duration_ms,
            result = ?outcome,
            fault = %self.fault.describe(),
            retries = self.retries,
            trace_id,
            span_id,
            error = error.as_deref().unwrap_or_default(),
            "connection"
        );
        if let Some(context) = self.trace.filter(|trace| trace.sampled) {
            let ended = Ended {
                outcome,
                sent,
                received,
                elapsed,
                endpoint,
                error,
            };
            sinks.tracer.submit(self.span(context, ended));
        }
    }

    /// The connection as a span: the access log's fields as attributes.
    fn span(self, context: TraceContext, ended: Ended) -> FinishedSpan {
        let (outcome, elapsed) = (ended.outcome, ended.elapsed);
        let end = SystemTime::now();
        let (kind, direction) = match self.reporter {
            "destination" => (SpanKind::Server, "inbound"),
            _ => (SpanKind::Client, "outbound"),
        };
        let name = if self.service.is_empty() {
            format!("{direction} {}", self.destination)
        } else {
            format!("{direction} {}", self.service)
        };
        let int = |n: u64| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
        let attributes = vec![
            ("reporter", Value::Text(self.reporter.to_owned())),
            ("src", Value::Text(self.client.to_string())),
            ("src_workload", Value::Text(self.source_workload)),
            ("src_namespace", Value::Text(self.source_namespace)),
            ("src_identity", Value::Text(self.source_principal)),
            ("dst", Value::Text(self.destination.to_string())),
            ("dst_service", Value::Text(self.service)),
            ("dst_workload", Value::Text(self.destination_workload)),
            ("dst_namespace", Value::Text(self.destination_namespace)),
            ("dst_identity", Value::Text(self.destination_principal)),
            ("endpoint", Value::Text(ended.endpoint)),
            ("mtls", Value::Bool(self.mutual_tls)),
            ("sent", int(ended.sent)),
            ("received", int(ended.received)),
            ("duration_ms", int(elapsed.as_millis() as u64)),
            ("result", Value::Text(format!("{outcome:?}"))),
            (
                "response_flags",
                Value::Text(outcome.response_flags().to_owned()),
            ),
            ("fault", Value::Text(self.fault.describe())),
            ("retries", Value::Int(i64::from(self.retries))),
            (
                "error",
                Value::Text(ended.error.clone().unwrap_or_default()),
            ),
        ];
        FinishedSpan {
            context,
            name,
            kind,
            start: end.checked_sub(elapsed).unwrap_or(end),
            end,
            error: match outcome {
                Outcome::Ok | Outcome::Reset => None,
                _ => Some(ended.error.unwrap_or_else(|| format!("{outcome:?}"))),
            },
            attributes,
            baggage: self.baggage,
        }
    }
}

/// How a connection ended, as its span tells it.
struct Ended {
    outcome: Outcome,
    sent: u64,
    received: u64,
    elapsed: Duration,
    endpoint: String,
    error: Option<String>,
}

fn source_reporter() -> &'static str {
    "source"
}

/// An `Instant` as the milliseconds since it, and back.
mod elapsed_ms {
    use std::time::{Duration, Instant};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(started: &Instant, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(started.elapsed().as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Instant, D::Error> {
        let ms = u64::deserialize(deserializer)?;
        let now = Instant::now();
        Ok(now.checked_sub(Duration::from_millis(ms)).unwrap_or(now))
    }
}

/// Seconds since the Unix epoch, with milliseconds.
fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
