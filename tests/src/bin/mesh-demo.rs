//! `cargo xtask demo`: two simulated nodes, five pods, an agent per node on
//! a built-in config, real traffic (same node and across nodes over mutual
//! TLS), and what the agents and the kernel saw. Leaves nothing behind.

use std::{net::SocketAddr, process::Command};

use mesh_tests::{
    agent::Agent,
    pod::Connect,
    topology::{self, Node},
};

const VIP: &str = "10.96.0.10:80";

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo creates namespaces and loads BPF programs: run it as root");
        std::process::exit(1);
    }
    let mut node1 = Node::new("demo", 1);
    for pod in ["client", "web-1", "web-2", "legacy"] {
        node1.add_pod(pod);
    }
    let mut node2 = Node::new("demo", 2);
    node2.add_pod("web-3");
    topology::connect(&mut node1, &mut node2);
    let config1 = node1_config(&node1, &node2);
    let config2 = node2_config(&node1, &node2);

    section("Simulated cluster");
    for (node, pods) in [
        (&node1, &["client", "web-1", "web-2", "legacy"][..]),
        (&node2, &["web-3"][..]),
    ] {
        println!(
            "node {} (netns {}, node IP {})",
            node.name,
            node.netns.name(),
            node.ip
        );
        for pod in pods {
            let p = node.pod(pod);
            let meshed = if *pod == "legacy" {
                "not meshed"
            } else {
                "meshed"
            };
            println!(
                "  pod {:<7} {:<11} veth {:<9} {meshed}",
                p.name, p.ip, p.host_if
            );
        }
    }
    section("Built-in agent config, node 1");
    print!("{config1}");

    let _servers = [
        node1.pod("web-1").serve(8080, "web-1", false),
        node1.pod("web-2").serve(8080, "web-2", false),
        node2.pod("web-3").serve(8080, "web-3", false),
        node1.pod("legacy").serve(8080, "legacy", false),
    ];
    // Node 1's agent creates the shared CA, node 2's loads it.
    let mut agent1 = Agent::start(&node1, &config1);
    let agent2 = Agent::start(&node2, &config2);
    println!(
        "\nagents ready (pins under {} and {})",
        agent1.pin_root.display(),
        agent2.pin_root.display()
    );

    section(&format!(
        "client -> service VIP {VIP}: 6 connections, round robin over 3 endpoints"
    ));
    let vip: SocketAddr = VIP.parse().expect("VIP");
    let client = node1.pod("client");
    for (i, report) in client
        .connect(
            vip,
            Connect {
                count: 6,
                ..Default::default()
            },
        )
        .iter()
        .enumerate()
    {
        let greeting = report["greeting"].as_str().unwrap_or("?");
        let (backend, peer) = greeting.split_once(' ').unwrap_or((greeting, "?"));
        let path = if backend == "web-3" {
            "node 1 agent =HBONE: TLS 1.3, mutual SPIFFE identities=> node 2 agent"
        } else {
            "node 1 agent (same node)"
        };
        // The backend sees the client's address, from the agent's socket.
        println!(
            "  #{} answered by {backend:<6} (saw {peer}, client socket {}) via {path}",
            i + 1,
            report["local"].as_str().unwrap_or("?")
        );
    }
    let stats2 = agent2.stats();
    println!(
        "  node 2 accepted {} HBONE stream(s)",
        stats2["inbound"]["streams"]
    );

    section("client -> VIP, 64 MiB with checksum and half-close");
    let report = &client.connect(
        vip,
        Connect {
            send: 64 << 20,
            ..Default::default()
        },
    )[0];
    let intact = report["reply"]
        .as_str()
        .is_some_and(|r| r.ends_with(report["sent_sha256"].as_str().unwrap_or("-")));
    println!(
        "  sent {} bytes, server confirmed \"{}\": {}",
        report["sent"],
        report["reply"].as_str().unwrap_or(""),
        if intact { "intact" } else { "MISMATCH" }
    );

    section("client -> legacy pod (not a meshed destination)");
    let legacy: SocketAddr = (node1.pod("legacy").ip, 8080).into();
    let report = &client.connect(legacy, Connect::default())[0];
    println!(
        "  {} (the client's own socket: the agent was bypassed)",
        report["greeting"].as_str().unwrap_or("?")
    );

    section("What node 1's agent and kernel counted (GET localhost:15000/stats)");
    let stats = agent1.stats();
    println!("  proxy: {}", stats["outbound"]);
    println!("  certificates: {}", stats["certificates"]);
    println!("  kernel counters: {}", stats["kernel"]["counters"]);
    for pod in stats["kernel"]["pods"].as_array().into_iter().flatten() {
        println!(
            "  {:<9} from pod {:>6} pkts {:>10} B | to pod {:>6} pkts {:>10} B | captured {}",
            pod["interface"].as_str().unwrap_or("?"),
            pod["packets_from_pod"],
            pod["bytes_from_pod"],
            pod["packets_to_pod"],
            pod["bytes_to_pod"],
            pod["captured"]
        );
    }
    for endpoint in stats["services"][0]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  endpoint {:<10} local {:<5} healthy {:<5} connections {:>2} ewma {:.3} ms",
            endpoint["ip"].as_str().unwrap_or("?"),
            endpoint["local"],
            endpoint["healthy"],
            endpoint["connections"],
            endpoint["ewma_ms"].as_f64().unwrap_or(0.0)
        );
    }

    section("bpftool: node 1's pinned programs, maps and links");
    let root = agent1.pin_root.display().to_string();
    // Programs for settings the demo leaves off (the fast path, direct
    // pairs) are not loaded, so not pinned.
    for name in mesh_common::programs::ALL {
        let pin = format!("{root}/progs/{name}");
        if std::path::Path::new(&pin).exists() {
            bpftool(&["prog", "show", "pinned", &pin]);
        }
    }
    for name in mesh_common::maps::ALL {
        bpftool(&["map", "show", "pinned", &format!("{root}/maps/{name}")]);
    }
    let mut links: Vec<_> = std::fs::read_dir(format!("{root}/links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    links.sort();
    for link in links {
        println!("{}:", link.display());
        bpftool(&["link", "show", "pinned", &link.display().to_string()]);
    }
    section("bpftool map dump pinned .../maps/MESH_SERVICES");
    bpftool(&[
        "map",
        "dump",
        "pinned",
        &format!("{root}/maps/MESH_SERVICES"),
    ]);

    section("SIGTERM");
    let status = agent1.terminate();
    let left = std::path::Path::new(&root).exists();
    println!(
        "  node 1 agent exited ({status}); pin root {}",
        if left { "STILL PRESENT" } else { "removed" }
    );
    drop(agent1);
    drop(agent2);
    drop(node2);
    drop(node1);
    println!("  agents stopped; namespaces and cgroups removed");
}

/// Node 1: the client, two local endpoints and one on node 2. Locality is
/// off so round robin visits all three.
fn node1_config(node1: &Node, node2: &Node) -> String {
    format!(
        "{}workloads:
{}{}{}  - {{ name: web-3, ips: [{}], node: {} }}
services:
  - name: web
    namespace: default
    vip: 10.96.0.10
    policy: round_robin
    locality: off
    ports: [{{ port: 80, target_port: 8080 }}]
    endpoints: [{{ ip: {} }}, {{ ip: {} }}, {{ ip: {} }}]
",
        node1.node_yaml(),
        node1.workload_yaml("client"),
        node1.workload_yaml("web-1"),
        node1.workload_yaml("web-2"),
        node2.pod("web-3").ip,
        node2.name,
        node1.pod("web-1").ip,
        node1.pod("web-2").ip,
        node2.pod("web-3").ip,
    )
}

/// Node 2: its endpoint, and who the client on node 1 is.
fn node2_config(node1: &Node, node2: &Node) -> String {
    format!(
        "{}workloads:\n{}  - {{ name: client, ips: [{}], node: {} }}\n",
        node2.node_yaml(),
        node2.workload_yaml("web-3"),
        node1.pod("client").ip,
        node1.name,
    )
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn bpftool(args: &[&str]) {
    match Command::new("bpftool").args(args).output() {
        Ok(output) => print!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => println!("bpftool: {error}"),
    }
}
