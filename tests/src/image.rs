//! OCI image archives made from this build's binaries, for the real
//! container runtime of [`crate::kubelet`] to import: no registry is
//! reachable, so every image a test's pods run is built here. One
//! uncompressed layer holds each binary at `/<name>` and the shared
//! libraries it loads at their host paths (what `ldd` lists), so the
//! image runs exactly the binary the tests built.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Writes an OCI image layout archive named `name` (for example
/// `localhost/mesh-agent:v1`) under `dir`, whose entrypoint is
/// `entrypoint` and whose one layer holds `binaries`. Returns its path.
pub fn build(dir: &Path, name: &str, entrypoint: &str, binaries: &[PathBuf]) -> PathBuf {
    let label: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let rootfs = dir.join(format!("{label}-rootfs"));
    let layout = dir.join(format!("{label}-layout"));
    for binary in binaries {
        let file_name = binary.file_name().expect("a binary's name");
        copy_into(&rootfs, binary, &PathBuf::from("/").join(file_name));
        for library in shared_libraries(binary) {
            copy_into(&rootfs, &library, &library);
        }
    }
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let layer = layout.join("layer.tar");
    crate::run(
        "tar",
        &[
            "-C",
            &rootfs.display().to_string(),
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
            &layer.display().to_string(),
            ".",
        ],
    );
    let layer = blob(&blobs, &fs::read(&layer).unwrap());
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": [entrypoint]},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    });
    let config = blob(&blobs, config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config["digest"],
            "size": config["size"],
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer["digest"],
            "size": layer["size"],
        }],
    });
    let manifest = blob(&blobs, manifest.to_string().as_bytes());
    let tag = name.rsplit(':').next().expect("a tag");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest["digest"],
            "size": manifest["size"],
            "platform": {"architecture": "amd64", "os": "linux"},
            // containerd names the image after the first; the second is
            // the OCI layout's own reference.
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        json!({"imageLayoutVersion": "1.0.0"}).to_string(),
    )
    .unwrap();
    fs::remove_file(layout.join("layer.tar")).unwrap();
    let archive = dir.join(format!("{label}.tar"));
    crate::run(
        "tar",
        &[
            "-C",
            &layout.display().to_string(),
            "-cf",
            &archive.display().to_string(),
            ".",
        ],
    );
    fs::remove_dir_all(&rootfs).unwrap();
    fs::remove_dir_all(&layout).unwrap();
    archive
}

/// Stores `content` as a blob named by its digest: its descriptor's
/// `digest` and `size`.
fn blob(blobs: &Path, content: &[u8]) -> Value {
    let hex: String = Sha256::digest(content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fs::write(blobs.join(&hex), content).unwrap();
    json!({"digest": format!("sha256:{hex}"), "size": content.len()})
}

/// The shared libraries `binary` loads (and the loader), as `ldd` finds
/// them on this host.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let listed = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .expect("running ldd");
    // A static binary: "not a dynamic executable", exit status 1.
    String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Copies `from` to `at` (an absolute path) inside `rootfs`.
fn copy_into(rootfs: &Path, from: &Path, at: &Path) {
    let to = rootfs.join(at.strip_prefix("/").expect("an absolute path"));
    fs::create_dir_all(to.parent().expect("a parent")).unwrap();
    fs::copy(from, &to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}
