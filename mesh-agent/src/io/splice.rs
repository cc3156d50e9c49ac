//! Moves bytes both ways between two TCP connections, as if they were one:
//! - an end-of-stream (FIN) from one side becomes a write shutdown (FIN) on
//!   the other, and the opposite direction keeps flowing (half-close);
//! - a reset or any I/O error on either side resets both sides (RST, not FIN),
//!   so neither peer mistakes an abort for a clean end.
//!
//! With the fast path the kernel moves the bytes (see
//! [`crate::dataplane::fast_path`]) and the same loop still runs: it sees
//! end of stream and errors exactly as before, forwards the rare segment
//! the kernel passes up, and takes byte counts, idleness and the first
//! response time from the kernel's TCP counters.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use crate::dataplane::fast_path::{self, FastPath, Migrant, Migrations};

/// Buffer per direction, allocated only once data arrives so an idle
/// connection holds none.
const BUFFER_SIZE: usize = 64 * 1024;

/// How long an end of stream may wait for the fast path to queue the data
/// before it (see [`fast_path::wait_forwarded`]).
const FORWARD_LIMIT: Duration = Duration::from_secs(5);

/// Backlog (bytes redirected but not yet queued on the other socket) at
/// which a kernel-moved direction is paused, and below which it resumes.
const BACKLOG_HIGH: u64 = 4 << 20;
const BACKLOG_LOW: u64 = 1 << 20;

/// Flow control of one kernel-moved direction. The kernel queues what it
/// redirects to a slow receiver without limit; pausing the direction leaves
/// new bytes in the sender's socket, where TCP's window holds the sender.
#[derive(Default)]
struct Gate {
    /// The kernel moves this direction (flow control applies).
    kernel: std::sync::atomic::AtomicBool,
    paused: std::sync::atomic::AtomicBool,
    /// Bytes that had arrived when the direction was paused.
    arrived_at_pause: AtomicU64,
    /// The pump is between a read and the count of what it wrote.
    writing: std::sync::atomic::AtomicBool,
    /// The pump read the end of stream (it carries it on from there).
    ended: std::sync::atomic::AtomicBool,
    resumed: tokio::sync::Notify,
}

impl Gate {
    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    async fn wait_open(&self) {
        loop {
            let resumed = self.resumed.notified();
            if !self.is_paused() {
                return;
            }
            resumed.await;
        }
    }

    /// Marks the pump busy (between a read and the count of what it
    /// wrote) until the guard drops.
    fn writing(&self) -> Writing<'_> {
        self.writing.store(true, Ordering::Release);
        Writing(&self.writing)
    }

    /// Stops the kernel moving this direction (see [`FastPath::pause`]).
    fn pause(&self, fast: &FastPath, key: &mesh_common::ConnKey, from: RawFd, arrived: u64) {
        if let Err(error) = fast.pause(key, &spliced_fd(from)) {
            // Without the guard the pause could drop a segment: the
            // direction keeps moving instead, and the pause is retried.
            tracing::warn!(%error, "fast path: pausing a direction");
            return;
        }
        fast.stats.pauses.fetch_add(1, Ordering::Relaxed);
        self.arrived_at_pause.store(arrived, Ordering::Relaxed);
        self.paused.store(true, Ordering::Release);
    }

    /// Hands this direction back to its pump for good (after
    /// [`FastPath::unpair`]).
    fn release_to_user_space(&self) {
        self.kernel.store(false, Ordering::Release);
        self.paused.store(false, Ordering::Release);
        self.resumed.notify_waiters();
    }

    /// Pauses or resumes by the backlog between `from` (where bytes
    /// arrive) and `to` (where the kernel queues them). Returns `false`
    /// when a paused direction could not be resumed: it stays paused, and
    /// the connection must leave the kernel ([`FastPath::unpair`]).
    fn regulate(
        &self,
        fast: &FastPath,
        key: &mesh_common::ConnKey,
        from: RawFd,
        arrived: u64,
        to: RawFd,
    ) -> bool {
        if !self.kernel.load(Ordering::Acquire) {
            return true;
        }
        let Some(queued) = fast_path::bytes_queued(&spliced_fd(to)) else {
            return true;
        };
        if !self.is_paused() {
            if arrived.saturating_sub(queued) > BACKLOG_HIGH {
                self.pause(fast, key, from, arrived);
            }
        } else if self
            .arrived_at_pause
            .load(Ordering::Relaxed)
            .saturating_sub(queued)
            < BACKLOG_LOW
        {
            if let Err(error) = fast.resume(key, &spliced_fd(from)) {
                // Typically the sender has half-closed meanwhile.
                tracing::debug!(%error, "fast path: a paused direction cannot resume");
                return false;
            }
            self.paused.store(false, Ordering::Release);
            self.resumed.notify_waiters();
        }
        true
    }
}

