//! The guest's initramfs: busybox, our binaries with their shared
//! libraries, iproute2, and the kernel modules the fixtures need.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// Modules the guest loads (with their dependencies): pod veths, clsact
/// and the BPF classifier for netlink tc.
pub(super) const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];

/// Modules loaded where the kernel ships them: `tls` for kernel TLS (the
/// scenario checks the agent's fallback where it is missing) and the
/// AEADs it asks the crypto API for. The guest has no `modprobe` to load
/// them on demand, so a kernel whose `tls` cannot find `gcm(aes)` refuses
/// the keys (ENOENT) as it would on a node without them.
pub(super) const OPTIONAL_MODULES: &[&str] = &[
    "tls",
    "aesni_intel",
    "aes_generic",
    "ctr",
    "ghash_generic",
    "ghash_clmulni_intel",
    "gcm",
    "chacha_x86_64",
    "chacha_generic",
    "poly1305_x86_64",
    "poly1305_generic",
    "chacha20poly1305",
];

/// Binaries of ours that go into the guest.
pub(super) const OUR_BINARIES: &[&str] = &["mesh-agent", "mesh-pod", "mesh-kernel-check"];

/// Busybox applets the init script uses (not `ip`: the fixtures need
/// iproute2's, and a busybox `ip` on PATH would shadow it).
pub(super) const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "poweroff", "cat", "echo", "uname", "sleep", "ls",
];

/// The part of the initramfs every kernel shares: busybox, our binaries
/// (debug info stripped), iproute2 and the libraries they link.
pub(super) fn build_common_image(root: &Path, work: &Path) -> anyhow::Result<PathBuf> {
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
pub(super) const INIT: &str = r#"#!/bin/sh
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
/usr/sbin/ip link set lo up
echo "MESH-KCHECK-BOOT $(uname -r)"
/bin/mesh-kernel-check
echo "MESH-KCHECK-EXIT $?"
poweroff -f
"#;

/// Shared libraries a dynamic binary loads (from `ldd`), loader included.
pub(super) fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
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

pub(super) fn which(program: &str) -> anyhow::Result<PathBuf> {
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
pub(super) fn cpio(tree: &Path, image: &Path) -> anyhow::Result<()> {
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

/// Adds `module` after its dependencies (by `modinfo -F depends`).
pub(super) fn module_with_dependencies(
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

pub(super) fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
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

pub(super) fn decompress_module(path: &Path, dest: &Path) -> anyhow::Result<()> {
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
