//! Tracing against a real collector: Jaeger (built from its Go module by
//! `cargo xtask`) in node 1's namespace receives the agents' OTLP, gRPC
//! from node 1's agent and HTTP/protobuf from node 2's. Needs root.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_agent::identity::SpiffeId;
use mesh_tests::{
    agent::Agent,
    eventually,
    jaeger::{Jaeger, OTLP_GRPC_PORT, OTLP_HTTP_PORT, Span},
    pod::{Connect, Server},
    raw_hbone,
    scenario::greeting,
    topology::{self, Node},
};

const VIP: &str = "10.96.0.10:80";
/// On node 1 only: a service whose endpoint is on node 1 too.
const LOCAL_VIP: &str = "10.96.0.20:80";

fn tracing_yaml(endpoint: &str, protocol: &str, ratio: f64, service: &str) -> String {
    format!(
        "tracing: {{ otlp_endpoint: \"{endpoint}\", protocol: {protocol}, sampling_ratio: {ratio}, service_name: {service} }}\n"
    )
}

/// Node 1 runs `client` and `local`, node 2 `server`; `web` (VIP) is
/// `server`, `near` (LOCAL_VIP) is `local`. Fields drop in order.
struct Setup {
    agent_a: Agent,
    agent_b: Agent,
    jaeger: Jaeger,
    _servers: Vec<Server>,
    a: Node,
    b: Node,
}

fn config_a(a: &Node, b: &Node, tracing: &str) -> String {
    format!(
        "{}{tracing}workloads:\n{}{}{}services:
  - name: web
    vip: 10.96.0.10
    ports: [{{ port: 80, target_port: 8080 }}]
    endpoints: [{{ ip: {} }}]
  - name: near
    vip: 10.96.0.20
    ports: [{{ port: 80, target_port: 8080 }}]
    endpoints: [{{ ip: {} }}]
",
        a.node_yaml(),
        a.own_identity_workload_yaml("client"),
        a.own_identity_workload_yaml("local"),
        b.remote_workload_yaml("server"),
        b.pod("server").ip,
        a.pod("local").ip,
    )
}

fn config_b(a: &Node, b: &Node, tracing: &str) -> String {
    format!(
        "{}{tracing}workloads:\n{}{}",
        b.node_yaml(),
        b.own_identity_workload_yaml("server"),
        a.remote_workload_yaml("client"),
    )
}

/// Node 2's agent samples nothing of its own (ratio 0): every span it
/// records is one whose parent said so.
fn setup(label: &str, ratio_a: f64) -> Setup {
    let mut a = Node::new(label, 1);
    let mut b = Node::new(label, 2);
    a.add_pod("client");
    a.add_pod("local");
    b.add_pod("server");
    topology::connect(&mut a, &mut b);
    let servers = vec![
        b.pod("server").serve(8080, "server", false),
        a.pod("local").serve(8080, "local", false),
    ];
    let jaeger = Jaeger::start(&a.netns);
    let tracing_a = tracing_yaml(
        &format!("http://127.0.0.1:{OTLP_GRPC_PORT}"),
        "grpc",
        ratio_a,
        "mesh-agent-a",
    );
    let tracing_b = tracing_yaml(
        &format!("http://{}:{OTLP_HTTP_PORT}", a.ip),
        "http/protobuf",
        0.0,
        "mesh-agent-b",
    );
    let agent_a = Agent::start(&a, &config_a(&a, &b, &tracing_a));
    let agent_b = Agent::start(&b, &config_b(&a, &b, &tracing_b));
    Setup {
        agent_a,
        agent_b,
        jaeger,
        _servers: servers,
        a,
        b,
    }
}

/// `key=value` of an access log line (quotes taken off).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if rest.is_empty() || rest.starts_with(' ') {
        return Some("");
    }
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.split('"').next();
    }
    rest.split_whitespace().next()
}

/// The agent's access log lines (`connection` events).
fn access_lines(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|line| line.contains(" access:") || line.contains("access: connection"))
        .filter(|line| line.contains(" trace_id="))
        .map(str::to_owned)
        .collect()
}

/// Every field the access log and the span share must agree.
fn assert_matches_log(span: &Span, line: &str) {
    for key in [
        "reporter",
        "src",
        "src_workload",
        "src_namespace",
        "src_identity",
        "dst",
        "dst_service",
        "dst_workload",
        "dst_namespace",
        "dst_identity",
        "endpoint",
        "mtls",
        "sent",
        "received",
        "duration_ms",
        "result",
        "retries",
    ] {
        let logged = field(line, key).unwrap_or_else(|| panic!("no {key} in {line}"));
        assert_eq!(
            span.tag(key).as_deref().unwrap_or(""),
            logged,
            "{key}: span {span:?}\nlog {line}"
        );
    }
}