/// See [`Gate::writing`].
struct Writing<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Flow control of a kernel-moved connection, run on every tick: pauses
/// and resumes each direction, and takes the whole connection out of the
/// kernel when a paused direction cannot resume. Dropped, it drops the
/// connection's entries in `MESH_REDIRECTED`, however the splice ended
/// (finished, failed, or cancelled when the agent stops).
struct KernelControl<'a> {
    fast: &'a FastPath,
    /// The client's and the upstream's socket keys.
    keys: (mesh_common::ConnKey, mesh_common::ConnKey),
    /// The client's and the upstream's sockets.
    fds: (RawFd, RawFd),
    /// Client to upstream, upstream to client.
    gates: (&'a Gate, &'a Gate),
    /// What the pumps wrote themselves, each way.
    passed_up: &'a crate::observability::live::Bytes,
    /// Set while the connection leaves the kernel: by when the kernel
    /// must have delivered what it took.
    leaving: Option<Instant>,
    /// The connection went to a new agent, which counts on its entries.
    migrated: bool,
}

impl Drop for KernelControl<'_> {
    fn drop(&mut self) {
        if !self.migrated {
            self.fast.forget(&self.keys);
        }
    }
}

impl KernelControl<'_> {
    /// Whether the connection can go to another process as it is: both
    /// directions in the kernel and flowing, no pump holding or carrying
    /// anything (a byte read and not written, an end of stream).
    fn movable(&self) -> bool {
        let (up, down) = self.gates;
        self.leaving.is_none()
            && [up, down].iter().all(|gate| {
                gate.kernel.load(Ordering::Acquire)
                    && !gate.is_paused()
                    && !gate.writing.load(Ordering::Acquire)
                    && !gate.ended.load(Ordering::Acquire)
            })
    }

    /// One tick, with both sockets' counters; an error ends the splice.
    fn tick(
        &mut self,
        client: &fast_path::TcpCounters,
        upstream: &fast_path::TcpCounters,
    ) -> Result<(), (Side, io::Error)> {
        match self.leaving {
            None => {
                self.regulate(client, upstream);
                Ok(())
            }
            Some(deadline) => self.try_leave(deadline),
        }
    }

    fn regulate(&mut self, client: &fast_path::TcpCounters, upstream: &fast_path::TcpCounters) {
        let (fast, (client_key, upstream_key)) = (self.fast, &self.keys);
        let (client_fd, upstream_fd) = self.fds;
        let (up_gate, down_gate) = self.gates;
        let up = up_gate.regulate(
            fast,
            client_key,
            client_fd,
            client.bytes_received,
            upstream_fd,
        );
        let down = down_gate.regulate(
            fast,
            upstream_key,
            upstream_fd,
            upstream.bytes_received,
            client_fd,
        );
        if up && down {
            return;
        }
        // Hold both directions until the kernel has delivered what it took.
        for (gate, key, from, arrived) in [
            (up_gate, client_key, client_fd, client.bytes_received),
            (
                down_gate,
                upstream_key,
                upstream_fd,
                upstream.bytes_received,
            ),
        ] {
            if !gate.is_paused() {
                gate.pause(fast, key, from, arrived);
            }
        }
        self.leaving = Some(Instant::now() + FORWARD_LIMIT);
        tracing::debug!("fast path: the connection leaves the kernel");
    }

    /// Bytes the kernel took from `from` and has not yet queued on `to`.
    /// What the kernel queued on a socket is all that was queued there
    /// less what a pump wrote (`written`).
    fn in_flight(
        &self,
        from: &mesh_common::ConnKey,
        to: RawFd,
        written: &AtomicU64,
    ) -> Option<u64> {
        let redirected = self.fast.redirected(from)?;
        let queued = fast_path::bytes_queued(&spliced_fd(to))?;
        let by_kernel = queued.saturating_sub(written.load(Ordering::Acquire));
        Some(redirected.saturating_sub(by_kernel))
    }

    /// Hands the connection to the pumps once the kernel holds none of
    /// its bytes; resets it if that takes past `deadline`.
    fn try_leave(&mut self, deadline: Instant) -> Result<(), (Side, io::Error)> {
        let (client_key, upstream_key) = &self.keys;
        let (client_fd, upstream_fd) = self.fds;
        let (up_gate, down_gate) = self.gates;
        let up = || self.in_flight(client_key, upstream_fd, &self.passed_up.sent);
        let down = || self.in_flight(upstream_key, client_fd, &self.passed_up.received);
        // A pump mid-write would blur the counts.
        let delivered = !up_gate.writing.load(Ordering::Acquire)
            && !down_gate.writing.load(Ordering::Acquire)
            && up() == Some(0)
            && down() == Some(0);
        if delivered {
            self.fast.unpair(&self.keys);
            let stats = &self.fast.stats;
            stats.returned_to_user_space.fetch_add(1, Ordering::Relaxed);
            up_gate.release_to_user_space();
            down_gate.release_to_user_space();
            // What queued meanwhile raised no edge a pump saw: this
            // re-signals "readable".
            for fd in [client_fd, upstream_fd] {
                let _ = crate::sockopt::set_int(
                    &spliced_fd(fd),
                    libc::SOL_SOCKET,
                    libc::SO_RCVLOWAT,
                    1,
                );
            }
            self.leaving = None;
            return Ok(());
        }
        if Instant::now() < deadline {
            return Ok(());
        }
        tracing::warn!(
            up = ?up(),
            down = ?down(),
            "fast path: bytes held in the kernel were not delivered in time; resetting"
        );
        // Never hand on a stream with a hole.
        self.fast
            .stats
            .undelivered_resets
            .fetch_add(1, Ordering::Relaxed);
        Err((
            Side::Upstream,
            io::Error::new(
                io::ErrorKind::TimedOut,
                "fast path: bytes held in the kernel were not delivered",
            ),
        ))
    }
}

