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
    eventually,
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

/// A node where `strict` is a strict meshed pod, `be1` a permissive one,
/// and `outsider` a pod outside the mesh; all have IPv6 addresses too
/// (`fd00::<last IPv4 octet>`), routed through the node like IPv4.
fn strict_node(label: &str) -> (Node, Agent) {
    let mut node = node_with_pods(label);
    node.add_pod("strict");
    node.netns.sysctl("net.ipv6.conf.all.forwarding", "1");
    for name in ["outsider", "be1", "strict"] {
        let pod = node.pod(name);
        let v6 = ipv6_of(pod);
        pod.netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{v6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        pod.netns
            .ip(&["-6", "route", "add", "fd00::ffff", "dev", "eth0"]);
        pod.netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00::ffff",
            "dev",
            "eth0",
        ]);
        node.netns.ip(&[
            "-6",
            "addr",
            "add",
            "fd00::ffff/128",
            "dev",
            &pod.host_if,
            "nodad",
        ]);
        node.netns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{v6}/128"),
            "dev",
            &pod.host_if,
        ]);
    }
    let strict = node.pod("strict");
    let mut text = config(&node, "");
    text = text.replace(
        "workloads:\n",
        &format!(
            "workloads:\n  - {{ name: strict, ips: [{}], interface: {}, cgroup: strict, mode: strict }}\n",
            strict.ip, strict.host_if
        ),
    );
    let agent = Agent::start(&node, &text);
    (node, agent)
}

fn ipv6_of(pod: &Pod) -> std::net::Ipv6Addr {
    format!("fd00::{}", pod.ip.octets()[3]).parse().unwrap()
}

/// `name`'s value in the `Ip:` lines of the pod's /proc/net/snmp.
fn ip_mib(pod: &Pod, name: &str) -> u64 {
    let text = pod
        .netns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .unwrap();
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let index = names.split_whitespace().position(|n| n == name).unwrap();
    values
        .split_whitespace()
        .nth(index)
        .unwrap()
        .parse()
        .unwrap()
}

/// Sends a TCP SYN from `from` to `to`:8080 split into two IPv4
/// fragments: the first carries only the ports and the sequence number,
/// the second the flags and the rest.
fn send_fragmented_syn(from: &Pod, to: std::net::Ipv4Addr) {
    let (src, dst) = (from.ip.octets(), to.octets());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40404u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&8080u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let checksum = internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    let ip_header = |fragment: u16, payload: usize| {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
        h[6..8].copy_from_slice(&fragment.to_be_bytes());
        h[8] = 64;
        h[9] = 6;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let checksum = internet_checksum(&h);
        h[10..12].copy_from_slice(&checksum.to_be_bytes());
        h
    };
    // More fragments, offset 0; then offset 1 (8 bytes), the last.
    let first = [&ip_header(0x2000, 8)[..], &tcp[..8]].concat();
    let second = [&ip_header(0x0001, 12)[..], &tcp[8..]].concat();
    from.netns.run(|| {
        // SAFETY: a raw socket we own, closed at the end; buffers outlive the calls.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst),
                },
                sin_zero: [0; 8],
            };
            for packet in [&first, &second] {
                let sent = libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                assert_eq!(
                    sent,
                    packet.len() as isize,
                    "{}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn a_syn_split_into_fragments_does_not_reach_a_strict_pod() {
    let (node, agent) = strict_node("frag");
    let outsider = node.pod("outsider");
    // The permissive pod reassembles what it is sent: the test can see a
    // fragmented SYN arrive.
    let permissive = node.pod("be1");
    let before = ip_mib(permissive, "ReasmOKs");
    send_fragmented_syn(outsider, permissive.ip);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ip_mib(permissive, "ReasmOKs"), before + 1);

    let strict = node.pod("strict");
    let before = ip_mib(strict, "ReasmReqds");
    send_fragmented_syn(outsider, strict.ip);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ip_mib(strict, "ReasmReqds"),
        before,
        "fragments reached the strict pod"
    );
    assert!(agent.counter("strict_fragment_dropped") >= 1);
}

