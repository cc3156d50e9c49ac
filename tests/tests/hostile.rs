//! What a hostile pod can try against its node's agent, from inside the
//! mesh and from outside it: the agent's ports on the node's address, the
//! agent's own listeners as destinations, and client port reuse against
//! servers that close first. Each test failed on the agent before its fix.
//! Needs root.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use mesh_tests::{
    agent::{ADMIN_PORT, Agent, METRICS_PORT, READY_PORT},
    pod::{Connect, Pod},
    topology::Node,
};

const VIP: &str = "10.96.0.10";

/// One HTTP/1.0 request from inside `pod`: the status code and body, or
/// the connect error.
fn http_from(
    pod: &Pod,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    pod.netns.run(|| {
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| e.to_string())?;
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status line in {response:?}"))?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((code, body.to_owned()))
    })
}

/// A node with a meshed client, a pod outside the mesh and a backend
/// behind `web` (VIP:80 → 8080), plus `extra` services.
fn node_with_pods(label: &str) -> Node {
    let mut node = Node::new(label, 1);
    node.add_pod("client");
    node.add_pod("outsider");
    node.add_pod("be1");
    node
}

fn config(node: &Node, extra_services: &str) -> String {
    let mut text = node.node_yaml();
    text.push_str("workloads:\n");
    text.push_str(&node.workload_yaml("client"));
    text.push_str(&node.workload_yaml("be1"));
    text.push_str(&format!(
        "services:\n  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, target_port: 8080 }}]\n    endpoints: [{{ ip: {} }}]\n",
        node.pod("be1").ip
    ));
    text.push_str(extra_services);
    text
}

#[test]
fn pods_reach_only_readiness_and_metrics_on_the_nodes_address() {
    let node = node_with_pods("ports");
    let agent = Agent::start(&node, &config(&node, ""));
    let at = |port| SocketAddr::from((node.ip, port));
    for pod in ["client", "outsider"] {
        let pod = node.pod(pod);
        // Readiness and metrics answer their own paths...
        let (code, _) = http_from(pod, at(READY_PORT), "GET", "/healthz/ready").unwrap();
        assert_eq!(code, 200, "{}", pod.name);
        let (code, body) = http_from(pod, at(METRICS_PORT), "GET", "/metrics").unwrap();
        assert_eq!(code, 200, "{}", pod.name);
        assert!(body.contains("mesh_"), "{body}");
        // ...and nothing else: no log switch, no dumps, no connection lists.
        for port in [READY_PORT, METRICS_PORT] {
            for (method, path) in [
                ("GET", "/logging?level=off"),
                ("POST", "/logging?level=off"),
                ("GET", "/config_dump"),
                ("GET", "/connections"),
                ("GET", "/events"),
                ("GET", "/stats"),
                ("GET", "/graph"),
            ] {
                let (code, _) = http_from(pod, at(port), method, path).unwrap();
                assert_eq!(code, 404, "{} {method} :{port}{path}", pod.name);
            }
        }
        assert_eq!(
            http_from(pod, at(READY_PORT), "GET", "/metrics").unwrap().0,
            404
        );
        assert_eq!(
            http_from(pod, at(METRICS_PORT), "GET", "/healthz/ready")
                .unwrap()
                .0,
            404
        );
        // The admin port is on loopback only.
        assert!(http_from(pod, at(ADMIN_PORT), "GET", "/stats").is_err());
    }
    // Access logs are still on: the pods silenced nothing.
    assert!(
        !agent.log().contains("log filter changed"),
        "{}",
        agent.log()
    );
}

#[test]
fn the_agent_never_connects_to_itself() {
    let node = node_with_pods("self");
    let _server = node.pod("be1").serve(8080, "be1", false);
    // A Service whose endpoints are the agent's own listeners on the
    // node's address (a mistake, or a pod's owner trying it on purpose).
    let loops = format!(
        "  - name: loop\n    vip: 10.96.0.11\n    ports: [{{ port: 80, target_port: 15001 }}, {{ port: 81, target_port: 15008 }}]\n    endpoints: [{{ ip: {} }}]\n",
        node.ip
    );
    let agent = Agent::start(&node, &config(&node, &loops));
    let client = node.pod("client");
    let direct = SocketAddr::from((node.ip, 15001));
    let accepted = || agent.stats()["outbound"]["accepted"].as_u64().unwrap();
    for target in [
        direct,
        "10.96.0.11:80".parse().unwrap(),
        "10.96.0.11:81".parse().unwrap(),
    ] {
        let before = accepted();
        let result = client.try_connect(target, Connect::default());
        // Refused or reset, never carried to anything.
        let carried = result.as_ref().is_ok_and(|reports| {
            reports[0]["greeting"]
                .as_str()
                .is_some_and(|g| !g.is_empty())
        });
        assert!(!carried, "{target}: {result:?}");
        std::thread::sleep(Duration::from_millis(300));
        // One accept for the pod's own connection; a loop would add
        // thousands (and end in EMFILE).
        let added = accepted() - before;
        assert!(added <= 1, "{target}: {added} connections accepted");
    }
    assert!(agent.stats()["outbound"]["not_captured"].as_u64().unwrap() >= 1);
    // Still serving.
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let report = &client.connect(vip, Connect::default())[0];
    assert!(
        report["greeting"].as_str().unwrap().starts_with("be1 "),
        "{report}"
    );
}

#[test]
fn servers_closing_first_never_stall_a_client_reusing_its_port() {
    let node = node_with_pods("twreuse");
    let _server = node.pod("be1").serve_closing_first(8080, "be1");
    let agent = Agent::start(&node, &config(&node, ""));
    let client = node.pod("client");
    // Four ports: every connection reuses a 4-tuple whose agent-side
    // socket closed first moments ago (and so sits in TIME_WAIT).
    client
        .netns
        .sysctl("net.ipv4.ip_local_port_range", "40000 40003");
    let vip = SocketAddr::V4(SocketAddrV4::new(VIP.parse().unwrap(), 80));
    let reports = client.connect(
        vip,
        Connect {
            count: 60,
            wait_close: true,
            ..Default::default()
        },
    );
    let slow: Vec<_> = reports
        .iter()
        .filter(|r| {
            r["duration_ms"].as_u64().unwrap_or(u64::MAX) >= 1000 || r.get("error").is_some()
        })
        .collect();
    assert!(
        slow.is_empty(),
        "{} of {} connections slow or failed: {slow:?}\n{}",
        slow.len(),
        reports.len(),
        agent.stats()["kernel"]["counters"]
    );
    for report in &reports {
        assert!(
            report["greeting"].as_str().unwrap().starts_with("be1 "),
            "{report}"
        );
    }
}
