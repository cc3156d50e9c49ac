//! `cargo xtask kernels`: the kernel matrix. Downloads Debian's cloud
//! kernels (through apt, from the mirror the machine's own apt sources
//! name, with a private apt configuration so the system's apt is left
//! alone), builds a throw-away initramfs (busybox, the agent, the guest
//! runner `mesh-kernel-check`, iproute2 and the modules the fixtures need),
//! boots each kernel in qemu under software emulation, and turns what the
//! runner prints on the serial console into a table.
//!
//! Why this way: `/dev/kvm` on these machines belongs to a nested module
//! under which stock kernels do not boot, so guests run under TCG (one boot
//! takes seconds); Debian's packages are the kernels reachable here, from
//! 5.10 (bullseye) to 7.x (trixie-backports). docs/kernels.md has the
//! table and what each kernel needed.

mod initramfs;
mod mirror;
mod qemu;
mod report;

use std::{path::Path, time::Instant};

use anyhow::bail;
use serde_json::json;

use self::{
    initramfs::build_common_image,
    mirror::{PrivateApt, select},
    qemu::boot,
    report::{KernelRow, table},
};

/// Which kernels to run: a series ("5.10") picks its newest build; "6.x"
/// and "7.x" the newest of the major.
pub const FULL: &[&str] = &["5.10", "6.1", "6.12", "6.x", "7.x"];
/// What CI runs besides the host kernel.
pub const SHORT: &[&str] = &["5.10", "6.1"];

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
