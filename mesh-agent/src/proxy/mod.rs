//! The outbound proxy: accepts the connections the kernel captured,
//! decides where each goes (a local endpoint directly, a remote one over
//! HBONE), connects there and splices the two.

mod faults;
mod outbound;
mod upstream;

pub use self::outbound::{Outbound, OutboundSettings, OutboundStats, conclude};
