//! The benchmark behind `cargo xtask bench`: two simulated nodes with
//! meshed and plain pods, real agents, real traffic (iperf3, sockperf, and
//! this binary's own connection-rate and idle-connection clients). Every
//! figure of a meshed case is printed as a ratio to the plain case measured
//! in the same run, cases interleaved round by round so drift on a shared
//! machine hits them alike. Output: a markdown table on stdout and in
//! `--out`/bench.md, every figure in `--out`/bench.json.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mesh_tests::{
    agent::{Agent, Launch},
    pod::Pod,
    process::Guarded,
    topology::{self, Node},
};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "mesh-agent benchmark: meshed versus plain, same node and across nodes")]
struct Cli {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// A few seconds in all: every case once, short runs (what CI runs).
    #[arg(long)]
    smoke: bool,
    /// Rounds of every measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per throughput, latency and connection-rate run.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Idle proxied connections for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Only this phase (for profiling one path; the report then lacks
    /// the other figures).
    #[arg(long, value_enum)]
    only: Option<Phase>,
    /// Directory for bench.md and bench.json.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Throughput,
    Latency,
    Connections,
    Memory,
}

/// What runs inside the pods.
#[derive(Subcommand)]
enum Helper {
    /// Answers every connection: echoes what it reads until EOF, or,
    /// with --close-first, echoes the first read and closes.
    EchoServer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        close_first: bool,
    },
    /// One 64-byte request and its echo per connection, for SECONDS;
    /// prints `{"rate", "slow", "total"}` (slow: longer than 1 s). With
    /// --server-closes it waits for the server's FIN before closing.
    ConnRate {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        server_closes: bool,
    },
    /// Opens COUNT connections, prints "held", keeps them until stdin closes.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
    },
}

/// Each agent's proxy threads (see `setup`).
const AGENT_WORKER_THREADS: u16 = 1;

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const ECHO_PORT: u16 = 7000;
/// The echo server that closes first.
const ECHO_CLOSING_PORT: u16 = 7001;

/// A connection slower than this counts against the "none slow" target.
const SLOW: Duration = Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.helper {
        Some(Helper::EchoServer { port, close_first }) => echo_server(port, close_first),
        Some(Helper::ConnRate {
            addr,
            seconds,
            server_closes,
        }) => conn_rate(addr, seconds, server_closes),
        Some(Helper::Hold { addr, count }) => hold(addr, count),
        None => bench(&cli),
    }
}

