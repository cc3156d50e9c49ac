//! Debian's cloud kernels through a private apt: the machine's own mirrors,
//! separate lists and cache, the newest build of each series.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};

/// Suites to look in, by the mirror that serves them.
pub(super) const SUITES: &[(Mirror, &str)] = &[
    (Mirror::Main, "bullseye"),
    (Mirror::Security, "bullseye-security"),
    (Mirror::Main, "bookworm"),
    (Mirror::Main, "bookworm-backports"),
    (Mirror::Main, "trixie"),
    (Mirror::Main, "trixie-backports"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mirror {
    Main,
    Security,
}

/// apt with its own sources, lists and cache under target/kernels/apt.
pub(super) struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    pub(super) fn new(work: &Path) -> anyhow::Result<Self> {
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

    pub(super) fn options(&self) -> Vec<String> {
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
    pub(super) fn update(&self) -> anyhow::Result<()> {
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
    pub(super) fn kernel_packages(&self) -> anyhow::Result<BTreeMap<String, Kernel>> {
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
    pub(super) fn unpack(&self, work: &Path, kernel: &Kernel) -> anyhow::Result<PathBuf> {
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
pub(super) struct Kernel {
    /// Debian's kernel version string (`uname -r` without `-cloud-amd64`).
    pub(super) version: String,
    pub(super) packages: Vec<String>,
}

/// The newest kernel of a series ("6.1") or major ("6.x").
pub(super) fn select<'a>(
    kernels: &'a BTreeMap<String, Kernel>,
    series: &str,
) -> Option<&'a Kernel> {
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
pub(super) fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let numbers = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    numbers(a).cmp(&numbers(b))
}

/// The Debian mirror and security mirror the machine's apt sources use.
pub(super) fn machine_mirrors() -> anyhow::Result<(String, String)> {
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
