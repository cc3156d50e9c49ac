//! `cargo xtask kernels`: the kernel matrix. Downloads Debian's cloud
//! kernels (through apt, from the mirror the machine's own apt sources
//! name, with a private apt configuration so the system's apt is left
//! alone), builds a throw-away initramfs (busybox, the agent, the guest
//! runner `mesh-kernel-check`, iproute2 and the modules the fixtures need),
//! boots each kernel in qemu under software emulation, and turns what the
//! runner prints on the serial console into a table.
//!
//! See ../shared/KERNELS.md for why it is done this way (no KVM here, and
//! what bit).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Which kernels to run: a series ("5.10") picks its newest build; "6.x"
/// and "7.x" the newest of the major.
pub const FULL: &[&str] = &["5.10", "6.1", "6.12", "6.x", "7.x"];
/// What CI runs besides the host kernel.
pub const SHORT: &[&str] = &["5.10", "6.1"];

/// Suites to look in, by the mirror that serves them.
const SUITES: &[(Mirror, &str)] = &[
    (Mirror::Main, "bullseye"),
    (Mirror::Security, "bullseye-security"),
    (Mirror::Main, "bookworm"),
    (Mirror::Main, "bookworm-backports"),
    (Mirror::Main, "trixie"),
    (Mirror::Main, "trixie-backports"),
];

/// Modules the guest loads (with their dependencies): pod veths, clsact
/// and the BPF classifier for netlink tc.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];

/// Binaries of ours that go into the guest.
const OUR_BINARIES: &[&str] = &["mesh-agent", "mesh-pod", "mesh-kernel-check"];

/// Busybox applets the init script uses (not `ip`: the fixtures need
/// iproute2's, and a busybox `ip` on PATH would shadow it).
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "poweroff", "cat", "echo", "uname", "sleep", "ls",
];

/// A guest that does not power off by then is reported as hung.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mirror {
    Main,
    Security,
}

pub struct Options {
    pub series: Vec<String>,
}

impl Options {
    pub fn short() -> Self {
        Self::of(SHORT)
    }

    pub fn full() -> Self {
        Self::of(FULL)
    }

    fn of(series: &[&str]) -> Self {
        Self {
            series: series.iter().map(|s| s.to_string()).collect(),
        }
    }
}

