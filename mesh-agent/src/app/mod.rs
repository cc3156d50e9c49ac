//! The composition root: builds every part from the config, runs them, and
//! takes them down in the right order.
//!
//! Two steps, so that a test can hold an agent in its hands: [`Bound::bind`]
//! builds everything and binds every port (returning the addresses it got),
//! then [`Bound::run`] serves until told to stop. [`run`] is what
//! `mesh-agent run` does with them: signals in, the steer routing around.
//!
//! Start: routing, listeners, kernel programs, then the model into the maps
//! (so the first captured SYN finds a listener). Stop (SIGTERM/SIGINT): stop
//! accepting, let open connections drain while capture stays attached,
//! then detach and unpin everything and remove the routing. A change to the
//! config file (or SIGHUP) reloads it; a bad config is logged and the last
//! good one stays. Under `kubernetes:`, workloads and services come from
//! the API server's watches instead, and every change there is applied the
//! same way (debounced by 50 ms).

mod arrivals;
mod bound;
mod direct_log;
mod handing_over;
pub mod memory;
mod reload;

use std::{net::SocketAddr, path::PathBuf, pin::pin};

use anyhow::Context;
use futures::FutureExt;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

pub use self::bound::{Addresses, Bound, ReloadHandle, Stopped};
use crate::{
    admin::LogControl,
    config::{Config, Overrides},
    dataplane::policy_routing,
};

/// What `mesh-agent run` was told on its command line.
pub struct RunOptions {
    pub log: LogControl,
    /// The config file, watched for changes.
    pub config: PathBuf,
    pub overrides: Overrides,
    pub pin_root: PathBuf,
    /// Where a new agent finds this one ([`crate::handover`]).
    pub handover_socket: PathBuf,
    /// Port 0 binds any free port ([`Addresses`] tells which).
    pub admin: SocketAddr,
    pub ready: SocketAddr,
    pub metrics: SocketAddr,
}

/// `mesh-agent run`: binds, serves until SIGTERM or SIGINT (SIGHUP
/// reloads), and leaves nothing behind in the kernel or the routing.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    // Refuse a bad config before touching the kernel.
    let config = Config::load_with(&options.config, &options.overrides)?;
    info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        pin_root = %options.pin_root.display(),
        "starting with effective config"
    );
    // Before anything waits: SIGTERM must always reach the clean-up.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    policy_routing::install()
        .await
        .context("installing the steer routing")?;
    // A panic unwinds through the dataplane (whose drop unpins and
    // detaches) but would skip the routing below: catch it here, so a bug
    // at start or at run time leaves no rule behind either.
    let serving = async {
        let mut shutdown = pin!(shutdown);
        let bound = tokio::select! {
            bound = Bound::bind(&options, config) => bound?,
            () = &mut shutdown => return Ok(Stopped::Cleaned),
        };
        let reload = bound.reload_handle();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                reload.request();
            }
        });
        bound.run(shutdown).await
    };
    let result = match std::panic::AssertUnwindSafe(serving).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(anyhow::anyhow!(
            "the agent panicked: {}",
            panic_message(panic.as_ref())
        )),
    };
    // After a handover the routing is the new agent's. And it goes only
    // with the kernel state it serves: an agent that failed or was stopped
    // before it had that state (the pins are still there: another agent
    // runs on them, or will adopt them) leaves the routing to that agent.
    let kernel_kept = options.pin_root.exists();
    if !matches!(result, Ok(Stopped::HandedOver))
        && !kernel_kept
        && let Err(error) = policy_routing::remove().await
    {
        warn!(%error, "removing the steer routing");
    }
    result.map(drop)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
