//! Simulated cluster for mesh-agent's tests and demo, on one real kernel:
//! - a **node** is a network namespace with its own cgroup subtree and its
//!   own agent (own pin root);
//! - a **pod** is a network namespace joined to its node by a veth pair,
//!   with its own cgroup under the node's;
//! - traffic is real TCP between real processes (`mesh-pod`) in the pods.
//!
//! Every fixture is an RAII guard that tears down what it made on drop, even
//! when a test panics. Names start with [`PREFIX`] and carry the test's
//! label and the process id, so parallel tests never collide and
//! `cargo xtask clean-test-env` can find leftovers.

pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod cluster;
pub mod image;
pub mod jaeger;
pub mod kube_node;
pub mod kubelet;
pub mod load;
pub mod manifest;
pub mod netns;
pub mod payload;
pub mod pod;
pub mod process;
pub mod raw_hbone;
pub mod scenario;
pub mod topology;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
};

/// Every namespace, cgroup and pin root the fixtures make starts with this.
pub const PREFIX: &str = "mt";

/// A name unique to this process and call: `mt<pid>x<n>-<label>`.
pub fn unique_name(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}x{n}-{label}", std::process::id())
}

/// Path of a binary built next to the running one (test binaries live in
/// `target/<profile>/deps`, binaries in `target/<profile>`), unless the
/// environment variable `env` names it.
pub fn sibling_binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found near {}: build it first (cargo build --bins)",
                exe.display()
            )
        })
}

pub fn mesh_agent_bin() -> PathBuf {
    sibling_binary("mesh-agent", "MESH_AGENT_BIN")
}

pub fn mesh_pod_bin() -> PathBuf {
    sibling_binary("mesh-pod", "MESH_POD_BIN")
}

/// Runs a command to completion and panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    if !output.status.success() {
        panic!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `bpftool -j ARGS`, parsed; `None` when bpftool fails (e.g. no such id).
pub fn bpftool(args: &[&str]) -> Option<serde_json::Value> {
    let output = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("running bpftool");
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// The hard limit on open files (0 when it cannot be read).
pub fn open_files_hard_limit() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(_, hard)| hard)
}

/// Raises the soft limit on open files to the hard one: load helpers hold
/// thousands of connections.
pub fn raise_open_files_limit() {
    let hard = open_files_hard_limit();
    // Failure leaves the old limit.
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
}

/// Sets its flag when dropped, also on a panic: threads of a
/// `std::thread::scope` that loop until the flag stop then, instead of
/// holding the scope (and the failed test) for ever.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A server binary `cargo xtask` builds from its Go module
/// (`target/tools/<name>`).
pub fn tool(name: &str) -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask setup` (or `cargo xtask test`) builds it from its Go module",
        path.display()
    );
    path
}

/// Waits (at most 30 s, else the test fails naming `what`) until `check`
/// holds; returns how long that took.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let took = start.elapsed();
    println!("{what}: after {took:?}");
    took
}
