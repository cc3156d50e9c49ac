//! Moves bytes both ways between two TCP connections, as if they were one:
//! - an end-of-stream (FIN) from one side becomes a write shutdown (FIN) on
//!   the other, and the opposite direction keeps flowing (half-close);
//! - a reset or any I/O error on either side resets both sides (RST, not FIN),
//!   so neither peer mistakes an abort for a clean end.

use std::io;

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

#[derive(Debug)]
pub struct Spliced {
    /// Bytes from the downstream (client) side to the upstream side.
    pub sent: u64,
    /// Bytes from the upstream side back to the client.
    pub received: u64,
    /// `None` when both directions ended cleanly.
    pub error: Option<io::Error>,
}

pub async fn splice(client: TcpStream, upstream: TcpStream) -> Spliced {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let (mut sent, mut received) = (0u64, 0u64);
    let error = {
        let to_upstream = pump(&mut client_read, &mut upstream_write, &mut sent);
        let to_client = pump(&mut upstream_read, &mut client_write, &mut received);
        tokio::pin!(to_upstream, to_client);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                result = &mut to_upstream, if !up_done => match result {
                    Ok(()) => up_done = true,
                    Err(error) => break Some(error),
                },
                result = &mut to_client, if !down_done => match result {
                    Ok(()) => down_done = true,
                    Err(error) => break Some(error),
                },
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
        sent,
        received,
        error,
    }
}

/// Copies until end of stream, then shuts down the writer.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    count: &mut u64,
) -> io::Result<()> {
    let mut buffer: Option<Box<[u8]>> = None;
    loop {
        from.readable().await?;
        let buffer = buffer.get_or_insert_with(|| vec![0; BUFFER_SIZE].into_boxed_slice());
        match from.try_read(buffer) {
            Ok(0) => return to.shutdown().await,
            Ok(n) => {
                to.write_all(&buffer[..n]).await?;
                *count += n as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
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
