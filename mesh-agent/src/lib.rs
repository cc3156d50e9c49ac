//! mesh-agent: one per node. Loads the kernel programs that steer meshed
//! pods' connections to it, proxies them to their endpoints, and cleans up
//! after itself. `main.rs` is the CLI; [`app`] wires the pieces together.

pub mod admin;
pub mod app;
pub mod authz;
pub mod ca_service;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod handover;
pub mod hbone;
pub mod identity;
pub mod io;
pub mod istio_ca;
pub mod lb;
mod locks;
pub mod model;
pub mod observability;
pub mod proxy;
pub mod routes;
mod sockopt;
pub mod source;
pub mod tls;
