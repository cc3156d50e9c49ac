//! Connecting to a workload, from the node's address or from the client's.
//!
//! From the client's address the workload sees who called it (its logs,
//! its own IP allow-lists), and TIME_WAIT spreads over client addresses
//! instead of piling up on the node's. The agent may only do that when the
//! workload's replies are sure to come back to it: [`crate::routes::Routes`]
//! decides, this module only opens the socket.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use crate::sockopt;

/// Connects to `target` within `timeout`, from `source` (any port) when
/// given, else from the node's address. The stream has TCP_NODELAY set.
pub async fn connect(
    target: SocketAddrV4,
    source: Option<Ipv4Addr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(source) = source {
        // A foreign address needs IP_TRANSPARENT. Without
        // IP_BIND_ADDRESS_NO_PORT, bind() would pick a port that must be free
        // for every destination; with it, connect() picks one free for this
        // 4-tuple only, as for an unbound socket.
        socket2::SockRef::from(&socket).set_ip_transparent_v4(true)?;
        sockopt::set_int(&socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        socket.bind(SocketAddrV4::new(source, 0).into())?;
    }
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(target.into())).await {
        Ok(connected) => connected,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}
