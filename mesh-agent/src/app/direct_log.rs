//! Access-log lines for same-node pod-to-pod connections
//! (`proxy.same_node_direct`). The agent never carries them; `mesh_sockops`
//! reports each one when its client socket closes (`MESH_DIR_CLOSED`), and
//! this task turns every report into the same record a proxied
//! connection gets: an access-log line, the Istio TCP metrics and an event
//! for `/events`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use mesh_common::{DirectClosed, ipv4_from_raw};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::warn;

use crate::{
    observability::access::{Outcome, Record, Sinks},
    routes::Routes,
};

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

/// The reader of the reports, which a handover stops (one reader per
/// ring: the successor's takes over) and starts again should the
/// handover fail.
pub struct DirectLog {
    routes: watch::Receiver<Arc<Routes>>,
    sinks: Arc<Sinks>,
    /// Where the ring is pinned, to open it again after a stop.
    pin: std::path::PathBuf,
    /// The ring as loaded, until the first [`DirectLog::resume`].
    ring: Option<RingBuf<MapData>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl DirectLog {
    /// A reader of `ring`, started by [`DirectLog::resume`].
    pub fn new(
        ring: RingBuf<MapData>,
        routes: watch::Receiver<Arc<Routes>>,
        sinks: Arc<Sinks>,
        pin: std::path::PathBuf,
    ) -> Self {
        Self {
            routes,
            sinks,
            pin,
            ring: Some(ring),
            task: None,
        }
    }

    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub fn resume(&mut self) {
        if self.task.is_some() {
            return;
        }
        let ring = match self.ring.take() {
            Some(ring) => Ok(ring),
            None => MapData::from_pin(&self.pin)
                .map(aya::maps::Map::RingBuf)
                .and_then(RingBuf::try_from),
        };
        match ring {
            Ok(ring) => {
                self.task = Some(tokio::spawn(run(
                    ring,
                    self.routes.clone(),
                    self.sinks.clone(),
                )));
            }
            Err(error) => {
                warn!(%error, "direct connections will have no access-log lines: reopening their ring buffer");
            }
        }
    }
}

/// Reads reports until the ring buffer cannot be polled any more (the
/// agent is stopping and the map was closed).
async fn run(ring: RingBuf<MapData>, routes: watch::Receiver<Arc<Routes>>, sinks: Arc<Sinks>) {
    // SAFETY: the ring buffer owns its map's descriptor (MapData) and
    // returns that same open descriptor for as long as it lives, which is
    // as long as the AsyncFd that owns it.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(error) => {
            warn!(%error, "direct connections will have no access-log lines: cannot poll their ring buffer");
            return;
        }
    };
    loop {
        let Ok(mut ready) = ring.readable_mut().await else {
            return;
        };
        let state = routes.borrow().state.clone();
        let reader = ready.get_inner_mut();
        while let Some(item) = reader.next() {
            if let Some(closed) = parse(&item) {
                let (client, server) = addresses(&closed);
                let mut record = Record::new("source", &state, client, server);
                record.endpoint = Some(server);
                let lived =
                    Duration::from_nanos(closed.closed_ns.saturating_sub(closed.established_ns));
                record.started = Instant::now()
                    .checked_sub(lived)
                    .unwrap_or_else(Instant::now);
                let (outcome, sent, received) = outcome(&closed);
                drop(record.opened(&sinks));
                record.finish(&sinks, outcome, sent, received, None);
            }
        }
        ready.clear_ready();
    }
}

