//! Just enough Ethernet/IPv4/TCP parsing for the tc programs.

use aya_ebpf::programs::TcContext;

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IPPROTO_TCP: u8 = 6;
const IPV4_MIN_HDR_LEN: usize = 20;
const TCP_MIN_HDR_LEN: usize = 20;

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
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

    #[inline(always)]
    pub fn is_rst(&self) -> bool {
        self.flags & TCP_FLAG_RST != 0
    }
}

/// What a frame is, as far as the mesh cares.
pub enum Frame {
    /// An IPv4 TCP segment with its whole TCP header in this packet.
    Tcp(TcpV4),
    /// IPv4 TCP whose TCP header is not (wholly) here: a later fragment,
    /// or a first fragment cut short. Only the receiver's reassembly
    /// would show what it is. `daddr` is raw.
    HiddenTcp { daddr: u32 },
    /// IPv4 other than TCP (UDP, ICMP), or ARP: not the mesh's business.
    Ipv4OtherOrArp,
    /// Anything else (IPv6 above all), or a header too short to read.
    Other,
}

/// Classifies the frame (Ethernet first).
#[inline(always)]
pub fn classify(ctx: &TcContext) -> Frame {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return Frame::Other;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => classify_ipv4(ctx),
        ETH_P_ARP => Frame::Ipv4OtherOrArp,
        _ => Frame::Other,
    }
}

#[inline(always)]
fn classify_ipv4(ctx: &TcContext) -> Frame {
    let (Ok(version_ihl), Ok(protocol), Ok(frag), Ok(saddr), Ok(daddr)) = (
        ctx.load::<u8>(ETH_HDR_LEN),
        ctx.load::<u8>(ETH_HDR_LEN + 9),
        ctx.load::<u16>(ETH_HDR_LEN + 6),
        ctx.load::<u32>(ETH_HDR_LEN + 12),
        ctx.load::<u32>(ETH_HDR_LEN + 16),
    ) else {
        return Frame::Other;
    };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN {
        return Frame::Other;
    }
    if protocol != IPPROTO_TCP {
        return Frame::Ipv4OtherOrArp;
    }
    // A later fragment carries no TCP header; a first one must carry all
    // of it (ports and flags are what the programs decide on).
    let l4 = ETH_HDR_LEN + header_len;
    if u16::from_be(frag) & 0x1fff != 0 || ctx.len() < (l4 + TCP_MIN_HDR_LEN) as u32 {
        return Frame::HiddenTcp { daddr };
    }
    let (Ok(sport), Ok(dport), Ok(flags)) = (
        ctx.load::<u16>(l4),
        ctx.load::<u16>(l4 + 2),
        ctx.load::<u8>(l4 + 13),
    ) else {
        return Frame::HiddenTcp { daddr };
    };
    Frame::Tcp(TcpV4 {
        saddr,
        daddr,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        flags,
    })
}

/// The frame as an IPv4 TCP segment; `None` for anything else.
#[inline(always)]
pub fn parse_tcp_v4(ctx: &TcContext) -> Option<TcpV4> {
    match classify(ctx) {
        Frame::Tcp(tcp) => Some(tcp),
        _ => None,
    }
}
