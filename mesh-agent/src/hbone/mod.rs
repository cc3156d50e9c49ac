//! HBONE: TCP connections tunnelled between nodes as HTTP/2 CONNECT streams
//! over mutual TLS (1.3, ALPN `h2`) to the destination pod's IP on port
//! 15008, with SPIFFE identities on both ends. Wire-compatible with Istio
//! ambient's ztunnel.
//!
//! [`client`] opens streams from a local workload to a remote one, pooling
//! HTTP/2 connections per (source identity, destination identity, node);
//! [`server`] accepts them for this node's workloads.

pub mod client;
pub mod server;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::proxy::splice;

/// HTTP/2 flow-control windows: large enough that one stream can fill a
/// fast link without waiting for WINDOW_UPDATEs.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame we accept (fewer, larger frames per byte moved).
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Bytes h2 buffers per stream before it stops taking writes (hyper's
/// default, 400 KiB, caps one stream below what the window allows).
pub const SEND_BUFFER: usize = 4 * 1024 * 1024;
/// Copy buffer per direction of a tunnelled connection, once data flows;
/// an idle one holds [`FIRST_BUFFER`].
pub const COPY_BUFFER: usize = 64 * 1024;
pub const FIRST_BUFFER: usize = 2 * 1024;

/// Hard cap on streams per HTTP/2 connection (the server's
/// SETTINGS_MAX_CONCURRENT_STREAMS); the client opens more connections well
/// before it (see `HboneConfig::streams_per_connection`).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes each way and how the tunnelled connection ended.
pub struct Tunnelled {
    pub sent: u64,
    pub received: u64,
    pub error: Option<std::io::Error>,
}

/// Splices a TCP connection with a tunnel stream. End of stream maps to a
/// write shutdown (END_STREAM) the other way; an error resets the TCP side.
pub async fn splice_tunnel<S>(mut tcp: tokio::net::TcpStream, stream: S) -> Tunnelled
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let copied = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let (mut tunnel_read, mut tunnel_write) = tokio::io::split(stream);
        tokio::try_join!(
            copy_one_way(&mut tcp_read, &mut tunnel_write),
            copy_one_way(&mut tunnel_read, &mut tcp_write),
        )
    };
    match copied {
        Ok((sent, received)) => Tunnelled {
            sent,
            received,
            error: None,
        },
        Err(error) => {
            splice::reset(tcp);
            Tunnelled {
                sent: 0,
                received: 0,
                error: Some(error),
            }
        }
    }
}

/// Copies one direction until end of stream, then shuts the writer down
/// (half-close). The full buffer is allocated once the first bytes came:
/// an idle tunnel holds a small one.
async fn copy_one_way<R, W>(reader: &mut R, writer: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; FIRST_BUFFER];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buffer).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buffer[..n]).await?;
        total += n as u64;
        if buffer.len() < COPY_BUFFER {
            buffer.resize(COPY_BUFFER, 0);
        }
    }
}
