//! Metrics and access logs, checked against known traffic, a real
//! exposition parser (promtool) and a real Prometheus server. Needs root.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{Agent, sample},
    pod::{Connect, Server},
    process::{self, Guarded},
    topology::Node,
};

const VIP: &str = "10.96.0.10:80";

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

/// Scrapes until `ready` holds (at most 10 s), and returns that scrape.
fn scrape_until(agent: &Agent, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = agent.metrics();
        if ready(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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

    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "be1"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("connection_security_policy", "none"),
        ("response_flags", "-"),
    ];
    // The agent records the close just after the client has its answer.
    let text = scrape_until(&c.agent, |text| {
        sample(text, "istio_tcp_connections_closed_total", &labels) == Some(1.0)
    });
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
    let text = scrape_until(&c.agent, |text| {
        let closed = |b: &str| {
            sample(
                text,
                "istio_tcp_connections_closed_total",
                &[("destination_workload", b)],
            )
            .unwrap_or(0.0)
        };
        closed("be1") + closed("be2") == 4.0
    });

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
        if let Some(value) = json["data"]["result"][0]["value"][1].as_str()
            && value == "4000"
        {
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
    let before = scrape_until(&c.agent, |text| {
        ["be1", "be2"]
            .iter()
            .all(|b| text.contains(&format!("destination_workload=\"{b}\"")))
    });
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
    let after = c.agent.metrics();
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

/// Runs `mesh-agent ARGS` in the node's namespace (where its admin API is).
fn cli(node: &Node, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(mesh_tests::mesh_agent_bin());
    command.args(args);
    process::enter(&mut command, &node.netns.path(), None);
    command.output().expect("mesh-agent CLI")
}

#[test]
fn readiness_waits_for_the_programs_and_config_dump_follows_reloads() {
    let mut node = Node::new("ready", 1);
    node.add_pod("client");
    node.add_pod("be1");
    let _server = node.pod("be1").serve(8080, "be1", false);
    let text = config(&node, &["be1"]);
    let agent = Agent::spawn(&node, &text);
    // From the moment it answers until it is ready: 503, and ready only
    // once every link is pinned (attached).
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((code, _)) = agent.http_get(15021, "/healthz/ready") {
            if code == 200 {
                let links = std::fs::read_dir(node.pin_root.join("links"))
                    .map(|d| d.count())
                    .unwrap_or(0);
                // sock_ops, the listener lookup, and tc both ways on two pods.
                assert_eq!(links, 6, "ready before the programs were attached");
                break;
            }
            seen.push(code);
        }
        assert!(Instant::now() < deadline, "never ready: {}", agent.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        seen.contains(&503),
        "readiness was never observed as not ready: {seen:?}"
    );

    let dump = |agent: &Agent| -> serde_json::Value {
        let (code, body) = agent.http_get(15000, "/config_dump").unwrap();
        assert_eq!(code, 200);
        assert!(
            !body.contains("PRIVATE KEY"),
            "a key leaked into config_dump"
        );
        serde_json::from_str(&body).unwrap()
    };
    let before = dump(&agent);
    assert_eq!(before["config"]["services"][0]["policy"], "round_robin");
    assert_eq!(
        before["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/default/sa/default"
    );
    agent.rewrite_config(&text.replace("policy: round_robin", "policy: random"));
    assert!(agent.wait_log("config reloaded", 1, Duration::from_secs(10)));
    let after = dump(&agent);
    assert_eq!(after["config"]["services"][0]["policy"], "random");
    assert_eq!(after["services"][0]["policy"], "random");
}

#[test]
fn connections_logging_and_the_status_command() {
    let c = cluster("conns", &["be1"]);
    let vip: SocketAddr = VIP.parse().unwrap();
    let held = c.node.pod("client").hold(vip);
    let entry = c.agent.live_connection(held.local);
    assert_eq!(entry["destination"], VIP);
    assert_eq!(entry["destination_workload"], "be1");
    // The server's greeting came back through the agent already.
    assert!(entry["received"].as_u64().unwrap() > 0, "{entry}");
    let active = |text: &str| sample(text, "mesh_outbound_active_connections", &[]);
    assert_eq!(active(&c.agent.metrics()), Some(1.0));

    let table = cli(&c.node, &["connections"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains(&held.local.to_string()),
        "{table:?}"
    );
    let status = cli(&c.node, &["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("service default/web (round_robin)"),
        "{status}"
    );

    // A state change is never a GET (a link or a prefetch could make one).
    let (code, _) = c.agent.http_get(15000, "/logging?level=debug").unwrap();
    assert_eq!(code, 405);
    let (code, _) = c.agent.http("POST", 15000, "/logging?level=debug").unwrap();
    assert_eq!(code, 200);
    assert!(
        c.agent
            .wait_log("log filter changed", 1, Duration::from_secs(5)),
        "{}",
        c.agent.log()
    );
    let (code, _) = c
        .agent
        .http("POST", 15000, "/logging?level=no=such=filter")
        .unwrap();
    assert_eq!(code, 400);
    held.release();
    let text = scrape_until(&c.agent, |text| active(text) == Some(0.0));
    assert_eq!(active(&text), Some(0.0), "{text}");
}

#[test]
fn inspect_and_bpftool_agree_on_the_maps() {
    let c = cluster("inspect", &["be1", "be2"]);
    let output = cli(
        &c.node,
        &["inspect", "--pin-root", c.node.pin_root.to_str().unwrap()],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let inspect: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for (map, key_fields, value_fields) in [
        (
            "MESH_SERVICES",
            &["addr", "port"][..],
            &[
                "service_id",
                "flags",
                "quota_interval_ns",
                "quota_tolerance_ns",
            ][..],
        ),
        (
            "MESH_WORKLOADS",
            &[][..],
            &[
                "workload_id",
                "flags",
                "quota_interval_ns",
                "quota_tolerance_ns",
            ][..],
        ),
    ] {
        let path = c.node.pin_root.join("maps").join(map);
        let bpftool = mesh_tests::bpftool(&["map", "dump", "pinned", path.to_str().unwrap()])
            .expect("bpftool map dump");
        let project = |entry: &serde_json::Value| -> String {
            let key = if key_fields.is_empty() {
                entry["key"].to_string()
            } else {
                key_fields
                    .iter()
                    .map(|f| entry["key"][f].to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let value = value_fields
                .iter()
                .map(|f| entry["value"][f].to_string())
                .collect::<Vec<_>>()
                .join(",");
            format!("{key}={value}")
        };
        // bpftool -j gives raw bytes under key/value and the BTF-decoded
        // fields under `formatted`.
        let mut from_bpftool: Vec<String> = bpftool
            .as_array()
            .unwrap()
            .iter()
            .map(|e| project(e.get("formatted").unwrap_or(e)))
            .collect();
        let mut from_inspect: Vec<String> = inspect[map]
            .as_array()
            .unwrap()
            .iter()
            .map(project)
            .collect();
        from_bpftool.sort();
        from_inspect.sort();
        assert!(!from_bpftool.is_empty(), "{map} is empty");
        assert_eq!(from_inspect, from_bpftool, "{map}");
    }
}

#[test]
fn observe_streams_connections_and_graph_renders() {
    let c = cluster("observe", &["be1"]);
    let mut command = Command::new(mesh_tests::mesh_agent_bin());
    command
        .arg("observe")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    process::enter(&mut command, &c.node.netns.path(), None);
    let mut child = command.spawn().expect("observe");
    let stdout = child.stdout.take().unwrap();
    let _observer = Guarded::new(child);
    let (lines, _) = process::Lines::collect(stdout);
    let vip: SocketAddr = VIP.parse().unwrap();
    // The observer subscribes once its request arrives; connect until it reports.
    let deadline = Instant::now() + Duration::from_secs(15);
    while lines.snapshot().is_empty() {
        assert!(Instant::now() < deadline, "observe printed nothing");
        c.node.pod("client").connect(
            vip,
            Connect {
                send: 10,
                ..Default::default()
            },
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let line = lines.snapshot()[0].clone();
    for needle in [
        "client",
        "be1",
        "OK",
        "sent=10",
        "spiffe://cluster.local/ns/default/sa/default",
    ] {
        assert!(line.contains(needle), "observe line lacks {needle}: {line}");
    }

    let graph = cli(&c.node, &["graph"]);
    let dot = String::from_utf8_lossy(&graph.stdout).into_owned();
    assert!(
        dot.contains("\"default/client\" -> \"default/be1\""),
        "{dot}"
    );
    let mut render = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("graphviz dot");
    std::io::Write::write_all(render.stdin.as_mut().unwrap(), dot.as_bytes()).unwrap();
    let svg = render.wait_with_output().unwrap();
    assert!(
        svg.status.success() && String::from_utf8_lossy(&svg.stdout).contains("<svg"),
        "dot rejected:\n{dot}"
    );
}
