//! Replacing the agent under live traffic (issue 18): a new agent on the
//! same pin root takes the listeners and the kernel state over from the
//! running one, which drains what it carries; after a SIGKILL a new agent
//! adopts what the dead one pinned. Real namespaces, programs and TCP.
//! Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    StopOnDrop,
    agent::{Agent, Launch},
    eventually,
    load::{check_transfer, churn, pinned_link_ids},
    pod::{Connect, Server},
    topology::{self, Node},
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The long transfer: checksummed at both ends.
const LONG: u64 = 4 << 30;
/// A service whose one endpoint is `be` (greets and echoes a digest).
const BE_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), 80);
/// `drip`, which reads 512 MiB/s, slower than its client sends (so the
/// fast path pauses and resumes it): 4 GiB take 8 s, outlasting three
/// upgrades.
const DRIP_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 21)), 80);
/// `first`, which closes before its clients do.
const FIRST_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 22)), 80);

/// A `services:` entry: `vip`:80 to port 8080 of the one endpoint.
fn service_yaml(name: &str, vip: SocketAddr, endpoint: Ipv4Addr) -> String {
    format!(
        "  - {{ name: {name}, vip: {}, ports: [{{ port: 80, target_port: 8080 }}], endpoints: [{{ ip: {endpoint} }}] }}\n",
        vip.ip()
    )
}

/// A node with its pods and servers; its agents live beside it, in the
/// order they took over (the last one serves).
struct UpgradeNode {
    config: String,
    _servers: Vec<Server>,
    node: Node,
}

fn upgrade_node(label: &str, proxy: &str) -> (UpgradeNode, Vec<Agent>) {
    let mut node = Node::new(label, 1);
    for pod in ["client", "be", "drip", "first", "outsider"] {
        node.add_pod(pod);
    }
    let workload = |pod: &str, mode: &str| {
        let p = node.pod(pod);
        format!(
            "  - {{ name: {pod}, service_account: {pod}, ips: [{}], interface: {}, cgroup: {pod}, mode: {mode} }}\n",
            p.ip, p.host_if
        )
    };
    let service = |name: &str, vip: SocketAddr| service_yaml(name, vip, node.pod(name).ip);
    let config = format!(
        "{}{proxy}workloads:\n{}{}{}{}services:\n{}{}{}",
        node.node_yaml(),
        workload("client", "permissive"),
        workload("be", "strict"),
        workload("drip", "strict"),
        workload("first", "strict"),
        service("be", BE_VIP),
        service("drip", DRIP_VIP),
        service("first", FIRST_VIP),
    );
    let servers = vec![
        node.pod("be").serve(8080, "be", false),
        node.pod("drip").serve_paced(8080, "drip", 512),
        node.pod("first").serve_closing_first(8080, "first"),
    ];
    let agent = Agent::start(&node, &config);
    (
        UpgradeNode {
            config,
            _servers: servers,
            node,
        },
        vec![agent],
    )
}

impl UpgradeNode {
    fn upgrade(&self, agents: &mut Vec<Agent>, launch: &Launch<'_>) -> Duration {
        upgrade(&self.node, &self.config, agents, launch)
    }
}

/// Starts a new agent on `node` beside the serving one (the last of
/// `agents`) and waits until it has taken over: the new one is ready, the
/// old one says it drains. Returns how long the new one took.
fn upgrade(node: &Node, config: &str, agents: &mut Vec<Agent>, launch: &Launch<'_>) -> Duration {
    {
        let started = Instant::now();
        let next = Agent::spawn_with(node, config, launch);
        let old = agents.last_mut().expect("an agent");
        assert!(
            next.wait_log("agent ready", 1, Duration::from_secs(30)),
            "the new agent did not get ready:\n{}\n--- old agent:\n{}",
            next.log(),
            old.log()
        );
        let took = started.elapsed();
        assert!(
            old.wait_log("handed over to the new agent", 1, Duration::from_secs(10)),
            "the old agent did not hand over:\n{}\n--- new agent:\n{}",
            old.log(),
            next.log()
        );
        old.handed_over();
        agents.push(next);
        took
    }
}

