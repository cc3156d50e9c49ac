//! One HBONE stream spliced with a TCP connection, driving h2's streams
//! directly so the payload is never copied in user space:
//! - TCP to tunnel: bytes are read into a shared buffer and each read is
//!   handed to h2 as a `Bytes` view of it (no copy); h2 chains it behind the
//!   frame header and TLS encrypts it from there;
//! - tunnel to TCP: each DATA frame's payload, a view of the TLS reader's
//!   buffer, is written to the socket as it is.
//!
//! (hyper's upgraded stream, used before, copies every DATA frame once more
//! each way: into a fresh `Bytes` when writing, out of it when reading.)
//!
//! Back-pressure is HTTP/2's own: the sender waits for stream capacity (the
//! peer's window, capped by the send buffer), and the receiver returns
//! window only once the pod's socket took the bytes.

use std::{future::poll_fn, io};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::proxy::splice;

/// Read size once data flows. Each read becomes one DATA frame.
const READ_BUFFER: usize = 64 * 1024;
/// The first read's buffer: an idle connection holds none, one that sent a
/// little holds this much.
const FIRST_READ: usize = 2 * 1024;
/// Spare room below which a fresh buffer is taken before reading (smaller
/// reads would mean smaller frames).
const MIN_READ: usize = 8 * 1024;

/// The two halves of an open CONNECT stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

/// Bytes each way and how the tunnelled connection ended.
pub struct Tunnelled {
    pub sent: u64,
    pub received: u64,
    pub error: Option<io::Error>,
}

/// Splices a TCP connection with a tunnel stream. End of stream maps to a
/// write shutdown the other way (FIN to END_STREAM and back); an error on
/// either side resets both (RST_STREAM CANCEL, TCP RST).
pub async fn splice_tunnel(mut tcp: TcpStream, tunnel: Tunnel) -> Tunnelled {
    let Tunnel { mut send, mut recv } = tunnel;
    let (mut sent, mut received) = (0, 0);
    let copied = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        tokio::try_join!(
            tcp_to_tunnel(&mut tcp_read, &mut send, &mut sent),
            tunnel_to_tcp(&mut recv, &mut tcp_write, &mut received),
        )
    };
    let error = copied.err();
    if error.is_some() {
        send.send_reset(h2::Reason::CANCEL);
        splice::reset(tcp);
    }
    Tunnelled {
        sent,
        received,
        error,
    }
}

/// Reads the TCP side until end of stream, then ends the stream.
async fn tcp_to_tunnel(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    total: &mut u64,
) -> io::Result<()> {
    let mut buffer = BytesMut::new();
    loop {
        if buffer.capacity() - buffer.len() < MIN_READ {
            if *total == 0 {
                // Allocate nothing until the client has something to say.
                tcp.readable().await?;
                buffer.reserve(FIRST_READ);
            } else {
                buffer.reserve(READ_BUFFER);
            }
        }
        let n = tcp.read_buf(&mut buffer).await?;
        if n == 0 {
            return send.send_data(Bytes::new(), true).map_err(stream_error);
        }
        *total += n as u64;
        let mut chunk = buffer.split().freeze();
        while !chunk.is_empty() {
            let granted = capacity(send, chunk.len()).await?;
            send.send_data(chunk.split_to(granted.min(chunk.len())), false)
                .map_err(stream_error)?;
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
    total: &mut u64,
) -> io::Result<()> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(stream_error)?;
        tcp.write_all(&data).await?;
        *total += data.len() as u64;
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(stream_error)?;
    }
    tcp.shutdown().await
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
