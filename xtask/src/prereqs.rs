//! Prerequisites, installed only when missing: Debian packages by the
//! command they provide, the nightly toolchain with rust-src and
//! bpf-linker for the kernel crate, and the tools the bench, the fuzzers
//! and the seccomp test need. docs/development.md says why each is needed.

use std::process::Command;

use anyhow::{Context, bail};

/// Debian packages the build, tests and demo call, by the command they provide.
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    // The tests' outside witnesses: capture on the wire, a foreign TLS
    // client, the exposition linter and a real server, DOT rendering.
    ("tcpdump", "tcpdump"),
    ("openssl", "openssl"),
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("dot", "graphviz"),
    // The rollout test's real node: the ptp CNI plugin wires its pods as
    // Calico does, and runc (built from its module) needs libseccomp for
    // the RuntimeDefault profile.
    ("/usr/lib/cni/ptp", "containernetworking-plugins"),
    ("/usr/include/seccomp.h", "libseccomp-dev"),
    ("pkg-config", "pkg-config"),
    ("cc", "gcc"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// The Kubernetes schema validator the manifest tests run.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// grpcio and its protoc, for the CA service's wire test: a client
/// generated from Istio's proto by an implementation not ours.
const GRPCIO: [&str; 2] = ["grpcio==1.85.1", "grpcio-tools==1.85.1"];

pub fn install_all() -> anyhow::Result<()> {
    install_packages()?;
    install_toolchain()?;
    install_kubernetes_validate()?;
    install_grpcio()?;
    install_seccomp_tools()?;
    install_kube_servers()?;
    install_container_runtime()?;
    install_trace_collector()?;
    mount_bpffs()
}

/// cargo-deny, pinned like the other tools.
const CARGO_DENY_VERSION: &str = "0.20.2";

const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// cargo-fuzz, and the nightly compiler its sanitizers need.
pub fn install_fuzzing() -> anyhow::Result<()> {
    if !output("rustup", &["toolchain", "list"]).is_ok_and(|l| l.contains("nightly")) {
        println!("installing the nightly toolchain (cargo-fuzz's sanitizers need it)");
        status(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    if output("cargo", &["fuzz", "--version"]).is_ok_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    println!("installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    status(
        "cargo",
        &[
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ],
    )
}

/// Where `cargo xtask` keeps tools it builds (the workspace's target/).
fn tools_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools")
}

/// cargo-deny, for `cargo xtask lint`'s licence, ban and source checks.
pub fn install_cargo_deny() -> anyhow::Result<()> {
    if output("cargo-deny", &["--version"]).is_ok_and(|v| v.contains(CARGO_DENY_VERSION)) {
        return Ok(());
    }
    println!("installing cargo-deny {CARGO_DENY_VERSION}");
    status(
        "cargo",
        &[
            "install",
            "cargo-deny",
            "--version",
            CARGO_DENY_VERSION,
            "--locked",
        ],
    )
}

/// What the tests need to run the agent under a container runtime's
/// default seccomp profile: libseccomp's Python bindings (Debian's, for
/// Debian's python3), and containerd's own profile, printed by a tool
/// built from containerd's Go module (pinned in its go.mod and go.sum).
fn install_seccomp_tools() -> anyhow::Result<()> {
    if !Command::new("/usr/bin/python3")
        .args(["-c", "import seccomp"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("installing python3-seccomp");
        status("apt-get", &["update", "-qq"])?;
        status(
            "apt-get",
            &[
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "python3-seccomp",
            ],
        )?;
    }
    go_tool("runtime-default-seccomp", ".")
}

/// etcd and kube-apiserver, for the tests' real Kubernetes API server,
/// built from their Go modules (versions pinned in `xtask/tools/*/go.mod`
/// and go.sum): nothing here can download their binaries.
pub fn install_kube_servers() -> anyhow::Result<()> {
    go_tool("etcd", "go.etcd.io/etcd/server/v3")?;
    for component in KUBERNETES_COMPONENTS {
        go_build(&GoBuild {
            module: "kube-apiserver",
            binary: component,
            package: &format!("k8s.io/kubernetes/cmd/{component}"),
            ..GoBuild::default()
        })?;
    }
    Ok(())
}

/// What the rollout test runs of Kubernetes, all from `k8s.io/kubernetes`
/// (the module under `xtask/tools/kube-apiserver`): a control plane with
/// the DaemonSet controller and the scheduler, and a real node.
const KUBERNETES_COMPONENTS: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    // The README's upgrade command, run as written.
    "kubectl",
];

/// The rollout test's container runtime: containerd with its runc shim
/// and `ctr` (which imports the locally built images; no registry is
/// reachable), and runc. Static containerd (no cgo: no btrfs or devmapper
/// snapshotters, which the test does not use); runc with cgo and
/// libseccomp, so RuntimeDefault profiles are enforced as on a real node.
pub fn install_container_runtime() -> anyhow::Result<()> {
    for binary in ["containerd", "containerd-shim-runc-v2", "ctr"] {
        go_build(&GoBuild {
            module: "containerd",
            binary,
            package: &format!("github.com/containerd/containerd/v2/cmd/{binary}"),
            cgo: false,
            ..GoBuild::default()
        })?;
    }
    go_build(&GoBuild {
        module: "runc",
        binary: "runc",
        package: "github.com/opencontainers/runc",
        cgo: true,
        tags: "seccomp",
    })?;
    build_pause()
}

/// The pod sandboxes' `pause`: kubelet's own C program, from the
/// `k8s.io/kubernetes` module the API server is built from, linked
/// statically (the test's sandbox image holds nothing else).
fn build_pause() -> anyhow::Result<()> {
    let binary = tools_dir().join("pause");
    if binary.exists() {
        return Ok(());
    }
    let module = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/kube-apiserver");
    let download = Command::new("go")
        .args(["mod", "download", "-json", "k8s.io/kubernetes"])
        .current_dir(&module)
        .output()
        .context("running go mod download")?;
    let info: serde_json::Value = serde_json::from_slice(&download.stdout)
        .context("go mod download's answer for k8s.io/kubernetes")?;
    let dir = info["Dir"]
        .as_str()
        .context("no Dir in go mod download's answer for k8s.io/kubernetes")?;
    let source = format!("{dir}/build/pause/linux/pause.c");
    status(
        "cc",
        &[
            "-static",
            "-O2",
            "-o",
            &binary.display().to_string(),
            &source,
        ],
    )
}

/// Jaeger, the tracing tests' OTLP collector (and the README's trace),
/// built from its Go module like the API server.
pub fn install_trace_collector() -> anyhow::Result<()> {
    go_tool("jaeger", "github.com/jaegertracing/jaeger/cmd/jaeger")
}

/// Builds `package` in the Go module `xtask/tools/<name>` into
/// `target/tools/<name>`.
fn go_tool(name: &str, package: &str) -> anyhow::Result<()> {
    go_build(&GoBuild {
        module: name,
        binary: name,
        package,
        ..GoBuild::default()
    })
}

/// One binary of a Go module under `xtask/tools`.
struct GoBuild<'a> {
    /// The module's directory under `xtask/tools`.
    module: &'a str,
    /// The binary's name under `target/tools`.
    binary: &'a str,
    package: &'a str,
    /// `CGO_ENABLED`; Go's default (on) when `true`.
    cgo: bool,
    tags: &'a str,
}

impl Default for GoBuild<'_> {
    fn default() -> Self {
        Self {
            module: "",
            binary: "",
            package: "",
            cgo: true,
            tags: "",
        }
    }
}