#[test]
fn a_strict_pod_takes_no_ipv6_and_stays_strict_without_its_counters() {
    let (node, agent) = strict_node("v6");
    let outsider = node.pod("outsider");
    let listen = |pod: &Pod| {
        pod.netns
            .run(|| std::net::TcpListener::bind("[::]:9090"))
            .expect("listen on IPv6")
    };
    let (_open, _strict) = (listen(node.pod("be1")), listen(node.pod("strict")));
    let dial = |pod: &Pod| {
        let addr = SocketAddr::from((ipv6_of(pod), 9090));
        outsider
            .netns
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
    };
    // Neighbour discovery on fresh interfaces can lose the first
    // attempts; the permissive pod must answer within a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(error) = dial(node.pod("be1")) {
        assert!(
            std::time::Instant::now() < deadline,
            "IPv6 to a permissive pod: {error}"
        );
    }
    // The strict pod is reachable over IPv6 from this host (the node's
    // own connections carry their socket), so only the mesh rule can
    // refuse the outsider.
    let strict_v6 = SocketAddr::from((ipv6_of(node.pod("strict")), 9090));
    node.netns
        .run(|| TcpStream::connect_timeout(&strict_v6, Duration::from_secs(5)))
        .expect("IPv6 to the strict pod from its node");
    let error = dial(node.pod("strict")).expect_err("a strict pod took plaintext over IPv6");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    assert!(agent.counter("strict_non_ipv4_dropped") >= 1);

    // Without its counters entry the pod is just as strict.
    let strict = node.pod("strict");
    let stats = agent.stats();
    let ifindex = stats["kernel"]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["interface"] == strict.host_if.as_str())
        .and_then(|p| p["ifindex"].as_u64())
        .unwrap_or_else(|| panic!("no counters for {}: {stats}", strict.host_if))
        as u32;
    let map = node.pin_root.join("maps/MESH_POD_STATS");
    let key: Vec<String> = ifindex
        .to_le_bytes()
        .iter()
        .map(|b| b.to_string())
        .collect();
    let mut args = vec!["map", "delete", "pinned", map.to_str().unwrap(), "key"];
    args.extend(key.iter().map(String::as_str));
    let status = std::process::Command::new("bpftool")
        .args(&args)
        .status()
        .unwrap();
    assert!(status.success());
    let _server = strict.serve(8080, "strict", false);
    let error = outsider
        .try_connect(SocketAddr::from((strict.ip, 8080)), Connect::default())
        .expect_err("strict pod took plaintext once its counters were gone");
    assert!(error.contains("timed out"), "{error}");
    assert!(dial(strict).is_err());
}

#[test]
fn a_pod_interface_made_again_under_its_name_is_captured_again() {
    let node = node_with_pods("recreate");
    let _server = node.pod("be1").serve(8080, "be1", false);
    let agent = Agent::start(&node, &config(&node, ""));
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let through_agent = |node: &Node| {
        let report = &node.pod("client").connect(vip, Connect::default())[0];
        assert!(
            report["greeting"].as_str().unwrap().starts_with("be1 "),
            "{report}"
        );
    };
    through_agent(&node);
    let ifindex = |agent: &Agent| {
        agent.stats()["kernel"]["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["interface"] == "p-client")
            .and_then(|p| p["ifindex"].as_u64())
    };
    let before = ifindex(&agent).unwrap();
    // The CNI deletes the pod's veth and makes a new one, same name.
    node.recreate_pod_interface("client");
    // Only the agent can answer the VIP: once it does, the new interface
    // is captured.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let quick = Connect {
        wait_close: false,
        ..Default::default()
    };
    while node
        .pod("client")
        .try_connect(vip, quick)
        .map_or(true, |r| r[0].get("greeting").is_none())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new interface is not captured:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    through_agent(&node);
    // The connect hook (on the pod's cgroup, not its interface) may steer
    // the first connections before the interface's programs are back;
    // the re-attach itself follows within moments.
    eventually("programs re-attached", || {
        agent.log().contains("programs re-attached")
    });
    eventually("counters on the new interface", || {
        ifindex(&agent).is_some_and(|after| after != before)
    });
}

