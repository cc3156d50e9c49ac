//! Load runs on the simulated nodes of [`mesh_tests`]: `mesh-bench` (the
//! benchmark, `cargo xtask bench`) and `mesh-soak` (held and new
//! connections under faults, `cargo xtask soak`). Each is one binary in
//! `src/bin`; they share nothing but the fixtures.