/// Three upgrades in a row while a long transfer, new connections (half
/// of them to a server that closes first) and a plaintext outsider
/// knocking at a strict pod run: nothing fails, nothing takes over a
/// second, every byte arrives, the strict pod never answers plaintext,
/// and the links in the kernel stay the same objects throughout.
fn upgrade_three_times_under_load(label: &str, proxy: &str, fast: bool) {
    let (s, mut agents) = upgrade_node(label, proxy);
    let links_before = pinned_link_ids(&s.node.pin_root);
    assert!(!links_before.is_empty(), "no pinned links (bpftool?)");
    let stop = AtomicBool::new(false);
    let opened = AtomicU64::new(0);
    let began = Instant::now();
    let (long, problems, plaintext, upgraded) = thread::scope(|scope| {
        // A failed check below must end the workers, or the scope waits
        // for them for ever.
        let _stop = StopOnDrop(&stop);
        let (node, stop, opened) = (&s.node, &stop, &opened);
        let long = scope.spawn(move || {
            node.pod("client").try_connect(
                DRIP_VIP,
                Connect {
                    send: LONG,
                    ..Default::default()
                },
            )
        });
        let churners: Vec<_> = [(BE_VIP, false), (FIRST_VIP, true)]
            .into_iter()
            .map(|(addr, wait_close)| {
                let options = Connect {
                    count: 50,
                    parallel: 2,
                    wait_close,
                    ..Default::default()
                };
                let client = node.pod("client");
                scope.spawn(move || churn(|o| client.try_connect(addr, o), options, stop, opened))
            })
            .collect();
        let outsider = scope.spawn(move || {
            let be = SocketAddr::new(node.pod("be").ip.into(), 8080);
            let (mut tries, mut answered) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let connected = node.pod("outsider").netns.run(|| {
                    std::net::TcpStream::connect_timeout(&be, Duration::from_millis(100)).is_ok()
                });
                tries += 1;
                answered += u64::from(connected);
            }
            (tries, answered)
        });
        // Every kind of traffic starts on the first agent: the long
        // transfer is under way there before the first upgrade (a busy
        // machine may take more than a moment to start its client).
        eventually("the long transfer on the first agent", || {
            agents[0]
                .live_connections()
                .iter()
                .any(|c| c["destination"] == DRIP_VIP.to_string().as_str())
        });
        thread::sleep(Duration::from_secs(1));
        for round in 1..=3 {
            let took = s.upgrade(&mut agents, &Launch::default());
            eprintln!("upgrade {round}: the new agent was ready after {took:?}");
            if fast {
                // The long transfer (and whatever else the kernel moved)
                // goes on in the new agent; the old one is left with
                // nothing and exits.
                old_agent_passed_its_connections(&agents);
            } else if round == 1 {
                old_agent_answers_while_draining(&agents);
            }
            thread::sleep(Duration::from_millis(1500));
        }
        let upgraded = began.elapsed();
        stop.store(true, Ordering::Relaxed);
        let problems: Vec<String> = churners
            .into_iter()
            .flat_map(|c| c.join().expect("churner"))
            .collect();
        (
            long.join().expect("long transfer"),
            problems,
            outsider.join().expect("outsider"),
            upgraded,
        )
    });
    let opened = opened.load(Ordering::Relaxed);
    eprintln!("{opened} connections opened across the upgrades; outsider {plaintext:?}");
    assert!(
        problems.is_empty(),
        "{} of {opened} connections failed or were slow: {:?}\n--- newest agent:\n{}",
        problems.len(),
        &problems[..problems.len().min(5)],
        agents.last().unwrap().log()
    );
    assert!(opened >= 200, "only {opened} connections opened");
    let (tries, answered) = plaintext;
    assert!(tries > 10, "the outsider tried only {tries} times");
    assert_eq!(
        answered, 0,
        "the strict pod answered plaintext during an upgrade"
    );
    let long = long.expect("long transfer");
    let report: &Value = &long[0];
    let took = check_transfer(report, LONG);
    eprintln!("4 GiB took {took} ms; the upgrades were done after {upgraded:?}");
    assert!(
        u128::from(took) > upgraded.as_millis(),
        "the transfer ended before the third upgrade: {report}"
    );
    // The same link objects: swapped programs, never a detach.
    assert_eq!(pinned_link_ids(&s.node.pin_root), links_before);
    // Every old agent drains its connections and exits cleanly, leaving
    // the kernel state to the newest.
    let newest = agents.pop().unwrap();
    for mut old in agents {
        let status = old.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "old agent exit {status}:\n{}", old.log());
        assert!(
            old.log().contains("handover drain finished"),
            "{}",
            old.log()
        );
    }
    assert!(
        newest.log().contains("kernel=Adopted"),
        "the newest agent did not adopt:\n{}",
        newest.log()
    );
    let after = s.node.pod("client").connect(BE_VIP, Connect::default());
    assert!(after[0]["error"].is_null(), "{after:?}");
}