pub fn run(root: &Path, options: &Options) -> anyhow::Result<()> {
    let work = root.join("target/kernels");
    std::fs::create_dir_all(&work)?;
    let apt = PrivateApt::new(&work)?;
    apt.update()?;
    let available = apt.kernel_packages()?;

    let mut rows = Vec::new();
    let common = build_common_image(root, &work)?;
    for series in &options.series {
        let started = Instant::now();
        let row = match select(&available, series) {
            None => KernelRow::failed(series, format!("no cloud kernel package for {series}")),
            Some(kernel) => match boot(&apt, &work, &common, kernel) {
                Ok(row) => row,
                Err(error) => KernelRow::failed(&kernel.version, format!("{error:#}")),
            },
        };
        let row = row.with_time(started.elapsed());
        println!("{}", row.summary());
        rows.push(row);
    }
    let table = table(&rows);
    println!("\n{table}");
    let report = json!({
        "kernels": rows.iter().map(KernelRow::json).collect::<Vec<_>>(),
    });
    std::fs::write(work.join("report.md"), &table)?;
    std::fs::write(
        work.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("report: {}", work.join("report.md").display());
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// apt with its own sources, lists and cache under target/kernels/apt.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(work: &Path) -> anyhow::Result<Self> {
        let dir = work.join("apt");
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let (main, security) = machine_mirrors()?;
        let mut sources = String::new();
        for (mirror, suite) in SUITES {
            let uri = match mirror {
                Mirror::Main => &main,
                Mirror::Security => &security,
            };
            writeln!(
                sources,
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main"
            )?;
        }
        std::fs::write(dir.join("sources.list"), sources)?;
        Ok(Self { dir })
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            "-oDir::Etc::SourceParts=/dev/null".into(),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}/cache"),
            "-oAPT::Sandbox::User=root".into(),
            "-qq".into(),
        ]
    }

    /// Refreshes the package lists when they are missing or a day old.
    fn update(&self) -> anyhow::Result<()> {
        let stamp = self.dir.join("lists/updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(86_400));
        if fresh {
            return Ok(());
        }
        println!("kernels: refreshing the package lists");
        crate::run(Command::new("apt-get").args(self.options()).arg("update"))?;
        std::fs::write(stamp, b"")?;
        Ok(())
    }

    /// Every cloud kernel package, by kernel version.
    fn kernel_packages(&self) -> anyhow::Result<BTreeMap<String, Kernel>> {
        let output = Command::new("apt-cache")
            .args(self.options())
            .args([
                "search",
                "--names-only",
                r"^linux-(image|binary|modules)-[0-9].*-cloud-amd64$",
            ])
            .output()
            .context("apt-cache search")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let packages: BTreeSet<&str> = text
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        let mut kernels: BTreeMap<String, Kernel> = BTreeMap::new();
        for package in &packages {
            let Some(version) = package
                .strip_prefix("linux-image-")
                .or_else(|| package.strip_prefix("linux-binary-"))
            else {
                continue;
            };
            let version = version.trim_end_matches("-cloud-amd64").to_owned();
            let binary = format!("linux-binary-{version}-cloud-amd64");
            let modules = format!("linux-modules-{version}-cloud-amd64");
            // Where a linux-binary exists (6.19 on), linux-image is an empty
            // meta package: the kernel is in linux-binary and the modules in
            // linux-modules. A build whose modules package the archive does
            // not carry (6.19 cloud, at the time of writing) cannot boot our
            // guest and is skipped.
            let packages = if packages.contains(binary.as_str()) {
                if !packages.contains(modules.as_str()) {
                    continue;
                }
                vec![binary, modules]
            } else {
                vec![format!("linux-image-{version}-cloud-amd64")]
            };
            kernels.insert(version.clone(), Kernel { version, packages });
        }
        Ok(kernels)
    }

    /// Downloads (once) and unpacks a kernel; returns the unpacked root.
    fn unpack(&self, work: &Path, kernel: &Kernel) -> anyhow::Result<PathBuf> {
        let root = work.join("roots").join(&kernel.version);
        if root.join(".unpacked").exists() {
            return Ok(root);
        }
        let debs = self.dir.join("debs");
        let have = |package: &str| -> Option<PathBuf> {
            std::fs::read_dir(&debs)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{package}_")))
                })
        };
        let missing: Vec<&String> = kernel
            .packages
            .iter()
            .filter(|p| have(p).is_none())
            .collect();
        if !missing.is_empty() {
            println!("kernels: downloading {}", kernel.packages.join(" "));
            crate::run(
                Command::new("apt-get")
                    .args(self.options())
                    .arg("download")
                    .args(missing)
                    .current_dir(&debs),
            )?;
        }
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        for package in &kernel.packages {
            let deb = have(package).with_context(|| format!("{package} was not downloaded"))?;
            crate::run(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
        }
        std::fs::write(root.join(".unpacked"), b"")?;
        Ok(root)
    }
}

#[derive(Clone)]
struct Kernel {
    /// Debian's kernel version string (`uname -r` without `-cloud-amd64`).
    version: String,
    packages: Vec<String>,
}

/// The newest kernel of a series ("6.1") or major ("6.x").
fn select<'a>(kernels: &'a BTreeMap<String, Kernel>, series: &str) -> Option<&'a Kernel> {
    let matches = |version: &str| match series.strip_suffix(".x") {
        Some(major) => version.split('.').next() == Some(major),
        None => version.starts_with(&format!("{series}.")),
    };
    kernels
        .values()
        .filter(|k| matches(&k.version))
        .max_by(|a, b| version_cmp(&a.version, &b.version))
}

