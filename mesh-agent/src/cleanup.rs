//! `mesh-agent cleanup`: removes what an agent that did not exit cleanly
//! (SIGKILL, crash, power loss of the process) left in the kernel.
//!
//! Everything the agent attaches is a pinned link, or a netlink tc filter
//! recorded in a pinned map (kernels before 6.6), so deleting the recorded
//! filters and unpinning the root detaches and frees all of it. The steer routing is
//! per network namespace: run this in the namespace the agent ran in.

use std::{fs::File, os::fd::AsRawFd, path::Path};

use anyhow::{Context, bail};

use crate::dataplane::{PinLayout, policy_routing};

pub async fn run(pin_root: &Path) -> anyhow::Result<()> {
    let pins = PinLayout::new(pin_root);
    if pins.exists() {
        let dir = File::open(pins.root())
            .with_context(|| format!("opening pin root {}", pins.root().display()))?;
        // SAFETY: flock on a descriptor we own; released when `dir` closes.
        let busy = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
        if busy {
            bail!(
                "pin root {} belongs to a running agent: stop it (SIGTERM) instead",
                pins.root().display()
            );
        }
        crate::dataplane::remove_leftovers(&pins)
            .with_context(|| format!("removing pin root {}", pins.root().display()))?;
        tracing::info!(pin_root = %pins.root().display(), "removed pins, programs and links");
    } else {
        tracing::info!(pin_root = %pins.root().display(), "no pins to remove");
    }
    policy_routing::remove()
        .await
        .context("removing the steer routing")?;
    Ok(())
}
