//! The soak behind `cargo xtask soak`: two simulated nodes, real agents,
//! and for a while a steady load that mixes what users do: thousands of
//! connections held open, and a steady rate of new ones, same node and
//! across nodes, half where the client closes first and half where the
//! server does, each carrying a payload whose checksum the server sends
//! back. A third of the way in, one endpoint's server is killed; two
//! thirds in, node 1's config is broken on disk. It reports failed and
//! slow connections, bad checksums, held connections lost, and the agents'
//! peak memory and file descriptors: `--out`/soak.md and soak.json.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
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
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(about = "mesh-agent soak: held connections, a steady rate of new ones, faults")]
struct Cli {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// Seconds of load.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Connections held open for the whole run.
    #[arg(long, default_value_t = 10_000)]
    hold: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Directory for soak.md and soak.json.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

/// What runs inside the pods.
#[derive(Subcommand)]
enum Helper {
    /// The soak's server: on CLIENT_FIRST_PORT it answers the payload's
    /// checksum and waits for the client to close; on SERVER_FIRST_PORT it
    /// answers and closes; on HOLD_PORT it reads until the client closes.
    Serve,
    /// Holds HOLD connections to the targets' HOLD_PORT, then opens RATE
    /// new connections per second for SECONDS; prints one JSON line a
    /// second and a summary.
    Load {
        #[arg(long, value_delimiter = ',')]
        targets: Vec<Ipv4Addr>,
        /// Where the held connections go (endpoints that stay up).
        #[arg(long, value_delimiter = ',')]
        hold_targets: Vec<Ipv4Addr>,
        #[arg(long)]
        hold: usize,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        seconds: u64,
    },
}

const CLIENT_FIRST_PORT: u16 = 7100;
const SERVER_FIRST_PORT: u16 = 7101;
const HOLD_PORT: u16 = 7102;
/// Bytes each new connection sends.
const PAYLOAD: usize = 4096;
/// A connection slower than this counts as slow.
const SLOW: Duration = Duration::from_secs(1);
/// After an endpoint dies, connections already on their way to it fail;
/// from this long after, none may.
const EJECTION_WINDOW: Duration = Duration::from_secs(10);

const SAME_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 1);
const CROSS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.helper {
        Some(Helper::Serve) => serve(),
        Some(Helper::Load {
            targets,
            hold_targets,
            hold,
            rate,
            seconds,
        }) => load(&targets, &hold_targets, hold, rate, seconds),
        None => soak(&cli),
    }
}

// ---- the orchestrator ----