/// Compares versions number by number ("6.12.117+deb13" > "6.12.95+deb12").
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let numbers = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    numbers(a).cmp(&numbers(b))
}

/// The Debian mirror and security mirror the machine's apt sources use.
fn machine_mirrors() -> anyhow::Result<(String, String)> {
    let mut uris = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(entries.flatten().map(|e| e.path()));
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_owned));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // `deb [options] uri suite components`
                let rest = match rest.trim_start().strip_prefix('[') {
                    Some(after) => after.split_once(']').map_or("", |(_, r)| r),
                    None => rest,
                };
                uris.extend(rest.split_whitespace().next().map(str::to_owned));
            }
        }
    }
    let uris: Vec<String> = uris
        .into_iter()
        .map(|u| u.trim_end_matches('/').to_owned())
        .collect();
    let security = uris
        .iter()
        .find(|u| u.ends_with("/debian-security"))
        .cloned();
    let main = uris.iter().find(|u| u.ends_with("/debian")).cloned();
    match (main, security) {
        (Some(main), Some(security)) => Ok((main, security)),
        (Some(main), None) => {
            let security = main.replace("/debian", "/debian-security");
            Ok((main, security))
        }
        _ => bail!("no Debian mirror (a URI ending in /debian) in the machine's apt sources"),
    }
}

/// The part of the initramfs every kernel shares: busybox, our binaries
/// (debug info stripped), iproute2 and the libraries they link.
fn build_common_image(root: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let tree = work.join("image");
    let _ = std::fs::remove_dir_all(&tree);
    for dir in ["bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc"] {
        std::fs::create_dir_all(tree.join(dir))?;
    }
    let busybox = which("busybox")?;
    std::fs::copy(&busybox, tree.join("bin/busybox"))?;
    // A dynamic busybox (Debian's `busybox` rather than `busybox-static`)
    // works too, with its libraries.
    let mut libraries: BTreeSet<PathBuf> = shared_libraries(&busybox)?.into_iter().collect();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))?;
    }
    for name in OUR_BINARIES {
        let built = root.join("target/debug").join(name);
        let dest = tree.join("bin").join(name);
        crate::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(&built)
                .arg(&dest),
        )
        .with_context(|| format!("{} (build it first)", built.display()))?;
        libraries.extend(shared_libraries(&built)?);
    }
    let ip = which("ip")?;
    std::fs::copy(&ip, tree.join("usr/sbin/ip"))?;
    libraries.extend(shared_libraries(&ip)?);
    for library in libraries {
        let dest = tree.join(library.strip_prefix("/").unwrap_or(&library));
        std::fs::create_dir_all(dest.parent().expect("a library has a directory"))?;
        std::fs::copy(&library, &dest).with_context(|| format!("copying {}", library.display()))?;
    }
    // Multiarch libraries live under /lib and /lib64 on Debian (usrmerge).
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    let init = tree.join("init");
    std::fs::write(&init, INIT)?;
    crate::run(Command::new("chmod").arg("755").arg(&init))?;
    let image = work.join("common.cpio");
    cpio(&tree, &image)?;
    Ok(image)
}

/// The guest's /init: mounts, modules, the runner, power off.
const INIT: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns
for module in $(cat /modules.list); do
    insmod "$module" || echo "MESH-KCHECK-MODULE-FAILED $module"
done
echo "MESH-KCHECK-BOOT $(uname -r)"
/bin/mesh-kernel-check
echo "MESH-KCHECK-EXIT $?"
poweroff -f
"#;

/// Shared libraries a dynamic binary loads (from `ldd`), loader included.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let output = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if path.is_empty() {
        bail!("{program} is not installed");
    }
    Ok(std::fs::canonicalize(path)?)
}

