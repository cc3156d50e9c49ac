//! Sockets and bytes, shared by the outbound proxy and the HBONE server:
//! the transparent listener, connecting upstream (from the client's address
//! when that is safe) and splicing two connections (in the kernel when the
//! fast path is on, else in user space).

mod connect;
pub mod splice;

use std::net::SocketAddr;

use tokio::net::TcpListener;

pub use self::connect::connect;

/// A listener that accepts connections addressed to any IP: the kernel hands
/// it captured flows whose destination is not a local address, and the
/// accepted socket's local address is the original destination.
pub fn transparent_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // Without IP_TRANSPARENT the kernel sends no SYN-ACK from a foreign address.
    socket.set_ip_transparent_v4(true)?;
    // Accepted sockets inherit it. A proxy forwards writes as they come:
    // with Nagle, a short write behind another waits for the peer's
    // delayed ACK (40 ms); HTTP/2 writes many small frames.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}
