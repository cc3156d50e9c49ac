//! One HBONE stream spliced with a TCP connection, driving h2's streams
//! directly so the payload is copied in user space only by TLS:
//! - TCP to tunnel: bytes are read into a shared buffer and each read is
//!   handed to h2 as a `Bytes` view of it (no copy); h2 chains it behind the
//!   frame header and TLS encrypts it from there;
//! - tunnel to TCP: each DATA frame's payload, a view of h2's read buffer
//!   (where TLS put the decrypted bytes), is written to the socket as it
//!   is.
//!
//! (hyper's upgraded stream, used before, copies every DATA frame once more
//! each way: into a fresh `Bytes` when writing, out of it when reading.)
//!
//! Back-pressure is HTTP/2's own: the sender waits for stream capacity (the
//! peer's window, capped by the send buffer), and the receiver returns
//! window only once the pod's socket took the bytes.
//!
//! Like a plain splice, it counts bytes as they move (live views see them),
//! applies the idle timeout, and reports when the first byte came back.

use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::io::splice::{self, Activity, Side, idle_check, sleep_until};

/// Largest read once data flows; each read becomes one DATA frame. With
/// its 9-byte frame header a full one is exactly eight full TLS records
/// (16 KiB of plaintext each): a 64 KiB read made four full records and a
/// fifth of 9 bytes, sent in a write and a TCP segment of its own.
const READ_BUFFER: usize = 8 * TLS_RECORD - FRAME_HEADER;
const TLS_RECORD: usize = 16 * 1024;
const FRAME_HEADER: usize = 9;
/// The first read's buffer: an idle connection holds none, one that sent a
/// little holds this much.
const FIRST_READ: usize = 2 * 1024;

/// The two halves of an open CONNECT stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

/// What the caller follows of a tunnelled connection while it runs.
pub struct Watch<'a> {
    /// Bytes from the TCP side into the stream, counted as they go.
    pub to_tunnel: &'a AtomicU64,
    /// Bytes from the stream out to the TCP side.
    pub from_tunnel: &'a AtomicU64,
    /// With no bytes either way for this long, both sides are reset.
    pub idle: Option<Duration>,
    /// Told once how long after the splice began the first byte came
    /// out of the stream.
    pub first_data: &'a (dyn Fn(Duration) + Sync),
}

/// Splices a TCP connection with a tunnel stream. End of stream maps to a
/// write shutdown the other way (FIN to END_STREAM and back); an error on
/// either side, or the idle timeout, resets both (RST_STREAM CANCEL, TCP
/// RST). Returns how it ended: `None` cleanly, or the error and its side
/// ([`Side::Client`] for the TCP connection, [`Side::Upstream`] for the
/// stream, or [`Side::Idle`]).
pub async fn splice_tunnel(
    mut tcp: TcpStream,
    tunnel: Tunnel,
    watch: &Watch<'_>,
) -> Option<(Side, io::Error)> {
    let Tunnel { mut send, mut recv } = tunnel;
    let activity = Activity::new();
    let error = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let both = async {
            tokio::try_join!(
                tcp_to_tunnel(&mut tcp_read, &mut send, watch.to_tunnel, &activity),
                tunnel_to_tcp(&mut recv, &mut tcp_write, watch, &activity),
            )
        };
        tokio::pin!(both);
        let mut idle_deadline = watch.idle.map(|idle| activity.started + idle);
        loop {
            tokio::select! {
                result = &mut both => break result.err(),
                _ = sleep_until(idle_deadline), if idle_deadline.is_some() => {
                    let idle = watch.idle.expect("deadline implies idle");
                    match idle_check(idle, activity.quiet()) {
                        Ok(next) => idle_deadline = Some(next),
                        Err(timed_out) => break Some(timed_out),
                    }
                }
            }
        }
    };
    if error.is_some() {
        send.send_reset(h2::Reason::CANCEL);
        splice::reset(tcp);
    }
    error
}

/// Reads the TCP side until end of stream, then ends the stream.
async fn tcp_to_tunnel(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    total: &AtomicU64,
    activity: &Activity,
) -> Result<(), (Side, io::Error)> {
    let tcp_side = |e| (Side::Client, e);
    let mut buffer = BytesMut::new();
    let mut any = false;
    loop {
        let limit = if any {
            READ_BUFFER
        } else {
            // Allocate nothing until the client has something to say.
            tcp.readable().await.map_err(tcp_side)?;
            FIRST_READ
        };
        // Room for a whole read: the buffer is reused in place once h2 let
        // go of every frame cut from it, or a fresh one is taken.
        buffer.reserve(limit);
        let n = tcp
            .read_buf(&mut (&mut buffer).limit(limit))
            .await
            .map_err(tcp_side)?;
        if n == 0 {
            return send
                .send_data(Bytes::new(), true)
                .map_err(|e| (Side::Upstream, stream_error(e)));
        }
        any = true;
        let mut chunk = buffer.split().freeze();
        while !chunk.is_empty() {
            let granted = capacity(send, chunk.len())
                .await
                .map_err(|e| (Side::Upstream, e))?;
            let part = chunk.split_to(granted.min(chunk.len()));
            let moved = part.len() as u64;
            send.send_data(part, false)
                .map_err(|e| (Side::Upstream, stream_error(e)))?;
            total.fetch_add(moved, Ordering::Relaxed);
            activity.touch();
        }
    }
}

/// Send capacity for up to `wanted` bytes: some of the peer's window, no
/// more than the send buffer has room for. Waits until there is any.
async fn capacity(send: &mut SendStream<Bytes>, wanted: usize) -> io::Result<usize> {
    send.reserve_capacity(wanted);
    loop {
        let now = send.capacity();
        if now > 0 {
            return Ok(now);
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(stream_error(error)),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "tunnel stream closed by the peer",
                ));
            }
        }
    }
}

/// Writes the stream's data to the TCP side until END_STREAM, then shuts
/// the socket's write side down.
async fn tunnel_to_tcp(
    recv: &mut RecvStream,
    tcp: &mut WriteHalf<'_>,
    watch: &Watch<'_>,
    activity: &Activity,
) -> Result<(), (Side, io::Error)> {
    let stream_side = |e| (Side::Upstream, stream_error(e));
    let mut first = Some(watch.first_data);
    while let Some(data) = recv.data().await {
        let data = data.map_err(stream_side)?;
        if let Some(report) = first.take() {
            report(activity.started.elapsed());
        }
        activity.touch();
        tcp.write_all(&data).await.map_err(|e| (Side::Client, e))?;
        watch
            .from_tunnel
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(stream_side)?;
    }
    tcp.shutdown().await.map_err(|e| (Side::Client, e))
}

/// An h2 stream or connection error as I/O: a reset by the peer reads as
/// one (it aborted the connection it carries).
fn stream_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if error.is_reset() || error.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, error)
}
