//! The dataplane foundation, end to end on the real kernel: a simulated node
//! (network namespace + cgroup), pods (namespaces on veths, own cgroups),
//! the real `mesh-agent` binary, and real TCP between `mesh-pod` processes.
//! Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::Agent,
    bpftool,
    pod::{Connect, Server},
    scenario::{ECHO_VIP, echo_config, greeting},
    topology::Node,
};
use serde_json::Value;

const VIP: &str = ECHO_VIP;
const RESET_VIP: &str = "10.96.0.11:80";
const GIB: u64 = 1 << 30;

/// One node: `client`, two backends `be1`/`be2` behind the service VIP, a
/// backend `rst` that resets every connection (behind RESET_VIP), and a
/// pod `plain` that is not meshed. Fields drop in order: agent first.
struct SingleNode {
    agent: Agent,
    servers: BTreeMap<&'static str, Server>,
    node: Node,
}

fn single_node(label: &str) -> SingleNode {
    let mut node = Node::new(label, 1);
    for pod in ["client", "be1", "be2", "rst", "plain"] {
        node.add_pod(pod);
    }
    // With the fast path (off by default), so the agent's whole kernel
    // state is loaded, pinned and cleaned up here.
    let config = echo_config(
        &node,
        &["client", "be1", "be2", "rst"],
        &["be1", "be2"],
        &format!(
            "  - name: resetter\n    vip: 10.96.0.11\n    ports: [{{ port: 80, target_port: 8080 }}]\n    endpoints: [{{ ip: {} }}]\nproxy: {{ fast_path: true }}\n",
            node.pod("rst").ip
        ),
    );
    let mut servers = BTreeMap::new();
    for name in ["be1", "be2", "plain"] {
        servers.insert(name, node.pod(name).serve(8080, name, false));
    }
    servers.insert("rst", node.pod("rst").serve(8080, "rst", true));
    let agent = Agent::start(&node, &config);
    SingleNode {
        agent,
        servers,
        node,
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn pod_stats<'a>(stats: &'a Value, interface: &str) -> &'a Value {
    stats["kernel"]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["interface"] == interface)
        .unwrap_or_else(|| panic!("no pod stats for {interface}: {stats}"))
}

fn conns(stats: &Value) -> Vec<Value> {
    stats["kernel"]["conns"].as_array().unwrap().clone()
}

#[test]
fn pod_to_vip_reaches_the_backends_through_the_agent() {
    let s = single_node("vip");
    let reports = s.node.pod("client").connect(
        addr(VIP),
        Connect {
            count: 6,
            ..Default::default()
        },
    );

    let mut per_backend = BTreeMap::new();
    for report in &reports {
        let (name, peer) = greeting(report);
        // The backend sees the client's address, on a connection of the
        // agent's (another port than the client's own).
        let local = addr(report["local"].as_str().unwrap());
        assert_eq!(peer.ip(), local.ip(), "{report}");
        assert_ne!(peer.port(), local.port(), "{report}");
        *per_backend.entry(name).or_insert(0) += 1;
    }
    assert_eq!(
        per_backend,
        BTreeMap::from([("be1".into(), 3), ("be2".into(), 3)])
    );

    let stats = s.agent.stats();
    assert_eq!(stats["outbound"]["accepted"], 6, "{stats}");
    assert_eq!(stats["kernel"]["counters"]["captured"], 6, "{stats}");
    let client = pod_stats(&stats, "p-client");
    assert_eq!(client["captured"], 6);
    assert!(
        client["packets_from_pod"].as_u64().unwrap() >= 6 * 3,
        "{client}"
    );
    assert!(client["bytes_to_pod"].as_u64().unwrap() > 0, "{client}");
}