/// Packs a directory as a newc cpio archive.
fn cpio(tree: &Path, image: &Path) -> anyhow::Result<()> {
    let out = std::fs::File::create(image)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio -o -H newc --quiet")
        .current_dir(tree)
        .stdout(out)
        .status()?;
    if !status.success() {
        bail!("cpio of {} failed", tree.display());
    }
    Ok(())
}

/// Unpacks the kernel, adds its modules to the image, boots it, and reads
/// the runner's verdicts off the serial console.
fn boot(
    apt: &PrivateApt,
    work: &Path,
    common: &Path,
    kernel: &Kernel,
) -> anyhow::Result<KernelRow> {
    let root = apt.unpack(work, kernel)?;
    let release = format!("{}-cloud-amd64", kernel.version);
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| root.join(dir).join(&release))
        .find(|dir| dir.is_dir())
        .with_context(|| format!("no modules directory for {release}"))?;
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        modules_dir.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz for {release}"))?;

    // The modules part of the initramfs: decompressed .ko files in load
    // order, listed in /modules.list. Built-in modules need nothing.
    let tree = work.join("modules").join(&kernel.version);
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("modules"))?;
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    for module in MODULES {
        module_with_dependencies(&modules_dir, &builtin, module, &mut order)?;
    }
    let mut list = String::new();
    for (name, path) in &order {
        let dest = tree.join("modules").join(format!("{name}.ko"));
        decompress_module(path, &dest)?;
        writeln!(list, "/modules/{name}.ko")?;
    }
    std::fs::write(tree.join("modules.list"), list)?;
    let modules_cpio = work.join(format!("modules-{}.cpio", kernel.version));
    cpio(&tree, &modules_cpio)?;
    // The kernel unpacks concatenated cpio archives in order.
    let initrd = work.join(format!("initrd-{}.cpio", kernel.version));
    let mut bytes = std::fs::read(common)?;
    bytes.extend(std::fs::read(&modules_cpio)?);
    std::fs::write(&initrd, bytes)?;

    let log = work.join(format!("console-{}.log", kernel.version));
    println!("kernels: booting {release}");
    let console = run_qemu(&vmlinuz, &initrd, &log)?;
    let row = KernelRow::from_console(&kernel.version, &console);
    if row.release.is_some() {
        return Ok(row);
    }
    // Under multi-threaded TCG an early-boot text patch (int3) can race and
    // oops before /init runs; nothing of ours has run yet. One more boot,
    // and the table says so.
    let first = panic_line(&console);
    println!("kernels: {release} did not reach /init ({first}); booting again");
    let console = run_qemu(&vmlinuz, &initrd, &log)?;
    let mut row = KernelRow::from_console(&kernel.version, &console);
    row.note = Some(format!(
        "second boot; the first did not reach /init: {first}"
    ));
    Ok(row)
}

/// The kernel's first oops or panic line, for the report.
fn panic_line(console: &str) -> String {
    console
        .lines()
        .find(|l| l.contains("Oops") || l.contains("Kernel panic") || l.contains("BUG"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| "no oops printed".into())
}

/// Adds `module` after its dependencies (by `modinfo -F depends`).
fn module_with_dependencies(
    modules_dir: &Path,
    builtin: &str,
    module: &str,
    order: &mut Vec<(String, PathBuf)>,
) -> anyhow::Result<()> {
    let name = module.replace('-', "_");
    if order.iter().any(|(n, _)| *n == name) {
        return Ok(());
    }
    let is_builtin = builtin.lines().any(|line| {
        Path::new(line)
            .file_stem()
            .and_then(|s| s.to_str())
            .is_some_and(|stem| stem.replace('-', "_") == name)
    });
    if is_builtin {
        return Ok(());
    }
    let path = find_module(modules_dir, &name)
        .with_context(|| format!("module {module} is neither built in nor shipped"))?;
    let output = Command::new("modinfo")
        .args(["-F", "depends"])
        .arg(&path)
        .output()
        .context("modinfo")?;
    for dependency in String::from_utf8_lossy(&output.stdout)
        .trim()
        .split(',')
        .filter(|d| !d.is_empty())
    {
        module_with_dependencies(modules_dir, builtin, dependency, order)?;
    }
    order.push((name, path));
    Ok(())
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
            continue;
        }
        let file = entry.file_name().to_string_lossy().replace('-', "_");
        if [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .any(|ext| file == format!("{name}{ext}"))
        {
            return Some(path);
        }
    }
    None
}