/// What a pump of a kernel-moved direction needs besides its sockets.
struct KernelMoved<'a> {
    gate: &'a Gate,
    /// Set for the upstream-to-client direction until handed over.
    hand_over: Option<&'a HandOver<'a>>,
    /// The live byte count of this direction.
    live: &'a AtomicU64,
}

/// Hands the upstream-to-client direction to the kernel.
struct HandOver<'a> {
    fast: &'a FastPath,
    key: mesh_common::ConnKey,
    fd: RawFd,
}

impl HandOver<'_> {
    fn run(&self, gate: &Gate) {
        match self.fast.resume(&self.key, &spliced_fd(self.fd)) {
            Ok(()) => gate.kernel.store(true, Ordering::Release),
            Err(error) => tracing::debug!(%error, "upstream direction stays in user space"),
        }
    }
}

/// Which connection an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    /// Neither: the idle timeout closed the connection.
    Idle,
}

#[derive(Debug)]
pub struct Spliced {
    /// Bytes from the downstream (client) side to the upstream side.
    pub sent: u64,
    /// Bytes from the upstream side back to the client.
    pub received: u64,
    /// `None` when both directions ended cleanly.
    pub error: Option<(Side, io::Error)>,
    /// Set when the connection left this process for a new agent.
    pub migrant: Option<Migrant>,
}

