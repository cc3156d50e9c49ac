//! Replacing a running agent without losing a connection or a moment of
//! capture.
//!
//! Every agent serves a Unix socket (`--handover-socket`, root only). A new
//! agent on the same node connects to it before it binds anything, and the
//! two talk:
//!
//! ```text
//! new                                old
//!  Hello {pin root}           ->      same pin root? (else Refused)
//!                             <-      Listeners + SCM_RIGHTS (outbound,
//!                                     inbound, admin, ready, metrics)
//!  (builds its model: under kubernetes:, the API server's lists)
//!  TakeKernel                 ->      stops changing the kernel, unlocks
//!                             <-      Released            the pin root
//!  (locks the pin root, adopts the pinned maps, swaps its programs into
//!   the pinned links in place, writes its model, accepts)
//!  Taken                      ->      stops accepting; GOAWAY to its HBONE
//!                             <-      Draining {stats}    peers
//!                             <-      Connection {record} + SCM_RIGHTS
//!                                     (client, upstream), for each fast-path
//!                                     connection as it can leave (5 s)
//!  (splices them on)          <-      Migrated {moved, kept}
//!                                     serves the rest until they end or
//!                                     `proxy.handover_drain_timeout_ms`;
//!                                     exits leaving the kernel as it is
//! ```
//!
//! The listening sockets are the same sockets in both processes, so a SYN
//! never meets a closed port: connections queue in the backlog and whoever
//! accepts first serves them (both can, between `Released` and `Taken`).
//! Should the new agent fail before `Taken` (the socket closes), the old
//! one locks the pin root again and goes on as if nothing happened.