#[test]
fn a_cross_node_connection_is_one_trace_with_a_span_per_node() {
    let t = setup("trace", 1.0);
    let report = &t.a.pod("client").connect(
        VIP.parse().unwrap(),
        Connect {
            send: 100_000,
            ..Default::default()
        },
    )[0];
    assert_eq!(greeting(report).0, "server");

    let mut lines = (Vec::new(), Vec::new());
    eventually("both agents' access log lines", || {
        lines = (access_lines(&t.agent_a), access_lines(&t.agent_b));
        !lines.0.is_empty() && !lines.1.is_empty()
    });
    let (source_line, destination_line) = (&lines.0[0], &lines.1[0]);
    let trace_id = field(source_line, "trace_id").unwrap();
    assert_eq!(trace_id.len(), 32, "{source_line}");
    assert_eq!(
        field(destination_line, "trace_id"),
        Some(trace_id),
        "one trace across nodes:\n{source_line}\n{destination_line}"
    );

    let mut spans = Vec::new();
    eventually("both spans in Jaeger", || {
        spans = t.jaeger.trace(trace_id);
        spans.len() == 2
    });
    let by_service = |service: &str| {
        spans
            .iter()
            .find(|s| s.service == service)
            .unwrap_or_else(|| panic!("no span from {service}: {spans:?}"))
            .clone()
    };
    let (source, destination) = (by_service("mesh-agent-a"), by_service("mesh-agent-b"));
    assert_eq!(Some(source.span_id.as_str()), field(source_line, "span_id"));
    assert_eq!(source.parent, None, "the source's span is the root");
    assert_eq!(
        destination.parent.as_deref(),
        Some(source.span_id.as_str()),
        "the destination's span is the source's child"
    );
    assert_eq!(
        Some(destination.span_id.as_str()),
        field(destination_line, "span_id")
    );
    assert_eq!(source.tag("span.kind").as_deref(), Some("client"));
    assert_eq!(destination.tag("span.kind").as_deref(), Some("server"));
    assert_eq!(source.name, "outbound web.default.svc.cluster.local");
    assert_matches_log(&source, source_line);
    assert_matches_log(&destination, destination_line);
    // What README shows: the trace as Jaeger's API gives it, abridged.
    for span in [&source, &destination] {
        let tags: serde_json::Map<_, _> = [
            "src_workload",
            "dst_service",
            "dst_workload",
            "endpoint",
            "mtls",
            "sent",
            "received",
            "duration_ms",
            "result",
            "response_flags",
            "span.kind",
        ]
        .iter()
        .filter_map(|key| Some((key.to_string(), span.tags.get(*key)?.clone())))
        .chain(
            span.tags
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(key, _)| key.starts_with("baggage."))
                .map(|(key, value)| (key.clone(), value.clone())),
        )
        .collect();
        println!(
            "{}",
            serde_json::json!({
                "traceID": span.trace_id,
                "spanID": span.span_id,
                "parent": span.parent,
                "service": span.service,
                "operationName": span.name,
                "tags": tags,
            })
        );
    }
    assert_eq!(source.tag("sent").as_deref(), Some("100000"));
    assert_eq!(source.tag("mtls").as_deref(), Some("true"));
    // What node 1 sent as baggage, kept by node 2.
    assert_eq!(
        destination.tag("baggage.service.name").as_deref(),
        Some("client")
    );
    assert_eq!(
        destination.tag("baggage.k8s.namespace.name").as_deref(),
        Some("default")
    );

    // A foreign HBONE client's (a ztunnel's) trace context is honoured the
    // same way: the span joins its trace, under its span.
    let foreign_trace = "5f0c3a1e9b7d44c2a8e61f0d2b3c4d5e";
    let foreign_parent = "1a2b3c4d5e6f7081";
    let server = t.b.pod("server").ip;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let mut sender = raw_hbone::connect(
            &t.a.netns,
            &t.a.ca_dir,
            &SpiffeId::new("cluster.local", "default", "client"),
            &SpiffeId::new("cluster.local", "default", "server"),
            SocketAddr::from((server, 15008)),
        )
        .await?;
        let mut request = raw_hbone::connect_request(SocketAddr::from((server, 8080)));
        request.headers_mut().insert(
            "traceparent",
            format!("00-{foreign_trace}-{foreign_parent}-01")
                .parse()
                .unwrap(),
        );
        request.headers_mut().insert(
            "baggage",
            "k8s.namespace.name=default,k8s.deployment.name=client"
                .parse()
                .unwrap(),
        );
        raw_hbone::answer(&mut sender, request).await
    });
    assert_eq!(status, Ok(200));
    drop(runtime);
    let mut foreign = Vec::new();
    eventually("the span under the foreign parent", || {
        foreign = t.jaeger.trace(foreign_trace);
        !foreign.is_empty()
    });
    assert_eq!(foreign.len(), 1, "{foreign:?}");
    assert_eq!(foreign[0].service, "mesh-agent-b");
    assert_eq!(foreign[0].parent.as_deref(), Some(foreign_parent));
    assert_eq!(
        foreign[0].tag("baggage.k8s.deployment.name").as_deref(),
        Some("client")
    );
    eventually("node 2's two spans counted exported", || {
        tracing_stat(&t.agent_b, "exported") == 2
    });
    assert_eq!(tracing_stat(&t.agent_a, "exported"), 1);
}

