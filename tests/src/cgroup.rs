//! cgroup v2 directories for nodes and pods, removed on drop after their
//! processes are killed.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Where cgroup v2 is mounted (`/sys/fs/cgroup/unified` on hybrid hosts,
/// `/sys/fs/cgroup` on unified ones).
pub fn cgroup2_root() -> PathBuf {
    mounts_of(&["cgroup2"])
        .into_iter()
        .next()
        .expect("cgroup2 is not mounted")
}

/// Where file systems of the types `fstypes` are mounted.
pub fn mounts_of(fstypes: &[&str]) -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("read mounts");
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            fstypes.contains(&fstype).then(|| PathBuf::from(path))
        })
        .collect()
}

pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn child(&self, name: &str) -> Self {
        Self::create(self.path.join(name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = self.procs();
            if procs.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in procs {
                // SAFETY: sending a signal; a stale pid is harmless (ESRCH).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        // Children are dropped first by their owners; rmdir may race with
        // exiting processes, so retry briefly.
        for _ in 0..50 {
            if remove_tree(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes a cgroup and the empty cgroups below it (kubelet-style layouts
/// leave intermediate levels that no fixture owns), deepest first.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(path)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path)
}