fn soak(cli: &Cli) -> anyhow::Result<()> {
    let mut a = Node::new("soak", 1);
    let mut b = Node::new("soak", 2);
    for pod in ["client", "sa1", "sa2"] {
        a.add_pod(pod);
    }
    for pod in ["sb1", "sb2"] {
        b.add_pod(pod);
    }
    topology::connect(&mut a, &mut b);
    let service = |name: &str, vip: Ipv4Addr, endpoints: [&Pod; 2]| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    policy: round_robin\n    ports: [{{ port: {CLIENT_FIRST_PORT} }}, {{ port: {SERVER_FIRST_PORT} }}, {{ port: {HOLD_PORT} }}]\n    endpoints: [{{ ip: {} }}, {{ ip: {} }}]\n    resilience: {{ outlier_detection: {{ consecutive_failures: 3, base_ejection_ms: 30000 }} }}\n",
            endpoints[0].ip, endpoints[1].ip
        )
    };
    let services = format!(
        "services:\n{}{}",
        service("same", SAME_VIP, [a.pod("sa1"), a.pod("sa2")]),
        service("cross", CROSS_VIP, [b.pod("sb1"), b.pod("sb2")])
    );
    let config_a = format!(
        "{}workloads:\n{}{}{}{}{}{services}",
        a.node_yaml(),
        a.own_identity_workload_yaml("client"),
        a.own_identity_workload_yaml("sa1"),
        a.own_identity_workload_yaml("sa2"),
        b.remote_workload_yaml("sb1"),
        b.remote_workload_yaml("sb2"),
    );
    let config_b = format!(
        "{}workloads:\n{}{}{}",
        b.node_yaml(),
        b.own_identity_workload_yaml("sb1"),
        b.own_identity_workload_yaml("sb2"),
        a.remote_workload_yaml("client"),
    );
    let mut servers = Vec::new();
    for pod in [a.pod("sa1"), a.pod("sa2"), b.pod("sb1"), b.pod("sb2")] {
        servers.push((pod.name.clone(), start_server(pod)?));
    }
    let launch = Launch {
        env: &[("MESH_LOG", "info")],
        ..Default::default()
    };
    let agents = [
        Agent::start_with(&a, &config_a, &launch),
        Agent::start_with(&b, &config_b, &launch),
    ];

    let mut load = a.pod("client").command(&std::env::current_exe()?);
    load.args([
        "load",
        "--targets",
        &format!("{SAME_VIP},{CROSS_VIP}"),
        // Held connections go to pods that stay up (same node and across),
        // by their own address: the killed endpoint's are lost by design.
        "--hold-targets",
        &format!("{},{}", a.pod("sa1").ip, b.pod("sb1").ip),
        "--hold",
        &cli.hold.to_string(),
        "--rate",
        &cli.rate.to_string(),
        "--seconds",
        &cli.seconds.to_string(),
    ])
    .stdout(Stdio::piped());
    let mut load = Guarded::new(load.spawn()?);
    let stdout = load.child_mut().stdout.take().expect("piped");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // Wait for the held connections, then watch the run.
    let held = lines
        .recv_timeout(Duration::from_secs(300))
        .context("the load never held its connections")?;
    println!("{held}");
    let started = Instant::now();
    let mut peak = [(0u64, 0usize); 2];
    let mut killed_at = None;
    let mut broken = false;
    let mut summary = None;
    while summary.is_none() {
        match lines.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if value.get("summary").is_some() {
                    summary = Some(value);
                } else {
                    println!("{line}");
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => bail!("the load ended without a summary"),
        }
        for (index, agent) in agents.iter().enumerate() {
            let (rss, fds) = usage(agent.pid());
            peak[index] = (peak[index].0.max(rss), peak[index].1.max(fds));
        }
        let elapsed = started.elapsed();
        if killed_at.is_none() && elapsed > Duration::from_secs(cli.seconds) / 3 {
            // One endpoint of the same-node service dies under load.
            servers.retain(|(name, _)| name != "sa2");
            killed_at = Some(elapsed);
            println!(
                "{{\"event\":\"killed sa2's server\",\"at_s\":{:.1}}}",
                elapsed.as_secs_f64()
            );
        }
        if !broken && elapsed > Duration::from_secs(cli.seconds) * 2 / 3 {
            agents[0].rewrite_config("node: { name: [broken\n");
            broken = true;
            println!(
                "{{\"event\":\"broke node 1's config\",\"at_s\":{:.1}}}",
                elapsed.as_secs_f64()
            );
        }
    }
    let summary = summary.expect("loop ends with one");
    let killed_at = killed_at.unwrap_or_default();
    let late_failures = summary["failures_at_s"]
        .as_array()
        .map(|at| {
            at.iter()
                .filter_map(Value::as_f64)
                .filter(|&t| t > (killed_at + EJECTION_WINDOW).as_secs_f64())
                .count()
        })
        .unwrap_or(0);
    let config_rejected = agents[0].log().contains("config rejected");
    let report = json!({
        "seconds": cli.seconds,
        "held": cli.hold,
        "rate": cli.rate,
        "load": summary,
        "endpoint_killed_at_s": killed_at.as_secs_f64(),
        "failures_after_ejection_window": late_failures,
        "broken_config_rejected": config_rejected,
        "agents": peak.iter().enumerate().map(|(i, (rss, fds))| json!({
            "node": i + 1, "peak_rss_mb": *rss as f64 / 1e6, "peak_fds": fds,
        })).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(
        cli.out.join("soak.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let table = markdown(&report);
    std::fs::write(cli.out.join("soak.md"), &table)?;
    println!("{table}");
    let load = &report["load"];
    let zero = |key: &str| load[key].as_u64() == Some(0);
    if late_failures != 0
        || !zero("slow")
        || !zero("bad_checksums")
        || !zero("held_lost")
        || !config_rejected
    {
        bail!("the soak missed a target (see the table)");
    }
    Ok(())
}

fn markdown(report: &Value) -> String {
    let load = &report["load"];
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let mut text = format!(
        "| figure | value | target |\n|---|---|---|\n\
         | connections held open for the run | {} of {} still open at the end | all {} |\n\
         | new connections ({} per second for {} s, half each close order, half across nodes) | {} completed, {} failed | |\n\
         | failed after the ejection window ({} s after an endpoint died at {:.0} s) | {} | 0 {} |\n\
         | slower than 1 s | {} | 0 {} |\n\
         | checksums wrong | {} | 0 {} |\n\
         | broken config on disk | {} | rejected, last good kept {} |\n",
        load["held_alive"],
        report["held"],
        met(load["held_lost"].as_u64() == Some(0)),
        report["rate"],
        report["seconds"],
        load["ok"],
        load["failed"],
        EJECTION_WINDOW.as_secs(),
        report["endpoint_killed_at_s"].as_f64().unwrap_or_default(),
        report["failures_after_ejection_window"],
        met(report["failures_after_ejection_window"].as_u64() == Some(0)),
        load["slow"],
        met(load["slow"].as_u64() == Some(0)),
        load["bad_checksums"],
        met(load["bad_checksums"].as_u64() == Some(0)),
        if report["broken_config_rejected"].as_bool() == Some(true) {
            "rejected"
        } else {
            "NOT rejected"
        },
        met(report["broken_config_rejected"].as_bool() == Some(true)),
    );
    for agent in report["agents"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "| node {} agent: peak RSS, peak open files | {:.1} MB, {} | |\n",
            agent["node"],
            agent["peak_rss_mb"].as_f64().unwrap_or_default(),
            agent["peak_fds"]
        ));
    }
    text
}

fn start_server(pod: &Pod) -> anyhow::Result<Guarded> {
    let child = pod
        .command(&std::env::current_exe()?)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let server = Guarded::new(child);
    for port in [CLIENT_FIRST_PORT, SERVER_FIRST_PORT, HOLD_PORT] {
        pod.wait_listening(port).map_err(anyhow::Error::msg)?;
    }
    Ok(server)
}

/// RSS (bytes) and open file descriptors of `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

// ---- helpers that run inside the pods ----

fn serve() -> anyhow::Result<()> {
    mesh_tests::raise_open_files_limit();
    let mut listeners = Vec::new();
    for port in [CLIENT_FIRST_PORT, SERVER_FIRST_PORT, HOLD_PORT] {
        listeners.push((port, TcpListener::bind(("0.0.0.0", port))?));
    }
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(port, listener)| {
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    std::thread::spawn(move || answer(stream, port));
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// One connection: the payload's checksum back, then the port's close order.
fn answer(mut stream: TcpStream, port: u16) {
    if port == HOLD_PORT {
        let _ = stream.read_to_end(&mut Vec::new());
        return;
    }
    let mut payload = vec![0u8; PAYLOAD];
    if stream.read_exact(&mut payload).is_err() {
        return;
    }
    if stream.write_all(&Sha256::digest(&payload)).is_err() {
        return;
    }
    if port == CLIENT_FIRST_PORT {
        let _ = stream.read_to_end(&mut Vec::new());
    }
    // Dropped: the server closes (first, on SERVER_FIRST_PORT).
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    slow: AtomicU64,
    bad_checksums: AtomicU64,
}

fn load(
    targets: &[Ipv4Addr],
    hold_targets: &[Ipv4Addr],
    hold: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    mesh_tests::raise_open_files_limit();
    let mut held = Vec::with_capacity(hold);
    for i in 0..hold {
        let addr = SocketAddrV4::new(hold_targets[i % hold_targets.len()], HOLD_PORT);
        let stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10))
            .with_context(|| format!("holding connection {i}"))?;
        held.push(stream);
    }
    println!("{}", json!({ "held": held.len() }));
    std::io::stdout().flush()?;

    let counts = Arc::new(Counts::default());
    let failures_at = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let started = Instant::now();
    let total = rate * seconds;
    let next = Arc::new(AtomicU64::new(0));
    // Enough workers that a slow connection does not hold the rate back.
    let workers = (rate / 10).clamp(4, 128);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (counts, failures_at, next) = (counts.clone(), failures_at.clone(), next.clone());
            let targets = targets.to_vec();
            std::thread::spawn(move || {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    // Connection n starts at n / rate seconds.
                    let due = started + Duration::from_nanos(n * 1_000_000_000 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let target = targets[(n as usize / 2) % targets.len()];
                    let port = if n % 2 == 0 {
                        CLIENT_FIRST_PORT
                    } else {
                        SERVER_FIRST_PORT
                    };
                    let began = Instant::now();
                    match one_connection(SocketAddrV4::new(target, port), n) {
                        Ok(true) => counts.ok.fetch_add(1, Ordering::Relaxed),
                        Ok(false) => counts.bad_checksums.fetch_add(1, Ordering::Relaxed),
                        Err(_) => {
                            failures_at
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(started.elapsed().as_secs_f64());
                            counts.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    if began.elapsed() > SLOW {
                        counts.slow.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Progress once a second.
    let progress = {
        let counts = counts.clone();
        std::thread::spawn(move || {
            for second in 1..=seconds {
                std::thread::sleep(Duration::from_secs(1));
                println!(
                    "{}",
                    json!({
                        "t": second,
                        "ok": counts.ok.load(Ordering::Relaxed),
                        "failed": counts.failed.load(Ordering::Relaxed),
                        "slow": counts.slow.load(Ordering::Relaxed),
                    })
                );
                let _ = std::io::stdout().flush();
            }
        })
    };
    for thread in threads {
        let _ = thread.join();
    }
    let _ = progress.join();
    // Every held connection must still be open: a byte written goes
    // through, and nothing (no reset, no end) has arrived.
    let alive = held.iter().filter(|stream| still_open(stream)).count();
    for stream in &held {
        let _ = stream.shutdown(Shutdown::Both);
    }
    let failures_at = failures_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    println!(
        "{}",
        json!({
            "summary": true,
            "ok": counts.ok.load(Ordering::Relaxed),
            "failed": counts.failed.load(Ordering::Relaxed),
            "slow": counts.slow.load(Ordering::Relaxed),
            "bad_checksums": counts.bad_checksums.load(Ordering::Relaxed),
            "held_alive": alive,
            "held_lost": held.len() - alive,
            "failures_at_s": failures_at,
        })
    );
    Ok(())
}

/// A byte written goes through, and nothing (no reset, no end) arrived.
fn still_open(mut stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).is_ok()
        && stream.write_all(&[1]).is_ok()
        && matches!(stream.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// One new connection: 4 KiB of payload (different for each), its
/// checksum back, the port's close order. Ok(false): a wrong checksum.
fn one_connection(addr: SocketAddrV4, n: u64) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut payload = vec![0u8; PAYLOAD];
    mesh_tests::payload::fill(&mut payload, n * PAYLOAD as u64);
    stream.write_all(&payload)?;
    let mut digest = [0u8; 32];
    stream.read_exact(&mut digest)?;
    let good = digest[..] == Sha256::digest(&payload)[..];
    if addr.port() == CLIENT_FIRST_PORT {
        stream.shutdown(Shutdown::Write)?;
    }
    // The server's end of stream (it closes first on SERVER_FIRST_PORT).
    if stream.read(&mut [0u8; 1])? != 0 {
        return Err(std::io::Error::other("bytes after the checksum"));
    }
    Ok(good)
}