/// A connection a previous agent spliced on the fast path, taken over.
pub struct Adopted {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub passed_up: (u64, u64),
}

/// Splices until both directions end; with `idle`, a connection with no
/// bytes either way for that long is reset on both sides.
/// `first_response` is told, once, how long after the splice began the
/// upstream sent its first byte (what a slow server looks like from here).
pub async fn splice(
    client: TcpStream,
    upstream: TcpStream,
    idle: Option<Duration>,
    counted: &crate::observability::live::Bytes,
    first_response: &(dyn Fn(Duration) + Sync),
    fast_path: Option<&FastPath>,
) -> Spliced {
    let keys = match fast_path.map(|fast| fast.splice(&client, &upstream)) {
        Some(Ok(keys)) => Some(keys),
        Some(Err(error)) => {
            tracing::debug!(%error, "copying in user space");
            None
        }
        None => None,
    };
    let path = fast_path.zip(keys);
    run(client, upstream, idle, counted, first_response, path, None).await
}

/// Goes on splicing a connection a previous agent moved on the fast path
/// and passed over (its sockets are in the kernel's maps still, both
/// directions moving). Err: its sockets cannot be keyed (then they close).
pub async fn adopt(
    connection: Adopted,
    idle: Option<Duration>,
    counted: &crate::observability::live::Bytes,
    fast: &FastPath,
) -> Result<Spliced, fast_path::FastPathError> {
    let keys = fast.keys(&connection.client, &connection.upstream)?;
    let Adopted {
        client,
        upstream,
        passed_up,
    } = connection;
    let path = Some((fast, keys));
    Ok(run(
        client,
        upstream,
        idle,
        counted,
        &|_| {},
        path,
        Some(passed_up),
    )
    .await)
}

