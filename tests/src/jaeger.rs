//! A real tracing collector: Jaeger v2's all-in-one (in-memory storage),
//! built from its Go module by `cargo xtask`, in a node's namespace. It
//! takes OTLP on 4317 (gRPC) and 4318 (HTTP) and answers its query API on
//! 16686, all on every address of that namespace.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{agent::http_request, netns::NetNs, process::Guarded, tool};

pub const OTLP_GRPC_PORT: u16 = 4317;
pub const OTLP_HTTP_PORT: u16 = 4318;
const QUERY_PORT: u16 = 16686;

pub struct Jaeger {
    process: Option<Guarded>,
    netns: PathBuf,
    pub log: PathBuf,
}

impl Jaeger {
    /// Starts Jaeger in `netns` and waits until its query API answers.
    pub fn start(netns: &NetNs) -> Self {
        let log = std::env::temp_dir().join(crate::unique_name("jaeger.log"));
        let mut command = Command::new(tool("jaeger"));
        command
            .env("JAEGER_LISTEN_HOST", "0.0.0.0")
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("jaeger log"));
        crate::process::enter(&mut command, &netns.path(), None);
        let mut jaeger = Self {
            process: Some(Guarded::new(command.spawn().expect("starting jaeger"))),
            netns: netns.path(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while jaeger.get("/api/services").is_none() {
            let exited = jaeger
                .process
                .as_mut()
                .and_then(|p| p.child_mut().try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "jaeger exited ({exited:?}):\n{}",
                jaeger.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "jaeger not ready in 60 s:\n{}",
                jaeger.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        jaeger
    }

    /// Stops it (spans sent from now on find nobody listening).
    pub fn stop(&mut self) {
        self.process.take();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A query API answer (`data` of its JSON), when it answers 200.
    fn get(&self, path: &str) -> Option<Value> {
        let (status, body) = http_request(&self.netns, "GET", QUERY_PORT, path)?;
        if status != 200 {
            return None;
        }
        serde_json::from_str::<Value>(&body)
            .ok()?
            .get("data")
            .cloned()
    }

    /// The trace `trace_id` (32 hex digits) as Jaeger holds it: its spans,
    /// each with its service name resolved.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        let Some(Value::Array(traces)) = self.get(&format!("/api/traces/{trace_id}")) else {
            return Vec::new();
        };
        traces.iter().flat_map(Span::all).collect()
    }

    /// Every trace with a span from `service` (at most `limit`).
    pub fn traces_of(&self, service: &str, limit: usize) -> Vec<Vec<Span>> {
        let path = format!("/api/traces?service={service}&limit={limit}&lookback=1h");
        let Some(Value::Array(traces)) = self.get(&path) else {
            return Vec::new();
        };
        traces.iter().map(Span::all).collect()
    }
}

/// A span as Jaeger's query API gives it.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// The span it is a child of, if any.
    pub parent: Option<String>,
    pub service: String,
    pub name: String,
    pub tags: Value,
}

impl Span {
    fn all(trace: &Value) -> Vec<Span> {
        let processes = &trace["processes"];
        trace["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|span| {
                let tags = span["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|tag| Some((tag["key"].as_str()?.to_owned(), tag["value"].clone())))
                    .collect::<serde_json::Map<_, _>>();
                Span {
                    trace_id: span["traceID"].as_str().unwrap_or_default().to_owned(),
                    span_id: span["spanID"].as_str().unwrap_or_default().to_owned(),
                    parent: span["references"].as_array().and_then(|refs| {
                        refs.iter()
                            .find(|r| r["refType"] == "CHILD_OF")
                            .and_then(|r| r["spanID"].as_str().map(str::to_owned))
                    }),
                    service:
                        processes[span["processID"].as_str().unwrap_or_default()]["serviceName"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    name: span["operationName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    tags: Value::Object(tags),
                }
            })
            .collect()
    }

    /// A tag's value as text (numbers and booleans as Jaeger prints them).
    pub fn tag(&self, key: &str) -> Option<String> {
        match &self.tags[key] {
            Value::String(text) => Some(text.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}
