//! The operator commands: `status`, `connections`, `observe`, `graph` talk
//! to a running agent's admin API (localhost:15000, so run them in the
//! agent's network namespace); `inspect` reads the pinned maps directly;
//! `probe` checks the kernel itself.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::dataplane::{KernelMaps, PinLayout};

/// Opens `GET path` and returns the stream positioned at the body.
fn request(admin: SocketAddr, path: &str) -> anyhow::Result<BufReader<TcpStream>> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .with_context(|| format!("connecting to the agent's admin API at {admin}"))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let code = status
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    if code != "200" {
        let mut body = String::new();
        reader.read_to_string(&mut body)?;
        bail!("{path}: {} {}", status.trim(), body.trim());
    }
    Ok(reader)
}

fn get_json(admin: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut body = String::new();
    request(admin, path)?.read_to_string(&mut body)?;
    serde_json::from_str(&body).with_context(|| format!("{path}: not JSON"))
}

pub fn status(admin: SocketAddr) -> anyhow::Result<()> {
    let stats = get_json(admin, "/stats")?;
    println!("outbound: {}", stats["outbound"]);
    println!("inbound:  {}", stats["inbound"]);
    println!("kernel:   {}", stats["kernel"]["counters"]);
    for cert in stats["certificates"].as_array().into_iter().flatten() {
        println!(
            "certificate {} (renewed {} times)",
            cert["identity"].as_str().unwrap_or("?"),
            cert["renewals"]
        );
    }
    for service in stats["services"].as_array().into_iter().flatten() {
        println!(
            "service {}/{} ({}): {}",
            service["namespace"].as_str().unwrap_or("?"),
            service["name"].as_str().unwrap_or("?"),
            service["policy"].as_str().unwrap_or("?"),
            service["counters"]
        );
        for e in service["endpoints"].as_array().into_iter().flatten() {
            let ejected = e["ejected_for_ms"]
                .as_u64()
                .map(|ms| format!(" ejected {ms} ms"))
                .unwrap_or_default();
            println!(
                "  {:<15} healthy {:<5} active {:>3} pending {:>3} ewma {:>8.3} ms{ejected}",
                e["ip"].as_str().unwrap_or("?"),
                e["healthy"],
                e["active"],
                e["pending"],
                e["ewma_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

pub fn connections(admin: SocketAddr) -> anyhow::Result<()> {
    let connections = get_json(admin, "/connections")?;
    println!(
        "{:>6} {:<22} {:<22} {:<22} {:>10} {:>10} {:>8}  mtls",
        "id", "client", "destination", "endpoint", "sent", "received", "age_ms"
    );
    for c in connections.as_array().into_iter().flatten() {
        println!(
            "{:>6} {:<22} {:<22} {:<22} {:>10} {:>10} {:>8}  {}",
            c["id"],
            c["client"].as_str().unwrap_or(""),
            c["destination"].as_str().unwrap_or(""),
            c["endpoint"].as_str().unwrap_or(""),
            c["sent"],
            c["received"],
            c["age_ms"],
            c["mtls"]
        );
    }
    Ok(())
}

/// Follows `/events`: one line per finished connection, source to
/// destination with identities, verdict and bytes (like `hubble observe`).
pub fn observe(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let reader = request(admin, "/events")?;
    for line in reader.lines() {
        let line = line?;
        if json {
            println!("{line}");
            continue;
        }
        let Ok(e) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
        let who =
            |workload: String, addr: String| if workload.is_empty() { addr } else { workload };
        println!(
            "{:.3} {} ({}) -> {} ({}) via {} {} {} sent={} received={} {}ms{}",
            e["time"].as_f64().unwrap_or(0.0),
            who(s("src_workload"), s("src")),
            s("src_identity"),
            who(s("dst_workload"), s("dst")),
            s("dst_identity"),
            s("endpoint"),
            s("reporter"),
            s("result").to_uppercase(),
            e["sent"],
            e["received"],
            e["duration_ms"],
            if e["mtls"].as_bool() == Some(true) {
                " mTLS"
            } else {
                ""
            },
        );
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Who talks to whom, as Graphviz DOT (or SVG through `dot`).
pub fn graph(admin: SocketAddr, svg: bool) -> anyhow::Result<()> {
    let edges = get_json(admin, "/graph")?;
    let dot = to_dot(&edges);
    if !svg {
        print!("{dot}");
        return Ok(());
    }
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .spawn()
        .context("running Graphviz `dot` (install graphviz)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(dot.as_bytes())?;
    if !child.wait()?.success() {
        bail!("dot failed");
    }
    Ok(())
}

pub fn to_dot(edges: &Value) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut dot =
        String::from("digraph mesh {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for e in edges.as_array().into_iter().flatten() {
        let label = format!(
            "{} conns\\n{} B sent / {} B received{}",
            e["connections"],
            e["sent"],
            e["received"],
            if e["mutual_tls"].as_bool() == Some(true) {
                "\\nmTLS"
            } else {
                ""
            }
        );
        dot.push_str(&format!(
            "  {} -> {} [label={}];\n",
            quote(e["source"].as_str().unwrap_or("?")),
            quote(e["destination"].as_str().unwrap_or("?")),
            quote(&label)
        ));
    }
    dot.push_str("}\n");
    dot
}

/// A typed dump of every pinned map (what `bpftool map dump` shows, with
/// addresses decoded).
pub fn inspect(pin_root: &Path) -> anyhow::Result<()> {
    let maps = KernelMaps::open_pinned(&PinLayout::new(pin_root))
        .with_context(|| format!("opening the maps pinned under {}", pin_root.display()))?;
    println!("{}", serde_json::to_string_pretty(&maps.dump())?);
    Ok(())
}

/// `probe`: the kernel features and a verifier pass of every program.
pub fn probe(json: bool) -> anyhow::Result<()> {
    use crate::dataplane::{features, probe_programs};
    let statuses = features::probe();
    let programs = probe_programs();
    let kernel = features::kernel_release();
    if json {
        let report = serde_json::json!({
            "kernel": kernel,
            "features": statuses,
            "programs": programs,
        });
        println!("{report}");
    } else {
        println!("kernel {kernel}");
        for status in &statuses {
            let verdict = match (status.available, status.fallback) {
                (true, _) => "yes",
                (false, Some(_)) => "no (fallback)",
                (false, None) => "MISSING",
            };
            println!(
                "  {:<48} {:<14} since {}",
                status.name, verdict, status.since
            );
        }
        for program in &programs {
            match &program.error {
                None => println!("  program {:<40} loads", program.name),
                Some(error) => println!("  program {:<40} FAILS: {error}", program.name),
            }
        }
    }
    features::require(&statuses)?;
    if let Some(failed) = programs.iter().find(|p| !p.loaded) {
        bail!("program {} does not load on this kernel", failed.name);
    }
    Ok(())
}