/// [`splice`], on the fast path when `path` says so; `adopted` carries
/// what a previous agent's pumps wrote (both directions are the kernel's
/// from the start then).
async fn run(
    client: TcpStream,
    upstream: TcpStream,
    idle: Option<Duration>,
    counted: &crate::observability::live::Bytes,
    first_response: &(dyn Fn(Duration) + Sync),
    path: Option<(&FastPath, (mesh_common::ConnKey, mesh_common::ConnKey))>,
    adopted: Option<(u64, u64)>,
) -> Spliced {
    let (fast_path, keys) = (path.map(|(fast, _)| fast), path.map(|(_, keys)| keys));
    let kernel = keys.is_some();
    let _live = fast_path.map(|fast| Counted::new(&fast.migrations.live));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    // In kernel mode the pumps only see what the kernel passes up; the
    // totals come from TCP's own counters.
    let passed_up = crate::observability::live::Bytes::default();
    if let Some((sent, received)) = adopted {
        passed_up.sent.store(sent, Ordering::Relaxed);
        passed_up.received.store(received, Ordering::Relaxed);
    }
    let (sent, received) = if kernel {
        (&passed_up.sent, &passed_up.received)
    } else {
        (&counted.sent, &counted.received)
    };
    let activity = Activity::new();
    let started = activity.started;
    let client_fd = client_read.as_ref().as_raw_fd();
    let upstream_fd = upstream_read.as_ref().as_raw_fd();
    let mut tick = Duration::from_millis(1);
    let mut next_tick = kernel.then(|| started + tick);
    // Flow control of each kernel-moved direction (client to upstream,
    // upstream to client). The upstream's first bytes go through user
    // space (they time the first response); the kernel takes over after.
    let (up_gate, down_gate) = (Gate::default(), Gate::default());
    up_gate.kernel.store(kernel, Ordering::Relaxed);
    down_gate
        .kernel
        .store(kernel && adopted.is_some(), Ordering::Relaxed);
    let hand_over = match (fast_path, keys) {
        (Some(_), Some(_)) if adopted.is_some() => None,
        (Some(fast), Some((_, upstream_key))) => Some(HandOver {
            fast,
            key: upstream_key,
            fd: upstream_fd,
        }),
        _ => None,
    };
    let mut last_arrived = (0u64, 0u64);
    let mut control = fast_path.zip(keys).map(|(fast, keys)| KernelControl {
        fast,
        keys,
        fds: (client_fd, upstream_fd),
        gates: (&up_gate, &down_gate),
        passed_up: &passed_up,
        leaving: None,
        migrated: false,
    });
    // A new agent took over: this connection goes to it at the first
    // tick where it can (see [`KernelControl::movable`]).
    let migrations = fast_path.map(|fast| &fast.migrations);
    let mut moving = false;
    let mut stays = false;
    // Which sides' ends of stream were read (client, upstream).
    let mut fins = (false, false);
    let error = {
        let to_upstream = pump(
            &mut client_read,
            &mut upstream_write,
            sent,
            &activity,
            None,
            kernel.then_some(KernelMoved {
                gate: &up_gate,
                hand_over: None,
                live: &counted.sent,
            }),
        );
        let to_client = pump(
            &mut upstream_read,
            &mut client_write,
            received,
            &activity,
            Some(first_response),
            kernel.then_some(KernelMoved {
                gate: &down_gate,
                hand_over: hand_over.as_ref(),
                live: &counted.received,
            }),
        );
        tokio::pin!(to_upstream, to_client);
        let (mut up_done, mut down_done) = (false, false);
        let mut idle_deadline = idle.map(|idle| started + idle);
        loop {
            tokio::select! {
                result = &mut to_upstream, if !up_done => match result {
                    Ok(()) => up_done = true,
                    Err((side, error)) => break Some((side.flip_if(false), error)),
                },
                result = &mut to_client, if !down_done => match result {
                    Ok(()) => down_done = true,
                    Err((side, error)) => break Some((side.flip_if(true), error)),
                },
                _ = sleep_until(idle_deadline), if idle_deadline.is_some() => {
                    let idle = idle.expect("deadline implies idle");
                    let mut quiet = activity.quiet();
                    if kernel {
                        let (client, upstream) = (counters_of(client_fd), counters_of(upstream_fd));
                        let kernel_quiet = client.last_data_recv_ms.min(upstream.last_data_recv_ms);
                        quiet = quiet.min(Duration::from_millis(kernel_quiet.into()));
                    }
                    match idle_check(idle, quiet) {
                        Ok(next) => idle_deadline = Some(next),
                        Err(timed_out) => break Some(timed_out),
                    }
                }
                () = wait_requested(migrations), if kernel && !moving && !stays => {
                    moving = true;
                    next_tick = Some(Instant::now());
                }
                // Kernel mode: live byte counts and flow control.
                _ = sleep_until(next_tick), if next_tick.is_some() => {
                    let (client, upstream) = (counters_of(client_fd), counters_of(upstream_fd));
                    counted.sent.fetch_max(client.bytes_received, Ordering::Relaxed);
                    counted.received.fetch_max(upstream.bytes_received, Ordering::Relaxed);
                    if let Some(control) = control.as_mut() {
                        if let Err(error) = control.tick(&client, &upstream) {
                            break Some(error);
                        }
                        if moving && migrations.is_some_and(Migrations::is_closed) {
                            // The window closed: this one stays here.
                            moving = false;
                            stays = true;
                        } else if moving
                            && !up_done
                            && !down_done
                            && control.movable()
                            && migrations.is_some_and(Migrations::reserve)
                        {
                            control.migrated = true;
                            break None;
                        }
                    }
                    // Poll fast while bytes move (flow control needs it),
                    // back off when the connection is quiet.
                    let arrived = (client.bytes_received, upstream.bytes_received);
                    let paused = up_gate.is_paused() || down_gate.is_paused();
                    tick = if arrived != last_arrived || paused || moving {
                        Duration::from_millis(1)
                    } else {
                        (tick * 2).min(Duration::from_secs(1))
                    };
                    last_arrived = arrived;
                    next_tick = Some(Instant::now() + tick);
                }
            }
            fins = (up_done, down_done);
            if up_done && down_done {
                break None;
            }
        }
    };
    let (sent, received) = if kernel {
        // TCP counts a received FIN as a byte; an end of stream read means
        // one arrived.
        let (client, upstream) = (counters_of(client_fd), counters_of(upstream_fd));
        let sent = client.bytes_received.saturating_sub(fins.0.into());
        let received = upstream.bytes_received.saturating_sub(fins.1.into());
        counted.sent.store(sent, Ordering::Relaxed);
        counted.received.store(received, Ordering::Relaxed);
        (sent, received)
    } else {
        (
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed),
        )
    };
    if control.as_ref().is_some_and(|c| c.migrated) {
        drop(control);
        let migrant = migrant(
            client_read,
            client_write,
            upstream_read,
            upstream_write,
            &passed_up,
        );
        // Its place ([`Migrations::reserve`]) keeps it counted until it
        // is sent, after `_live` lets go of it.
        match (fast_path, &migrant) {
            (Some(fast), Some(_)) => {
                fast.stats.migrated_out.fetch_add(1, Ordering::Relaxed);
            }
            (Some(fast), None) => {
                fast.migrations.unreserve();
                tracing::warn!("a connection leaving for the new agent lost its sockets");
            }
            (None, _) => {}
        }
        return Spliced {
            sent,
            received,
            error: None,
            migrant,
        };
    }
    if error.is_some() {
        abort(client_read, client_write);
        abort(upstream_read, upstream_write);
    }
    Spliced {
        sent,
        received,
        error,
        migrant: None,
    }
}

