//! A real `mesh-agent run` process in a node's namespace, with its own pin
//! root. Dropping it stops it with SIGTERM (SIGKILL and `cleanup` if that
//! fails), so no test leaves kernel state behind.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    mesh_agent_bin,
    pod::Held,
    process::{self, Guarded},
    topology::Node,
};

pub const READY_PORT: u16 = 15021;
pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;

/// The value of the sample `name` in metrics `text` whose labels include
/// all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// How to start an agent beyond its config.
#[derive(Default)]
pub struct Launch<'a> {
    pub env: &'a [(&'a str, &'a str)],
    /// Only these capabilities (setpriv names: `bpf`, `net_admin`, ...).
    pub capabilities: Option<&'a [&'a str]>,
    /// Under the seccomp profile a container runtime gives by default
    /// (RuntimeDefault), for those capabilities, with no_new_privs set (as
    /// `allowPrivilegeEscalation: false` sets it).
    pub runtime_default_seccomp: bool,
}

/// containerd's default seccomp profile for a container with
/// `capabilities`, written to a file: `cargo xtask` builds the tool that
/// prints it from containerd's own module.
fn runtime_default_seccomp(capabilities: &[&str], path: &Path) {
    let tool =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/runtime-default-seccomp");
    let output = Command::new(&tool)
        .arg(capabilities.join(","))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (cargo xtask setup builds it from containerd's Go module)",
                tool.display()
            )
        });
    assert!(output.status.success(), "{output:?}");
    std::fs::write(path, output.stdout).expect("write seccomp profile");
}

pub struct Agent {
    process: Option<Guarded>,
    /// Handed its kernel state to another agent: dropping this one must
    /// leave the pin root alone.
    handed_over: bool,
    pub pin_root: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
    netns: PathBuf,
    node: String,
}

impl Agent {
    /// Starts the agent on `node` with `config` (YAML) and waits until it
    /// reports ready.
    pub fn start(node: &Node, config: &str) -> Self {
        let agent = Self::spawn(node, config);
        agent.wait_ready();
        agent
    }