/// How the connection ended and its payload bytes each way. The kernel's
/// counts are of sequence space: what was acknowledged includes our SYN
/// and, once acknowledged, our FIN; what was received includes the
/// peer's FIN. Which FINs went follows from the state the client socket
/// left for CLOSE and whether a reset went either way.
fn outcome(closed: &DirectClosed) -> (Outcome, u64, u64) {
    let reset = closed.reset != 0;
    let (our_fin, their_fin) = match closed.last_state {
        // Our FIN was acknowledged; without a reset, theirs came too
        // (FIN_WAIT2 then goes to TIME_WAIT).
        TCP_FIN_WAIT2 => (1, u64::from(!reset)),
        // Both FINs went: simultaneous close, or after the peer.
        TCP_CLOSING | TCP_LAST_ACK => (1, 1),
        // The peer had closed; we had not.
        TCP_CLOSE_WAIT => (0, 1),
        // ESTABLISHED, FIN_WAIT1 (our FIN not acknowledged), handshakes.
        _ => (0, 0),
    };
    let clean = !reset && our_fin == 1 && their_fin == 1;
    let outcome = if clean { Outcome::Ok } else { Outcome::Reset };
    let sent = closed.sent.saturating_sub(1 + our_fin);
    let received = closed.received.saturating_sub(their_fin);
    (outcome, sent, received)
}

/// A report, if the bytes are one (the kernel writes whole records).
fn parse(bytes: &[u8]) -> Option<DirectClosed> {
    if bytes.len() < size_of::<DirectClosed>() {
        return None;
    }
    // SAFETY: DirectClosed is plain integers without padding (checked at
    // compile time in mesh-common), any bit pattern is valid, and the
    // length was checked; read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DirectClosed>()) })
}

fn addresses(closed: &DirectClosed) -> (SocketAddrV4, SocketAddrV4) {
    let ip = |raw| Ipv4Addr::from(ipv4_from_raw(raw));
    (
        SocketAddrV4::new(ip(closed.client), closed.client_port),
        SocketAddrV4::new(ip(closed.server), closed.server_port),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_ESTABLISHED: u32 = 1;

    #[test]
    fn a_report_is_read_from_its_bytes_and_a_short_one_refused() {
        let closed = DirectClosed {
            established_ns: 1,
            closed_ns: 2,
            sent: 3,
            received: 4,
            client: mesh_common::ipv4_to_raw([10, 1, 0, 1]),
            server: mesh_common::ipv4_to_raw([10, 1, 0, 2]),
            client_port: 40000,
            server_port: 8080,
            last_state: TCP_ESTABLISHED,
            reset: 1,
            pad: 0,
        };
        // SAFETY: viewing a plain-integer struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const closed).cast::<u8>(), size_of::<DirectClosed>())
        };
        assert_eq!(parse(bytes), Some(closed));
        assert_eq!(parse(&bytes[1..]), None);
        let (client, server) = addresses(&closed);
        assert_eq!(client.to_string(), "10.1.0.1:40000");
        assert_eq!(server.to_string(), "10.1.0.2:8080");
    }

    #[test]
    fn sequence_counts_become_payload_counts_by_how_it_closed() {
        let closed = |last_state, reset, sent, received| DirectClosed {
            sent,
            received,
            last_state,
            reset,
            ..DirectClosed::default()
        };
        // 100 bytes each way, closed cleanly: SYN and FIN out, FIN in.
        let clean = (Outcome::Ok, 100, 100);
        assert_eq!(outcome(&closed(TCP_FIN_WAIT2, 0, 102, 101)), clean);
        assert_eq!(outcome(&closed(TCP_LAST_ACK, 0, 102, 101)), clean);
        // Reset while established: only the SYN is extra.
        let reset = (Outcome::Reset, 100, 100);
        assert_eq!(outcome(&closed(TCP_ESTABLISHED, 1, 101, 100)), reset);
        assert_eq!(outcome(&closed(TCP_CLOSE_WAIT, 1, 101, 101)), reset);
        // Reset after our half-close was acknowledged: no FIN came back.
        assert_eq!(outcome(&closed(TCP_FIN_WAIT2, 1, 102, 100)), reset);
        // Never below zero, whatever the kernel says.
        let nothing = (Outcome::Ok, 0, 0);
        assert_eq!(outcome(&closed(TCP_FIN_WAIT2, 0, 0, 0)), nothing);
    }
}