#[test]
fn a_model_too_large_for_the_maps_is_refused_whole_and_the_last_one_serves() {
    let node = node_with_pods("mapfull");
    let _server = node.pod("be1").serve(8080, "be1", false);
    let service = |name: &str, vip: &str| {
        format!(
            "  - {{ name: {name}, vip: {vip}, ports: [{{ port: 80, target_port: 8080 }}], endpoints: [{{ ip: {} }}] }}\n",
            node.pod("be1").ip
        )
    };
    // Room for two service ports and two workload addresses.
    let small = config(&node, &service("second", "10.96.0.12")).replacen(
        "workloads:\n",
        "maps: { services: 2, workloads: 2 }\nworkloads:\n",
        1,
    );
    let agent = Agent::start(&node, &small);
    let ready = |agent: &Agent| agent.http_get(READY_PORT, "/healthz/ready").unwrap();
    assert!(
        ready(&agent).1.contains("MESH_SERVICES 2/2"),
        "{}",
        ready(&agent).1
    );
    // One service and one workload more than fit.
    let outsider = node.pod("outsider");
    let larger = small.replace(
        "services:\n",
        &format!(
            "  - {{ name: outsider, ips: [{}], interface: {}, cgroup: outsider }}\nservices:\n",
            outsider.ip, outsider.host_if
        ),
    ) + &service("third", "10.96.0.13");
    agent.reload(&larger);
    assert!(
        agent.wait_log("keeping the last good model", 1, Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    let (code, text) = ready(&agent);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("last model refused"), "{text}");
    assert!(text.contains("maps.services"), "{text}");
    // Nothing of the larger model reached the kernel or the proxy...
    let dump = agent.config_dump();
    assert_eq!(dump["services"].as_array().unwrap().len(), 2, "{dump}");
    let entries = mesh_tests::bpftool(&[
        "map",
        "dump",
        "pinned",
        node.pin_root.join("maps/MESH_SERVICES").to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 2, "{entries}");
    // ...and the model before it still serves, every pod attached.
    for vip in ["10.96.0.10:80", "10.96.0.12:80"] {
        let report = &node
            .pod("client")
            .connect(vip.parse().unwrap(), Connect::default())[0];
        assert!(
            report["greeting"].as_str().unwrap().starts_with("be1 "),
            "{vip}: {report}"
        );
    }
    assert!(
        !agent.log().contains("pod interface detached"),
        "{}",
        agent.log()
    );
}

/// Whether `from` can open a TCP connection to `to`:8080 within 2 s.
fn reaches(from: &Pod, to: &Pod) -> bool {
    let addr = SocketAddr::from((to.ip, 8080));
    from.netns
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .is_ok()
}

#[test]
fn while_no_agent_runs_after_a_crash_strict_pods_stay_closed() {
    let (node, mut agent) = strict_node("crash");
    let _servers = [
        node.pod("strict").serve(8080, "strict", false),
        node.pod("be1").serve(8080, "be1", false),
    ];
    let (outsider, strict, permissive) =
        (node.pod("outsider"), node.pod("strict"), node.pod("be1"));
    assert!(!reaches(outsider, strict));
    // SIGKILL: the pinned programs stay attached with nobody behind them.
    agent.kill();
    assert!(node.pin_root.exists());
    // Strict pods take no plaintext from outside the mesh (fail closed);
    // permissive pods take it as they would with an agent.
    assert!(
        !reaches(outsider, strict),
        "a strict pod opened up after the crash"
    );
    assert!(reaches(outsider, permissive));
    // A meshed client's connections to a service find no listener and fail
    // at once rather than leave the mesh.
    let error = node
        .pod("client")
        .try_connect(format!("{VIP}:80").parse().unwrap(), Connect::default())
        .expect_err("a VIP answered with no agent");
    assert!(!error.contains("timed out"), "{error}");
    // `cleanup` then removes what the agent left (and with it, strictness).
    assert!(agent.cleanup().status.success());
    assert!(!node.pin_root.exists());
}

#[test]
fn after_a_clean_stop_strict_mode_lapses_until_the_next_agent() {
    // Uninstalling, as documented in ARCHITECTURE.md: SIGTERM detaches
    // everything, strictness included. Upgrades and restarts hand over
    // instead (tests/tests/upgrade.rs).
    let (node, mut agent) = strict_node("stopped");
    let _server = node.pod("strict").serve(8080, "strict", false);
    let (outsider, strict) = (node.pod("outsider"), node.pod("strict"));
    assert!(!reaches(outsider, strict));
    assert!(agent.terminate().success());
    assert!(reaches(outsider, strict), "strict held after a clean stop");
}

#[test]
fn connections_complete_when_the_listener_answers_with_syn_cookies() {
    // A half-open flood fills the listener's backlog and the kernel
    // answers with SYN cookies; `2` makes it answer every SYN so. The
    // handshake then completes only if the client's ACK, which matches
    // no socket yet, reaches the listener.
    let node = node_with_pods("cookies");
    let _server = node.pod("be1").serve(8080, "be1", false);
    node.netns.sysctl("net.ipv4.tcp_syncookies", "2");
    let agent = Agent::start(&node, &config(&node, ""));
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let reports = node.pod("client").connect(
        vip,
        Connect {
            count: 20,
            ..Default::default()
        },
    );
    for report in &reports {
        assert!(
            report["greeting"].as_str().unwrap().starts_with("be1 "),
            "{report}"
        );
    }
    assert_eq!(agent.stats()["outbound"]["accepted"], 20);
}
