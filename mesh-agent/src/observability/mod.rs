//! What the agent tells about the traffic it carries: the access record of
//! each connection, the table of open ones, the Prometheus metrics built
//! from them, the spans sent to a tracing collector, and the rate limit on
//! log lines a remote party can cause.
//!
//! Nothing here decides anything about a connection; the proxy and the
//! HBONE server report into it, and the admin endpoints read from it.

pub mod access;
pub mod live;
pub mod log_budget;
pub mod metrics;
pub mod spans;
