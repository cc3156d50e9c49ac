//! The agent never proxies to itself. Its listeners are bound to every
//! address (the transparent ones must be), so a pod can connect to
//! `node-ip:15001` directly, and a Service can list the node's address and
//! an agent port as an endpoint. Either would make the agent dial its own
//! listener, which accepts the dial as a new captured connection and dials
//! again, without end. So a connection that arrives on an agent port of a
//! local address was not steered by the kernel and is refused, and no
//! connection is ever opened to an agent port on a local address.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

/// The ports the agent listens on (proxy, HBONE, admin, metrics, readiness).
#[derive(Clone, Debug, Default)]
pub struct OwnListeners {
    ports: Vec<u16>,
}

impl OwnListeners {
    pub fn new(ports: impl IntoIterator<Item = u16>) -> Self {
        let mut ports: Vec<u16> = ports.into_iter().collect();
        ports.sort_unstable();
        ports.dedup();
        Self { ports }
    }

    /// Whether a connection to `addr` would reach one of the agent's own
    /// listeners: an agent port on an address of this node. The address
    /// is only checked (a system call) when the port is one of ours.
    pub fn reaches_agent(&self, addr: SocketAddrV4) -> bool {
        self.ports.binary_search(&addr.port()).is_ok() && is_local(*addr.ip())
    }
}

/// Whether `ip` is an address of this network namespace (or one that means
/// "this host": unspecified, loopback). Binding succeeds only for those:
/// the kernel's own answer, kept current with every address change, where
/// a cached list of interface addresses would go stale.
pub fn is_local(ip: Ipv4Addr) -> bool {
    ip.is_unspecified() || ip.is_loopback() || UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ports_on_local_addresses_are_the_agent() {
        let own = OwnListeners::new([15001, 15008, 15000, 15020, 15021]);
        for addr in ["127.0.0.1:15001", "0.0.0.0:15008", "127.0.0.2:15020"] {
            assert!(own.reaches_agent(addr.parse().unwrap()), "{addr}");
        }
        // Another port here, or an agent port elsewhere, is someone else.
        assert!(!own.reaches_agent("127.0.0.1:8080".parse().unwrap()));
        assert!(!own.reaches_agent("192.0.2.1:15001".parse().unwrap()));
    }

    #[test]
    fn only_this_hosts_addresses_are_local() {
        assert!(is_local(Ipv4Addr::LOCALHOST));
        assert!(is_local(Ipv4Addr::UNSPECIFIED));
        // TEST-NET-1 is on no interface.
        assert!(!is_local(Ipv4Addr::new(192, 0, 2, 1)));
    }
}
