//! The same-node fast paths: every behaviour is checked on each of the
//! three ways a same-node connection can go, and must be the same:
//! - through the agent (the default);
//! - spliced (`proxy.fast_path`: `mesh_splice`, sk_skb redirect between
//!   the agent's two sockets of a connection; the kernel must have moved
//!   the bytes);
//! - direct (`proxy.same_node_direct`: an allowed pair of pods talks pod
//!   to pod; the agent must not have carried the connection).
//!
//! The server pods are strict, so direct connections also prove that
//! strict mode admits an allowed pair and nothing else. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    agent::Agent,
    bpftool,
    pod::{Connect, Server},
    topology::Node,
};
use serde_json::Value;

const GIB: u64 = 1 << 30;
/// A service whose one endpoint is `be`.
const BE_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), 80);
const MIB: u64 = 1 << 20;

/// One node: `client` and `other` (service account `other`, which policy
/// denies) as clients; `be` echoes its input's length and hash, `rst`
/// resets every connection, `slow` accepts but never reads, `drip` reads
/// 64 KiB every 2 ms (about 30 MiB/s). Fields drop in
/// order: agent first.
struct FastNode {
    agent: Agent,
    servers: Vec<(&'static str, Server)>,
    node: Node,
}

/// How same-node connections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Agent,
    Splice,
    Direct,
}

const PATHS: [Path; 3] = [Path::Agent, Path::Splice, Path::Direct];

fn fast_node(label: &str, path: Path) -> FastNode {
    let (fast_path, direct) = (path == Path::Splice, path == Path::Direct);
    node_with(
        label,
        &format!("proxy: {{ fast_path: {fast_path}, same_node_direct: {direct} }}\n"),
    )
}

/// [`fast_node`] with `proxy` as the config's proxy section (empty: the
/// defaults). `outsider` is a pod of the node outside the mesh.
fn node_with(label: &str, proxy: &str) -> FastNode {
    let mut node = Node::new(label, 1);
    for pod in ["client", "other", "be", "rst", "slow", "drip", "outsider"] {
        node.add_pod(pod);
    }
    let workload = |pod: &str, sa: &str, mode: &str| {
        let p = node.pod(pod);
        format!(
            "  - {{ name: {pod}, service_account: {sa}, ips: [{}], interface: {}, cgroup: {pod}, mode: {mode} }}\n",
            p.ip, p.host_if
        )
    };
    let config = format!(
        "{}{proxy}workloads:\n{}{}{}{}{}{}services:
  - {{ name: be, vip: {}, policy: round_robin, ports: [{{ port: 80, target_port: 8080 }}], endpoints: [{{ ip: {} }}] }}
authorization:
  rules:
    - {{ name: no-other, action: deny, from: {{ principals: ['spiffe://cluster.local/ns/default/sa/other'] }} }}
",
        node.node_yaml(),
        workload("client", "client", "permissive"),
        workload("other", "other", "permissive"),
        workload("be", "be", "strict"),
        workload("rst", "rst", "strict"),
        workload("slow", "slow", "strict"),
        workload("drip", "drip", "strict"),
        BE_VIP.ip(),
        node.pod("be").ip,
    );
    let servers = vec![
        ("be", node.pod("be").serve(8080, "be", false)),
        ("rst", node.pod("rst").serve(8080, "rst", true)),
        (
            "slow",
            node.pod("slow").serve_delayed(8080, "slow", false, 60_000),
        ),
        ("drip", node.pod("drip").serve_slow_reader(8080, "drip", 2)),
    ];
    let agent = Agent::start(&node, &config);
    FastNode {
        agent,
        servers,
        node,
    }
}

impl FastNode {
    fn addr(&self, pod: &str) -> SocketAddr {
        SocketAddr::new(self.node.pod(pod).ip.into(), 8080)
    }