/// One pair of pods to measure between.
struct Case {
    name: &'static str,
    /// Index of the plain case this one is compared with.
    baseline: Option<usize>,
    client: (usize, &'static str),
    server: (usize, &'static str),
}

const CASES: [Case; 5] = [
    Case {
        name: "same node, plain",
        baseline: None,
        client: (0, "pc"),
        server: (0, "ps"),
    },
    Case {
        name: "same node, meshed",
        baseline: Some(0),
        client: (0, "mc"),
        server: (0, "ms"),
    },
    Case {
        name: "across nodes, plain",
        baseline: None,
        client: (0, "pc"),
        server: (1, "pr"),
    },
    Case {
        name: "across nodes, mTLS",
        baseline: Some(2),
        client: (0, "mc"),
        server: (1, "mr"),
    },
    // A third node whose agent runs with `proxy.same_node_direct: true`
    // (off by default): the allowed pair talks pod to pod.
    Case {
        name: "same node, direct",
        baseline: Some(0),
        client: (2, "dc"),
        server: (2, "ds"),
    },
];

struct Bench {
    nodes: Vec<Node>,
    agents: Vec<Agent>,
    _servers: Vec<Guarded>,
}

fn bench(cli: &Cli) -> anyhow::Result<()> {
    let (rounds, seconds, idle) = if cli.smoke {
        (1, 1, 200)
    } else {
        (cli.rounds, cli.seconds, cli.idle_connections)
    };
    // Each proxied connection costs the agent two descriptors, and lifting
    // the hard limit needs CAP_SYS_RESOURCE, which containers often drop:
    // measure what fits and scale (the report says so).
    let fits = (mesh_tests::open_files_hard_limit().saturating_sub(500) / 2) as usize;
    let idle = idle.min(fits);
    let setup = setup()?;
    let started = Instant::now();
    // (case, figure) -> one value per round.
    let mut figures: BTreeMap<(usize, &'static str), Vec<f64>> = BTreeMap::new();
    // Agent CPU seconds and bytes moved, per meshed case, over the throughput runs.
    let mut cpu: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
    // Connections slower than SLOW, and all, per case, over the
    // connection-rate runs.
    let mut slow: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    let runs = |phase| cli.only.is_none_or(|only| only == phase);
    for round in 0..rounds {
        eprintln!("bench: round {} of {rounds}", round + 1);
        let throughput = [("throughput_1_gbps", 1), ("throughput_4_gbps", 4)];
        for (figure, parallel) in throughput.into_iter().filter(|_| runs(Phase::Throughput)) {
            for (index, case) in CASES.iter().enumerate() {
                let before = setup.agent_cpu_seconds();
                let (bits, bytes) = setup.iperf(case, parallel, seconds)?;
                let spent = setup.agent_cpu_seconds() - before;
                figures.entry((index, figure)).or_default().push(bits / 1e9);
                if case.baseline.is_some() {
                    let entry = cpu.entry(index).or_default();
                    entry.0 += spent;
                    entry.1 += bytes;
                }
            }
        }
        for (index, case) in CASES.iter().enumerate().filter(|_| runs(Phase::Latency)) {
            let (p50, p99) = setup.sockperf(case, seconds)?;
            figures
                .entry((index, "latency_p50_us"))
                .or_default()
                .push(p50);
            figures
                .entry((index, "latency_p99_us"))
                .or_default()
                .push(p99);
        }
        let orders = [
            ("connections_per_s", false),
            ("connections_server_closes_per_s", true),
        ];
        for (figure, server_closes) in orders.into_iter().filter(|_| runs(Phase::Connections)) {
            for (index, case) in CASES.iter().enumerate() {
                let (rate, slow_ones, total) = setup.conn_rate(case, seconds, server_closes)?;
                figures.entry((index, figure)).or_default().push(rate);
                let entry = slow.entry(index).or_default();
                entry.0 += slow_ones;
                entry.1 += total;
            }
        }
    }
    let memory = if runs(Phase::Memory) {
        setup.memory(idle)?
    } else {
        Value::Null
    };
    let report = report(
        &Measured { figures, cpu, slow },
        &memory,
        rounds,
        seconds,
        idle,
        started.elapsed(),
    );
    std::fs::create_dir_all(&cli.out)?;
    let markdown = markdown(&report);
    std::fs::write(cli.out.join("bench.md"), &markdown)?;
    std::fs::write(
        cli.out.join("bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("{markdown}");
    eprintln!("bench: written to {}", cli.out.display());
    drop(setup);
    Ok(())
}

fn setup() -> anyhow::Result<Bench> {
    let mut a = Node::new("bench", 1);
    let mut b = Node::new("bench", 2);
    for pod in ["mc", "ms", "pc", "ps"] {
        a.add_pod(pod);
    }
    for pod in ["mr", "pr"] {
        b.add_pod(pod);
    }
    topology::connect(&mut a, &mut b);
    let mut c = Node::new("bench", 3);
    for pod in ["dc", "ds"] {
        c.add_pod(pod);
    }
    let workload = |node: &Node, pod: &str| node.own_identity_workload_yaml(pod);
    let remote = |node: &Node, pod: &str| node.remote_workload_yaml(pod);
    let config_a = format!(
        "{}workloads:\n{}{}{}",
        a.node_yaml(),
        workload(&a, "mc"),
        workload(&a, "ms"),
        remote(&b, "mr")
    );
    let config_b = format!(
        "{}workloads:\n{}{}",
        b.node_yaml(),
        workload(&b, "mr"),
        remote(&a, "mc")
    );
    let config_c = format!(
        "{}proxy: {{ same_node_direct: true }}\nworkloads:\n{}{}",
        c.node_yaml(),
        workload(&c, "dc"),
        workload(&c, "ds"),
    );
    let mut servers = Vec::new();
    for (node, pod) in [(&a, "ms"), (&a, "ps"), (&b, "mr"), (&b, "pr"), (&c, "ds")] {
        servers.extend(start_servers(node.pod(pod))?);
    }
    // Two simulated nodes share this machine's cores with the pods' own
    // traffic: each agent gets one worker, as on a node with one core to
    // spare for it (with one per CPU, two agents' workers and the pods
    // contend for the same cores).
    let threads = AGENT_WORKER_THREADS.to_string();
    // Logging as deployed (info: one access-log line per connection), not
    // the tests' debug level.
    let launch = Launch {
        env: &[("MESH_WORKER_THREADS", &threads), ("MESH_LOG", "info")],
        capabilities: None,
        ..Default::default()
    };
    let agents = vec![
        Agent::start_with(&a, &config_a, &launch),
        Agent::start_with(&b, &config_b, &launch),
        Agent::start_with(&c, &config_c, &launch),
    ];
    Ok(Bench {
        nodes: vec![a, b, c],
        agents,
        _servers: servers,
    })
}

fn start_servers(pod: &Pod) -> anyhow::Result<Vec<Guarded>> {
    let quiet = |mut command: Command| -> anyhow::Result<Guarded> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Guarded::new(child))
    };
    let mut iperf = pod.command("iperf3".as_ref());
    iperf.args(["-s", "-p", &IPERF_PORT.to_string()]);
    let mut sockperf = pod.command("sockperf".as_ref());
    sockperf.args([
        "server",
        "--tcp",
        "-i",
        "0.0.0.0",
        "-p",
        &SOCKPERF_PORT.to_string(),
    ]);
    let mut echo = pod.command(&std::env::current_exe()?);
    echo.args(["echo-server", "--port", &ECHO_PORT.to_string()]);
    let mut closing = pod.command(&std::env::current_exe()?);
    closing.args([
        "echo-server",
        "--port",
        &ECHO_CLOSING_PORT.to_string(),
        "--close-first",
    ]);
    let servers = vec![
        quiet(iperf)?,
        quiet(sockperf)?,
        quiet(echo)?,
        quiet(closing)?,
    ];
    // Wait until all four listen.
    for port in [IPERF_PORT, SOCKPERF_PORT, ECHO_PORT, ECHO_CLOSING_PORT] {
        pod.wait_listening(port).map_err(anyhow::Error::msg)?;
    }
    Ok(servers)
}

impl Bench {
    fn pod(&self, (node, pod): (usize, &str)) -> &Pod {
        self.nodes[node].pod(pod)
    }

    fn target(&self, case: &Case) -> Ipv4Addr {
        self.pod(case.server).ip
    }

    fn agent_cpu_seconds(&self) -> f64 {
        self.agents.iter().map(|a| cpu_seconds(a.pid())).sum()
    }

    /// iperf3 from the client pod: (bits per second received, bytes).
    fn iperf(&self, case: &Case, parallel: u32, seconds: u64) -> anyhow::Result<(f64, f64)> {
        let mut command = self.pod(case.client).command("iperf3".as_ref());
        command.args([
            "-c",
            &self.target(case).to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &parallel.to_string(),
            "-J",
        ]);
        let output = command.output().context("iperf3")?;
        let report: Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("iperf3 output for {}", case.name))?;
        let received = &report["end"]["sum_received"];
        let (Some(bits), Some(bytes)) = (
            received["bits_per_second"].as_f64(),
            received["bytes"].as_f64(),
        ) else {
            bail!("iperf3 for {}: {}", case.name, report["error"]);
        };
        Ok((bits, bytes))
    }

    /// sockperf ping-pong with 64-byte messages: (p50, p99) in µs.
    fn sockperf(&self, case: &Case, seconds: u64) -> anyhow::Result<(f64, f64)> {
        let mut command = self.pod(case.client).command("sockperf".as_ref());
        command.args([
            "ping-pong",
            "--tcp",
            "-i",
            &self.target(case).to_string(),
            "-p",
            &SOCKPERF_PORT.to_string(),
            "-t",
            &seconds.to_string(),
            "-m",
            "64",
        ]);
        let output = command.output().context("sockperf")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let percentile = |p: &str| -> Option<f64> {
            text.lines()
                .find(|l| l.contains(&format!("percentile {p} =")))
                .and_then(|l| l.rsplit('=').next())
                .and_then(|v| v.trim().parse().ok())
        };
        match (percentile("50.000"), percentile("99.000")) {
            (Some(p50), Some(p99)) => Ok((p50, p99)),
            _ => bail!(
                "sockperf for {}: {}{}",
                case.name,
                text,
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    /// New connections per second, and (slow, total) connections.
    fn conn_rate(
        &self,
        case: &Case,
        seconds: u64,
        server_closes: bool,
    ) -> anyhow::Result<(f64, u64, u64)> {
        let mut command = self.pod(case.client).command(&std::env::current_exe()?);
        let port = if server_closes {
            ECHO_CLOSING_PORT
        } else {
            ECHO_PORT
        };
        command.args([
            "conn-rate",
            "--addr",
            &SocketAddr::new(self.target(case).into(), port).to_string(),
            "--seconds",
            &seconds.to_string(),
        ]);
        if server_closes {
            command.arg("--server-closes");
        }
        let output = command.output().context("conn-rate")?;
        serde_json::from_slice::<Value>(&output.stdout)
            .ok()
            .and_then(|v| {
                Some((
                    v["rate"].as_f64()?,
                    v["slow"].as_u64()?,
                    v["total"].as_u64()?,
                ))
            })
            .with_context(|| {
                format!(
                    "conn-rate for {}: {}",
                    case.name,
                    String::from_utf8_lossy(&output.stderr)
                )
            })
    }

    /// Agent RSS when idle, and with `count` idle proxied connections (same
    /// node, so each costs the agent both of its sockets).
    fn memory(&self, count: usize) -> anyhow::Result<Value> {
        let agent = self.agents[0].pid();
        // Idle means after the traffic: the agent gives freed heap back
        // once it has been quiet for a check period (5 s) after activity.
        std::thread::sleep(Duration::from_secs(11));
        let idle = rss_bytes(agent);
        let case = &CASES[1];
        let mut command = self.pod(case.client).command(&std::env::current_exe()?);
        command
            .args([
                "hold",
                "--addr",
                &SocketAddr::new(self.target(case).into(), ECHO_PORT).to_string(),
                "--count",
                &count.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = command.spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != "held" {
            let _ = child.kill();
            bail!("holding {count} connections failed: {line}");
        }
        // Let the agent finish its upstream connects. Polled through the
        // metrics' one gauge: `/stats` lists up to 1,000 tracked
        // connections, and building that list every 200 ms would itself
        // grow the heap being measured.
        let active = || {
            mesh_tests::agent::sample(
                &self.agents[0].metrics(),
                "mesh_outbound_active_connections",
                &[],
            )
            .unwrap_or(0.0) as u64
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while active() < count as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let active = active();
        let loaded = rss_bytes(agent);
        drop(child.stdin.take());
        let _ = child.wait();
        Ok(json!({
            "idle_rss_mb": idle as f64 / 1e6,
            "idle_connections": count,
            "connections_seen_active": active,
            "rss_with_idle_connections_mb": loaded as f64 / 1e6,
            "added_mb": loaded.saturating_sub(idle) as f64 / 1e6,
            "added_kb_per_connection": loaded.saturating_sub(idle) as f64 / 1e3 / count as f64,
        }))
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Figures, ratios and targets. "higher" says which way is better.
const FIGURES: &[(&str, &str, bool)] = &[
    ("throughput_1_gbps", "throughput, 1 stream (Gbit/s)", true),
    ("throughput_4_gbps", "throughput, 4 streams (Gbit/s)", true),
    ("latency_p50_us", "latency p50, 64 B ping-pong (µs)", false),
    ("latency_p99_us", "latency p99 (µs)", false),
    (
        "connections_per_s",
        "new connections per second, client closes first",
        true,
    ),
    (
        "connections_server_closes_per_s",
        "new connections per second, server closes first",
        true,
    ),
];

/// The targets: (baseline case, figure) -> bound on the ratio.
fn target(baseline: usize, figure: &str) -> Option<f64> {
    match (baseline, figure) {
        (0, "throughput_1_gbps" | "throughput_4_gbps") => Some(0.95),
        (0, "latency_p50_us") => Some(1.1),
        (0, "connections_per_s" | "connections_server_closes_per_s") => Some(0.8),
        (2, "throughput_1_gbps" | "throughput_4_gbps") => Some(0.5),
        (2, "latency_p50_us") => Some(1.8),
        (2, "latency_p99_us") => Some(2.0),
        (2, "connections_per_s" | "connections_server_closes_per_s") => Some(0.5),
        _ => None,
    }
}

/// Agent CPU per GB moved (both agents), by meshed case: near zero on one
/// node (the kernel moves the bytes), at most 1 core-s across nodes.
fn cpu_target(case: usize) -> Option<f64> {
    match case {
        1 | 4 => Some(0.05),
        3 => Some(1.0),
        _ => None,
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Everything the rounds measured.
struct Measured {
    /// (case, figure) -> one value per round.
    figures: BTreeMap<(usize, &'static str), Vec<f64>>,
    /// Agent CPU seconds and bytes moved, per meshed case, over the
    /// throughput runs.
    cpu: BTreeMap<usize, (f64, f64)>,
    /// Connections slower than SLOW, and all, per case, over the
    /// connection-rate runs.
    slow: BTreeMap<usize, (u64, u64)>,
}

fn report(
    Measured { figures, cpu, slow }: &Measured,
    memory: &Value,
    rounds: usize,
    seconds: u64,
    idle: usize,
    elapsed: Duration,
) -> Value {
    let mut comparisons = Vec::new();
    for (index, case) in CASES.iter().enumerate() {
        let Some(baseline) = case.baseline else {
            continue;
        };
        for &(figure, label, higher) in FIGURES {
            let (Some(meshed_runs), Some(plain_runs)) = (
                figures.get(&(index, figure)),
                figures.get(&(baseline, figure)),
            ) else {
                continue;
            };
            let meshed = median(meshed_runs);
            let plain = median(plain_runs);
            let ratio = meshed / plain;
            let bound = target(baseline, figure);
            let met = bound.map(|b| if higher { ratio >= b } else { ratio <= b });
            comparisons.push(json!({
                "case": case.name,
                "baseline": CASES[baseline].name,
                "figure": figure,
                "label": label,
                "meshed": meshed,
                "plain": plain,
                "ratio": ratio,
                "target": bound.map(|b| format!("{} {b}", if higher { ">=" } else { "<=" })),
                "met": met,
                "meshed_runs": meshed_runs,
                "plain_runs": plain_runs,
            }));
        }
    }
    let cpu: Vec<Value> = cpu
        .iter()
        .map(|(&index, &(seconds, bytes))| {
            let per_gb = seconds / (bytes / 1e9);
            let bound = cpu_target(index);
            json!({
                "case": CASES[index].name,
                "agent_cpu_seconds": seconds,
                "gigabytes": bytes / 1e9,
                "cpu_seconds_per_gb": per_gb,
                "target": bound.map(|b| format!("<= {b}")),
                "met": bound.map(|b| per_gb <= b),
            })
        })
        .collect();
    let slow: Vec<Value> = slow
        .iter()
        .map(|(&index, &(slow, total))| {
            json!({
                "case": CASES[index].name,
                "slow": slow,
                "total": total,
                "fraction": if total == 0 { 0.0 } else { slow as f64 / total as f64 },
                "met": slow == 0,
            })
        })
        .collect();
    let release = nix_release();
    json!({
        "date": chrono_date(),
        "kernel": release,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rounds": rounds,
        "agent_worker_threads": AGENT_WORKER_THREADS,
        // A smoke run uses the tests' debug build: it proves the bench
        // runs, and its figures are not comparable with release runs.
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "seconds_per_run": seconds,
        "idle_connections": idle,
        "elapsed_s": elapsed.as_secs_f64(),
        "comparisons": comparisons,
        "agent_cpu": cpu,
        "slow_connections": slow,
        "memory": memory,
        "memory_targets": {
            "idle_rss_mb": "<= 20",
            "added_mb_for_10000": "<= 64",
            "idle_met": memory["idle_rss_mb"].as_f64().map(|v| v <= 20.0),
            "added_met": memory["added_kb_per_connection"].as_f64().map(|v| v * 10_000.0 / 1e3 <= 64.0),
        },
    })
}

fn markdown(report: &Value) -> String {
    let mut out = format!(
        "Benchmark {} · {} build · kernel {} · {} cores · {} worker thread(s) per agent · {} round(s) of {} s, medians\n\n",
        report["date"].as_str().unwrap_or(""),
        report["build"].as_str().unwrap_or(""),
        report["kernel"].as_str().unwrap_or(""),
        report["cores"],
        report["agent_worker_threads"],
        report["rounds"],
        report["seconds_per_run"],
    );
    out.push_str(
        "| case | figure | plain | meshed | ratio | target |\n|---|---|---|---|---|---|\n",
    );
    for c in report["comparisons"].as_array().into_iter().flatten() {
        let verdict = match c["met"].as_bool() {
            Some(true) => format!("{} met", c["target"].as_str().unwrap_or("")),
            Some(false) => format!("{} **missed**", c["target"].as_str().unwrap_or("")),
            None => "–".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2}x | {} |\n",
            c["case"].as_str().unwrap_or(""),
            c["label"].as_str().unwrap_or(""),
            c["plain"].as_f64().unwrap_or(f64::NAN),
            c["meshed"].as_f64().unwrap_or(f64::NAN),
            c["ratio"].as_f64().unwrap_or(f64::NAN),
            verdict
        ));
    }
    out.push_str("\n| resource | value | target |\n|---|---|---|\n");
    for c in report["agent_cpu"].as_array().into_iter().flatten() {
        let target = c["target"].as_str().unwrap_or("");
        out.push_str(&format!(
            "| agent CPU, {} (both agents) | {:.2} core-s per GB | {} |\n",
            c["case"].as_str().unwrap_or(""),
            c["cpu_seconds_per_gb"].as_f64().unwrap_or(f64::NAN),
            match c["met"].as_bool() {
                Some(true) => format!("{target} met"),
                Some(false) => format!("{target} **missed**"),
                None => "–".into(),
            }
        ));
    }
    for c in report["slow_connections"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| connections slower than 1 s, {} | {} of {} ({:.3}%) | 0 {} |\n",
            c["case"].as_str().unwrap_or(""),
            c["slow"],
            c["total"],
            c["fraction"].as_f64().unwrap_or(f64::NAN) * 100.0,
            if c["met"].as_bool() == Some(true) {
                "met"
            } else {
                "**missed**"
            }
        ));
    }
    let m = &report["memory"];
    if m.is_null() {
        return out;
    }
    let t = &report["memory_targets"];
    let met = |v: &Value| match v.as_bool() {
        Some(true) => "met",
        _ => "**missed**",
    };
    out.push_str(&format!(
        "| agent RSS, idle | {:.1} MB | <= 20 MB {} |\n",
        m["idle_rss_mb"].as_f64().unwrap_or(f64::NAN),
        met(&t["idle_met"])
    ));
    out.push_str(&format!(
        "| agent RSS added by {} idle proxied connections | {:.1} MB ({:.2} KB each, {:.1} MB per 10,000) | <= 64 MB per 10,000 {} |\n",
        m["idle_connections"],
        m["added_mb"].as_f64().unwrap_or(f64::NAN),
        m["added_kb_per_connection"].as_f64().unwrap_or(f64::NAN),
        m["added_kb_per_connection"].as_f64().unwrap_or(f64::NAN) * 10.0,
        met(&t["added_met"])
    ));
    out
}

fn nix_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn chrono_date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

// ---- helpers that run inside the pods ----

fn echo_server(port: u16, close_first: bool) -> anyhow::Result<()> {
    mesh_tests::raise_open_files_limit();
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 || stream.write_all(&buffer[..n]).is_err() || close_first {
                    break;
                }
            }
            // Dropped here: with --close-first the server's FIN goes
            // first, right behind its answer.
        });
    }
    Ok(())
}

fn conn_rate(addr: SocketAddr, seconds: f64, server_closes: bool) -> anyhow::Result<()> {
    let request = [7u8; 64];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let (mut done, mut slow) = (0u64, 0u64);
    while Instant::now() < deadline {
        let began = Instant::now();
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.write_all(&request)?;
        let mut answer = [0u8; 64];
        stream.read_exact(&mut answer)?;
        if server_closes {
            // The server's FIN, then ours.
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest)?;
        }
        drop(stream);
        if began.elapsed() > SLOW {
            slow += 1;
        }
        done += 1;
    }
    println!(
        "{}",
        json!({
            "rate": done as f64 / started.elapsed().as_secs_f64(),
            "slow": slow,
            "total": done,
        })
    );
    Ok(())
}

fn hold(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    mesh_tests::raise_open_files_limit();
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        let stream = TcpStream::connect(addr).with_context(|| format!("connection {i}"))?;
        streams.push(stream);
    }
    println!("held");
    std::io::stdout().flush()?;
    let mut sink = String::new();
    let _ = std::io::stdin().read_to_string(&mut sink);
    Ok(())
}
