//! `cargo xtask demo`: one simulated node, four pods, the agent on a built-in
//! config, real traffic, and what the agent and the kernel saw. Leaves
//! nothing behind.

use std::{net::SocketAddr, process::Command};

use mesh_tests::{agent::Agent, pod::Connect, topology::Node};

const VIP: &str = "10.96.0.10:80";

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo creates namespaces and loads BPF programs: run it as root");
        std::process::exit(1);
    }
    let mut node = Node::new("demo", 1);
    for pod in ["client", "web-1", "web-2", "legacy"] {
        node.add_pod(pod);
    }
    let config = built_in_config(&node);
    section("Simulated node");
    println!(
        "node {} (netns {}, node IP {})",
        node.name,
        node.netns.name(),
        node.ip
    );
    for pod in ["client", "web-1", "web-2", "legacy"] {
        let p = node.pod(pod);
        let meshed = if pod == "legacy" {
            "not meshed"
        } else {
            "meshed"
        };
        println!(
            "  pod {:<7} {:<11} veth {:<9} {meshed}",
            p.name, p.ip, p.host_if
        );
    }
    section("Built-in agent config");
    print!("{config}");

    let _web1 = node.pod("web-1").serve(8080, "web-1", false);
    let _web2 = node.pod("web-2").serve(8080, "web-2", false);
    let _legacy = node.pod("legacy").serve(8080, "legacy", false);
    let agent = Agent::start(&node, &config);
    println!(
        "\nagent ready (pid {}, pins under {})",
        agent.pid(),
        agent.pin_root.display()
    );

    section(&format!("client -> service VIP {VIP}, 6 connections"));
    let vip: SocketAddr = VIP.parse().expect("VIP");
    for (i, report) in node
        .pod("client")
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
        println!(
            "  #{} answered by {backend:<6} (it saw the connection come from {peer}: the agent)",
            i + 1
        );
    }

    section("client -> VIP, 64 MiB with checksum and half-close");
    let report = &node.pod("client").connect(
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
    let legacy: SocketAddr = (node.pod("legacy").ip, 8080).into();
    let report = &node.pod("client").connect(legacy, Connect::default())[0];
    println!(
        "  {} (the peer is the client itself: the agent was bypassed)",
        report["greeting"].as_str().unwrap_or("?")
    );

    section("What the agent and the kernel counted (GET localhost:15000/stats)");
    let stats = agent.stats();
    println!("  proxy: {}", stats["outbound"]);
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

    section("bpftool: the pinned programs, maps and links");
    let root = agent.pin_root.display().to_string();
    for name in mesh_common::programs::ALL {
        bpftool(&["prog", "show", "pinned", &format!("{root}/progs/{name}")]);
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
    let mut agent = agent;
    let status = agent.terminate();
    let left = std::path::Path::new(&root).exists();
    println!(
        "  agent exited ({status}); pin root {}",
        if left { "STILL PRESENT" } else { "removed" }
    );
    drop(agent);
    drop(node);
    println!("  namespaces and cgroups removed");
}

fn built_in_config(node: &Node) -> String {
    format!(
        "{}workloads:\n{}{}{}services:\n  - name: web\n    namespace: default\n    vip: 10.96.0.10\n    policy: round_robin\n    ports: [{{ port: 80, target_port: 8080 }}]\n    endpoints: [{{ ip: {} }}, {{ ip: {} }}]\n",
        node.node_yaml(),
        node.workload_yaml("client"),
        node.workload_yaml("web-1"),
        node.workload_yaml("web-2"),
        node.pod("web-1").ip,
        node.pod("web-2").ip,
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