/// On the fast path the old agent passes its connections to the new one
/// (both sockets over the handover socket), the long transfer among
/// them, and the new one counts them in.
fn old_agent_passed_its_connections(agents: &[Agent]) {
    let [.., old, new] = agents else {
        unreachable!("two agents after an upgrade")
    };
    let line = "fast-path connections passed to the new agent";
    assert!(
        old.wait_log(line, 1, Duration::from_secs(10)),
        "the old agent passed nothing on:\n{}",
        old.log()
    );
    let log = old.log();
    let moved: u64 = log
        .lines()
        .find(|l| l.contains(line))
        .and_then(|l| l.split("moved=").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(moved >= 1, "moved {moved}:\n{log}");
    let fast = &new.stats()["fast_path"];
    assert!(
        fast["migrated_in"].as_u64().unwrap_or(0) >= 1,
        "the new agent took none in: {fast}"
    );
    eprintln!("the old agent passed {moved} fast-path connections on");
}

/// The new agent says where the old one's `/stats` answers, and there
/// the old one says it drains and still carries the long transfer.
fn old_agent_answers_while_draining(agents: &[Agent]) {
    let [.., old, new] = agents else {
        unreachable!("two agents after an upgrade")
    };
    let lifecycle = &new.stats()["lifecycle"];
    assert_eq!(lifecycle["took_over_from"]["pid"], old.pid(), "{lifecycle}");
    assert_eq!(lifecycle["kernel"]["kind"], "adopted", "{lifecycle}");
    let at: SocketAddr = lifecycle["took_over_from"]["stats"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no stats address: {lifecycle}"));
    let (code, body) = old
        .http_get(at.port(), "/stats")
        .expect("old agent's stats");
    assert_eq!(code, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).expect("stats JSON");
    assert_eq!(stats["lifecycle"]["draining"], true, "{body}");
    assert!(
        stats["outbound"]["active"].as_u64().unwrap_or(0) >= 1,
        "the old agent carries nothing: {}",
        stats["outbound"]
    );
    let metrics = new.metrics();
    assert!(
        metrics.contains("mesh_agent_kernel_start{kind=\"adopted\"} 1"),
        "{metrics}"
    );
}

#[test]
fn upgrades_lose_nothing_through_the_agent() {
    upgrade_three_times_under_load("upg-agent", "", false);
}

#[test]
fn upgrades_lose_nothing_on_the_fast_path() {
    upgrade_three_times_under_load("upg-fast", "proxy: { fast_path: true }\n", true);
}

/// SIGKILL: what is pinned stays attached, so a strict pod still refuses
/// plaintext while no agent runs; the next agent adopts the same links
/// rather than cleaning up. New connections are opened throughout, in
/// batches timed from outside; returns the batches that failed (begun
/// and ended, in ms after the kill, and how many of 5 failed) and when
/// the next agent was started and ready (ms after the kill). A connection
/// held across the kill (`held`, to `be`) reports how it ended.
struct AfterKill {
    failing: Vec<(u128, u128, usize)>,
    batches: usize,
    restarted: u128,
    ready: u128,
    held: Value,
}

fn sigkill_under_churn(label: &str, proxy: &str) -> AfterKill {
    let (s, mut agents) = upgrade_node(label, proxy);
    let links_before = pinned_link_ids(&s.node.pin_root);
    let held = s.node.pod("client").hold(BE_VIP);
    assert!(held.greeting.contains("be"), "{}", held.greeting);
    let stop = AtomicBool::new(false);
    let (next, batches, killed, restarted, ready) = thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let (node, stop) = (&s.node, &stop);
        let churn = scope.spawn(move || {
            let mut batches = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let begun = Instant::now();
                let options = Connect {
                    count: 5,
                    wait_close: true,
                    ..Default::default()
                };
                let failed = match node.pod("client").try_connect(FIRST_VIP, options) {
                    Ok(reports) => reports.iter().filter(|r| !r["error"].is_null()).count(),
                    Err(_) => 5,
                };
                batches.push((begun, Instant::now(), failed));
            }
            batches
        });
        thread::sleep(Duration::from_millis(500));
        let mut dead = agents.pop().unwrap();
        let killed = Instant::now();
        dead.kill();
        // Its drop must not clean up what the next agent adopts.
        dead.handed_over();
        let be = SocketAddr::new(node.pod("be").ip.into(), 8080);
        let mut tries = 0;
        while killed.elapsed() < Duration::from_millis(800) {
            let answered = node.pod("outsider").netns.run(|| {
                std::net::TcpStream::connect_timeout(&be, Duration::from_millis(100)).is_ok()
            });
            assert!(
                !answered,
                "the strict pod answered plaintext with no agent running"
            );
            tries += 1;
        }
        assert!(tries >= 2, "{tries}");
        let restarted = Instant::now();
        let next = Agent::start(node, &s.config);
        let ready = Instant::now();
        thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        (next, churn.join().expect("churn"), killed, restarted, ready)
    });
    let ms_after_kill = |t: Instant| t.saturating_duration_since(killed).as_millis();
    let failing: Vec<_> = batches
        .iter()
        .filter(|(_, _, failed)| *failed > 0)
        .map(|(begun, ended, failed)| (ms_after_kill(*begun), ms_after_kill(*ended), *failed))
        .collect();
    let after = AfterKill {
        failing,
        batches: batches.len(),
        restarted: ms_after_kill(restarted),
        ready: ms_after_kill(ready),
        held: held.release(),
    };
    eprintln!(
        "{} batches of 5 new connections; the next agent started {} ms after the kill, ready at {} ms; failing batches (begun, ended, failed): {:?}",
        after.batches, after.restarted, after.ready, after.failing
    );
    assert!(
        after.failing.iter().all(|(_, ended, _)| *ended > 0),
        "connections failed before the kill"
    );
    assert!(
        batches
            .iter()
            .any(|(begun, _, failed)| *begun > ready && *failed == 0),
        "no batch got through after the restart"
    );
    assert!(
        next.log()
            .contains("adopting the maps and links a previous agent pinned"),
        "{}",
        next.log()
    );
    assert_eq!(
        pinned_link_ids(&s.node.pin_root),
        links_before,
        "links were replaced"
    );
    let later = s.node.pod("client").connect(DRIP_VIP, Connect::default());
    assert!(later[0]["error"].is_null(), "{later:?}");
    assert_eq!(next.stats()["lifecycle"]["kernel"]["kind"], "adopted");
    agents.push(next);
    after
}

