//! The same-node fast path, user-space side: hands the two sockets of an
//! admitted, plaintext proxied connection to the kernel (`mesh_splice`),
//! which then moves their bytes without the agent copying them.
//!
//! Order matters, so that no byte can overtake another:
//! 1. each socket goes into `MESH_SPLICE_TO` under its peer's key: both
//!    get a psock, but no program runs on them yet;
//! 2. a socket goes into `MESH_SPLICE_ON` (where `mesh_splice` is
//!    attached): from then on what arrives on it is redirected, and the
//!    target exists;
//! 3. `SO_RCVLOWAT` is set on it, which makes TCP signal "data ready":
//!    bytes that arrived before step 2 go through the verdict first, in
//!    order.
//!
//! Step 2 happens for a direction only while the agent holds none of its
//! bytes: for the client's socket at once (the agent has read nothing),
//! for the upstream's once its first bytes have been copied in user space
//! (which is how the agent times the first response for the balancer).
//! Closing a socket takes it out of both maps.

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::Mutex,
};

use aya::maps::{HashMap, MapData, SockHash};
use mesh_common::{ConnKey, ipv4_to_raw};
use tokio::net::TcpStream;

use super::error_chain;
use crate::locks::lock;

/// Why a pair of sockets stays in user space.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("fast path: {0} is not IPv4")]
    NotIpv4(SocketAddr),
    #[error("fast path: socket address: {0}")]
    Address(std::io::Error),
    #[error("fast path: sockhash update: {0}")]
    Map(String),
    #[error("fast path: SO_RCVLOWAT: {0}")]
    ReceiveLowWater(std::io::Error),
}

pub struct FastPath {
    maps: Mutex<Maps>,
    pub stats: FastPathStats,
    /// A new agent's call for the connections this process moves.
    pub migrations: Migrations,
}

/// A kernel-moved connection on its way to a new agent: both sockets, and
/// what the old agent's pumps wrote each way (the new agent's account of
/// the bytes in flight needs it).
#[derive(Debug)]
pub struct Migrant {
    pub client: std::os::fd::OwnedFd,
    pub upstream: std::os::fd::OwnedFd,
    pub passed_up: (u64, u64),
}

/// A migrant with its connection record (JSON: the record's type is the
/// proxy's, which this module does not know).
#[derive(Debug)]
pub struct Departure {
    pub migrant: Migrant,
    pub record: serde_json::Value,
}

/// Once a new agent took over, every spliced connection is asked to leave
/// for it; the ones that can (see the splice) come out here.
#[derive(Default)]
pub struct Migrations {
    requested: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
    /// Taking connections while set; cleared when the window closes.
    sink: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Departure>>>,
    closed: std::sync::atomic::AtomicBool,
    /// Kernel-moved connections this process splices now.
    pub live: std::sync::atomic::AtomicUsize,
    /// Connections whose splice let go of them, not yet sent: so that
    /// `live` and this together never miss one on its way.
    in_transit: std::sync::atomic::AtomicUsize,
}

impl Migrations {
    /// Asks every connection to leave; they arrive on `sink`.
    pub fn request(&self, sink: tokio::sync::mpsc::UnboundedSender<Departure>) {
        *lock(&self.sink) = Some(sink);
        self.requested
            .store(true, std::sync::atomic::Ordering::Release);
        self.wake.notify_waiters();
    }