/// Counts itself in while it lives.
struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Counted<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves once a new agent asked for this process's connections.
async fn wait_requested(migrations: Option<&Migrations>) {
    match migrations {
        Some(migrations) => migrations.requested().await,
        None => std::future::pending().await,
    }
}

/// Both sockets as plain descriptors, for a new agent.
fn migrant(
    client_read: OwnedReadHalf,
    client_write: OwnedWriteHalf,
    upstream_read: OwnedReadHalf,
    upstream_write: OwnedWriteHalf,
    passed_up: &crate::observability::live::Bytes,
) -> Option<Migrant> {
    let descriptor = |read: OwnedReadHalf, write: OwnedWriteHalf| {
        let stream = read.reunite(write).ok()?.into_std().ok()?;
        Some(std::os::fd::OwnedFd::from(stream))
    };
    Some(Migrant {
        client: descriptor(client_read, client_write)?,
        upstream: descriptor(upstream_read, upstream_write)?,
        passed_up: (
            passed_up.sent.load(Ordering::Relaxed),
            passed_up.received.load(Ordering::Relaxed),
        ),
    })
}

/// The kernel's counters of a socket we hold.
fn counters_of(fd: RawFd) -> fast_path::TcpCounters {
    fast_path::tcp_counters(&spliced_fd(fd)).unwrap_or_default()
}