#[test]
fn backends_see_the_clients_address_where_their_replies_come_back_to_the_agent() {
    let mut node = Node::new("source", 1);
    for pod in ["client", "be", "plain"] {
        node.add_pod(pod);
    }
    let ip = |pod: &str| node.pod(pod).ip;
    // Round robin over a meshed pod, a pod outside the mesh and the client
    // itself: three connections, one to each.
    let config = |proxy: &str| {
        format!(
            "{node_yaml}{proxy}workloads:\n{client}{be}services:
  - name: mixed
    vip: 10.96.0.20
    policy: round_robin
    locality: off
    ports: [{{ port: 80, target_port: 8080 }}]
    endpoints: [{{ ip: {be_ip} }}, {{ ip: {plain} }}, {{ ip: {client_ip} }}]
",
            node_yaml = node.node_yaml(),
            client = node.workload_yaml("client"),
            be = node.workload_yaml("be"),
            be_ip = ip("be"),
            plain = ip("plain"),
            client_ip = ip("client"),
        )
    };
    let _servers: Vec<Server> = ["client", "be", "plain"]
        .iter()
        .map(|pod| node.pod(pod).serve(8080, pod, false))
        .collect();
    let seen = || -> BTreeMap<String, Ipv4Addr> {
        let reports = node.pod("client").connect(
            addr("10.96.0.20:80"),
            Connect {
                count: 3,
                ..Default::default()
            },
        );
        reports
            .iter()
            .map(|report| {
                let (name, peer) = greeting(report);
                let SocketAddr::V4(peer) = peer else {
                    panic!("{report}")
                };
                (name, *peer.ip())
            })
            .collect()
    };
    let expect = |be: Ipv4Addr| {
        BTreeMap::from([
            ("be".to_owned(), be),
            // Its replies would go straight to the client, not the agent.
            ("plain".to_owned(), node.ip),
            // A packet from its own address would be a martian to it.
            ("client".to_owned(), node.ip),
        ])
    };

    let agent = Agent::start(&node, &config(""));
    assert_eq!(seen(), expect(ip("client")));
    drop(agent);

    let _agent = Agent::start(&node, &config("proxy: { preserve_client_ip: false }\n"));
    assert_eq!(seen(), expect(node.ip));
}

#[test]
fn traffic_to_or_from_non_meshed_pods_bypasses_the_agent() {
    let s = single_node("bypass");
    let client = s.node.pod("client");
    let plain = s.node.pod("plain");

    // Meshed pod to a non-meshed destination: forwarded by the node as usual.
    let to_plain = client.connect(SocketAddr::from((plain.ip, 8080)), Connect::default());
    let (name, peer) = greeting(&to_plain[0]);
    assert_eq!(
        (name.as_str(), peer.ip()),
        ("plain", client.ip.into()),
        "{}",
        to_plain[0]
    );

    // Non-meshed pod to a meshed pod: no program on its interface, untouched.
    let be1 = s.node.pod("be1").ip;
    let from_plain = plain.connect(SocketAddr::from((be1, 8080)), Connect::default());
    let (name, peer) = greeting(&from_plain[0]);
    assert_eq!(
        (name.as_str(), peer.ip()),
        ("be1", plain.ip.into()),
        "{}",
        from_plain[0]
    );

    let stats = s.agent.stats();
    assert_eq!(stats["outbound"]["accepted"], 0, "{stats}");
    assert_eq!(stats["kernel"]["counters"]["captured"], 0, "{stats}");
    // The client's program saw the packets and let them pass.
    assert!(
        pod_stats(&stats, "p-client")["packets_from_pod"]
            .as_u64()
            .unwrap()
            >= 3
    );
}

