//! Embeds the kernel object built by `cargo xtask build-ebpf`, so a node needs
//! only the `mesh-agent` binary.
//!
//! Before that object exists (a fresh clone, rust-analyzer, `cargo check`,
//! `cargo clippy`, plain `cargo test`) an empty placeholder is embedded
//! instead, so everything that does not load programs still builds; the
//! agent then refuses to start with an error saying how to build the
//! object (`dataplane::DataplaneError::NoKernelObject`).

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = env::var_os("MESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../target/bpf/mesh-ebpf.o")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let embedded = if object.exists() {
        object.canonicalize().expect("object path resolves")
    } else {
        println!(
            "cargo:warning=kernel object {} is missing: embedding an empty placeholder; \
             run `cargo xtask build-ebpf` (or set MESH_EBPF_OBJECT) for an agent that loads",
            object.display()
        );
        let placeholder =
            PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("placeholder.o");
        fs::write(&placeholder, b"").expect("placeholder object is written");
        placeholder
    };
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", embedded.display());
}
