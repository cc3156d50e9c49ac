//! A reader that never reads past the end of a TLS record while the
//! handshake runs.
//!
//! Kernel TLS takes over a socket after rustls's handshake: every byte the
//! kernel has not yet delivered must still be a whole, undecrypted record.
//! rustls reads as much as the socket offers, so it could take the start of
//! the peer's first application record into its own buffer, where the
//! kernel would never see it. Bounded to one record per read, rustls stops
//! exactly behind the last handshake record, and the hand-over is exact.
//! After the hand-over (or when the kernel path is not taken) reads are
//! unbounded again.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// TLS record header: type (1), version (2), length (2).
const HEADER: usize = 5;

pub struct RecordBounded<IO> {
    io: IO,
    bounded: bool,
    header: [u8; HEADER],
    header_len: usize,
    body_left: usize,
}

impl<IO> RecordBounded<IO> {
    /// `bounded`: one record per read until [`Self::unbound`]; otherwise a
    /// plain pass-through.
    pub fn new(io: IO, bounded: bool) -> Self {
        Self {
            io,
            bounded,
            header: [0; HEADER],
            header_len: 0,
            body_left: 0,
        }
    }

    /// Whether every byte read so far belongs to a complete record (never
    /// known for an unbounded reader).
    pub fn at_record_boundary(&self) -> bool {
        self.bounded && self.header_len == 0 && self.body_left == 0
    }

    /// Reads as much as the socket offers from now on.
    pub fn unbound(&mut self) {
        self.bounded = false;
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    pub fn into_inner(self) -> IO {
        self.io
    }

    /// How many bytes the next read may take without crossing a record.
    fn allowance(&self) -> usize {
        if self.header_len < HEADER && self.body_left == 0 {
            HEADER - self.header_len
        } else {
            self.body_left
        }
    }

    /// Follows the record structure over bytes just read.
    fn account(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.body_left == 0 {
                let take = (HEADER - self.header_len).min(rest.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&rest[..take]);
                self.header_len += take;
                rest = &rest[take..];
                if self.header_len == HEADER {
                    self.body_left =
                        usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                    self.header_len = if self.body_left == 0 { 0 } else { HEADER };
                }
            } else {
                let take = self.body_left.min(rest.len());
                self.body_left -= take;
                rest = &rest[take..];
                if self.body_left == 0 {
                    self.header_len = 0;
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for RecordBounded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.bounded {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let allowance = this.allowance().min(buf.remaining());
        let mut limited = buf.take(allowance);
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut limited))?;
        let read = limited.filled().len();
        this.account(limited.filled());
        // SAFETY: `limited` wrote `read` initialised bytes into `buf`'s
        // unfilled part.
        unsafe { buf.assume_init(read) };
        buf.advance(read);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for RecordBounded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut record = vec![kind, 3, 3];
        record.extend_from_slice(&(body.len() as u16).to_be_bytes());
        record.extend_from_slice(body);
        record
    }

    #[tokio::test]
    async fn reads_stop_at_each_record_end() {
        let (mut near, far) = tokio::io::duplex(1 << 16);
        let first = record(22, &[7; 300]);
        let second = record(23, &[9; 40]);
        near.write_all(&[first.clone(), second.clone()].concat())
            .await
            .unwrap();
        let mut bounded = RecordBounded::new(far, true);
        let mut buf = vec![0; 4096];
        let mut got = Vec::new();
        while got.len() < first.len() {
            let n = bounded.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, first, "no byte of the second record was taken");
        assert!(bounded.at_record_boundary());
        bounded.unbound();
        let n = bounded.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &second[..]);
    }

    #[test]
    fn split_headers_and_empty_records_are_followed() {
        let mut bounded = RecordBounded::new(tokio::io::empty(), true);
        let stream = [record(22, &[]), record(22, &[1, 2, 3])].concat();
        for byte in &stream[..7] {
            bounded.account(std::slice::from_ref(byte));
        }
        assert!(!bounded.at_record_boundary());
        assert_eq!(bounded.allowance(), 3, "the rest of the second header");
        bounded.account(&stream[7..]);
        assert!(bounded.at_record_boundary());
    }
}