#[test]
fn the_agents_own_connections_are_not_captured() {
    let s = single_node("own");
    let client = s.node.pod("client");
    let held = client.hold(addr(VIP));
    // `peer` is the agent's upstream socket, bound to the client's address.
    let (backend, peer) = greeting(&serde_json::json!({ "greeting": held.greeting }));
    assert_eq!(peer.ip(), client.ip);

    // While the connection is open the tracker holds the pod's two sockets
    // (client outbound to the VIP, backend inbound from the agent) and none
    // of the agent's: its sockets live outside the pods' cgroups and its
    // upstream packets never cross a pod's ingress hook.
    let stats = s.agent.stats();
    let tracked = conns(&stats);
    assert_eq!(
        stats["kernel"]["conns_tracked"].as_u64(),
        Some(tracked.len() as u64),
        "{stats}"
    );
    let client_side = format!("{}", held.local);
    assert!(
        tracked.iter().any(|c| c["local"] == client_side.as_str()
            && c["remote"] == VIP
            && c["direction"] == 1),
        "client socket not tracked: {tracked:?}"
    );
    let backend_ip = s.node.pod(&backend).ip;
    let agent_side = peer.to_string();
    assert!(
        tracked
            .iter()
            .any(|c| c["local"] == format!("{backend_ip}:8080")
                && c["remote"] == agent_side.as_str()
                && c["direction"] == 2),
        "backend socket not tracked: {tracked:?}"
    );
    assert!(
        !tracked.iter().any(|c| c["local"] == agent_side.as_str()),
        "the agent's upstream socket was tracked: {tracked:?}"
    );
    let report = held.release();
    assert_eq!(
        report["reply"],
        format!("0 {}", report["sent_sha256"].as_str().unwrap()),
        "{report}"
    );

    // More connections: each is accepted exactly once and reaches a backend
    // exactly once (a captured upstream would loop back into the agent).
    client.connect(
        addr(VIP),
        Connect {
            count: 4,
            ..Default::default()
        },
    );
    let stats = s.agent.stats();
    assert_eq!(stats["outbound"]["accepted"], 5, "{stats}");
    assert_eq!(stats["kernel"]["counters"]["captured"], 5, "{stats}");
    let served = || -> usize {
        ["be1", "be2"]
            .iter()
            .map(|b| s.servers[b].connections().len())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while served() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(served(), 5);
}

#[test]
fn a_thousand_short_connections_leave_the_tracking_map_bounded() {
    let s = single_node("short");
    let reports = s.node.pod("client").connect(
        addr(VIP),
        Connect {
            count: 1000,
            ..Default::default()
        },
    );
    assert_eq!(reports.len(), 1000);
    let bad: Vec<&Value> = reports
        .iter()
        .filter(|r| !r["reply"].as_str().is_some_and(|t| t.starts_with("0 ")))
        .collect();
    assert!(bad.is_empty(), "{} bad, e.g. {:?}", bad.len(), bad.first());

    // Entries leave with their sockets: once the last close is processed
    // the map is empty again, and every tracked socket was forgotten.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = s.agent.stats();
        if conns(&stats).is_empty() || Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        conns(&stats),
        Vec::<Value>::new(),
        "tracking map did not drain"
    );
    let counters = &stats["kernel"]["counters"];
    // Client side and backend side of each connection.
    assert!(
        counters["conn_tracked"].as_u64().unwrap() >= 2000,
        "{counters}"
    );
    assert_eq!(
        counters["conn_tracked"], counters["conn_closed"],
        "{counters}"
    );

    // bpftool reads the same (empty) map from the pin.
    let dump = bpftool(&[
        "map",
        "dump",
        "pinned",
        &format!("{}/maps/MESH_CONNS", s.node.pin_root.display()),
    ])
    .expect("bpftool map dump");
    assert_eq!(dump.as_array().map(Vec::len), Some(0), "{dump}");
}

#[test]
fn a_gibibyte_arrives_intact_and_half_close_works() {
    let s = single_node("gib");
    let report = &s.node.pod("client").connect(
        addr(VIP),
        Connect {
            send: GIB,
            ..Default::default()
        },
    )[0];
    assert_eq!(report["sent"], GIB);
    // The server answers only after it read end-of-stream (our half-close),
    // and its answer travels back on the still-open reverse direction.
    let expected = format!("{GIB} {}", report["sent_sha256"].as_str().unwrap());
    assert_eq!(report["reply"], expected.as_str(), "{report}");
    let stats = s.agent.stats();
    assert!(
        pod_stats(&stats, "p-client")["bytes_from_pod"]
            .as_u64()
            .unwrap()
            > GIB,
        "tc counted less than was sent: {stats}"
    );
}

#[test]
fn resets_propagate_both_ways() {
    let s = single_node("reset");
    let client = s.node.pod("client");

    // The backend resets: the client must see a reset, not a clean end.
    // A reset may discard the greeting still in flight, so any step may fail.
    let report = &client.connect(addr(RESET_VIP), Connect::default())[0];
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("reset"), "client saw no reset: {report}");

    // The client resets: the backend must see a reset.
    let report = &client.connect(
        addr(VIP),
        Connect {
            reset: true,
            ..Default::default()
        },
    )[0];
    let (backend, _) = greeting(report);
    let seen = s.servers[backend.as_str()].wait_connections(1, Duration::from_secs(10));
    let error = seen[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("reset"), "backend saw no reset: {seen:?}");
}

