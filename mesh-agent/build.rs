//! Embeds the kernel object built by `cargo xtask build-ebpf`, so a node needs
//! only the `mesh-agent` binary.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = env::var_os("MESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../target/bpf/mesh-ebpf.o")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "kernel object {} is missing: run `cargo xtask build-ebpf` first \
             (or set MESH_EBPF_OBJECT)",
            object.display()
        );
    }
    let object = object.canonicalize().expect("object path resolves");
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
}