/// Same-node direct mode: nothing goes through the agent, so new
/// connections do not fail at all while none runs, and a held one keeps
/// flowing.
#[test]
fn after_sigkill_the_next_agent_adopts_and_strict_stays_closed() {
    let after = sigkill_under_churn("upg-kill", "proxy: { same_node_direct: true }\n");
    assert_eq!(after.failing, vec![], "new direct connections failed");
    assert!(after.batches > 50, "only {} batches", after.batches);
    assert!(after.held["error"].is_null(), "{}", after.held);
    assert!(
        after.held["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("0 ")),
        "{}",
        after.held
    );
}

/// Through the agent: new connections fail while no agent runs (its
/// listeners died with it; a SYN that met none is retried by the client's
/// TCP a second later), and less than a second after the next one starts
/// they get through again. A connection the dead agent carried dies with
/// it (its sockets were the process's).
#[test]
fn after_sigkill_new_connections_fail_only_until_the_next_agent_serves() {
    let after = sigkill_under_churn("upg-killp", "proxy: {}\n");
    assert!(!after.failing.is_empty(), "nothing failed with no agent");
    assert!(
        after
            .failing
            .iter()
            .all(|(begun, _, _)| *begun < after.restarted + 1_000),
        "new connections still failed a second after the next agent started"
    );
    // Closed with the dead process's descriptors: the server's digest of
    // what it received never comes back.
    assert!(
        after.held["reply"]
            .as_str()
            .is_none_or(|r| !r.starts_with("0 ")),
        "{}",
        after.held
    );
}

/// A new agent whose map layout differs (a version bump, as a build that
/// changes what an entry means would carry) does not adopt the maps: it
/// says why, reloads with fresh links, counts it, and serves.
#[test]
fn a_layout_change_reloads_and_says_why() {
    let (s, mut agents) = upgrade_node("upg-layout", "");
    let links_before = pinned_link_ids(&s.node.pin_root);
    s.upgrade(
        &mut agents,
        &Launch {
            env: &[("MESH_TEST_LAYOUT_VERSION", "99")],
            ..Default::default()
        },
    );
    let new = agents.last().unwrap();
    let log = new.log();
    assert!(
        log.contains("layout version 1 pinned, this agent's is 99"),
        "{log}"
    );
    let kernel = &new.stats()["lifecycle"]["kernel"];
    assert_eq!(kernel["kind"], "reloaded", "{kernel}");
    assert!(
        new.metrics()
            .contains("mesh_agent_kernel_start{kind=\"reloaded\"} 1")
    );
    let report = s.node.pod("client").connect(BE_VIP, Connect::default());
    assert!(report[0]["error"].is_null(), "{report:?}");
    let mut old = agents.remove(0);
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}:\n{}", old.log());
    let links_after = pinned_link_ids(&s.node.pin_root);
    assert!(!links_after.is_empty());
    assert!(
        links_after.iter().all(|id| !links_before.contains(id)),
        "{links_before:?} -> {links_after:?}"
    );
    // Still serving once the old agent is gone.
    let report = s.node.pod("client").connect(BE_VIP, Connect::default());
    assert!(report[0]["error"].is_null(), "{report:?}");
}

