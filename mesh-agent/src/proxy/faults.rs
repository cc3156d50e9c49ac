//! A service's injected faults ([`crate::model::Faults`]) applied to one
//! outbound connection: drawn when it is admitted, a delay before the
//! endpoint is connected, a refusal instead of it, or a cut once enough
//! bytes have passed.

use std::{
    net::SocketAddrV4,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde::Serialize;
use tokio::net::TcpStream;

use crate::{
    model::{Faults, Injected, MeshState},
    observability::live,
};

/// How often a connection to be cut looks at its byte counts.
const CUT_POLL: Duration = Duration::from_millis(5);

/// Connections that got each fault (`/stats`).
#[derive(Debug, Default)]
pub struct FaultStats {
    pub delayed: AtomicU64,
    pub refused: AtomicU64,
    pub cut: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct FaultStatsSnapshot {
    pub delayed: u64,
    pub refused: u64,
    pub cut: u64,
}

impl FaultStats {
    pub fn snapshot(&self) -> FaultStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultStatsSnapshot {
            delayed: get(&self.delayed),
            refused: get(&self.refused),
            cut: get(&self.cut),
        }
    }
}

/// This connection's faults: the client is named by its workload's
/// identity when it runs here, else by its address alone.
pub fn draw(faults: &Faults, state: &MeshState, client: SocketAddrV4) -> Injected {
    if faults.is_empty() {
        return Injected::default();
    }
    let principal = state
        .workload_by_ip(*client.ip())
        .filter(|(_, w)| w.local.is_some())
        .map(|(_, w)| state.identity(w));
    faults.draw(
        principal.as_ref(),
        &state.trust_domain,
        *client.ip(),
        || fastrand::u32(0..100),
    )
}

/// Resolves once `limit` bytes have passed, both directions together (at
/// the first count at or past it: user space counts per read, the fast
/// path per tick, so a cut may come a read late).
pub async fn bytes_reach(counted: &live::Bytes, limit: u64) {
    loop {
        let moved = counted.sent.load(Ordering::Relaxed) + counted.received.load(Ordering::Relaxed);
        if moved >= limit {
            return;
        }
        tokio::time::sleep(CUT_POLL).await;
    }
}

/// A second descriptor of the client's socket, so a cut can reset it
/// after the splice that owns the stream is dropped.
pub fn hold_for_cut(client: &TcpStream) -> Option<OwnedFd> {
    client.as_fd().try_clone_to_owned().ok()
}

/// Resets the client held by [`hold_for_cut`] (RST, not FIN: a cut is an
/// abort).
pub fn cut(held: OwnedFd) {
    let _ = socket2::SockRef::from(&held).set_linger(Some(Duration::ZERO));
    drop(held);
}