    fn server(&self, name: &str) -> &Server {
        &self.servers.iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// Checks that `pod`'s connection to `addr` is refused before any
    /// upstream exists: a reset, or no greeting.
    fn refused(&self, pod: &str, addr: SocketAddr) {
        let denied = self.node.pod(pod).try_connect(addr, Connect::default());
        if let Ok(reports) = &denied {
            assert!(reports[0]["greeting"].is_null(), "{reports:?}");
        }
    }

    fn spliced_bytes(&self) -> u64 {
        self.agent.counter("spliced_bytes")
    }

    /// Checks that `connections` went the way `path` says: pod to pod
    /// (admitted by the kernel, never captured) or captured by the agent.
    fn went(&self, path: Path, connections: u64) {
        let (direct, captured) = (
            self.agent.counter("direct_admitted"),
            self.agent.counter("captured"),
        );
        if path == Path::Direct {
            assert!(direct >= connections, "{direct} admitted directly");
            assert_eq!(captured, 0, "the agent captured a direct pair");
        } else {
            assert_eq!(direct, 0);
            assert!(captured >= connections, "{captured} captured");
        }
    }
}

/// Every path, each on its own node.
fn every_path(label: &str, check: impl Fn(&FastNode, Path)) {
    for (index, path) in PATHS.into_iter().enumerate() {
        let node = fast_node(&format!("{label}{index}"), path);
        check(&node, path);
    }
}

#[test]
fn a_gibibyte_arrives_intact_with_half_close_and_kernel_byte_counts() {
    every_path("fgib", |s, path| {
        let report = &s.node.pod("client").connect(
            s.addr("be"),
            Connect {
                send: GIB,
                ..Default::default()
            },
        )[0];
        assert_eq!(report["sent"], GIB, "{report}");
        // The server answers after it read our half-close; its answer comes
        // back on the still-open reverse direction.
        let expected = format!("{GIB} {}", report["sent_sha256"].as_str().unwrap());
        assert_eq!(report["reply"], expected.as_str(), "{report}");
        s.went(path, 1);
        let spliced = s.spliced_bytes();
        if path == Path::Splice {
            assert!(spliced >= GIB, "the kernel moved only {spliced} bytes");
        } else {
            assert_eq!(spliced, 0);
        }
        let greeting = report["greeting"].as_str().unwrap().len() as u64 + 1;
        let reply = expected.len() as u64 + 1;
        if path == Path::Direct {
            // No agent socket: the pod counters saw the bytes go by.
            let stats = s.agent.stats();
            let client = s.node.pod("client").host_if.as_str();
            let pods = stats["kernel"]["pods"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let sent = pods
                .iter()
                .find(|pod| pod["interface"] == client)
                .and_then(|pod| pod["bytes_from_pod"].as_u64())
                .unwrap_or(0);
            assert!(
                sent > GIB,
                "client interface counted {sent} bytes: {pods:?}"
            );
            // Segments went straight into the receiving pod.
            let redirected = s.agent.counter("direct_redirected");
            assert!(redirected > 1000, "{redirected} segments redirected");
        }
        // The access record's byte counts are exact on every path (direct:
        // from the kernel's report of the client socket's close).
        let needle = format!("sent={GIB} received={}", greeting + reply);
        assert!(
            s.agent.wait_log(&needle, 1, Duration::from_secs(10)),
            "no access record with {needle} ({path:?}):\n{}",
            s.agent.log()
        );
    });
}

#[test]
fn resets_propagate_both_ways() {
    every_path("frst", |s, path| {
        let client = s.node.pod("client");
        // The server resets: the client sees a reset, not a clean end.
        let report = &client.connect(s.addr("rst"), Connect::default())[0];
        let error = report["error"].as_str().unwrap_or_default();
        assert!(error.contains("reset"), "client saw no reset: {report}");
        // The client resets: the server sees a reset.
        let report = &client.connect(
            s.addr("be"),
            Connect {
                reset: true,
                ..Default::default()
            },
        )[0];
        assert!(report["greeting"].is_string(), "{report}");
        let seen = s.server("be").wait_connections(1, Duration::from_secs(10));
        let error = seen[0]["error"].as_str().unwrap_or_default();
        assert!(error.contains("reset"), "server saw no reset: {seen:?}");
        s.went(path, 2);
        // Both access records say so (direct: from the kernel's reports).
        assert!(
            s.agent.wait_log("result=Reset", 2, Duration::from_secs(10)),
            "{path:?}: no two reset records:\n{}",
            s.agent.log()
        );
    });
}

#[test]
fn a_hundred_parallel_connections_arrive_intact() {
    every_path("fpar", |s, path| {
        let reports = s.node.pod("client").connect(
            s.addr("be"),
            Connect {
                count: 100,
                parallel: 100,
                send: MIB,
                ..Default::default()
            },
        );
        assert_eq!(reports.len(), 100);
        for report in &reports {
            let expected = format!("{MIB} {}", report["sent_sha256"].as_str().unwrap());
            assert_eq!(report["reply"], expected.as_str(), "{report}");
        }
        if path == Path::Splice {
            assert!(s.spliced_bytes() >= 100 * MIB);
        }
        s.went(path, 100);
    });
}

#[test]
fn a_peer_that_does_not_read_holds_the_sender_back() {
    every_path("fbp", |s, path| {
        // Write to a server that never reads until the kernel refuses more.
        let accepted = s.node.pod("client").write_until_stalled(s.addr("slow"));
        // Socket buffers along the path hold some megabytes (about 20 MiB
        // here without the fast path; it adds at most its 4 MiB backlog
        // bound); without back-pressure the sender would never stall.
        eprintln!("{path:?}: {} MiB accepted", accepted / MIB);
        assert!(
            accepted < 64 * MIB,
            "{path:?}: {accepted} bytes accepted by a path to a peer that reads nothing"
        );
        s.went(path, 1);
    });
}

#[test]
fn an_edge_triggered_sender_against_a_slow_reader_never_stalls() {
    every_path("fet", |s, path| {
        // A non-blocking sender that waits for writable edges (as tokio and
        // Go do) keeps filling a path whose far end drains slowly: every
        // time the path is full it must be woken again when room comes.
        let report = &s.node.pod("client").connect(
            s.addr("drip"),
            Connect {
                send: 48 * MIB,
                edge_triggered: true,
                ..Default::default()
            },
        )[0];
        assert!(report["error"].is_null(), "{path:?}: {report}");
        let expected = format!("{} {}", 48 * MIB, report["sent_sha256"].as_str().unwrap());
        assert_eq!(report["reply"], expected.as_str(), "{report}");
        // The same sender against a server that never reads stalls, and
        // says so: the check above can fail.
        let report = &s.node.pod("client").connect(
            s.addr("slow"),
            Connect {
                send: 256 * MIB,
                send_first: true,
                edge_triggered: true,
                ..Default::default()
            },
        )[0];
        let error = report["error"].as_str().unwrap_or_default();
        assert!(error.contains("stalled"), "{path:?}: {report}");
        s.went(path, 2);
        // With the fast path, the slow reader paused it, and the client's
        // half-close while paused sent the connection back to user space.
        let stats = &s.agent.stats()["fast_path"];
        if path == Path::Splice {
            assert!(stats["pauses"].as_u64() > Some(0), "{stats}");
            assert!(
                stats["returned_to_user_space"].as_u64() > Some(0),
                "{stats}"
            );
            assert_eq!(stats["undelivered_resets"], 0, "{stats}");
        } else {
            assert!(stats.is_null(), "{stats}");
        }
    });
}

#[test]
fn a_connection_denied_by_policy_never_gets_a_fast_path() {
    let s = fast_node("fdeny", Path::Splice);
    s.refused("other", s.addr("be"));
    assert_eq!(map_entries(&s, "MESH_SPLICE_TO"), 0);
    assert_eq!(map_entries(&s, "MESH_SPLICE_ON"), 0);
    assert_eq!(s.spliced_bytes(), 0);
    // An admitted connection, held open, does get one: both of its sockets
    // (the upstream's once its first bytes, the greeting, were copied).
    let held = s.node.pod("client").hold(s.addr("be"));
    assert!(held.greeting.starts_with("be "), "{}", held.greeting);
    assert_eq!(map_entries(&s, "MESH_SPLICE_TO"), 2);
    assert_eq!(map_entries(&s, "MESH_SPLICE_ON"), 2);
    let stats: Value = s.agent.stats();
    assert_eq!(stats["outbound"]["denied"], 1, "{stats}");
}

#[test]
fn a_denied_pair_and_a_pod_outside_the_mesh_never_go_direct() {
    let s = fast_node("fdirdeny", Path::Direct);
    // The denied pair has no entry: its SYN goes to the agent, which
    // refuses it and says so.
    s.refused("other", s.addr("be"));
    let stats: Value = s.agent.stats();
    assert_eq!(stats["outbound"]["denied"], 1, "{stats}");
    assert_eq!(s.agent.counter("direct_admitted"), 0);
    assert_eq!(s.agent.counter("captured"), 1);
    // A pod outside the mesh is plaintext to a strict pod, direct pairs
    // or not: dropped.
    let outsider = s
        .node
        .pod("outsider")
        .try_connect(s.addr("be"), Connect::default());
    let got_in = outsider.is_ok_and(|reports| reports[0]["greeting"].is_string());
    assert!(!got_in, "a pod outside the mesh reached a strict pod");
    // Allowed pairs: one entry (port 0: no rule names a port) for each
    // ordered pair of the six meshed pods (30) but other's five.
    assert_eq!(map_entries(&s, "MESH_DIRECT"), 25);
    // The client's connection goes pod to pod, not through the agent.
    let held = s.node.pod("client").hold(s.addr("be"));
    assert!(held.greeting.starts_with("be "), "{}", held.greeting);
    assert_eq!(s.agent.counter("direct_admitted"), 1);
    assert_eq!(s.agent.counter("captured"), 1);
    assert_eq!(s.agent.stats()["outbound"]["accepted"], 1);
    // Both directions of the held connection learnt their way straight
    // into the receiving pod.
    let path = s.agent.pin_root.join("maps").join("MESH_DIR_FLOWS");
    let flows = bpftool(&["map", "dump", "pinned", path.to_str().unwrap()]).unwrap();
    let receivers: Vec<u64> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| entry["formatted"]["value"]["receiver_ifindex"].as_u64())
        .collect();
    let stats = s.agent.stats();
    let interface = |pod: &str| {
        let name = s.node.pod(pod).host_if.as_str();
        let pods = stats["kernel"]["pods"].as_array().unwrap();
        let entry = pods.iter().find(|p| p["interface"] == name).unwrap();
        entry["ifindex"].as_u64().unwrap()
    };
    let mut expected = vec![interface("be"), interface("client")];
    expected.sort();
    let mut receivers = receivers;
    receivers.sort();
    assert_eq!(receivers, expected, "{flows}");
    // Through the service VIP: the kernel picks the endpoint at connect
    // time, and the connection goes pod to pod as well.
    let report = &s.node.pod("client").connect(BE_VIP, Connect::default())[0];
    assert!(
        report["greeting"]
            .as_str()
            .is_some_and(|g| g.starts_with("be ")),
        "{report}"
    );
    assert_eq!(s.agent.counter("direct_balanced"), 1);
    assert_eq!(s.agent.counter("direct_admitted"), 2);
    // The denied pod's connect() is balanced too, but its SYN to the
    // endpoint still reaches the agent, which refuses it.
    s.refused("other", BE_VIP);
    assert_eq!(s.agent.stats()["outbound"]["denied"], 2);
    assert_eq!(s.agent.counter("direct_admitted"), 2);
}

/// Entries of one of the agent's pinned maps, as bpftool dumps it.
fn map_entries(s: &FastNode, map: &str) -> usize {
    let path = s.agent.pin_root.join("maps").join(map);
    bpftool(&["map", "dump", "pinned", path.to_str().unwrap()])
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(usize::MAX)
}