    /// Like [`Agent::start`], launched as `launch` says.
    pub fn start_with(node: &Node, config: &str, launch: &Launch<'_>) -> Self {
        let agent = Self::spawn_with(node, config, launch);
        agent.wait_ready();
        agent
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(node: &Node, config: &str) -> Self {
        Self::spawn_with(node, config, &Launch::default())
    }

    pub fn spawn_with(node: &Node, config: &str, launch: &Launch<'_>) -> Self {
        // The agent watches its config file's directory: one of its own
        // keeps the agent from waking for every other file written in /tmp
        // (its own log among them).
        // Paths of their own per agent: a node may run a new agent beside
        // its old one (a handover).
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let serial = match STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
            0 => String::new(),
            n => format!(".{n}"),
        };
        let config_dir = std::env::temp_dir().join(format!("{}{serial}.config", node.name));
        std::fs::create_dir_all(&config_dir).expect("create config directory");
        let config_path = config_dir.join("config.yaml");
        let log_path = std::env::temp_dir().join(format!("{}{serial}.log", node.name));
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::File::create(&log_path).expect("create log");
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if launch.runtime_default_seccomp {
            let capabilities = launch.capabilities.expect("seccomp goes with capabilities");
            let profile = config_dir.join("seccomp.json");
            runtime_default_seccomp(capabilities, &profile);
            // The filter is installed first (libseccomp sets no_new_privs),
            // so setpriv and the agent both run under it.
            argv.push("/usr/bin/python3".into());
            argv.push(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tools/seccomp-exec.py")
                    .into(),
            );
            argv.push(profile.into());
        }
        if let Some(capabilities) = launch.capabilities {
            // Root, but with only these capabilities: what a container
            // with `capabilities: {drop: [ALL], add: [...]}` gets.
            let set = format!(
                "-all,{}",
                capabilities
                    .iter()
                    .map(|c| format!("+{c}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            // Root's permitted set after exec is the bounding set.
            argv.extend([
                "setpriv".into(),
                "--bounding-set".into(),
                set.into(),
                "--".into(),
            ]);
        }
        argv.push(mesh_agent_bin().into());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--pin-root")
            .arg(&node.pin_root)
            .arg("--handover-socket")
            .arg(node.handover_socket())
            .env("MESH_LOG", "info,mesh_agent=debug")
            .envs(launch.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        process::enter(&mut command, &node.netns.path(), None);
        let child = command.spawn().expect("starting mesh-agent");
        Self {
            process: Some(Guarded::new(child)),
            handed_over: false,
            pin_root: node.pin_root.clone(),
            config_path,
            log_path,
            netns: node.netns.path(),
            node: node.name.clone(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").pid()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (30 s at most) until the agent reports ready.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(status)) = self.process.as_ref().map(|_| self.try_exit_status())
                && let Some(status) = status
            {
                panic!(
                    "agent on {} exited ({status}) before ready:\n{}",
                    self.node,
                    self.log()
                );
            }
            if self
                .http_get(READY_PORT, "/healthz/ready")
                .is_some_and(|(code, _)| code == 200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent on {} not ready in 30 s:\n{}", self.node, self.log());
    }

    fn try_exit_status(&self) -> std::io::Result<Option<ExitStatus>> {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on our own child; reaping is fine
        // because Guarded's later wait() just fails with ECHILD.
        let pid = unsafe { libc::waitpid(self.pid() as i32, &mut status, libc::WNOHANG) };
        if pid > 0 {
            use std::os::unix::process::ExitStatusExt;
            return Ok(Some(ExitStatus::from_raw(status)));
        }
        Ok(None)
    }

    /// The live connections (`/connections`).
    pub fn live_connections(&self) -> Vec<Value> {
        let (code, body) = self
            .http_get(ADMIN_PORT, "/connections")
            .expect("GET /connections");
        assert_eq!(code, 200, "{body}");
        let live: Value = serde_json::from_str(&body).expect("/connections JSON");
        live.as_array().expect("a list").clone()
    }

    /// The `/connections` entry of the live connection from `client`.
    pub fn live_connection(&self, client: SocketAddr) -> Value {
        let live = self.live_connections();
        live.iter()
            .find(|e| e["client"] == client.to_string().as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{client} not listed: {live:?}"))
    }

    /// Waits for the agent to log an idle timeout, then checks that the
    /// held connection was reset by it.
    pub fn expect_idle_reset(&self, held: Held) {
        assert!(
            self.wait_log("idle timeout", 1, Duration::from_secs(10)),
            "{}",
            self.log()
        );
        let report = held.release();
        assert!(
            report["error"]
                .as_str()
                .unwrap_or_default()
                .contains("reset"),
            "{report}"
        );
    }

    /// GET on the agent's loopback (inside the node namespace); returns the
    /// status code and body.
    pub fn http_get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        self.http("GET", port, path)
    }

    /// `method` on the agent's loopback; returns the status code and body.
    pub fn http(&self, method: &str, port: u16, path: &str) -> Option<(u16, String)> {
        http_request(&self.netns, method, port, path)
    }

    /// The body of a GET that must answer 200.
    fn get_ok(&self, port: u16, path: &str) -> String {
        let (code, body) = self
            .http_get(port, path)
            .unwrap_or_else(|| panic!("GET {path}: no answer"));
        assert_eq!(code, 200, "{path}: {body}");
        body
    }

    /// The agent's `/stats` JSON.
    pub fn stats(&self) -> Value {
        serde_json::from_str(&self.get_ok(ADMIN_PORT, "/stats")).expect("stats JSON")
    }

    /// The agent's `/config_dump` JSON.
    pub fn config_dump(&self) -> Value {
        serde_json::from_str(&self.get_ok(ADMIN_PORT, "/config_dump")).expect("config_dump JSON")
    }

    /// The agent's `/metrics` text.
    pub fn metrics(&self) -> String {
        self.get_ok(METRICS_PORT, "/metrics")
    }

    /// A kernel counter from `/stats` (e.g. "captured").
    /// The value of an unlabelled series in `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        sample(&text, name, &[]).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    /// The workload `name` as the model in `/config_dump` has it.
    pub fn workload(&self, name: &str) -> Option<Value> {
        self.config_dump()["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.stats()["kernel"]["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("counter {name}"))
    }

    /// Replaces the config file and sends SIGHUP.
    pub fn reload(&self, config: &str) {
        self.rewrite_config(config);
        self.signal(libc::SIGHUP);
    }

    /// Replaces the config file the way editors do (write aside, rename
    /// over), without a signal: the agent's file watch must notice.
    pub fn rewrite_config(&self, config: &str) {
        let aside = self.config_path.with_extension("yaml.new");
        std::fs::write(&aside, config).expect("write config");
        std::fs::rename(&aside, &self.config_path).expect("rename config");
    }

    /// Waits until the agent's log has `count` lines containing `needle`.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// SIGTERM, then wait for the exit (at most 30 s).
    pub fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait_exit(Duration::from_secs(30))
    }

    /// SIGTERM without waiting: the agent drains, then exits.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits for the agent to exit (panics after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.try_exit_status() {
                self.process.take().map(Guarded::into_inner);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Marks this agent as one that handed over to a successor: its drop
    /// leaves the kernel state (the successor's now) alone.
    pub fn handed_over(&mut self) {
        self.handed_over = true;
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            drop(process);
        }
    }

    /// `mesh-agent cleanup` for this agent's pin root, in its namespace.
    pub fn cleanup(&self) -> Output {
        cleanup(&self.netns, &self.pin_root)
    }
}

pub fn cleanup(netns: &Path, pin_root: &Path) -> Output {
    let mut command = Command::new(mesh_agent_bin());
    command.arg("cleanup").arg("--pin-root").arg(pin_root);
    process::enter(&mut command, netns, None);
    command.output().expect("running mesh-agent cleanup")
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.process.is_some() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.try_exit_status() {
                    self.process.take().map(Guarded::into_inner);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.kill();
        }
        if self.pin_root.exists() && !self.handed_over {
            let _ = self.cleanup();
        }
        if let Some(config_dir) = self.config_path.parent() {
            let _ = std::fs::remove_dir_all(config_dir);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log_path);
        } else {
            // CI keeps only what is printed: the agent's last complaints
            // often say why the test failed.
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            let complaints: Vec<&str> = log
                .lines()
                .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                .collect();
            for line in &complaints[complaints.len().saturating_sub(15)..] {
                eprintln!("  agent: {line}");
            }
            eprintln!("agent log kept at {}", self.log_path.display());
        }
    }
}

/// `method path` (HTTP/1.0) to 127.0.0.1:`port` inside the network
/// namespace at `netns`; returns the status code and body.
pub fn http_request(netns: &Path, method: &str, port: u16, path: &str) -> Option<(u16, String)> {
    crate::netns::run_in(netns, || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((code, body))
    })
}
