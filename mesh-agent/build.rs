//! Two jobs. It embeds the kernel object built by `cargo xtask build-ebpf`,
//! so a node needs only the `mesh-agent` binary; and it generates the gRPC
//! stubs of Istio's certificate service from a description in Rust
//! (tonic's manual builder), so no `.proto` compiler is needed either (the
//! messages are in `src/istio_ca.rs`).
//!
//! Before that object exists (a fresh clone, rust-analyzer, `cargo check`,
//! `cargo clippy`, plain `cargo test`) an empty placeholder is embedded
//! instead, so everything that does not load programs still builds; the
//! agent then refuses to start with an error saying how to build the
//! object (`dataplane::DataplaneError::NoKernelObject`).

use std::{env, fs, path::PathBuf};

fn main() {
    embed_kernel_object();
    generate_ca_stubs();
}

fn generate_ca_stubs() {
    let create_certificate = tonic_build::manual::Method::builder()
        .name("create_certificate")
        .route_name("CreateCertificate")
        .input_type("crate::istio_ca::IstioCertificateRequest")
        .output_type("crate::istio_ca::IstioCertificateResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("IstioCertificateService")
        .package("istio.v1.auth")
        .method(create_certificate)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}

fn embed_kernel_object() {
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
