//! Metrics and access logs, checked against known traffic, a real
//! exposition parser (promtool) and a real Prometheus server. Needs root.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::Agent,
    pod::{Connect, Server},
    process::{self, Guarded},
    topology::Node,
};

const VIP: &str = "10.96.0.10:80";
const METRICS_PORT: u16 = 15020;

struct Cluster {
    agent: Agent,
    _servers: Vec<Server>,
    node: Node,
}

fn config(node: &Node, backends: &[&str]) -> String {
    let mut text = node.node_yaml();
    text.push_str("workloads:\n");
    text.push_str(&node.workload_yaml("client"));
    for backend in backends {
        text.push_str(&node.workload_yaml(backend));
    }
    text.push_str("services:\n  - name: web\n    vip: 10.96.0.10\n    policy: round_robin\n    ports: [{ port: 80, target_port: 8080 }]\n    endpoints:\n");
    for backend in backends {
        text.push_str(&format!("      - {{ ip: {} }}\n", node.pod(backend).ip));
    }
    text
}

fn cluster(label: &str, backends: &[&str]) -> Cluster {
    let mut node = Node::new(label, 1);
    node.add_pod("client");
    for backend in backends {
        node.add_pod(backend);
    }
    let servers = backends
        .iter()
        .map(|b| node.pod(b).serve(8080, b, false))
        .collect();
    let agent = Agent::start(&node, &config(&node, backends));
    Cluster {
        agent,
        _servers: servers,
        node,
    }
}

fn scrape(agent: &Agent) -> String {
    let (code, body) = agent
        .http_get(METRICS_PORT, "/metrics")
        .expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn byte_counters_and_the_access_log_match_a_known_transfer() {
    let c = cluster("bytes", &["be1"]);
    const N: u64 = 1_234_567;
    let vip: SocketAddr = VIP.parse().unwrap();
    let report = &c.node.pod("client").connect(
        vip,
        Connect {
            send: N,
            ..Default::default()
        },
    )[0];
    let greeting = report["greeting"].as_str().unwrap();
    let reply = report["reply"].as_str().unwrap();
    // What the server sent back: the greeting line and the answer line.
    let back = (greeting.len() + 1 + reply.len() + 1) as f64;

    let text = scrape(&c.agent);
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "be1"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("connection_security_policy", "none"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &labels),
        Some(N as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &labels),
        Some(back),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &labels[..5]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &labels),
        Some(1.0),
        "{text}"
    );
    let from_pod = sample(
        &text,
        "mesh_pod_bytes_total",
        &[("workload", "client"), ("direction", "from_pod")],
    )
    .unwrap();
    assert!(
        from_pod >= N as f64,
        "tc counted {from_pod} bytes from the client"
    );

    let log = c.agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("access") && l.contains("src_workload=client"))
        .unwrap_or_else(|| panic!("no access log line:\n{log}"));
    for field in [
        format!("sent={N}"),
        format!("received={back}"),
        "result=Ok".into(),
        "dst_workload=be1".into(),
    ] {
        assert!(line.contains(&field), "access log lacks {field}: {line}");
    }
}

fn prometheus_installed() -> bool {
    Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn promtool_accepts_the_exposition_and_prometheus_scrapes_it() {
    assert!(
        prometheus_installed(),
        "promtool and prometheus are needed (cargo xtask setup installs them)"
    );
    let c = cluster("prom", &["be1", "be2"]);
    let vip: SocketAddr = VIP.parse().unwrap();
    c.node.pod("client").connect(
        vip,
        Connect {
            count: 4,
            send: 1000,
            ..Default::default()
        },
    );
    let text = scrape(&c.agent);

    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let output = check.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // A real Prometheus in the node's namespace scrapes the agent.
    let dir = std::env::temp_dir().join(format!("{}-prometheus", c.node.name));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global: { scrape_interval: 1s }\nscrape_configs:\n  - job_name: mesh\n    static_configs: [{ targets: ['127.0.0.1:15020'] }]\n",
    )
    .unwrap();
    let mut command = Command::new("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:19090")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    process::enter(&mut command, &c.node.netns.path(), None);
    let _prometheus = Guarded::new(command.spawn().expect("prometheus"));
    let query = "/api/v1/query?query=sum(istio_tcp_sent_bytes_total%7Breporter%3D%22source%22%7D)";
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        let answer = c
            .agent
            .http_get(19090, query)
            .map(|(_, body)| body)
            .unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        if let Some(value) = json["data"]["result"][0]["value"][1].as_str() {
            break value.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the series: {answer}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(value, "4000");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_deleted_workloads_series_are_gone_at_the_next_scrape() {
    let c = cluster("deleted", &["be1", "be2"]);
    let vip: SocketAddr = VIP.parse().unwrap();
    c.node.pod("client").connect(
        vip,
        Connect {
            count: 4,
            ..Default::default()
        },
    );
    let before = scrape(&c.agent);
    for workload in ["be1", "be2"] {
        assert!(
            before.contains(&format!("destination_workload=\"{workload}\"")),
            "{before}"
        );
        assert!(
            before.contains(&format!("workload=\"{workload}\"")),
            "{before}"
        );
    }
    c.agent.rewrite_config(&config(&c.node, &["be1"]));
    assert!(
        c.agent
            .wait_log("config reloaded", 1, Duration::from_secs(10))
    );
    let after = scrape(&c.agent);
    assert!(
        !after.contains("\"be2\""),
        "series of the deleted workload remain:\n{after}"
    );
    assert!(after.contains("destination_workload=\"be1\""), "{after}");
    let reloads: BTreeMap<&str, f64> = [(
        "mesh_config_reloads_total",
        sample(&after, "mesh_config_reloads_total", &[]).unwrap_or(0.0),
    )]
    .into();
    assert_eq!(reloads["mesh_config_reloads_total"], 1.0, "{after}");
}