/// One of the two sockets being spliced, by descriptor: the pumps hold
/// their halves mutably, so the control loop keeps the raw number.
fn spliced_fd<'a>(fd: RawFd) -> BorrowedFd<'a> {
    // SAFETY: only called with the descriptors of the two streams, which
    // live until `splice` returns, longer than any use of the result.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// When a splice started and when it last moved a byte: what its idle
/// timeout and first-response timing are measured from.
pub(crate) struct Activity {
    pub started: Instant,
    /// Milliseconds since `started` of the last byte moved either way.
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// A byte moved just now.
    pub fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// How long no byte has moved.
    pub fn quiet(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// The idle check when the idle deadline passed: the error that ends the
/// splice if it was quiet for `idle`, or else the next deadline.
pub(crate) fn idle_check(idle: Duration, quiet: Duration) -> Result<Instant, (Side, io::Error)> {
    if quiet >= idle {
        return Err((
            Side::Idle,
            io::Error::new(io::ErrorKind::TimedOut, "idle timeout"),
        ));
    }
    Ok(Instant::now() + (idle - quiet))
}

/// Sleeps until `deadline`, or for ever without one.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Where a pump failed: reading its source or writing its destination.
#[derive(Debug, Clone, Copy)]
enum PumpSide {
    Read,
    Write,
}

impl PumpSide {
    /// The connection that failed, for the client→upstream pump (`false`)
    /// or the upstream→client pump (`true`).
    fn flip_if(self, from_upstream: bool) -> Side {
        match (self, from_upstream) {
            (PumpSide::Read, false) | (PumpSide::Write, true) => Side::Client,
            (PumpSide::Read, true) | (PumpSide::Write, false) => Side::Upstream,
        }
    }
}

/// Copies until end of stream, then shuts down the writer.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    count: &AtomicU64,
    activity: &Activity,
    mut first_data: Option<&(dyn Fn(Duration) + Sync)>,
    kernel_moved: Option<KernelMoved<'_>>,
) -> Result<(), (PumpSide, io::Error)> {
    let kernel = kernel_moved.is_some();
    let gate = kernel_moved.as_ref().map(|k| k.gate);
    let live = kernel_moved.as_ref().map(|k| k.live);
    let mut hand_over = kernel_moved.and_then(|k| k.hand_over);
    let mut buffer: Option<Box<[u8]>> = None;
    loop {
        if let Some(gate) = gate {
            gate.wait_open().await;
        }
        from.readable().await.map_err(|e| (PumpSide::Read, e))?;
        // Paused meanwhile: what is queued must wait for the kernel, or it
        // would overtake bytes still in the kernel's backlog.
        if gate.is_some_and(Gate::is_paused) {
            continue;
        }
        let writing = gate.map(Gate::writing);
        // Readiness may come without data (the fast path's sockets are
        // woken when the kernel takes their bytes): until the first bytes
        // really arrive, read into a small stack buffer and allocate none.
        let read = match buffer.as_mut() {
            Some(buffer) => from.try_read(buffer),
            None => {
                let mut first = [0u8; 2048];
                from.try_read(&mut first).inspect(|&n| {
                    if n > 0 {
                        let mut big = vec![0; BUFFER_SIZE].into_boxed_slice();
                        big[..n].copy_from_slice(&first[..n]);
                        buffer = Some(big);
                    }
                })
            }
        };
        let buffer = buffer.as_deref().unwrap_or_default();
        match read {
            Ok(0) => {
                if let Some(gate) = gate {
                    gate.ended.store(true, Ordering::Release);
                }
                drop(writing);
                if kernel {
                    fast_path::wait_forwarded(from.as_ref(), to.as_ref(), FORWARD_LIMIT).await;
                }
                return to.shutdown().await.map_err(|e| (PumpSide::Write, e));
            }
            Ok(n) => {
                if let Some(report) = first_data.take() {
                    report(activity.started.elapsed());
                }
                activity.touch();
                to.write_all(&buffer[..n])
                    .await
                    .map_err(|e| (PumpSide::Write, e))?;
                let total = count.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                if let Some(live) = live {
                    // The kernel's totals include these bytes too.
                    live.fetch_max(total, Ordering::Relaxed);
                }
                drop(writing);
                // Nothing of this direction is held here now: the kernel
                // may take it over.
                if let (Some(hand_over), Some(gate)) = (hand_over.take(), gate) {
                    hand_over.run(gate);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err((PumpSide::Read, error)),
        }
    }
}

/// Closes with RST. The halves are reunited first: dropping a lone write
/// half would send a FIN, which the peer would read as a clean end.
fn abort(read: OwnedReadHalf, write: OwnedWriteHalf) {
    if let Ok(stream) = read.reunite(write) {
        reset(stream);
    }
}

/// Closes a connection with RST instead of FIN.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
