//! The upgrade as an operator runs it (issue 18): `deploy/mesh-agent.yaml`
//! installed on a real cluster (kube-apiserver, kube-controller-manager,
//! kube-scheduler, and a node with kubelet, containerd and runc, all
//! built from their Go modules), then the README's one `kubectl set
//! image`, three times, while meshed pods on that node talk through the
//! agent. The DaemonSet controller, the scheduler and kubelet decide when
//! each agent starts, becomes ready and is told to stop; nothing of that
//! is simulated. Needs root.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    StopOnDrop,
    cluster::Cluster,
    eventually, image,
    kubelet::{RealNode, is_ready},
    load::{check_transfer, churn, pinned_link_ids},
    manifest, mesh_agent_bin, mesh_pod_bin,
    pod::{Connect, run_client},
    tool,
    topology::Node,
};
use serde::Deserialize;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
/// The long transfer, paced by its server at [`DRIP_MIB_PER_S`]: it
/// outlasts the three rollouts, so each agent hands it on to the next.
const LONG: u64 = 640 * MIB;
const DRIP_MIB_PER_S: u64 = 24;
const AGENT_IMAGE: &str = "localhost/mesh-agent";
const POD_IMAGE: &str = "localhost/mesh-pod:tests";

/// The manifests as shipped, with what this cluster differs in: the
/// agent image is the one built here, the API server is reached on the
/// node's loopback (no kube-proxy serves the `kubernetes` Service), pins
/// and the handover socket are this test's, kubelet's cgroups are under
/// this node's root, capabilities this machine lacks are not asked for,
/// and identities come from an embedded CA on the host
/// (this cluster runs no CA service, so its root and token volumes go).
fn manifests(cluster: &Cluster, node: &Node, real: &RealNode) -> Vec<Value> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh-agent.yaml"),
    )
    .unwrap();
    let port = cluster.url.rsplit(':').next().expect("a port").to_owned();
    let run_dir = cluster.dir().join("run-mesh-agent");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .map(|doc| serde_json::to_value(doc).unwrap())
        .map(|mut doc| {
            match doc["kind"].as_str() {
                Some("ConfigMap") => {
                    let config = doc["data"]["config.yaml"].as_str().unwrap();
                    let mut config: serde_yaml::Value = serde_yaml::from_str(config).unwrap();
                    config["identity"] =
                        serde_yaml::from_str("{ ca_dir: /etc/mesh-agent/ca }").unwrap();
                    config["kubernetes"]["cgroup_root"] =
                        real.cgroup_v2_root().display().to_string().into();
                    doc["data"]["config.yaml"] = serde_yaml::to_string(&config).unwrap().into();
                }
                Some("DaemonSet") => {
                    let spec = &mut doc["spec"]["template"]["spec"];
                    let container = &mut spec["containers"][0];
                    container["image"] = format!("{AGENT_IMAGE}:v1").into();
                    // Capabilities this machine cannot grant (runc refuses to
                    // start a container asking for one outside its own
                    // bounding set): the agent runs without them, as the
                    // other tests run it.
                    let held: Vec<Value> = manifest::daemonset_capabilities()
                        .iter()
                        .map(|c| c.to_uppercase().into())
                        .collect();
                    container["securityContext"]["capabilities"]["add"] = held.into();
                    let args = container["args"].as_array_mut().unwrap();
                    args.extend([
                        "--pin-root".into(),
                        node.pin_root.display().to_string().into(),
                    ]);
                    let env = container["env"].as_array_mut().unwrap();
                    env.push(json!({"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}));
                    env.push(json!({"name": "KUBERNETES_SERVICE_PORT", "value": port}));
                    let mounts = container["volumeMounts"].as_array_mut().unwrap();
                    mounts.retain(|m| m["name"] != "roots" && m["name"] != "ca-token");
                    mounts.push(json!({"name": "ca", "mountPath": "/etc/mesh-agent/ca"}));
                    let volumes = spec["volumes"].as_array_mut().unwrap();
                    volumes.retain(|v| v["name"] != "roots" && v["name"] != "ca-token");
                    for volume in volumes.iter_mut().filter(|v| v["name"] == "run") {
                        volume["hostPath"]["path"] = run_dir.display().to_string().into();
                    }
                    volumes.push(json!({"name": "ca", "hostPath": {
                        "path": node.ca_dir.display().to_string(), "type": "DirectoryOrCreate"}}));
                }
                _ => {}
            }
            doc
        })
        .collect()
}

/// The README's upgrade command, run as written (the image is this
/// cluster's).
fn kubectl_set_image(cluster: &Cluster, node: &Node, image: &str) {
    let mut command = Command::new(tool("kubectl"));
    command
        .arg("--kubeconfig")
        .arg(cluster.dir().join("admin.kubeconfig"))
        .args(["-n", "mesh-system", "set", "image", "daemonset/mesh-agent"])
        .arg(format!("mesh-agent={image}"));
    mesh_tests::process::enter(&mut command, &node.netns.path(), None);
    let output = command.output().expect("running kubectl");
    assert!(
        output.status.success(),
        "kubectl set image: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The agent pods, by name: (image, ready, terminating).
fn agent_pods(cluster: &Cluster) -> BTreeMap<String, (String, bool, bool)> {
    let pods = cluster
        .request(
            http::Method::GET,
            "/api/v1/namespaces/mesh-system/pods?labelSelector=app.kubernetes.io%2Fname%3Dmesh-agent",
            None,
        )
        .expect("listing agent pods");
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|pod| {
            (
                pod["metadata"]["name"].as_str().unwrap().to_owned(),
                (
                    pod["spec"]["containers"][0]["image"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    is_ready(pod),
                    !pod["metadata"]["deletionTimestamp"].is_null(),
                ),
            )
        })
        .collect()
}

/// Waits until the DaemonSet has rolled out `image`: its pod is ready and
/// every other agent pod is told to stop. Returns how long that took and
/// the new pod's name.
fn wait_rolled_out(cluster: &Cluster, real: &RealNode, image: &str) -> (Duration, String) {
    let began = Instant::now();
    loop {
        let pods = agent_pods(cluster);
        let current: Vec<&String> = pods
            .iter()
            .filter(|(_, (i, ready, terminating))| i == image && *ready && !terminating)
            .map(|(name, _)| name)
            .collect();
        let others_stopping = pods
            .iter()
            .filter(|(_, (i, _, _))| i != image)
            .all(|(_, (_, _, terminating))| *terminating);
        if let [new] = current[..]
            && others_stopping
        {
            return (began.elapsed(), new.clone());
        }
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "{image} not rolled out in 120 s: {pods:?}\n--- kubelet:\n{}",
            real.log("kubelet.log")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A meshed pod running `mesh-pod serve` (`extra` its options) behind a
/// Service of the same name; returns the Service's address.
fn serve(cluster: &Cluster, name: &str, extra: &[&str]) -> SocketAddr {
    let mut args = vec!["serve", "--port", "8080", "--name", name];
    args.extend(extra);
    cluster.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": {"containers": [{"name": "main", "image": POD_IMAGE,
            "imagePullPolicy": "Never", "args": args}]},
    }));
    let service = cluster.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
    }));
    let ip = service["spec"]["clusterIP"].as_str().expect("a cluster IP");
    SocketAddr::new(ip.parse().unwrap(), 80)
}