fn run_with_config(config: Option<&str>, label: &str) -> (bool, String) {
    agent_with_config("run", config, label)
}

/// `mesh-agent VERB --config` (`run` or `check`) with `config` written to a
/// file (or no file): whether it succeeded, and its stderr.
fn agent_with_config(verb: &str, config: Option<&str>, label: &str) -> (bool, String) {
    let path = std::env::temp_dir().join(mesh_tests::unique_name(label));
    if let Some(config) = config {
        std::fs::write(&path, config).unwrap();
    }
    let pin_root = Path::new("/sys/fs/bpf").join(mesh_tests::unique_name(label));
    let mut command = std::process::Command::new(mesh_tests::mesh_agent_bin());
    command.args([verb, "--config"]).arg(&path);
    if verb == "run" {
        command.arg("--pin-root").arg(&pin_root);
    }
    let output = command.output().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        !pin_root.exists(),
        "a refused config must not touch the kernel"
    );
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_config_is_refused_with_an_error_naming_the_problem() {
    let good = "node: { name: n1 }
workloads:
  - { name: a, ips: [10.11.0.2], interface: p-a }
services:
  - name: web
    vip: 10.96.0.10
    ports: [{ port: 80 }]
";
    let cases = [
        (
            good.replace("name: web", "name: web\n    colour: blue"),
            vec!["unknown field `colour`", "line 6"],
        ),
        (
            good.replace("10.96.0.10", "10.96.0.300"),
            vec!["services[0].vip", "line 6"],
        ),
        (
            format!("{good}  - {{ name: web2, vip: 10.96.0.10, ports: [{{ port: 80 }}] }}\n"),
            vec!["services[1].ports[0]", "duplicate VIP 10.96.0.10:80"],
        ),
    ];
    let cases = cases.into_iter().chain([
        // Fields that `check` let through and `run` then panicked on or
        // misbehaved with.
        (
            good.replace(
                "node: { name: n1 }",
                "node: { name: n1 }\nproxy: { outbound_port: 15020 }",
            ),
            vec!["proxy.outbound_port", "--metrics", "line 2"],
        ),
        (
            good.replace(
                "node: { name: n1 }",
                "node: { name: n1 }\nidentity: { cert_lifetime_s: 1000000000000 }",
            ),
            vec!["identity.cert_lifetime_s", "line 2"],
        ),
        (
            good.replace("10.96.0.10", "0.0.0.0"),
            vec!["services[0].vip", "not a pod or service address"],
        ),
    ]);
    for (config, expected) in cases {
        // `check` says what `run` says, and neither accepts.
        for verb in ["run", "check"] {
            let (ok, stderr) = agent_with_config(verb, Some(&config), "badcfg");
            assert!(!ok, "{verb} accepted a bad config:\n{config}");
            for needle in &expected {
                assert!(
                    stderr.contains(needle),
                    "{verb}: error lacks {needle:?}: {stderr}"
                );
            }
        }
    }
    let (ok, stderr) = run_with_config(None, "nocfg");
    assert!(!ok);
    assert!(
        stderr.contains("reading config") && stderr.contains("No such file"),
        "{stderr}"
    );
}

/// Kernel object ids of everything pinned under the agent's root.
struct PinnedIds {
    programs: Vec<u64>,
    maps: Vec<u64>,
    links: Vec<u64>,
}

fn pinned_ids(pin_root: &Path) -> PinnedIds {
    let ids = |dir: &str, kind: &str| -> Vec<u64> {
        std::fs::read_dir(pin_root.join(dir))
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                let info = bpftool(&[kind, "show", "pinned", path.to_str().unwrap()])
                    .unwrap_or_else(|| panic!("bpftool {kind} show pinned {}", path.display()));
                info["id"].as_u64().unwrap()
            })
            .collect()
    };
    PinnedIds {
        programs: ids("progs", "prog"),
        maps: ids("maps", "map"),
        links: ids("links", "link"),
    }
}

