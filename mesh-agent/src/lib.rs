//! mesh-agent: one per node. Loads the kernel programs that steer meshed
//! pods' connections to it, proxies them to their endpoints, and cleans up
//! after itself. `main.rs` is the CLI; [`app`] wires the pieces together.

pub mod access;
pub mod admin;
pub mod app;
pub mod authz;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod hbone;
pub mod health;
pub mod identity;
pub mod kubernetes;
pub mod lb;
pub mod live;
mod locks;
pub mod log_budget;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod routing;
mod sockopt;
mod telemetry;
pub mod tls;
pub mod watch;