fn pod_uid(cluster: &Cluster, name: &str) -> String {
    let pod = cluster
        .request(
            http::Method::GET,
            &format!("/api/v1/namespaces/shop/pods/{name}"),
            None,
        )
        .expect("reading a pod");
    pod["metadata"]["uid"].as_str().unwrap().to_owned()
}

/// What each agent said about starting, handing over and stopping (its
/// warnings and errors too), for a failure's message.
fn lifecycle(logs: &BTreeMap<String, String>) -> String {
    let mut said = String::new();
    for (pod, log) in logs {
        said.push_str(&format!("--- {pod}:\n"));
        for line in log.lines().filter(|l| {
            !l.contains("\"DEBUG\"")
                && [
                    "handover",
                    "taking",
                    "ready",
                    "drain",
                    "WARN",
                    "ERROR",
                    "signal",
                    "Adopted",
                    "Fresh",
                    "new agent",
                ]
                .iter()
                .any(|word| l.contains(word))
        }) {
            said.push_str(line);
            said.push('\n');
        }
    }
    said
}

/// Runs `mesh-agent cleanup` on a pin root (in its node's namespace)
/// that is still there when dropped.
struct RemovePins(std::path::PathBuf, std::path::PathBuf);

impl Drop for RemovePins {
    fn drop(&mut self) {
        if self.0.exists() {
            mesh_tests::agent::cleanup(&self.1, &self.0);
        }
    }
}