fn assert_running_state(s: &SingleNode) -> PinnedIds {
    let ids = pinned_ids(&s.node.pin_root);
    // Every program but mesh_connect4, which loads only with
    // proxy.same_node_direct (this node runs without it).
    assert_eq!(ids.programs.len(), mesh_common::programs::ALL.len() - 1);
    assert_eq!(ids.maps.len(), mesh_common::maps::ALL.len());
    // 2 tc links per meshed pod (4 pods) + sock_ops on the node cgroup +
    // the listener lookup on the node's namespace.
    assert_eq!(ids.links.len(), 10);
    // bpftool lists the programs and maps by name.
    let programs = bpftool(&["prog", "show"]).unwrap();
    for id in &ids.programs {
        let program = programs
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == *id)
            .unwrap();
        assert!(
            program["name"].as_str().unwrap().starts_with("mesh_"),
            "{program}"
        );
    }
    let cgroup = bpftool(&["cgroup", "show", s.node.cgroup.path().to_str().unwrap()]).unwrap();
    assert_eq!(cgroup.as_array().unwrap().len(), 1, "{cgroup}");
    assert!(s.node.netns.ip(&["rule"]).contains("fwmark 0x200/0xf00"));
    ids
}

/// Waits (bounded) until bpftool no longer finds `kind` `id`: the kernel
/// frees programs and maps asynchronously once the last reference is gone.
fn assert_freed(kind: &str, id: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while bpftool(&[kind, "show", "id", &id.to_string()]).is_some() {
        assert!(Instant::now() < deadline, "{kind} {id} still in the kernel");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_nothing_left(s: &SingleNode, ids: &PinnedIds) {
    assert!(!s.node.pin_root.exists(), "pin root left behind");
    for id in &ids.links {
        assert_freed("link", *id);
    }
    for id in &ids.programs {
        assert_freed("prog", *id);
    }
    for id in &ids.maps {
        assert_freed("map", *id);
    }
    let cgroup = bpftool(&["cgroup", "show", s.node.cgroup.path().to_str().unwrap()]);
    assert!(
        cgroup
            .as_ref()
            .is_none_or(|c| c.as_array().is_none_or(Vec::is_empty)),
        "{cgroup:?}"
    );
    assert!(
        !s.node.netns.ip(&["rule"]).contains("fwmark"),
        "steer rule left"
    );
    assert!(
        s.node
            .netns
            .ip(&["route", "show", "table", "100"])
            .is_empty(),
        "local route left"
    );
}

#[test]
fn sigterm_leaves_nothing_behind() {
    let mut s = single_node("term");
    // Traffic first, so the agent shuts down with real state behind it.
    s.node.pod("client").connect(
        addr(VIP),
        Connect {
            count: 3,
            ..Default::default()
        },
    );
    let ids = assert_running_state(&s);
    let status = s.agent.terminate();
    assert!(status.success(), "agent exit {status}:\n{}", s.agent.log());
    assert_nothing_left(&s, &ids);
}

#[test]
fn cleanup_after_sigkill_leaves_nothing_behind() {
    let mut s = single_node("kill");
    s.node.pod("client").connect(
        addr(VIP),
        Connect {
            count: 3,
            ..Default::default()
        },
    );
    let ids = assert_running_state(&s);
    s.agent.kill();
    // Killed, the agent left its pins, so its programs are still attached.
    assert!(s.node.pin_root.exists());
    assert!(bpftool(&["link", "show", "id", &ids.links[0].to_string()]).is_some());
    let output = s.agent.cleanup();
    assert!(
        output.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_nothing_left(&s, &ids);
    // A meshed pod's traffic to a non-meshed address still flows afterwards.
    let plain = s.node.pod("plain").ip;
    let report = &s
        .node
        .pod("client")
        .connect(SocketAddr::from((plain, 8080)), Connect::default())[0];
    assert_eq!(greeting(report).1.ip(), s.node.pod("client").ip);
}

#[test]
fn node_addresses_are_distinct() {
    // Guards the topology's addressing plan that the tests above rely on.
    let mut node = Node::new("addr", 2);
    let a = node.add_pod("a").ip;
    let b = node.add_pod("b").ip;
    assert_eq!(node.ip, Ipv4Addr::new(10, 0, 0, 2));
    assert_ne!(a, b);
}
