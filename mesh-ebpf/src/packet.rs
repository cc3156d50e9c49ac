//! Just enough Ethernet/IPv4/TCP parsing for the tc programs.

use aya_ebpf::programs::TcContext;

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// The host-order port from a context's `remote_port` field (sock_ops,
/// sk_skb), which holds the network-order port in the high or the low half
/// depending on the kernel.
#[inline(always)]
pub fn remote_port_from_field(raw: u32) -> u16 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

/// An IPv4 TCP segment's addressing. Addresses are raw (network order),
/// ports host order.
pub struct TcpV4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

impl TcpV4 {
    /// A SYN that opens a connection (not the SYN-ACK answering one).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// Parses the packet as Ethernet + IPv4 + TCP; `None` for anything else.
#[inline(always)]
pub fn parse_tcp_v4(ctx: &TcContext) -> Option<TcpV4> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let version_ihl: u8 = ctx.load(ETH_HDR_LEN).ok()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let protocol: u8 = ctx.load(ETH_HDR_LEN + 9).ok()?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    // Fragments other than the first carry no TCP header.
    let frag: u16 = u16::from_be(ctx.load(ETH_HDR_LEN + 6).ok()?);
    if frag & 0x1fff != 0 {
        return None;
    }
    let saddr: u32 = ctx.load(ETH_HDR_LEN + 12).ok()?;
    let daddr: u32 = ctx.load(ETH_HDR_LEN + 16).ok()?;
    let l4 = ETH_HDR_LEN + ((version_ihl & 0x0f) as usize) * 4;
    let sport = u16::from_be(ctx.load(l4).ok()?);
    let dport = u16::from_be(ctx.load(l4 + 2).ok()?);
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    Some(TcpV4 {
        saddr,
        daddr,
        sport,
        dport,
        flags,
    })
}
