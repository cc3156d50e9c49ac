//! Moves bytes both ways between two TCP connections, as if they were one:
//! - an end-of-stream (FIN) from one side becomes a write shutdown (FIN) on
//!   the other, and the opposite direction keeps flowing (half-close);
//! - a reset or any I/O error on either side resets both sides (RST, not FIN),
//!   so neither peer mistakes an abort for a clean end.

use std::{
    io,
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

/// Buffer per direction, allocated only once data arrives so an idle
/// connection holds none.
const BUFFER_SIZE: usize = 64 * 1024;

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
}

/// Splices until both directions end; with `idle`, a connection with no
/// bytes either way for that long is reset on both sides.
/// `first_response` is told, once, how long after the splice began the
/// upstream sent its first byte (what a slow server looks like from here).
pub async fn splice(
    client: TcpStream,
    upstream: TcpStream,
    idle: Option<Duration>,
    counted: &crate::live::Bytes,
    first_response: &(dyn Fn(Duration) + Sync),
) -> Spliced {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let (sent, received) = (&counted.sent, &counted.received);
    let started = Instant::now();
    // Milliseconds since `started` of the last byte moved either way.
    let last_activity = AtomicU64::new(0);
    let error = {
        let to_upstream = pump(
            &mut client_read,
            &mut upstream_write,
            sent,
            started,
            &last_activity,
            None,
        );
        let to_client = pump(
            &mut upstream_read,
            &mut client_write,
            received,
            started,
            &last_activity,
            Some(first_response),
        );
        tokio::pin!(to_upstream, to_client);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let idle_deadline = idle.map(|idle| {
                started + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + idle
            });
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
                    let quiet = started.elapsed().saturating_sub(Duration::from_millis(last_activity.load(Ordering::Relaxed)));
                    if quiet >= idle {
                        break Some((Side::Idle, io::Error::new(io::ErrorKind::TimedOut, "idle timeout")));
                    }
                }
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    if error.is_some() {
        abort(client_read, client_write);
        abort(upstream_read, upstream_write);
    }
    Spliced {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        error,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
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
    started: Instant,
    last_activity: &AtomicU64,
    mut first_data: Option<&(dyn Fn(Duration) + Sync)>,
) -> Result<(), (PumpSide, io::Error)> {
    let mut buffer: Option<Box<[u8]>> = None;
    loop {
        from.readable().await.map_err(|e| (PumpSide::Read, e))?;
        let buffer = buffer.get_or_insert_with(|| vec![0; BUFFER_SIZE].into_boxed_slice());
        match from.try_read(buffer) {
            Ok(0) => return to.shutdown().await.map_err(|e| (PumpSide::Write, e)),
            Ok(n) => {
                if let Some(report) = first_data.take() {
                    report(started.elapsed());
                }
                last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                to.write_all(&buffer[..n])
                    .await
                    .map_err(|e| (PumpSide::Write, e))?;
                count.fetch_add(n as u64, Ordering::Relaxed);
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
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
