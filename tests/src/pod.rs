//! A pod: a network namespace on a veth to its node, its own cgroup, and
//! `mesh-pod` processes running inside both.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    cgroup::Cgroup,
    mesh_pod_bin,
    netns::NetNs,
    process::{self, Guarded, Lines},
};

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The veth end in the node namespace.
    pub host_if: String,
    // Processes die with the cgroup; the namespace goes last.
    pub cgroup: Cgroup,
    pub netns: NetNs,
}

/// A `mesh-pod serve` process.
pub struct Server {
    pub port: u16,
    pub lines: Lines,
    _process: Guarded,
}

impl Server {
    /// One parsed JSON line per finished connection.
    pub fn connections(&self) -> Vec<Value> {
        self.lines
            .snapshot()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until `count` connections finished, and returns them.
    pub fn wait_connections(&self, count: usize, timeout: Duration) -> Vec<Value> {
        // The first line is "listening".
        self.lines.wait_for(count + 1, timeout);
        self.connections()
    }
}

/// Options of `mesh-pod connect`.
#[derive(Default, Clone, Copy)]
pub struct Connect {
    pub count: u32,
    pub send: u64,
    pub reset: bool,
    /// Send before reading the server's greeting (so the first bytes are
    /// on their way before the path to the server is open).
    pub send_first: bool,
    /// Source address (one of the pod's).
    pub bind: Option<Ipv4Addr>,
    /// Connections spread over this many threads.
    pub parallel: u32,
    /// After the greeting, wait for the server to close first.
    pub wait_close: bool,
    /// Send on a non-blocking socket, waiting for writability with
    /// edge-triggered epoll (as tokio and Go do); a wait of 5 s without
    /// an edge is reported as a stall.
    pub edge_triggered: bool,
    /// A connect refused by a reset is reported (`"refused": true`), not
    /// a failure of the whole client.
    pub report_refused: bool,
    /// Make a failed connection again, up to this many times (a caller's
    /// retry policy); reports say how many `attempts` each took.
    pub retries: u32,
}

/// A `mesh-pod connect --hold` process: one open connection until dropped
/// or released.
pub struct Held {
    pub local: SocketAddr,
    pub greeting: String,
    lines: Lines,
    process: Guarded,
}

impl Held {
    /// Lets the connection finish (half-close, read the answer) and returns
    /// the client's report.
    pub fn release(self) -> Value {
        let mut child = self.process.into_inner();
        drop(child.stdin.take());
        let status = child.wait().expect("wait held client");
        assert!(status.success(), "held client failed: {status}");
        let lines = self.lines.wait_for(2, Duration::from_secs(10));
        serde_json::from_str(lines.last().expect("a report")).expect("client JSON")
    }
}

impl Pod {
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut command = Command::new(program);
        process::enter(&mut command, &self.netns.path(), Some(self.cgroup.path()));
        command
    }

