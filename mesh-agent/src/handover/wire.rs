//! The handover conversation's messages: one JSON object per frame, each
//! frame a 4-byte big-endian length and the JSON, on a Unix stream socket.
//! The listeners travel with one message as `SCM_RIGHTS`.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::{io::Interest, net::UnixStream};

/// Frames larger than this are refused: the messages are a few hundred
/// bytes, and the peer is only trusted as far as its uid.
const MAX_FRAME: usize = 64 * 1024;
/// At most this many descriptors per message.
pub const MAX_FDS: usize = 8;

/// Which of the agent's listeners a passed descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerRole {
    Outbound,
    Inbound,
    Admin,
    Ready,
    Metrics,
}

/// What the new agent says.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromSuccessor {
    /// Who it is, and the pin root it will use (must be the old agent's).
    Hello {
        pin_root: String,
        version: String,
        pid: u32,
        /// It runs the fast path, so it can carry the old agent's
        /// fast-path connections on (absent from agents before it could).
        #[serde(default)]
        takes_fast_path: bool,
    },
    /// Ready to load: the old agent must stop changing the kernel state.
    TakeKernel,
    /// Adopted the kernel state and accepting: the old agent may go.
    Taken,
}

/// What the old agent answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromPredecessor {
    /// Sent with the listeners' descriptors, in this order.
    Listeners {
        roles: Vec<ListenerRole>,
        version: String,
        pid: u32,
    },
    /// The pin root is unlocked and nothing will change it.
    Released,
    /// Draining from now on; its own `/stats` answers at `stats`.
    Draining {
        stats: String,
    },
    /// A fast-path connection for the new agent to carry on, sent with
    /// its two sockets (client, upstream): its record, and what the old
    /// agent's pumps wrote each way.
    Connection {
        record: serde_json::Value,
        passed_up: (u64, u64),
    },
    /// No more connections: `moved` were sent, `kept` stay with the old
    /// agent until they end.
    Migrated {
        moved: u64,
        kept: u64,
    },
    Refused {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the other agent closed the handover socket")]
    Closed,
    #[error("handover socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("handover frame of {0} bytes (at most {MAX_FRAME})")]
    TooLarge(usize),
    #[error("handover message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("handover message carried {0} descriptors (at most {MAX_FDS})")]
    TooManyFds(usize),
}

/// Sends `message` with `fds` attached (none for most messages).
pub async fn send<T: Serialize>(
    stream: &UnixStream,
    message: &T,
    fds: &[RawFd],
) -> Result<(), WireError> {
    let body = serde_json::to_vec(message)?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let mut sent = 0;
    while sent < frame.len() {
        // The descriptors go with the first byte only.
        let attach = if sent == 0 { fds } else { &[] };
        sent += stream
            .async_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(&frame[sent..])];
                let cmsgs = [ControlMessage::ScmRights(attach)];
                let cmsgs: &[ControlMessage<'_>] = if attach.is_empty() { &[] } else { &cmsgs };
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
    }
    Ok(())
}

/// Receives one message and the descriptors that came with it.
pub async fn receive<T: for<'de> Deserialize<'de>>(
    stream: &UnixStream,
) -> Result<(T, Vec<OwnedFd>), WireError> {
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    read_exact(stream, &mut header, &mut fds).await?;
    let length = u32::from_be_bytes(header) as usize;
    if length > MAX_FRAME {
        return Err(WireError::TooLarge(length));
    }
    let mut body = vec![0u8; length];
    read_exact(stream, &mut body, &mut fds).await?;
    if fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds(fds.len()));
    }
    Ok((serde_json::from_slice(&body)?, fds))
}

async fn read_exact(
    stream: &UnixStream,
    buffer: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<(), WireError> {
    let mut filled = 0;
    while filled < buffer.len() {
        let read = stream
            .async_io(Interest::READABLE, || {
                let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [IoSliceMut::new(&mut buffer[filled..])];
                let message = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                for cmsg in message.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: SCM_RIGHTS installed these descriptors
                        // in this process; nothing else owns them.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                Ok(message.bytes)
            })
            .await?;
        if read == 0 {
            return Err(WireError::Closed);
        }
        filled += read;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_message_arrives_with_its_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let message = FromPredecessor::Listeners {
            roles: vec![ListenerRole::Outbound],
            version: "1".into(),
            pid: 7,
        };
        send(&a, &message, &[writer.as_raw_fd()]).await.unwrap();
        let (received, fds) = receive::<FromPredecessor>(&b).await.unwrap();
        assert!(matches!(
            received,
            FromPredecessor::Listeners { pid: 7, .. }
        ));
        assert_eq!(fds.len(), 1);
        // The descriptor is the same pipe.
        let mut passed = std::fs::File::from(fds.into_iter().next().unwrap());
        passed.write_all(b"x").unwrap();
        drop((passed, &mut writer));
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_it_is_read() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let error = receive::<FromSuccessor>(&b).await.unwrap_err();
        assert!(
            matches!(error, WireError::TooLarge(n) if n == 1 << 30),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_cut_frame_and_garbage_are_errors_not_panics() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0, 0, 0, 10, b'{']).await.unwrap();
        drop(a);
        let error = receive::<FromSuccessor>(&b).await.unwrap_err();
        assert!(matches!(error, WireError::Closed), "{error}");

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0, 0, 0, 3, b'a', b'b', b'c']).await.unwrap();
        let error = receive::<FromSuccessor>(&b).await.unwrap_err();
        assert!(matches!(error, WireError::Json(_)), "{error}");
    }
}