fn decompress_module(path: &Path, dest: &Path) -> anyhow::Result<()> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => {
            std::fs::copy(path, dest)?;
        }
        Some(tool) => {
            let out = std::fs::File::create(dest)?;
            let status = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .stdout(out)
                .status()
                .with_context(|| format!("running {tool}"))?;
            if !status.success() {
                bail!("{tool} -dc {name} failed");
            }
        }
    }
    Ok(())
}

/// Boots under software emulation (see KERNELS.md: KVM here is a nested
/// PVM that stock kernels do not survive) and returns the console output.
fn run_qemu(vmlinuz: &Path, initrd: &Path, log: &Path) -> anyhow::Result<String> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-m", "1536M", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet random.trust_cpu=on rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut console = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                if let Some(at) = line.find("MESH-KCHECK") {
                    println!("  {}", truncate(&line[at..], 160));
                }
                console.push_str(line);
                console.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            console.push_str("MESH-KCHECK-TIMEOUT\n");
            break;
        }
    }
    let _ = child.wait();
    std::fs::write(log, &console)?;
    Ok(console)
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// One kernel's results.
struct KernelRow {
    kernel: String,
    /// `uname -r` in the guest.
    release: Option<String>,
    /// (kind, name) -> result line.
    results: Vec<Value>,
    /// Set when the kernel could not be run at all, or the runner died.
    error: Option<String>,
    /// Anything else the table should say (a retried boot).
    note: Option<String>,
    seconds: f64,
}

impl KernelRow {
    fn failed(kernel: &str, error: String) -> Self {
        Self {
            kernel: kernel.to_owned(),
            release: None,
            results: Vec::new(),
            error: Some(error),
            note: None,
            seconds: 0.0,
        }
    }

    fn from_console(kernel: &str, console: &str) -> Self {
        let mut row = Self::failed(kernel, String::new());
        row.error = None;
        let mut done = false;
        // The firmware's terminal escapes may precede a line's text.
        let lines = console
            .lines()
            .filter_map(|line| line.find("MESH-KCHECK").map(|at| &line[at..]));
        for line in lines {
            if let Some(release) = line.strip_prefix("MESH-KCHECK-BOOT ") {
                row.release = Some(release.trim().to_owned());
            } else if let Some(json) = line.strip_prefix("MESH-KCHECK ") {
                if let Ok(value) = serde_json::from_str(json) {
                    row.results.push(value);
                }
            } else if line.starts_with("MESH-KCHECK-DONE ") {
                done = true;
            } else if let Some(module) = line.strip_prefix("MESH-KCHECK-MODULE-FAILED ") {
                row.error = Some(format!("module {module} did not load"));
            }
        }
        if console.contains("MESH-KCHECK-TIMEOUT") {
            row.error = Some(format!("timed out after {} s", BOOT_TIMEOUT.as_secs()));
        } else if row.release.is_none() {
            row.error = Some("the guest did not boot to /init (see the console log)".into());
        } else if !done && row.error.is_none() {
            row.error = Some("the runner stopped without a verdict (see the console log)".into());
        }
        row
    }

    fn with_time(mut self, elapsed: Duration) -> Self {
        self.seconds = elapsed.as_secs_f64();
        self
    }

    fn ok(&self) -> bool {
        self.error.is_none()
            && !self.results.is_empty()
            && self.results.iter().all(|r| r["ok"] == true)
    }