/// A long HBONE stream from node 1 to node 2 and new cross-node
/// connections, while node 2's agent (the stream's inbound end), then node
/// 1's (its outbound end, holding the pooled HBONE connection), then node
/// 2's again are replaced: nothing fails, every byte arrives.
#[test]
fn cross_node_traffic_survives_upgrades_of_both_ends() {
    let mut a = Node::new("upg-x", 1);
    let mut b = Node::new("upg-x", 2);
    a.add_pod("client");
    for pod in ["be", "drip"] {
        b.add_pod(pod);
    }
    b.share_ca_with(&a);
    topology::connect(&mut a, &mut b);
    let service = |name: &str, vip: SocketAddr| service_yaml(name, vip, b.pod(name).ip);
    let config_a = format!(
        "{}workloads:\n{}{}{}services:\n{}{}",
        a.node_yaml(),
        a.own_identity_workload_yaml("client"),
        b.remote_workload_yaml("be"),
        b.remote_workload_yaml("drip"),
        service("be", BE_VIP),
        service("drip", DRIP_VIP),
    );
    let config_b = format!(
        "{}workloads:\n{}{}{}",
        b.node_yaml(),
        b.own_identity_workload_yaml("be"),
        b.own_identity_workload_yaml("drip"),
        a.remote_workload_yaml("client"),
    );
    let _servers = [
        b.pod("be").serve(8080, "be", false),
        b.pod("drip").serve_slow_reader(8080, "drip", 2),
    ];
    let mut agents_a = vec![Agent::start(&a, &config_a)];
    let mut agents_b = vec![Agent::start(&b, &config_b)];
    let stop = AtomicBool::new(false);
    let opened = AtomicU64::new(0);
    let (long, problems) = thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let (a, stop, opened) = (&a, &stop, &opened);
        let long = scope.spawn(move || {
            a.pod("client").try_connect(
                DRIP_VIP,
                Connect {
                    send: 256 * MIB,
                    ..Default::default()
                },
            )
        });
        let churner = scope.spawn(move || {
            let options = Connect {
                count: 20,
                parallel: 2,
                ..Default::default()
            };
            churn(
                |o| a.pod("client").try_connect(BE_VIP, o),
                options,
                stop,
                opened,
            )
        });
        thread::sleep(Duration::from_secs(1));
        for (node, config, agents) in [
            (&b, &config_b, &mut agents_b),
            (a, &config_a, &mut agents_a),
        ] {
            let took = upgrade(node, config, agents, &Launch::default());
            eprintln!("{}: the new agent was ready after {took:?}", node.name);
            thread::sleep(Duration::from_millis(1500));
        }
        upgrade(&b, &config_b, &mut agents_b, &Launch::default());
        thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        (
            long.join().expect("long transfer"),
            churner.join().expect("churner"),
        )
    });
    let opened = opened.load(Ordering::Relaxed);
    eprintln!("{opened} cross-node connections opened across the upgrades");
    assert!(
        problems.is_empty(),
        "{} of {opened} failed or were slow: {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
    assert!(opened >= 50, "only {opened} connections opened");
    let long = long.expect("long transfer");
    check_transfer(&long[0], 256 * MIB);
    for mut old in agents_a
        .drain(..agents_a.len() - 1)
        .chain(agents_b.drain(..agents_b.len() - 1))
    {
        let status = old.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "old agent exit {status}:\n{}", old.log());
    }
}