/// Three `kubectl set image` rollouts of the agent while a long transfer,
/// and new connections (half of them to a server that closes first) run
/// through it between real pods: nothing fails, nothing takes over a
/// second, every byte arrives, the kernel's links stay the same objects,
/// and every old agent finishes its connections and exits on its own.
#[test]
fn kubectl_rollouts_replace_the_agent_without_loss() {
    let mut node = Node::new("rollout", 1);
    // A failed check leaves agents SIGKILLed with the node: their pins go
    // too (dropped after the node's kubelet and containers).
    let _pins = RemovePins(node.pin_root.clone(), node.netns.path());
    // The manifest's uplink (one node: nothing at its other end).
    node.netns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0-peer",
    ]);
    node.netns.ip(&["link", "set", "eth0", "up"]);
    node.uplinks.push("eth0".into());
    let mut cluster = Cluster::start(&node.netns, "rollout");
    cluster.start_controllers();
    let real = RealNode::start(&cluster, &node.netns, &node.name, node.ip);
    let agent = image::build(
        cluster.dir(),
        &format!("{AGENT_IMAGE}:v1"),
        "/mesh-agent",
        &[mesh_agent_bin()],
    );
    real.import(&agent);
    for version in 2..=4 {
        real.tag(
            &format!("{AGENT_IMAGE}:v1"),
            &format!("{AGENT_IMAGE}:v{version}"),
        );
    }
    real.import(&image::build(
        cluster.dir(),
        POD_IMAGE,
        "/mesh-pod",
        &[mesh_pod_bin()],
    ));

    for doc in manifests(&cluster, &node, &real) {
        cluster.apply(&doc);
    }
    let (took, first_agent) = wait_rolled_out(&cluster, &real, &format!("{AGENT_IMAGE}:v1"));
    eprintln!("the first agent ({first_agent}) was ready after {took:?}");

    cluster.namespace("shop", true);
    let be = serve(&cluster, "be", &[]);
    let first = serve(&cluster, "first", &["--close-first"]);
    let drip = serve(
        &cluster,
        "drip",
        &["--read-rate-mib", &DRIP_MIB_PER_S.to_string()],
    );
    let _ = serve(&cluster, "client", &[]);
    for pod in ["be", "first", "drip", "client"] {
        eventually(&format!("pod {pod} ready"), || {
            cluster
                .request(
                    http::Method::GET,
                    &format!("/api/v1/namespaces/shop/pods/{pod}"),
                    None,
                )
                .is_ok_and(|pod| is_ready(&pod))
        });
    }
    let client = pod_uid(&cluster, "client");
    let connect = |addr: SocketAddr, options: Connect| {
        run_client(real.pod_command(&client, &mesh_pod_bin()), addr, options)
    };
    for (name, addr) in [("be", be), ("first", first), ("drip", drip)] {
        eventually(&format!("{name} through the agent"), || {
            connect(addr, Connect::default())
                .is_ok_and(|r| r[0]["error"].is_null() && !r[0]["greeting"].is_null())
        });
    }

    // Every pod's hooks attached: the agent looks again every 2 s for a
    // pod whose interface or cgroup was not there yet, so the set is
    // complete once it stays the same for longer than that.
    let mut links_before = pinned_link_ids(&node.pin_root);
    let settle = Instant::now();
    loop {
        thread::sleep(Duration::from_secs(3));
        let now = pinned_link_ids(&node.pin_root);
        if now == links_before {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(30),
            "links never settled: {now:?}"
        );
        links_before = now;
    }
    assert!(!links_before.is_empty(), "no pinned links (bpftool?)");

    // Old agents' logs vanish with their pods: keep the last seen.
    let logs: Mutex<BTreeMap<String, String>> = Mutex::default();
    // An agent container started again by kubelet: an agent exited under
    // its running pod (it would then take over from its own successor).
    let restarts: Mutex<BTreeMap<String, usize>> = Mutex::default();
    let stop = AtomicBool::new(false);
    let opened = AtomicU64::new(0);
    let began = Instant::now();
    let (long, problems, rolled) = thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let (stop, opened, logs, restarts, real, connect) =
            (&stop, &opened, &logs, &restarts, &real, &connect);
        scope.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (pod, text) in real.container_logs("mesh-system", "mesh-agent") {
                    if !text.is_empty() {
                        logs.lock().unwrap().insert(pod, text);
                    }
                }
                for (pod, count) in real.container_restarts("mesh-system", "mesh-agent") {
                    let mut restarts = restarts.lock().unwrap();
                    let seen = restarts.entry(pod).or_default();
                    *seen = (*seen).max(count);
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let long = scope.spawn(move || {
            connect(
                drip,
                Connect {
                    send: LONG,
                    ..Default::default()
                },
            )
        });
        let churners: Vec<_> = [(be, false), (first, true)]
            .into_iter()
            .map(|(addr, wait_close)| {
                scope.spawn(move || {
                    let options = Connect {
                        count: 50,
                        parallel: 2,
                        wait_close,
                        ..Default::default()
                    };
                    churn(|o| connect(addr, o), options, stop, opened)
                })
            })
            .collect();
        thread::sleep(Duration::from_secs(2));
        for version in 2..=4 {
            let image = format!("{AGENT_IMAGE}:v{version}");
            kubectl_set_image(&cluster, &node, &image);
            let (took, pod) = wait_rolled_out(&cluster, real, &image);
            eprintln!(
                "rollout to v{version}: {pod} ready, the old agent told to stop, after {took:?}"
            );
            thread::sleep(Duration::from_secs(1));
        }
        let rolled = began.elapsed();
        stop.store(true, Ordering::Relaxed);
        let problems: Vec<String> = churners
            .into_iter()
            .flat_map(|c| c.join().expect("churner"))
            .collect();
        (long.join().expect("long transfer"), problems, rolled)
    });
    let opened = opened.load(Ordering::Relaxed);
    eprintln!("{opened} connections opened across the rollouts");
    assert!(
        problems.is_empty(),
        "{} of {opened} connections failed or were slow: {:?}\n{}",
        problems.len(),
        &problems[..problems.len().min(5)],
        lifecycle(&logs.lock().unwrap())
    );
    assert!(opened >= 100, "only {opened} connections opened");
    let restarts = restarts.into_inner().unwrap();
    assert!(
        restarts.values().all(|&count| count == 0),
        "agent containers started again: {restarts:?}\n{}",
        lifecycle(&logs.lock().unwrap())
    );
    let long = long.expect("long transfer");
    let report = &long[0];
    let took = check_transfer(report, LONG);
    eprintln!(
        "{} MiB took {took} ms; the rollouts were done after {rolled:?}",
        LONG / MIB
    );
    assert!(
        u128::from(took) > rolled.as_millis(),
        "the transfer ended before the third rollout: {report}"
    );
    // Swapped programs, never a detach.
    assert_eq!(
        pinned_link_ids(&node.pin_root),
        links_before,
        "{}",
        lifecycle(&logs.lock().unwrap())
    );
    // Each old agent finishes what it carries and exits on its own; kubelet
    // then removes its pod. Only the newest remains.
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent_pods(&cluster).len() > 1 {
        assert!(
            Instant::now() < deadline,
            "old agents still there: {:?}",
            agent_pods(&cluster)
        );
        for (pod, text) in real.container_logs("mesh-system", "mesh-agent") {
            if !text.is_empty() {
                logs.lock().unwrap().insert(pod, text);
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    let newest = agent_pods(&cluster).into_keys().next().unwrap();
    let logs = logs.into_inner().unwrap();
    assert_eq!(logs.len(), 4, "four agents' logs: {:?}", logs.keys());
    for (pod, log) in &logs {
        if *pod == newest {
            assert!(
                log.contains("Adopted"),
                "the newest agent did not adopt:\n{log}"
            );
        } else {
            assert!(log.contains("handover drain finished"), "{pod}:\n{log}");
        }
    }
    // Uninstall as the README says: the last agent removes its kernel state.
    cluster
        .request(
            http::Method::DELETE,
            "/apis/apps/v1/namespaces/mesh-system/daemonsets/mesh-agent",
            None,
        )
        .expect("deleting the DaemonSet");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !agent_pods(&cluster).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the agent did not stop: {:?}",
            agent_pods(&cluster)
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !node.pin_root.exists(),
        "pins left at {}",
        node.pin_root.display()
    );
}
