//! Booting one kernel under qemu (TCG) with the initramfs, and reading what
//! the guest runner printed on the serial console.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

use super::{
    initramfs::{MODULES, OPTIONAL_MODULES, cpio, decompress_module, module_with_dependencies},
    mirror::{Kernel, PrivateApt},
    report::KernelRow,
};

/// A guest that does not power off by then is reported as hung.
pub(super) const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Unpacks the kernel, adds its modules to the image, boots it, and reads
/// the runner's verdicts off the serial console.
pub(super) fn boot(
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
    for module in OPTIONAL_MODULES {
        if let Err(error) = module_with_dependencies(&modules_dir, &builtin, module, &mut order) {
            eprintln!("{}: optional module left out: {error:#}", kernel.version);
        }
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
    // An early-boot text patch (int3) raced and oopsed before /init under
    // multi-threaded TCG (see run_qemu); nothing of ours has run yet. Kept
    // in case it happens single-threaded too: one more boot, and the table
    // says so.
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
pub(super) fn panic_line(console: &str) -> String {
    console
        .lines()
        .find(|l| l.contains("Oops") || l.contains("Kernel panic") || l.contains("BUG"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| "no oops printed".into())
}

/// Boots under software emulation (see KERNELS.md: KVM here is a nested
/// PVM that stock kernels do not survive) and returns the console output.
///
/// Two vCPUs share one emulation thread (`thread=single`). With a thread
/// each, boots oopsed now and then in the kernel's live code patching
/// (int3, then a cross-CPU sync), and 5.10 soft-locked both CPUs
/// mid-scenario (once in CI, once in 12 runs here), the same race's
/// signature: attaching and detaching programs flips static keys, which
/// patches code. One thread costs nothing measurable here (5.10's five
/// scenarios: 33 s either way).
pub(super) fn run_qemu(vmlinuz: &Path, initrd: &Path, log: &Path) -> anyhow::Result<String> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=single", "-cpu", "max", "-smp", "2"])
        .args(["-m", "1536M", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=5 random.trust_cpu=on rdinit=/init",
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
                if let Some(at) = line.find("MESH-KCHECK-DIAG") {
                    // What a hung scenario's processes were doing: whole.
                    println!("  {}", &line[at..]);
                } else if let Some(at) = line.find("MESH-KCHECK") {
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
            // The guest's own watchdog did not fire: show where it was.
            println!(
                "kernels: no result in {} s; the console's last lines:",
                BOOT_TIMEOUT.as_secs()
            );
            for line in console
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                println!("  | {line}");
            }
            console.push_str("MESH-KCHECK-TIMEOUT\n");
            break;
        }
    }
    let _ = child.wait();
    std::fs::write(log, &console)?;
    Ok(console)
}

pub(super) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}
