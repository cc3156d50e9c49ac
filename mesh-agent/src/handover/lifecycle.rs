//! What `/stats` and `/metrics` tell about how this agent came to serve
//! and whether it is handing over: the figures an operator watches
//! during an upgrade.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use serde_json::json;

use crate::{dataplane::Adoption, locks::lock};

pub struct Lifecycle {
    /// How the kernel state came to this agent.
    pub kernel: Adoption,
    /// The agent this one took over from: its pid and where its `/stats`
    /// answers while it drains.
    predecessor: Mutex<Option<(u32, String)>>,
    /// New agents that asked to take over and did not (this one kept
    /// serving).
    pub handovers_failed: AtomicU64,
    /// Handed over: serving only what it carried, until that ends.
    pub draining: AtomicBool,
}

impl Lifecycle {
    pub fn new(kernel: Adoption) -> Self {
        Self {
            kernel,
            predecessor: Mutex::new(None),
            handovers_failed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        }
    }

    pub fn took_over(&self, pid: u32, stats: String) {
        *lock(&self.predecessor) = Some((pid, stats));
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let predecessor = lock(&self.predecessor).clone();
        json!({
            "kernel": self.kernel,
            "took_over_from": predecessor.as_ref().map(|(pid, stats)| json!({
                "pid": pid,
                "stats": stats,
            })),
            "handovers_failed": self.handovers_failed.load(Ordering::Relaxed),
            "draining": self.draining.load(Ordering::Relaxed),
        })
    }

    /// `fresh`, `adopted` or `reloaded`: the label of the start metric.
    pub fn kernel_kind(&self) -> &'static str {
        match self.kernel {
            Adoption::Fresh => "fresh",
            Adoption::Adopted => "adopted",
            Adoption::Reloaded(_) => "reloaded",
        }
    }
}