    /// Resolves once [`Migrations::request`] was called.
    pub async fn requested(&self) {
        loop {
            let woken = self.wake.notified();
            if self.requested.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }

    /// A place for one connection, before its splice lets go of it:
    /// `false` once the window closed (it stays here then).
    pub fn reserve(&self) -> bool {
        let sink = lock(&self.sink);
        if sink.is_none() || self.is_closed() {
            return false;
        }
        self.in_transit
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        true
    }

    /// Gives back a place [`Migrations::reserve`] took.
    pub fn unreserve(&self) {
        self.in_transit
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether the window closed: connections stop trying to leave.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes the window: no more places; those reserved still arrive,
    /// until [`Migrations::finish`].
    pub fn close(&self) {
        let _sink = lock(&self.sink);
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Lets go of the sink, once every reserved connection was sent.
    pub fn finish(&self) {
        lock(&self.sink).take();
    }

    /// Hands on a connection that had a place; Err: nobody takes it.
    pub fn send(&self, departure: Departure) -> Result<(), Departure> {
        let sent = match lock(&self.sink).as_ref() {
            Some(sink) => sink.send(departure).map_err(|e| e.0),
            None => Err(departure),
        };
        self.unreserve();
        sent
    }

    /// Connections that may still leave: spliced now, or on their way.
    pub fn pending(&self) -> usize {
        self.in_transit() + self.live.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Connections with a place, not yet handed on.
    pub fn in_transit(&self) -> usize {
        self.in_transit.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What the fast path did with the connections it carried (`/stats`).
#[derive(Debug, Default)]
pub struct FastPathStats {
    /// Directions paused because the receiver fell behind.
    pub pauses: std::sync::atomic::AtomicU64,
    /// Connections taken out of the kernel and finished in user space (a
    /// paused direction that could not resume).
    pub returned_to_user_space: std::sync::atomic::AtomicU64,
    /// Connections reset because the kernel did not deliver what it had
    /// taken in time.
    pub undelivered_resets: std::sync::atomic::AtomicU64,
    /// Connections passed to a new agent at a handover.
    pub migrated_out: std::sync::atomic::AtomicU64,
    /// Connections taken over from the agent before this one.
    pub migrated_in: std::sync::atomic::AtomicU64,
}

impl FastPathStats {
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        serde_json::json!({
            "pauses": get(&self.pauses),
            "returned_to_user_space": get(&self.returned_to_user_space),
            "undelivered_resets": get(&self.undelivered_resets),
            "migrated_out": get(&self.migrated_out),
            "migrated_in": get(&self.migrated_in),
        })
    }
}

struct Maps {
    to: SockHash<MapData, ConnKey>,
    on: SockHash<MapData, ConnKey>,
    redirected: HashMap<MapData, ConnKey, u64>,
}

impl FastPath {
    pub fn new(
        to: SockHash<MapData, ConnKey>,
        on: SockHash<MapData, ConnKey>,
        redirected: HashMap<MapData, ConnKey, u64>,
    ) -> Self {
        Self {
            maps: Mutex::new(Maps { to, on, redirected }),
            stats: FastPathStats::default(),
            migrations: Migrations::default(),
        }
    }

    /// Pairs `a` and `b` and lets the kernel move what arrives on `a`;
    /// [`FastPath::resume`] does the same for `b` later. On error nothing
    /// is left in the maps and the caller copies in user space as usual.
    /// Returns the sockets' keys.
    pub fn splice(
        &self,
        a: &TcpStream,
        b: &TcpStream,
    ) -> Result<(ConnKey, ConnKey), FastPathError> {
        let (key_a, key_b) = (key(a)?, key(b)?);
        let paired = {
            let mut maps = lock(&self.maps);
            maps.redirected
                .insert(key_a, 0, 0)
                .and_then(|()| maps.redirected.insert(key_b, 0, 0))
                .and_then(|()| maps.to.insert(key_a, b.as_raw_fd(), 0))
                .and_then(|()| maps.to.insert(key_b, a.as_raw_fd(), 0))
                .map_err(|e| FastPathError::Map(error_chain(&e)))
        };
        if let Err(error) = paired.and_then(|()| self.resume(&key_a, a)) {
            self.unpair(&(key_a, key_b));
            self.forget(&(key_a, key_b));
            return Err(error);
        }
        Ok((key_a, key_b))
    }

    /// The keys of a pair [`FastPath::splice`] paired (in this process or
    /// the agent before it).
    pub fn keys(&self, a: &TcpStream, b: &TcpStream) -> Result<(ConnKey, ConnKey), FastPathError> {
        Ok((key(a)?, key(b)?))
    }

    /// Stops moving what arrives on one socket: it stays in that socket's
    /// receive queue, where TCP flow control holds the sender back. The
    /// kernel queues redirected bytes for a slow receiver without bound, so
    /// the agent pauses a direction whose backlog grows too large.
    ///
    /// Removing the socket from the verdict's map detaches the program
    /// without the socket lock, and a segment whose "data ready" runs in
    /// that moment finds no program and is dropped (a whole GRO segment,
    /// 65,160 bytes, went missing that way). So the socket first stops
    /// signalling data: a receive low-water mark no queue reaches keeps
    /// TCP from calling "data ready", and setting it takes the socket lock,
    /// which waits out a segment being processed. [`FastPath::resume`]
    /// lowers it again, which also hands what queued meanwhile to the
    /// verdict.
    pub fn pause(&self, key: &ConnKey, stream: &impl AsRawFd) -> Result<(), FastPathError> {
        crate::sockopt::set_int(
            stream,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            libc::c_int::MAX,
        )
        .map_err(FastPathError::ReceiveLowWater)?;
        let mut maps = lock(&self.maps);
        let _ = maps.on.remove(key);
        Ok(())
    }

    /// Takes both sockets of a connection out of both maps for good, so
    /// they are plain TCP sockets again and the agent copies what is left.
    /// Only once the kernel holds none of their bytes (what it redirected,
    /// [`FastPath::redirected`], has all been queued on the other socket):
    /// bytes still in a socket's backlog go with its psock.
    /// A socket the peer has half-closed cannot re-enter `MESH_SPLICE_ON`
    /// (the kernel refuses sockets that are not established), so a paused
    /// direction whose sender finished ends this way.
    pub fn unpair(&self, keys: &(ConnKey, ConnKey)) {
        let mut maps = lock(&self.maps);
        for key in [&keys.0, &keys.1] {
            let _ = maps.on.remove(key);
            let _ = maps.to.remove(key);
        }
    }

    /// Drops a connection's byte counts (when it ends; the sockhashes drop
    /// closed sockets by themselves, this map does not).
    pub fn forget(&self, keys: &(ConnKey, ConnKey)) {
        let mut maps = lock(&self.maps);
        for key in [&keys.0, &keys.1] {
            let _ = maps.redirected.remove(key);
        }
    }

    /// Bytes `mesh_splice` redirected from the socket with this key.
    pub fn redirected(&self, key: &ConnKey) -> Option<u64> {
        lock(&self.maps).redirected.get(key, 0).ok()
    }

    /// Lets the kernel move what arrives on a socket (at first, or again
    /// after a pause), starting with what queued up before: in order, as
    /// long as the agent holds none of that direction's bytes.
    pub fn resume(&self, key: &ConnKey, stream: &impl AsRawFd) -> Result<(), FastPathError> {
        let inserted = lock(&self.maps)
            .on
            .insert(key, stream.as_raw_fd(), 0)
            .map_err(|e| FastPathError::Map(error_chain(&e)));
        // TCP signals "data ready", so what queued before the verdict was
        // in place goes through it first. Lowered even when the insert
        // failed: a paused socket must be readable again.
        let lowered = crate::sockopt::set_int(stream, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
            .map_err(FastPathError::ReceiveLowWater);
        inserted.and(lowered)
    }
}

/// The socket's key as `mesh_splice` computes it for its segments.
fn key(stream: &TcpStream) -> Result<ConnKey, FastPathError> {
    let v4 = |addr: std::io::Result<SocketAddr>| match addr {
        Ok(SocketAddr::V4(addr)) => Ok(addr),
        Ok(other) => Err(FastPathError::NotIpv4(other)),
        Err(e) => Err(FastPathError::Address(e)),
    };
    let (local, remote): (SocketAddrV4, SocketAddrV4) =
        (v4(stream.local_addr())?, v4(stream.peer_addr())?);
    Ok(ConnKey {
        local_addr: ipv4_to_raw(local.ip().octets()),
        remote_addr: ipv4_to_raw(remote.ip().octets()),
        local_port: local.port(),
        remote_port: remote.port(),
    })
}

/// What the kernel says a TCP socket moved, for byte counts and idleness
/// when the agent no longer sees the bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpCounters {
    pub bytes_received: u64,
    /// Bytes the peer acknowledged.
    pub bytes_acked: u64,
    /// Milliseconds since the last data segment arrived.
    pub last_data_recv_ms: u32,
    /// Milliseconds since the last data segment was sent.
    pub last_data_sent_ms: u32,
}

pub fn tcp_counters(stream: &impl AsRawFd) -> Option<TcpCounters> {
    // SAFETY: tcp_info is plain integers, for which all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // that large, and sets `len` to what it wrote.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (ret == 0).then_some(TcpCounters {
        bytes_received: info.tcpi_bytes_received,
        bytes_acked: info.tcpi_bytes_acked,
        last_data_recv_ms: info.tcpi_last_data_recv,
        last_data_sent_ms: info.tcpi_last_data_sent,
    })
}

/// Bytes written into a socket so far: acknowledged plus still queued.
pub fn bytes_queued(stream: &impl AsRawFd) -> Option<u64> {
    let acked = tcp_counters(stream)?.bytes_acked;
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int.
    let ret = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
    (ret == 0).then(|| acked + outq.max(0) as u64)
}

/// Before an end of stream is carried from `from` to `to`: waits until
/// the kernel has queued on `to` every byte that arrived on `from`, so the
/// FIN cannot overtake data still on its way through the fast path.
/// Gives up after `limit` (a peer that stopped reading holds the data back
/// no matter what, and the FIN then waits behind it in TCP anyway).
pub async fn wait_forwarded(from: &impl AsRawFd, to: &impl AsRawFd, limit: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = std::time::Duration::from_micros(50);
    loop {
        // The FIN we are about to carry took one sequence number, which
        // TCP counts as a received byte.
        let arrived = tcp_counters(from).map_or(0, |c| c.bytes_received.saturating_sub(1));
        let queued = bytes_queued(to).unwrap_or(u64::MAX);
        if queued >= arrived || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(10));
    }
}