/// `count` connections from `client` to `vip`, one after another; how
/// long they took.
fn connections(t: &Setup, vip: &str, count: u32) -> Duration {
    let started = Instant::now();
    let reports = t.a.pod("client").connect(
        vip.parse().unwrap(),
        Connect {
            count,
            ..Default::default()
        },
    );
    let took = started.elapsed();
    assert_eq!(reports.len(), count as usize);
    for report in &reports {
        greeting(report);
    }
    took
}

fn tracing_stat(agent: &Agent, key: &str) -> u64 {
    agent.stats()["tracing"][key].as_u64().unwrap_or_default()
}

#[test]
fn sampling_holds_its_ratio_and_a_dead_collector_costs_nothing() {
    let mut t = setup("sampling", 0.3);
    const N: u32 = 1000;
    connections(&t, LOCAL_VIP, N);
    let mut exported = 0;
    eventually("every sampled span exported", || {
        exported = tracing_stat(&t.agent_a, "exported");
        exported > 0 && exported == tracing_stat(&t.agent_a, "queued")
    });
    let share = exported as f64 / f64::from(N);
    println!("sampled {exported} of {N} connections at ratio 0.3: {share:.3}");
    assert!((share - 0.3).abs() <= 0.05, "sampled {exported} of {N}");
    let mut stored = 0;
    eventually("Jaeger holds every exported span", || {
        stored = t.jaeger.traces_of("mesh-agent-a", 2 * N as usize).len() as u64;
        stored == exported
    });
    assert_eq!(tracing_stat(&t.agent_a, "dropped"), 0);

    // The collector goes away: proxying must neither fail nor slow, and
    // every span is accounted for as lost.
    t.jaeger.stop();
    let tracing_on = tracing_yaml(
        &format!("http://127.0.0.1:{OTLP_GRPC_PORT}"),
        "grpc",
        1.0,
        "mesh-agent-a",
    );
    t.agent_a.reload(&config_a(&t.a, &t.b, &tracing_on));
    assert!(t.agent_a.wait_log("tracing on", 2, Duration::from_secs(10)));
    let before = (
        tracing_stat(&t.agent_a, "failed"),
        tracing_stat(&t.agent_a, "dropped"),
    );
    let down = connections(&t, LOCAL_VIP, N);
    eventually(
        "every span of the dead collector's phase counted lost",
        || {
            let lost = tracing_stat(&t.agent_a, "failed") + tracing_stat(&t.agent_a, "dropped")
                - before.0
                - before.1;
            lost == u64::from(N)
        },
    );
    assert_eq!(tracing_stat(&t.agent_a, "exported"), exported);
    assert!(tracing_stat(&t.agent_a, "export_errors") > 0);
    t.agent_a.reload(&config_a(&t.a, &t.b, ""));
    assert!(
        t.agent_a
            .wait_log("tracing off", 1, Duration::from_secs(10))
    );
    let off = connections(&t, LOCAL_VIP, N);
    println!(
        "{N} connections: collector down, every one sampled {:.0} ms, tracing off {:.0} ms (ratio {:.2})",
        down.as_secs_f64() * 1e3,
        off.as_secs_f64() * 1e3,
        down.as_secs_f64() / off.as_secs_f64()
    );
    assert!(
        t.agent_a.log().contains("tracing: export failed"),
        "the failure is logged"
    );
}
