//! What `deploy/mesh-agent.yaml` says about how the agent runs, for the
//! tests that run it the same way (capabilities, seccomp).

use std::path::Path;

/// The capabilities `deploy/mesh-agent.yaml` gives the agent, as setpriv
/// names them, less those this test process does not have itself (this
/// sandbox lacks SYS_RESOURCE; the agent then keeps its rlimits).
pub fn daemonset_capabilities() -> Vec<String> {
    const NUMBERS: &[(&str, u32)] = &[
        ("NET_ADMIN", 12),
        ("SYS_RESOURCE", 24),
        ("SYS_ADMIN", 21),
        ("PERFMON", 38),
        ("BPF", 39),
    ];
    let daemonset = daemonset();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .filter(|name| {
            let number = NUMBERS.iter().find(|(n, _)| n == name).map(|(_, b)| *b);
            let held = number.is_some_and(|b| bounding >> b & 1 == 1);
            if !held {
                println!("capability {name}: not held by this test; the agent runs without it");
            }
            held
        })
        .map(|name| name.to_lowercase())
        .collect()
}

/// The DaemonSet of deploy/mesh-agent.yaml.
pub fn daemonset() -> serde_yaml::Value {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh-agent.yaml"),
    )
    .unwrap();
    serde_yaml::Deserializer::from_str(&manifest)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .find(|d: &serde_yaml::Value| d["kind"].as_str() == Some("DaemonSet"))
        .unwrap()
}

/// Whether the manifest runs the agent under the runtime's default seccomp
/// profile with no privilege escalation (the test then does the same).
pub fn daemonset_uses_runtime_default_seccomp() -> bool {
    let daemonset = daemonset();
    let context = &daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(
        context["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "the agent never needs to gain privileges"
    );
    context["seccompProfile"]["type"].as_str() == Some("RuntimeDefault")
}