/// A new agent without the fast path could not carry the old one's
/// fast-path connections: the old agent keeps them (none moved, one
/// kept) and finishes them itself.
#[test]
fn fast_path_connections_stay_when_the_new_agent_runs_without_it() {
    let (s, mut agents) = upgrade_node("upg-keep", "proxy: { fast_path: true }\n");
    let held = s.node.pod("client").hold(BE_VIP);
    assert!(held.greeting.contains("be"), "{}", held.greeting);
    let without = s.config.replace("proxy: { fast_path: true }\n", "");
    upgrade(&s.node, &without, &mut agents, &Launch::default());
    let old = &agents[agents.len() - 2];
    assert!(
        old.wait_log("moved=0 kept=1 takes=false", 1, Duration::from_secs(10)),
        "{}",
        old.log()
    );
    let report = held.release();
    assert!(
        report["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("0 ")),
        "{report}"
    );
}

/// A new agent that gets the running one's listeners and then fails
/// before it takes the kernel state (here its inbound port is taken; in a
/// rollout, kubelet stopping a container that had just started) leaves
/// the running agent whole: the steer routing stays (its exit used to
/// remove that node-wide routing, and every connection the running agent
/// was then handed was lost), readiness answers ready again (it says no
/// while a new agent talks to this one), and traffic goes on.
#[test]
fn a_new_agent_that_fails_midway_leaves_the_running_one_whole() {
    let (s, agents) = upgrade_node("midway", "");
    let running = &agents[0];
    let steer_rule = |node: &Node| node.netns.ip(&["rule"]).contains("lookup 100");
    assert!(steer_rule(&s.node), "{}", s.node.netns.ip(&["rule"]));
    // Something else holds the port the new agent wants for inbound HBONE.
    let taken = s
        .node
        .netns
        .run(|| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 15999)))
        .expect("port 15999");
    let config = std::env::temp_dir().join(format!("{}-midway.yaml", s.node.name));
    std::fs::write(
        &config,
        format!("{}proxy: {{ inbound_port: 15999 }}\n", s.config),
    )
    .unwrap();
    let mut command = std::process::Command::new(mesh_tests::mesh_agent_bin());
    command
        .args(["run", "--config"])
        .arg(&config)
        .arg("--pin-root")
        .arg(&s.node.pin_root)
        .arg("--handover-socket")
        .arg(s.node.handover_socket())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    mesh_tests::process::enter(&mut command, &s.node.netns.path(), None);
    let output = command.output().expect("running the new agent");
    drop(taken);
    std::fs::remove_file(&config).ok();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the new agent started:\n{said}");
    assert!(
        said.contains("taking over from the running agent"),
        "{said}"
    );
    assert!(
        running.wait_log(
            "handover to a new agent abandoned",
            1,
            Duration::from_secs(10)
        ),
        "{}",
        running.log()
    );
    assert!(
        steer_rule(&s.node),
        "the failed agent removed the running one's routing: {}",
        s.node.netns.ip(&["rule"])
    );
    eventually("the running agent ready again", || {
        running
            .http("GET", mesh_tests::agent::READY_PORT, "/healthz/ready")
            .is_some_and(|(code, _)| code == 200)
    });
    for _ in 0..20 {
        let reports = s.node.pod("client").connect(BE_VIP, Connect::default());
        assert!(reports[0]["error"].is_null(), "{reports:?}");
        assert!(!reports[0]["greeting"].is_null(), "{reports:?}");
    }
}