/// Builds `build.package` in its module into `target/tools/<binary>`,
/// unless the binary is newer than the module's go.mod, go.sum and
/// sources. Go's build cache makes a rebuild cheap.
fn go_build(build: &GoBuild<'_>) -> anyhow::Result<()> {
    let (name, package) = (build.binary, build.package);
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join(build.module);
    let binary = tools_dir().join(name);
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let newest_source = ["main.go", "go.mod", "go.sum"]
        .iter()
        .filter_map(|file| modified(&source.join(file)))
        .max();
    if modified(&binary).is_some() && modified(&binary) >= newest_source {
        return Ok(());
    }
    println!("building {name} from its Go module (cold: minutes; cached in Go's build cache)");
    let started = std::time::Instant::now();
    let mut go = Command::new("go");
    go.args(["build", "-trimpath", "-o"]).arg(&binary);
    if !build.tags.is_empty() {
        go.args(["-tags", build.tags]);
    }
    if !build.cgo {
        go.env("CGO_ENABLED", "0");
    }
    let ok = go
        .arg(package)
        .current_dir(&source)
        .status()
        .with_context(|| format!("running go to build {name}"))?
        .success();
    if !ok {
        bail!("go build of {package} in {} failed", source.display());
    }
    println!("built {name} in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `kubernetes-validate` from PyPI, with the machine's Python.
fn install_kubernetes_validate() -> anyhow::Result<()> {
    let version =
        output("python3", &["-m", "kubernetes_validate", "--version"]).unwrap_or_default();
    let wanted = KUBERNETES_VALIDATE.trim_start_matches("kubernetes-validate==");
    if version.contains(wanted) {
        return Ok(());
    }
    pip_install(&[KUBERNETES_VALIDATE])
}

/// `pip install` of exactly `packages` (pinned), with the machine's Python.
fn pip_install(packages: &[&str]) -> anyhow::Result<()> {
    println!("installing {}", packages.join(" "));
    let mut args = vec![
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--root-user-action=ignore",
    ];
    args.extend(packages);
    status("python3", &args)
}

/// grpcio and grpcio-tools from PyPI, with the machine's Python.
fn install_grpcio() -> anyhow::Result<()> {
    let wanted = GRPCIO[0].trim_start_matches("grpcio==");
    let version = output(
        "python3",
        &["-c", "import grpc, grpc_tools; print(grpc.__version__)"],
    )
    .unwrap_or_default();
    if version.trim() == wanted {
        return Ok(());
    }
    pip_install(&GRPCIO)
}

/// rust-src (to build `core` for the BPF target) and bpf-linker.
pub fn install_toolchain() -> anyhow::Result<()> {
    let installed = output("rustup", &["component", "list", "--installed"]).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("installing rust-src");
        status("rustup", &["component", "add", "rust-src"])?;
    }
    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        install_bpf_linker()?;
    }
    Ok(())
}