    /// Waits (at most 10 s) until something in the pod accepts
    /// connections on `port`.
    pub fn wait_listening(&self, port: u16) -> Result<(), String> {
        let addr = SocketAddr::new(self.ip.into(), port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .netns
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(format!("server on {addr} in {} did not start", self.name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts a server on `port` that introduces itself as `name`.
    pub fn serve(&self, port: u16, name: &str, reset: bool) -> Server {
        self.serve_with(port, name, &["--delay-ms", "0"], reset)
    }

    /// A server that holds each connection `delay_ms` before greeting.
    pub fn serve_delayed(&self, port: u16, name: &str, reset: bool, delay_ms: u64) -> Server {
        self.serve_with(port, name, &["--delay-ms", &delay_ms.to_string()], reset)
    }

    /// A server that reads slowly: it sleeps `read_delay_ms` after every
    /// read of at most 64 KiB.
    pub fn serve_slow_reader(&self, port: u16, name: &str, read_delay_ms: u64) -> Server {
        self.serve_with(
            port,
            name,
            &["--read-delay-ms", &read_delay_ms.to_string()],
            false,
        )
    }

    /// A server that reads at most `mib_per_s` MiB a second, slower than
    /// its senders yet fast enough for gigabytes.
    pub fn serve_paced(&self, port: u16, name: &str, mib_per_s: u64) -> Server {
        self.serve_with(
            port,
            name,
            &["--read-rate-mib", &mib_per_s.to_string()],
            false,
        )
    }

    /// A server that greets and closes at once, before its client does.
    pub fn serve_closing_first(&self, port: u16, name: &str) -> Server {
        self.serve_with(port, name, &["--close-first"], false)
    }

    fn serve_with(&self, port: u16, name: &str, args: &[&str], reset: bool) -> Server {
        let mut command = self.command(&mesh_pod_bin());
        command.args(["serve", "--port", &port.to_string(), "--name", name]);
        command.args(args);
        if reset {
            command.arg("--reset");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting server in {}: {e}", self.name));
        let stdout = child.stdout.take().expect("piped");
        let process = Guarded::new(child);
        let (lines, rx) = Lines::collect(stdout);
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line == "listening" => {}
            other => panic!("server in {} did not start: {other:?}", self.name),
        }
        Server {
            port,
            lines,
            _process: process,
        }
    }

    /// Runs `mesh-pod connect` to completion: one JSON report per connection.
    pub fn connect(&self, addr: SocketAddr, options: Connect) -> Vec<Value> {
        self.try_connect(addr, options)
            .unwrap_or_else(|error| panic!("client in {} to {addr} failed: {error}", self.name))
    }

    /// Like [`Pod::connect`], but a client that could not connect at all is
    /// an `Err` with its message rather than a panic.
    pub fn try_connect(&self, addr: SocketAddr, options: Connect) -> Result<Vec<Value>, String> {
        run_client(self.command(&mesh_pod_bin()), addr, options)
    }

    /// Connects to `addr` (a peer that reads nothing) and writes without
    /// blocking until writes have stalled for a second (or 20 s passed):
    /// how many bytes the path took. Without back-pressure somewhere on
    /// the way, that would be as much as 20 s of writing allows.
    pub fn write_until_stalled(&self, addr: SocketAddr) -> u64 {
        self.netns.run(|| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream.set_nonblocking(true).unwrap();
            let chunk = vec![7u8; 64 * 1024];
            let mut accepted = 0u64;
            let mut stalled_since = None;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match stream.write(&chunk) {
                    Ok(n) => {
                        accepted += n as u64;
                        stalled_since = None;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let since = *stalled_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(1) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("write failed: {e}"),
                }
            }
            accepted
        })
    }

    /// Opens one connection and keeps it open until the result is released.
    pub fn hold(&self, addr: SocketAddr) -> Held {
        let mut child = self
            .command(&mesh_pod_bin())
            .args(["connect", "--addr", &addr.to_string(), "--hold"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting held client");
        let stdout = child.stdout.take().expect("piped");
        let (lines, rx) = Lines::collect(stdout);
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                panic!("held connection from {} to {addr} did not open", self.name)
            });
        let report: Value = serde_json::from_str(&line).expect("client JSON");
        Held {
            local: report["local"].as_str().unwrap().parse().unwrap(),
            greeting: report["greeting"].as_str().unwrap().to_owned(),
            lines,
            process: Guarded::new(child),
        }
    }
}

/// Runs `command` (`mesh-pod` entering some pod) as `mesh-pod connect` to
/// `addr` with `options`, to completion: one JSON report per connection,
/// or the client's error when it could not connect at all.
pub fn run_client(
    mut command: Command,
    addr: SocketAddr,
    options: Connect,
) -> Result<Vec<Value>, String> {
    command.args([
        "connect",
        "--addr",
        &addr.to_string(),
        "--count",
        &options.count.max(1).to_string(),
        "--send",
        &options.send.to_string(),
    ]);
    if options.reset {
        command.arg("--reset");
    }
    if options.send_first {
        command.arg("--send-first");
    }
    if options.edge_triggered {
        command.arg("--edge-triggered");
    }
    if options.report_refused {
        command.arg("--report-refused");
    }
    if options.retries > 0 {
        command.args(["--retries", &options.retries.to_string()]);
    }
    if let Some(bind) = options.bind {
        command.args(["--bind", &bind.to_string()]);
    }
    if options.wait_close {
        // Long enough that a stalled handshake shows in the durations
        // rather than as a failure.
        command.args(["--wait-close", "--connect-timeout-ms", "30000"]);
    }
    command.args(["--parallel", &options.parallel.max(1).to_string()]);
    let output = command.output().expect("running client");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("client JSON"))
        .collect())
}
