//! The manifests in `deploy/`: valid against the Kubernetes schema (strict),
//! RBAC no wider than the watches, and a ConfigMap the agent accepts.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use mesh_tests::{mesh_agent_bin, unique_name};
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// `kubernetes-validate --strict` (installed by `cargo xtask test`; run as
/// a module so a fresh console-script shim is not needed).
fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; cargo xtask test does)")
}

#[test]
fn manifests_validate_against_the_kubernetes_schema_strictly() {
    let files = [
        deploy_dir().join("mesh-agent.yaml"),
        deploy_dir().join("cleanup.yaml"),
        deploy_dir().join("mesh-ca.yaml"),
    ];
    let output = validate(&files);
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    assert!(report.contains("daemonset/mesh-agent "), "{report}");
    assert!(report.contains("deployment/mesh-ca "), "{report}");

    // The validator is strict: a misspelt field fails.
    let broken = std::env::temp_dir().join(format!("{}.yaml", unique_name("broken")));
    let text = std::fs::read_to_string(&files[0]).unwrap().replace(
        "terminationGracePeriodSeconds",
        "terminationGracePeriodSecs",
    );
    std::fs::write(&broken, text).unwrap();
    let output = validate(std::slice::from_ref(&broken));
    std::fs::remove_file(&broken).unwrap();
    assert!(!output.status.success(), "a misspelt field passed");
}

#[test]
fn cluster_role_grants_exactly_what_the_watches_read() {
    let docs = documents("mesh-agent.yaml");
    let role = find(&docs, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let verbs: BTreeSet<&str> = rule["verbs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule:?}");
        for group in rule["apiGroups"].as_sequence().unwrap() {
            for resource in rule["resources"].as_sequence().unwrap() {
                granted.insert((
                    group.as_str().unwrap().to_owned(),
                    resource.as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    let watched: BTreeSet<(String, String)> = mesh_agent::source::kubernetes::WATCHED
        .iter()
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    assert_eq!(granted, watched);
}

#[test]
fn daemonset_is_wired_to_what_the_agent_reads() {
    let docs = documents("mesh-agent.yaml");
    let daemonset = find(&docs, "DaemonSet");
    let spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
    let container = &spec["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"].as_bool(), Some(false));
    assert_eq!(
        container["readinessProbe"]["httpGet"]["port"].as_u64(),
        Some(15021)
    );
    // Upgrades overlap old and new agent on a node (the handover), which
    // the scheduler allows only when the pod claims no host port: with
    // hostNetwork, every container port is one.
    let rolling = &daemonset["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"].as_u64(), Some(1), "{rolling:?}");
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0), "{rolling:?}");
    assert!(container["ports"].is_null(), "{:?}", container["ports"]);
    let env_node = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("NODE_NAME"))
        .expect("NODE_NAME");
    assert_eq!(
        env_node["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    let mounts: BTreeSet<&str> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/etc/mesh-agent/config",
        "/etc/mesh-agent/roots",
        "/var/run/secrets/mesh-ca",
        "/run/mesh-agent",
    ] {
        assert!(mounts.contains(path), "{path} not mounted: {mounts:?}");
    }
    // No signing key on a node: no Secret at all, a token for the CA
    // service's audience.
    let volumes = spec["volumes"].as_sequence().unwrap();
    assert!(
        volumes.iter().all(|v| v["secret"].is_null()),
        "a Secret on every node: {volumes:?}"
    );
    let projected = volumes
        .iter()
        .find_map(|v| v["projected"]["sources"][0]["serviceAccountToken"].as_mapping())
        .expect("a projected token");
    assert_eq!(
        projected.get("audience").and_then(|a| a.as_str()),
        Some("istio-ca")
    );
    // The grace period outlasts the configured drain.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    let config: Value = serde_yaml::from_str(
        find(&docs, "ConfigMap")["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    // The CA service's root and token where the mounts put them.
    let istio = &config["identity"]["istio"];
    assert!(
        istio["roots"]
            .as_str()
            .is_some_and(|p| p.starts_with("/etc/mesh-agent/roots/")),
        "{istio:?}"
    );
    assert_eq!(
        istio["token"].as_str(),
        Some("/var/run/secrets/mesh-ca/token")
    );
    for drain in ["drain_timeout_ms", "handover_drain_timeout_ms"] {
        let drain_ms = config["proxy"][drain].as_u64().unwrap();
        assert!(
            grace * 1000 > drain_ms + 5000,
            "grace {grace} s, {drain} {drain_ms} ms"
        );
    }
}

#[test]
fn configmap_config_is_accepted_by_the_agent() {
    let docs = documents("mesh-agent.yaml");
    let text = find(&docs, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = std::env::temp_dir().join(format!("{}.yaml", unique_name("configmap")));
    std::fs::write(&path, &text).unwrap();
    let check = |env_node: Option<&str>| {
        let mut command = Command::new(mesh_agent_bin());
        command
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("NODE_NAME");
        if let Some(node) = env_node {
            command.env("NODE_NAME", node);
        }
        command.output().unwrap()
    };
    let accepted = check(Some("node-1"));
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    // Without the downward API's node name it is refused, by field.
    let refused = check(None);
    let _ = std::fs::remove_file(&path);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("node.name"), "{message}");
}
