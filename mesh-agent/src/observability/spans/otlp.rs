//! Finished spans as OTLP messages (opentelemetry-proto's types): one
//! resource (the agent on its node), one scope, the batch's spans.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status},
};

use super::{FinishedSpan, Settings, SpanKind, Value};

/// A batch, ready to send.
pub fn request(settings: &Settings, spans: Vec<FinishedSpan>) -> ExportTraceServiceRequest {
    let resource = Resource {
        attributes: vec![
            text("service.name", &settings.config.service_name),
            text("host.name", &settings.node),
            text("service.version", env!("CARGO_PKG_VERSION")),
        ],
        ..Default::default()
    };
    let scope = InstrumentationScope {
        name: "mesh-agent".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope),
                spans: spans.into_iter().map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn span(finished: FinishedSpan) -> Span {
    let context = finished.context;
    let mut attributes: Vec<KeyValue> = finished
        .attributes
        .into_iter()
        .map(|(key, value)| KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(match value {
                    Value::Text(text) => any_value::Value::StringValue(text),
                    Value::Int(int) => any_value::Value::IntValue(int),
                    Value::Bool(bool) => any_value::Value::BoolValue(bool),
                }),
            }),
            ..Default::default()
        })
        .collect();
    attributes.extend(
        finished
            .baggage
            .iter()
            .map(|(key, value)| text(&format!("baggage.{key}"), value)),
    );
    let status = match finished.error {
        Some(message) => Status {
            message,
            code: status::StatusCode::Error as i32,
        },
        None => Status {
            message: String::new(),
            code: status::StatusCode::Unset as i32,
        },
    };
    Span {
        trace_id: context.trace_id.to_be_bytes().to_vec(),
        span_id: context.span_id.to_be_bytes().to_vec(),
        parent_span_id: context
            .parent_id
            .map(|id| id.to_be_bytes().to_vec())
            .unwrap_or_default(),
        // W3C trace flags in the low byte: sampled.
        flags: u32::from(context.sampled),
        name: finished.name,
        kind: match finished.kind {
            SpanKind::Client => span::SpanKind::Client,
            SpanKind::Server => span::SpanKind::Server,
        } as i32,
        start_time_unix_nano: unix_nanos(finished.start),
        end_time_unix_nano: unix_nanos(finished.end),
        attributes,
        status: Some(status),
        ..Default::default()
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::observability::spans::{Protocol, TraceContext, TracingConfig};

    #[test]
    fn a_span_carries_its_ids_times_and_attributes() {
        let settings = Settings {
            config: TracingConfig {
                otlp_endpoint: "http://127.0.0.1:4317".into(),
                protocol: Protocol::Grpc,
                sampling_ratio: 1.0,
                service_name: "mesh".into(),
            },
            node: "node-a".into(),
        };
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let finished = FinishedSpan {
            context: TraceContext {
                trace_id: 0x0102,
                span_id: 0x0304,
                parent_id: Some(0x0506),
                sampled: true,
            },
            name: "outbound".into(),
            kind: SpanKind::Client,
            start,
            end: start + Duration::from_millis(5),
            error: Some("refused".into()),
            attributes: vec![("sent", Value::Int(7)), ("mtls", Value::Bool(true))],
            baggage: vec![("k8s.namespace.name".into(), "shop".into())],
        };
        let request = request(&settings, vec![finished]);
        let resource = &request.resource_spans[0];
        let names: Vec<_> = resource
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|a| a.key.as_str())
            .collect();
        assert_eq!(names, ["service.name", "host.name", "service.version"]);
        let span = &resource.scope_spans[0].spans[0];
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(span.trace_id[14..], [1, 2]);
        assert_eq!(span.span_id, 0x0304u64.to_be_bytes());
        assert_eq!(span.parent_span_id, 0x0506u64.to_be_bytes());
        assert_eq!(
            span.end_time_unix_nano - span.start_time_unix_nano,
            5_000_000
        );
        assert_eq!(span.kind, span::SpanKind::Client as i32);
        assert_eq!(
            span.status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
        let keys: Vec<_> = span.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["sent", "mtls", "baggage.k8s.namespace.name"]);
    }
}