    fn result(&self, kind: &str, name: &str) -> Option<&Value> {
        self.results
            .iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
    }

    fn scenarios(&self) -> Vec<&Value> {
        self.results
            .iter()
            .filter(|r| r["kind"] == "scenario")
            .collect()
    }

    fn summary(&self) -> String {
        let passed = self.scenarios().iter().filter(|r| r["ok"] == true).count();
        format!(
            "kernels: {} {} ({} of {} scenarios, {:.0} s){}",
            self.release.as_deref().unwrap_or(&self.kernel),
            if self.ok() { "PASS" } else { "FAIL" },
            passed,
            self.scenarios().len(),
            self.seconds,
            self.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    }

    fn json(&self) -> Value {
        json!({
            "kernel": self.kernel,
            "release": self.release,
            "ok": self.ok(),
            "error": self.error,
            "note": self.note,
            "seconds": self.seconds,
            "results": self.results,
        })
    }
}

const PROGRAMS: &[&str] = &[
    "mesh_from_pod",
    "mesh_to_pod",
    "mesh_sockops",
    "mesh_uplink",
    "mesh_splice",
];

/// The markdown table: one row per kernel, a column per program (load and
/// attach) and per scenario, then every failure spelled out.
fn table(rows: &[KernelRow]) -> String {
    let scenario_names: Vec<String> = rows
        .iter()
        .flat_map(|r| r.scenarios())
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .fold(Vec::new(), |mut names, name| {
            if !names.contains(&name) {
                names.push(name);
            }
            names
        });
    let mut out = String::new();
    let _ = write!(out, "| kernel | features |");
    for program in PROGRAMS {
        let _ = write!(out, " {program} |");
    }
    for (i, _) in scenario_names.iter().enumerate() {
        let _ = write!(out, " S{} |", i + 1);
    }
    let _ = writeln!(out, " time |");
    let _ = write!(out, "|---|---|");
    for _ in 0..PROGRAMS.len() + scenario_names.len() {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out, "---|");
    let mark = |value: Option<&Value>| match value {
        None => "–".to_owned(),
        Some(v) if v["ok"] == true => "pass".to_owned(),
        Some(_) => "**FAIL**".to_owned(),
    };
    for row in rows {
        let _ = write!(
            out,
            "| {} | {} |",
            row.release.as_deref().unwrap_or(&row.kernel),
            mark(row.result("probe", "features"))
        );
        for program in PROGRAMS {
            let load = row.result("load", program);
            let attach = row.result("attach", program);
            let cell = match (load, attach) {
                (None, _) => "–".to_owned(),
                (Some(l), _) if l["ok"] != true => "load **FAIL**".to_owned(),
                (Some(_), None) => "loads".to_owned(),
                (Some(_), Some(a)) => {
                    format!("loads, {}", a["detail"].as_str().unwrap_or("attached"))
                }
            };
            let _ = write!(out, " {cell} |");
        }
        for name in &scenario_names {
            let _ = write!(out, " {} |", mark(row.result("scenario", name)));
        }
        let _ = writeln!(out, " {:.0} s |", row.seconds);
    }
    let _ = writeln!(out);
    for (i, name) in scenario_names.iter().enumerate() {
        let _ = writeln!(out, "S{}: {name}  ", i + 1);
    }
    for row in rows {
        if let Some(error) = &row.error {
            let _ = writeln!(out, "\n{}: {error}", row.kernel);
        }
        if let Some(note) = &row.note {
            let _ = writeln!(out, "\n{}: {note}", row.kernel);
        }
        for failure in row.results.iter().filter(|r| r["ok"] != true) {
            let _ = writeln!(
                out,
                "\n{} {} {}: {}",
                row.release.as_deref().unwrap_or(&row.kernel),
                failure["kind"].as_str().unwrap_or(""),
                failure["name"].as_str().unwrap_or(""),
                failure["error"].as_str().unwrap_or("")
            );
        }
    }
    out
}
