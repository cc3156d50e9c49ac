//! Project tasks: `cargo xtask <verb>`. Every verb installs what it needs
//! first, so each works on a fresh machine.

mod kernels;
mod prereqs;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "mesh-agent project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src,
    /// bpf-linker) and mount bpffs.
    Setup,
    /// Build the kernel programs to target/bpf/mesh-ebpf.o.
    BuildEbpf,
    /// Build the kernel programs and every binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test (unit and end-to-end; needs root), then the short
    /// kernel matrix (5.10 and 6.1 in qemu) unless a filter is given.
    Test {
        /// Skip the kernel matrix.
        #[arg(long)]
        no_kernels: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// rustfmt check, clippy (workspace, then the kernel crate) with no
    /// warnings, and cargo deny (licences, bans, sources).
    Lint,
    /// Build everything, start a simulated node with pods and an agent on the
    /// built-in config, send traffic, show what happened, clean up.
    Demo,
    /// The benchmark: release build, two simulated nodes, meshed versus
    /// plain pods (iperf3, sockperf, connection rate, agent CPU and memory);
    /// table and JSON in target/bench. `--smoke` uses the tests' debug
    /// build instead (it checks the bench runs; its figures are not
    /// comparable).
    Bench {
        /// Every case once, for a few seconds (what CI runs).
        #[arg(long)]
        smoke: bool,
        /// Extra arguments for mesh-bench (--rounds, --seconds, --idle-connections, --only).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The soak: two simulated nodes under held connections and a steady
    /// rate of new ones (both close orders, same node and across nodes),
    /// an endpoint killed and the config broken mid-run; reports failed
    /// and slow connections, wrong checksums, lost held connections and
    /// the agents' peak RSS and open files (target/soak). Default: release
    /// build, 60 s, 10,000 held, 1,000 new per second.
    Soak {
        /// 15 s, 1,000 held, 200 per second, debug build (what CI runs).
        #[arg(long)]
        short: bool,
        /// Extra arguments for mesh-soak (--seconds, --hold, --rate).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The kernel matrix: boot Debian's kernels (5.10 to the newest 7.x) in
    /// qemu and run the programs and the core scenarios in each.
    Kernels {
        /// Only the kernels CI runs (5.10 and 6.1).
        #[arg(long)]
        short: bool,
        /// Kernel series to run ("5.10", "6.12"; "6.x" is the newest 6).
        #[arg(long = "kernel", value_name = "SERIES")]
        kernels: Vec<String>,
    },
    /// Fuzz what a peer, a pod or a file can feed the agent (config,
    /// HBONE CONNECT requests, SPIFFE IDs and certificates, authorization
    /// patterns): cargo-fuzz with libFuzzer and AddressSanitizer, each
    /// target for `--time` seconds from the committed corpus in
    /// fuzz/corpus (new inputs go to fuzz/target/corpus; crashes to
    /// fuzz/artifacts).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Build the targets without optimisation (still with the
        /// sanitizer): about half the build time, fewer runs a second.
        /// For CI's short regression run from the corpus.
        #[arg(long)]
        dev: bool,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Remove what interrupted or failed tests and demos left: namespaces,
    /// cgroups, pins and temporary files whose names start with the
    /// fixtures' prefix (failed tests keep their agent logs there).
    CleanTestEnv,
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().command {
        Task::Setup => prereqs::install_all(),
        Task::BuildEbpf => build_ebpf(&root),
        Task::Build { release } => build(&root, release),
        Task::Test { no_kernels, args } => {
            prereqs::install_all()?;
            build(&root, false)?;
            let matrix = !no_kernels && args.is_empty();
            let mut command = cargo(&root);
            command.args([
                "test",
                "--workspace",
                "--exclude",
                "xtask",
                "--no-fail-fast",
            ]);
            if !args.is_empty() {
                command.arg("--").args(args);
            }
            let tests = run(&mut command);
            // The matrix runs even when a test failed: its table says
            // whether the failure is this kernel's alone.
            if matrix {
                prereqs::install_matrix_packages()?;
                kernels::run(&root, &kernels::Options::short())?;
            }
            tests
        }
        Task::Lint => {
            prereqs::install_toolchain()?;
            build_ebpf(&root)?;
            run(cargo(&root).args(["fmt", "--all", "--", "--check"]))?;
            run(Command::new(rustfmt())
                .args(["--edition", "2024", "--check"])
                .arg(root.join("mesh-ebpf/src/main.rs")))?;
            run(cargo(&root).args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(ebpf_cargo(&root, "clippy").args(["--", "-D", "warnings"]))?;
            // Intra-doc links break silently when code moves.
            run(cargo(&root).env("RUSTDOCFLAGS", "-D warnings").args([
                "doc",
                "--workspace",
                "--no-deps",
                "--document-private-items",
            ]))?;
            // Advisories need the RustSec database from github.com, which
            // the build machines cannot reach: licences, bans and sources.
            prereqs::install_cargo_deny()?;
            run(cargo(&root).args(["deny", "check", "licenses", "bans", "sources"]))
        }
        Task::Demo => {
            prereqs::install_all()?;
            build(&root, false)?;
            run(&mut Command::new(root.join("target/debug/mesh-demo")))
        }
        Task::Kernels { short, kernels } => {
            prereqs::install_all()?;
            prereqs::install_matrix_packages()?;
            build(&root, false)?;
            let options = if !kernels.is_empty() {
                kernels::Options { series: kernels }
            } else if short {
                kernels::Options::short()
            } else {
                kernels::Options::full()
            };
            kernels::run(&root, &options)
        }
        Task::Bench { smoke, args } => {
            prereqs::install_all()?;
            prereqs::install_bench_packages()?;
            // The smoke run only proves the bench works: the tests' debug
            // build spares CI a second, release, build of everything.
            build(&root, !smoke)?;
            let profile = if smoke { "debug" } else { "release" };
            let mut command = Command::new(root.join(format!("target/{profile}/mesh-bench")));
            command
                .current_dir(&root)
                .arg("--out")
                .arg(root.join("target/bench"));
            if smoke {
                command.arg("--smoke");
            }
            run(command.args(args))
        }
        Task::CleanTestEnv => clean_test_env(&root),
        Task::Soak { short, args } => {
            prereqs::install_all()?;
            build(&root, !short)?;
            let profile = if short { "debug" } else { "release" };
            let mut command = Command::new(root.join(format!("target/{profile}/mesh-soak")));
            command
                .current_dir(&root)
                .arg("--out")
                .arg(root.join("target/soak"));
            if short {
                command.args(["--seconds", "15", "--hold", "1000", "--rate", "200"]);
            }
            run(command.args(args))
        }
        Task::Fuzz { time, dev, targets } => fuzz(&root, time, dev, &targets),
    }
}

const FUZZ_TARGETS: [&str; 4] = ["config", "hbone_request", "spiffe", "authz_match"];

fn fuzz(root: &Path, seconds: u64, dev: bool, only: &[String]) -> anyhow::Result<()> {
    prereqs::install_fuzzing()?;
    build_ebpf(root)?;
    let fuzz_dir = root.join("fuzz");
    let targets: Vec<&str> = if only.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        FUZZ_TARGETS
            .into_iter()
            .filter(|t| only.iter().any(|o| o == t))
            .collect()
    };
    if targets.is_empty() {
        bail!("no such target; targets: {}", FUZZ_TARGETS.join(", "));
    }
    let mut report = Vec::new();
    for target in targets {
        let found = fuzz_dir.join("target/corpus").join(target);
        let seeds = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&found)?;
        std::fs::create_dir_all(&seeds)?;
        let started = std::time::Instant::now();
        let mut command = Command::new("cargo");
        command
            .current_dir(&fuzz_dir)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .args(["+nightly", "fuzz", "run", target]);
        if dev {
            command.arg("--dev");
        }
        let result = run(command.arg(&found).arg(&seeds).args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-rss_limit_mb=2048",
        ]));
        let inputs = std::fs::read_dir(&found).map_or(0, |d| d.count());
        report.push(format!(
            "{target}: {} after {:.0} s, {inputs} new inputs in {}",
            if result.is_ok() {
                "no crash"
            } else {
                "CRASHED (see fuzz/artifacts)"
            },
            started.elapsed().as_secs_f64(),
            found.display()
        ));
        if result.is_err() {
            println!("{}", report.join("\n"));
            return result;
        }
    }
    println!("{}", report.join("\n"));
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// The cargo that runs us (so the same toolchain builds everything).
fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root);
    command
}