mod lifecycle;
mod wire;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::{
        fd::{AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use self::wire::{FromPredecessor, FromSuccessor, WireError};
pub use self::{lifecycle::Lifecycle, wire::ListenerRole};
use crate::dataplane::fast_path::{Departure, Migrations};

/// Default `--handover-socket`.
pub const DEFAULT_SOCKET: &str = "/run/mesh-agent/handover.sock";
/// How long a new agent may take between connecting and saying hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old agent waits for `Taken` once it lent the kernel
/// state: loading, adopting and writing the model take well under that.
const TAKE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the old agent passes fast-path connections on: each leaves
/// at its first tick with nothing in the agent's hands (milliseconds, or
/// a paused direction's backlog draining), and those that cannot by then
/// stay with the old agent until they end.
const MIGRATION_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("handover socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("the other agent sent {0} where {1} was due")]
    Unexpected(String, &'static str),
    #[error("the running agent refused the handover: {0}")]
    Refused(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("handover peer has uid {peer}, this agent {own}")]
    Stranger { peer: u32, own: u32 },
}

fn unexpected<T: std::fmt::Debug>(message: T, due: &'static str) -> HandoverError {
    HandoverError::Unexpected(format!("{message:?}"), due)
}

/// Only the agent's own user may take its listeners.
fn check_peer(stream: &UnixStream) -> Result<(), HandoverError> {
    let peer = stream.peer_cred().map_err(WireError::Io)?.uid();
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if peer != own {
        return Err(HandoverError::Stranger { peer, own });
    }
    Ok(())
}

/// The new agent's side: the running agent it takes over from.
pub struct Predecessor {
    stream: UnixStream,
    pid: u32,
    version: String,
    listeners: HashMap<ListenerRole, OwnedFd>,
}

impl Predecessor {
    /// Asks the agent serving `socket` for its listeners. `None` when no
    /// agent answers there (none runs, or it crashed). `takes_fast_path`:
    /// this agent runs the fast path and can carry the old one's
    /// fast-path connections on.
    pub async fn find(
        socket: &Path,
        pin_root: &Path,
        takes_fast_path: bool,
    ) -> Result<Option<Self>, HandoverError> {
        let stream = match UnixStream::connect(socket).await {
            Ok(stream) => stream,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None);
            }
            Err(source) => {
                return Err(HandoverError::Socket {
                    path: socket.to_owned(),
                    source,
                });
            }
        };
        check_peer(&stream)?;
        let hello = FromSuccessor::Hello {
            pin_root: pin_root.display().to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            takes_fast_path,
        };
        wire::send(&stream, &hello, &[]).await?;
        let (answer, fds) = tokio::time::timeout(HELLO_TIMEOUT, wire::receive(&stream))
            .await
            .map_err(|_| HandoverError::Timeout("the running agent's listeners"))??;
        let (roles, version, pid) = match answer {
            FromPredecessor::Listeners {
                roles,
                version,
                pid,
            } => (roles, version, pid),
            FromPredecessor::Refused { reason } => return Err(HandoverError::Refused(reason)),
            other => return Err(unexpected(other, "listeners")),
        };
        if roles.len() != fds.len() {
            return Err(HandoverError::Unexpected(
                format!("{} descriptors for {} listeners", fds.len(), roles.len()),
                "one per listener",
            ));
        }
        info!(pid, %version, listeners = roles.len(), "taking over from the running agent");
        Ok(Some(Self {
            stream,
            pid,
            version,
            listeners: roles.into_iter().zip(fds).collect(),
        }))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The running agent's listener for `role`, if it listens where this
    /// agent wants to (`wanted` port 0: anywhere). A TCP listening socket
    /// is checked as such before it is used.
    pub fn take_listener(
        &mut self,
        role: ListenerRole,
        wanted: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let fd = self.listeners.remove(&role)?;
        let listener = std::net::TcpListener::from(fd);
        let listening =
            nix::sys::socket::getsockopt(&listener, nix::sys::socket::sockopt::AcceptConn)
                .unwrap_or(false);
        let local = listener.local_addr().ok()?;
        let fits =
            listening && (local == wanted || (wanted.port() == 0 && local.ip() == wanted.ip()));
        if !fits {
            info!(?role, %local, %wanted, "not using the running agent's listener: it listens elsewhere");
            return None;
        }
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// Asks the running agent to stop changing the kernel state and to
    /// unlock the pin root; returns once it has.
    pub async fn take_kernel(&mut self) -> Result<(), HandoverError> {
        wire::send(&self.stream, &FromSuccessor::TakeKernel, &[]).await?;
        match tokio::time::timeout(TAKE_TIMEOUT, wire::receive(&self.stream))
            .await
            .map_err(|_| {
                HandoverError::Timeout("the running agent to release the kernel state")
            })?? {
            (FromPredecessor::Released, _) => Ok(()),
            (other, _) => Err(unexpected(other, "released")),
        }
    }

    /// Tells the old agent this one serves now. Returns where the old
    /// agent's own `/stats` answers while it drains, and the connections
    /// it passes on.
    pub async fn taken(self) -> Result<(String, Arrivals), HandoverError> {
        wire::send(&self.stream, &FromSuccessor::Taken, &[]).await?;
        match tokio::time::timeout(HELLO_TIMEOUT, wire::receive(&self.stream))
            .await
            .map_err(|_| HandoverError::Timeout("the old agent to drain"))??
        {
            (FromPredecessor::Draining { stats }, _) => {
                info!(pid = self.pid, version = %self.version, %stats, "handover complete: the old agent drains");
                Ok((
                    stats,
                    Arrivals {
                        stream: self.stream,
                    },
                ))
            }
            (other, _) => Err(unexpected(other, "draining")),
        }
    }
}

/// The fast-path connections the old agent passes on after the handover.
pub struct Arrivals {
    stream: UnixStream,
}

/// One connection passed on: its record, what the old agent's pumps wrote
/// each way, and its sockets.
pub struct Arrival {
    pub record: serde_json::Value,
    pub passed_up: (u64, u64),
    pub client: OwnedFd,
    pub upstream: OwnedFd,
}

impl Arrivals {
    /// The next connection; `Ok(None)` once the old agent has sent them
    /// all (it says how many, and how many it keeps).
    pub async fn next(&mut self) -> Result<Option<Arrival>, HandoverError> {
        let (message, fds) =
            tokio::time::timeout(MIGRATION_WINDOW * 2, wire::receive(&self.stream))
                .await
                .map_err(|_| HandoverError::Timeout("the old agent's connections"))??;
        match message {
            FromPredecessor::Connection { record, passed_up } => {
                let [client, upstream]: [OwnedFd; 2] = fds.try_into().map_err(|fds: Vec<_>| {
                    HandoverError::Unexpected(
                        format!("a connection with {} descriptors", fds.len()),
                        "two per connection",
                    )
                })?;
                Ok(Some(Arrival {
                    record,
                    passed_up,
                    client,
                    upstream,
                }))
            }
            FromPredecessor::Migrated { moved, kept } => {
                info!(
                    moved,
                    kept, "the old agent passed on its fast-path connections"
                );
                Ok(None)
            }
            other => Err(unexpected(other, "connection")),
        }
    }
}

/// The running agent's side: the socket new agents find it at.
pub struct HandoverServer {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

impl HandoverServer {
    /// Binds `path` (its directory made root-only), replacing a socket
    /// nobody answers on any more, or the one of the agent this one took
    /// over from (`took_over`), which still holds it while it drains.
    /// Another live agent there is left alone.
    pub async fn bind(path: &Path, took_over: bool) -> Result<Self, HandoverError> {
        let socket_err = |source| HandoverError::Socket {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(socket_err)?;
        }
        if path.exists() {
            if !took_over && UnixStream::connect(path).await.is_ok() {
                return Err(socket_err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another agent serves it (another pin root's agent with the same socket?)",
                )));
            }
            std::fs::remove_file(path).map_err(socket_err)?;
        }
        let listener = UnixListener::bind(path).map_err(socket_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err)?;
        let inode = std::fs::metadata(path).map_err(socket_err)?.ino();
        Ok(Self {
            listener,
            path: path.to_owned(),
            inode,
        })
    }

    /// The next agent that connects (strangers turned away).
    pub async fn accept(&self) -> UnixStream {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => match check_peer(&stream) {
                    Ok(()) => return stream,
                    Err(error) => warn!(%error, "handover: turned a connection away"),
                },
                Err(error) => {
                    warn!(%error, "handover socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Removes the socket file, unless a successor has replaced it.
    pub fn remove(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A new agent talking to this one, until it wants the kernel state.
pub struct Successor {
    stream: UnixStream,
    pub pid: u32,
    /// It can carry fast-path connections on (else they stay here).
    pub takes_fast_path: bool,
}

impl Successor {
    /// Answers a new agent's hello with `listeners` and waits until it
    /// asks for the kernel state (it may first wait for its API server).
    pub async fn greet(
        stream: UnixStream,
        pin_root: &Path,
        listeners: &[(ListenerRole, BorrowedFd<'_>)],
    ) -> Result<Self, HandoverError> {
        let (hello, _) = tokio::time::timeout(HELLO_TIMEOUT, wire::receive(&stream))
            .await
            .map_err(|_| HandoverError::Timeout("hello"))??;
        let FromSuccessor::Hello {
            pin_root: theirs,
            version,
            pid,
            takes_fast_path,
        } = hello
        else {
            return Err(unexpected(hello, "hello"));
        };
        if Path::new(&theirs) != pin_root {
            let reason = format!(
                "this agent's pin root is {}, the new agent's {theirs}",
                pin_root.display()
            );
            let _ = wire::send(
                &stream,
                &FromPredecessor::Refused {
                    reason: reason.clone(),
                },
                &[],
            )
            .await;
            return Err(HandoverError::Refused(reason));
        }
        info!(pid, %version, "a new agent asks to take over: passing the listeners");
        let (roles, fds): (Vec<ListenerRole>, Vec<i32>) = listeners
            .iter()
            .map(|(role, fd)| (*role, fd.as_raw_fd()))
            .unzip();
        let message = FromPredecessor::Listeners {
            roles,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
        };
        wire::send(&stream, &message, &fds).await?;
        match wire::receive(&stream).await? {
            (FromSuccessor::TakeKernel, _) => Ok(Self {
                stream,
                pid,
                takes_fast_path,
            }),
            (other, _) => Err(unexpected(other, "take_kernel")),
        }
    }

    /// Says the kernel state is released, and waits until the new agent
    /// has taken it (or failed: then the caller takes it back).
    pub async fn release(&mut self) -> Result<(), HandoverError> {
        wire::send(&self.stream, &FromPredecessor::Released, &[]).await?;
        match tokio::time::timeout(TAKE_TIMEOUT, wire::receive(&self.stream))
            .await
            .map_err(|_| HandoverError::Timeout("the new agent to take over"))??
        {
            (FromSuccessor::Taken, _) => Ok(()),
            (other, _) => Err(unexpected(other, "taken")),
        }
    }

    /// Tells the new agent where this one's `/stats` answers while it drains.
    pub async fn draining(self, stats: SocketAddr) -> Self {
        let message = FromPredecessor::Draining {
            stats: stats.to_string(),
        };
        if let Err(error) = wire::send(&self.stream, &message, &[]).await {
            warn!(%error, "telling the new agent this one drains");
        }
        self
    }

    /// Passes the fast-path connections that leave (`departures`) to the
    /// new agent, until none that could is left (`live` counts them) or
    /// `MIGRATION_WINDOW` (5 s) has passed; then says how many went and how
    /// many stay. Returns that count.
    pub async fn pass_connections(
        self,
        mut departures: tokio::sync::mpsc::UnboundedReceiver<Departure>,
        migrations: Option<&Migrations>,
    ) -> (u64, u64) {
        let pending = || migrations.map_or(0, Migrations::pending);
        let deadline = tokio::time::Instant::now() + MIGRATION_WINDOW;
        let mut moved = 0u64;
        let mut closed = false;
        loop {
            let departure = tokio::select! {
                departure = departures.recv() => departure,
                () = tokio::time::sleep(Duration::from_millis(10)) => None,
                () = tokio::time::sleep_until(deadline), if !closed => {
                    // No more places; those given still come.
                    migrations.inspect(|m| m.close());
                    closed = true;
                    None
                }
            };
            let Some(Departure { migrant, record }) = departure else {
                let in_transit = migrations.map_or(0, Migrations::in_transit);
                if pending() == 0 || (closed && in_transit == 0 && departures.is_empty()) {
                    break;
                }
                continue;
            };
            let message = FromPredecessor::Connection {
                record,
                passed_up: migrant.passed_up,
            };
            let fds = [migrant.client.as_raw_fd(), migrant.upstream.as_raw_fd()];
            match wire::send(&self.stream, &message, &fds).await {
                Ok(()) => moved += 1,
                // Gone: this connection closes with its descriptors here.
                Err(error) => warn!(%error, "passing a connection to the new agent"),
            }
        }
        if let Some(migrations) = migrations {
            migrations.close();
            migrations.finish();
        }
        let kept = pending() as u64;
        let done = FromPredecessor::Migrated { moved, kept };
        if let Err(error) = wire::send(&self.stream, &done, &[]).await {
            warn!(%error, "telling the new agent the connections are passed");
        }
        (moved, kept)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// An agent of another pin root (another node's, sharing a socket
    /// path by mistake) gets no listener.
    #[tokio::test]
    async fn a_new_agent_of_another_pin_root_is_refused() {
        let dir = std::env::temp_dir().join(format!("handover-test-{}", std::process::id()));
        let path = dir.join("handover.sock");
        let server = HandoverServer::bind(&path, false).await.unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let old = async {
            let stream = server.accept().await;
            let fd = listener.as_fd();
            Successor::greet(
                stream,
                Path::new("/sys/fs/bpf/ours"),
                &[(ListenerRole::Admin, fd)],
            )
            .await
        };
        let new = Predecessor::find(&path, Path::new("/sys/fs/bpf/theirs"), false);
        let (old, new) = tokio::join!(old, new);
        assert!(
            matches!(old, Err(HandoverError::Refused(_))),
            "{:?}",
            old.err()
        );
        let error = new.err().expect("refused");
        assert!(error.to_string().contains("/sys/fs/bpf/theirs"), "{error}");
        server.remove();
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&dir);
    }

    #[tokio::test]
    async fn no_running_agent_is_no_predecessor() {
        let path = std::env::temp_dir().join(format!("no-agent-{}.sock", std::process::id()));
        let found = Predecessor::find(&path, Path::new("/sys/fs/bpf/x"), false)
            .await
            .unwrap();
        assert!(found.is_none());
    }
}