/// bpf-linker linked against the LLVM that ships inside the Rust toolchain
/// (Debian's LLVM is too old, and the default feature wants LLVM 23).
fn install_bpf_linker() -> anyhow::Result<()> {
    println!("installing bpf-linker {BPF_LINKER_VERSION}");
    let sysroot = output("rustc", &["--print", "sysroot"])?.trim().to_owned();
    let lib = format!("{sysroot}/lib");
    let llvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| {
            name.starts_with("libLLVM-") && name.contains("-rust-") && name.ends_with(".so")
        })
        .with_context(|| format!("no libLLVM-*-rust-*.so in {lib}"))?;
    let llvm = llvm.trim_start_matches("lib").trim_end_matches(".so");
    let major = llvm
        .trim_start_matches("LLVM-")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or_default();
    let rustflags = format!("-L native={lib} -l dylib={llvm} -C link-arg=-Wl,-rpath,{lib}");
    let ok = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major},no-llvm-linking")])
        .env("RUSTFLAGS", rustflags)
        .status()?
        .success();
    if !ok {
        bail!("installing bpf-linker failed");
    }
    Ok(())
}

/// What the kernel matrix needs besides the build: qemu, a static busybox
/// for the guest, cpio, modinfo and the module decompressors.
const MATRIX_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("modinfo", "kmod"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
];

/// Load generators of the benchmark.
const BENCH_PACKAGES: &[(&str, &str)] = &[("iperf3", "iperf3"), ("sockperf", "sockperf")];

pub fn install_bench_packages() -> anyhow::Result<()> {
    install(BENCH_PACKAGES)
}

pub fn install_matrix_packages() -> anyhow::Result<()> {
    install(MATRIX_PACKAGES)
}

fn install_packages() -> anyhow::Result<()> {
    install(PACKAGES)
}

fn install(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(command, _)| {
            // A path names a file the package installs (a header, a plugin).
            if command.starts_with('/') {
                return !std::path::Path::new(command).exists();
            }
            !Command::new("sh")
                .args(["-c", &format!("command -v {command}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {}", missing.join(" "));
    status("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    let ok = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?
        .success();
    if !ok {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn mount_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        println!("mounting bpffs at /sys/fs/bpf");
        status("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(program: &str, args: &[&str]) -> anyhow::Result<()> {
    if !Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?
        .success()
    {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(())
}
