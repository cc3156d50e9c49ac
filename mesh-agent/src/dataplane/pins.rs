//! The pin root: where one agent's programs, maps and links live in bpffs,
//! and how to remove them.
//!
//! ```text
//! <root>/maps/<MAP_NAME>           every map
//! <root>/progs/<prog_name>         every program
//! <root>/links/sockops             sock_ops on the node cgroup
//! <root>/links/connect4            cgroup/connect4 there (same-node direct)
//! <root>/links/<ifname>_from_pod   tc ingress on a pod interface (TCX)
//! <root>/links/<ifname>_to_pod     tc egress on a pod interface (TCX)
//! ```
//! bpffs refuses names with a dot, so a `.` in an interface name (a VLAN,
//! `eth0.100`) is written as `:`, which interface names never contain.
//! Removing a pinned link detaches it once no process holds it, so removing
//! the whole root is a complete clean-up of what the kernel holds for us.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use mesh_common::pins::{LINKS_DIR, MAPS_DIR, PROGS_DIR};

#[derive(Debug, Clone)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(MAPS_DIR).join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.root.join(PROGS_DIR).join(name)
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.root.join(LINKS_DIR).join(name)
    }

    /// The link of one tc program on a pod interface.
    pub fn pod_link(&self, ifname: &str, program: &str) -> PathBuf {
        self.link(&format!("{}_{program}", ifname.replace('.', ":")))
    }

    /// Creates the directories, readable by root only: pinned maps hold
    /// who-talks-to-whom and must not be world-readable.
    pub fn create(&self) -> io::Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for dir in [MAPS_DIR, PROGS_DIR, LINKS_DIR] {
            builder.create(self.root.join(dir))?;
        }
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
    }

    /// Does anything live under the root?
    pub fn exists(&self) -> bool {
        self.root.exists()
    }

    /// Removes everything under the root and the root itself. Links go first
    /// so programs are detached before their maps disappear from view.
    pub fn remove_all(&self) -> io::Result<()> {
        if !self.root.exists() {
            return Ok(());
        }
        for dir in [LINKS_DIR, PROGS_DIR, MAPS_DIR] {
            let path = self.root.join(dir);
            if path.exists() {
                fs::remove_dir_all(&path)?;
            }
        }
        fs::remove_dir_all(&self.root)
    }
}