fn rustfmt() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .and_then(|cargo| cargo.parent().map(|dir| dir.join("rustfmt")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| "rustfmt".into())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Where `build-ebpf` puts the kernel object (the agent embeds it from here).
pub const EBPF_OBJECT: &str = "target/bpf/mesh-ebpf.o";

/// cargo for the kernel crate: bpfel target, core built from source (on the
/// stable compiler, through RUSTC_BOOTSTRAP), BTF for bpftool.
fn ebpf_cargo(root: &Path, verb: &str) -> Command {
    let mut command = cargo(&root.join("mesh-ebpf"));
    command
        .args([
            verb,
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg",
                "bpf_target_arch=\"x86_64\"",
                "-C",
                "debuginfo=2",
                "-C",
                "link-arg=--btf",
            ]
            .join("\x1f"),
        );
    command
}

fn build_ebpf(root: &Path) -> anyhow::Result<()> {
    prereqs::install_toolchain()?;
    run(&mut ebpf_cargo(root, "build"))?;
    let built = root.join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf");
    let object = root.join(EBPF_OBJECT);
    std::fs::create_dir_all(object.parent().expect("has a parent"))?;
    // Copy only on change so the agent is not rebuilt for nothing.
    let new = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if std::fs::read(&object).ok().as_deref() != Some(new.as_slice()) {
        std::fs::write(&object, new)?;
    }
    println!("kernel object: {}", object.display());
    Ok(())
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    build_ebpf(root)?;
    let mut command = cargo(root);
    command.args(["build", "--workspace", "--exclude", "xtask", "--bins"]);
    if release {
        command.arg("--release");
    }
    run(&mut command)
}

fn clean_test_env(root: &Path) -> anyhow::Result<()> {
    let prefix = "mt";
    let owned = |name: &str| {
        name.starts_with(prefix) && name[prefix.len()..].starts_with(|c: char| c.is_ascii_digit())
    };
    let agent = root.join("target/debug/mesh-agent");
    // A real node's kubelet, containerd and its shims, and the control
    // plane a killed test left running: their command lines name the
    // test's directory.
    kill_processes_mentioning(&format!("{}/{prefix}", std::env::temp_dir().display()));
    // Pins first (in the right namespace the routing goes too), then namespaces.
    for entry in std::fs::read_dir("/sys/fs/bpf")?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if owned(&name) {
            let netns = Path::new("/run/netns").join(&name);
            let mut command = Command::new("nsenter");
            if netns.exists() {
                command.arg(format!("--net={}", netns.display()));
            }
            command
                .arg(&agent)
                .args(["cleanup", "--pin-root"])
                .arg(entry.path());
            if run(&mut command).is_err() {
                std::fs::remove_dir_all(entry.path()).ok();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owned(&name) {
                run(Command::new("ip").args(["netns", "del", &name]))?;
            }
        }
    }
    for cgroup_root in [
        "/sys/fs/cgroup/unified/mesh-tests",
        "/sys/fs/cgroup/mesh-tests",
    ] {
        remove_cgroup_tree(Path::new(cgroup_root));
    }
    // kubelet's cgroups in each cgroup v1 hierarchy (the real node's).
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        remove_cgroup_tree(&hierarchy.path().join("mesh-tests"));
    }
    // Volumes and container root filesystems under the tests' directories,
    // then the pod sandboxes' namespaces nothing uses any more.
    unmount_below(&format!("{}/{prefix}", std::env::temp_dir().display()));
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let unused = Command::new("ip")
                .args(["netns", "pids", &name])
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.is_empty());
            if name.starts_with("cni-") && unused {
                run(Command::new("ip").args(["netns", "del", &name]))?;
            }
        }
    }
    // Configs, CA directories, captures, and the agent logs kept for failed tests.
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        if owned(&entry.file_name().to_string_lossy()) {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
    println!("test environment clean");
    Ok(())
}

/// SIGKILLs every process whose command line contains `needle`.
fn kill_processes_mentioning(needle: &str) {
    let own = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) || pid == own {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

/// Unmounts every mount point whose path starts with `prefix`, deepest first.
fn unmount_below(prefix: &str) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

/// Kills what runs in a cgroup tree and removes it, deepest first.
fn remove_cgroup_tree(path: &Path) {
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(path).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
