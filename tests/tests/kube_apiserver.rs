//! The agent against a real kube-apiserver (with etcd), built from their
//! Go modules by `cargo xtask`: the manifest's RBAC applied for real, the
//! agent on its own ServiceAccount's token, objects written through the
//! API as the controllers and kubelet would. `tests/tests/kubernetes.rs`
//! keeps the JSON fixture for what a real server cannot be made to show
//! on demand (a stream cut mid-event, a compaction at a chosen moment).
//! Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_tests::{
    agent::{Agent, READY_PORT},
    apiserver::objects::{self, PodSpec, besteffort_cgroup},
    cluster::Cluster,
    eventually,
    kube_node::{run_pod, spawn_agent, start_agent},
    pod::{Connect, Pod, Server},
    scenario::answered_by,
    topology::Node,
};
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

/// Which servers answered ten new connections from `client` to the VIP.
fn answers(client: &Pod) -> Vec<String> {
    let reports = client.connect(
        SocketAddr::from((VIP, 80)),
        Connect {
            count: 10,
            ..Default::default()
        },
    );
    answered_by(&reports)
}

/// The manifest's ClusterRole lets the agent do its job and nothing more,
/// as the real authorizer decides it. The authorizer reads roles and
/// bindings from its informers, a moment behind the objects just applied:
/// what is allowed is waited for, and once it all is, the cache holds the
/// bindings for the refusals to mean something.
fn rbac_is_what_the_agent_needs(cluster: &Cluster) {
    for (verb, resource) in [
        ("list", "pods"),
        ("watch", "pods"),
        ("list", "services"),
        ("watch", "endpointslices"),
        ("list", "namespaces"),
        ("get", "nodes"),
    ] {
        eventually(&format!("the agent may {verb} {resource}"), || {
            cluster.can(AGENT, verb, resource, None)
        });
    }
    for (verb, resource, namespace) in [
        ("get", "secrets", None),
        ("list", "secrets", Some("mesh-system")),
        ("create", "pods", None),
        ("update", "services", Some("shop")),
        ("delete", "endpointslices", None),
        ("patch", "nodes", None),
        ("create", "configmaps", Some("mesh-system")),
    ] {
        assert!(
            !cluster.can(AGENT, verb, resource, namespace),
            "the agent may {verb} {resource} in {namespace:?}"
        );
    }
}

#[test]
fn the_agent_follows_a_real_api_server_with_the_manifests_permissions() {
    let mut node = Node::new("kreal", 1);
    let mut cluster = Cluster::start(&node.netns, "kreal");
    cluster.apply_rbac(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh-agent.yaml"));
    rbac_is_what_the_agent_needs(&cluster);
    cluster.namespace("shop", true);
    cluster.apply(&objects::node(&node.name, "zone-a"));
    let uids: Vec<String> = ["kc", "ka", "kb"]
        .into_iter()
        .map(|name| run_pod(&cluster, &mut node, name, name))
        .collect();
    let _servers = [
        node.pod("ka").serve(8080, "ka", false),
        node.pod("kb").serve(8080, "kb", false),
    ];
    let kubeconfig = cluster.service_account_kubeconfig("mesh-system", "mesh-agent");
    let agent = start_agent(&node, &kubeconfig, "");
    // The filter and no_new_privs really are on the agent.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    for field in ["Seccomp:\t2", "NoNewPrivs:\t1"] {
        assert!(status.contains(field), "{field} not in {status}");
    }
    let vip = SocketAddr::from((VIP, 80));
    let client = node.pod("kc");
    let slice = |pods: &[&str]| {
        let endpoints: Vec<(Ipv4Addr, &str, &str)> = pods
            .iter()
            .map(|p| (node.pod(p).ip, node.name.as_str(), *p))
            .collect();
        objects::endpoint_slice("shop", "echo-1", "echo", 8080, &endpoints)
    };
    // A Service and its EndpointSlice, written as the controller would.
    cluster.apply(&objects::service("shop", "echo", VIP, 80, "http"));
    cluster.apply(&slice(&["ka"]));
    let took = eventually("traffic to ka", || {
        client
            .try_connect(vip, Connect::default())
            .is_ok_and(|r| answered_by(&r) == ["ka"])
    });
    eprintln!("service reachable {took:?} after it was written");
    // The model has each pod with the cgroup kubelet would give it.
    let kc = agent.workload("kc").expect("kc in the model");
    let expected_cgroup = node.cgroup.path().join(besteffort_cgroup(&uids[0]));
    assert_eq!(
        kc["local"]["cgroup"],
        expected_cgroup.display().to_string().as_str()
    );
    assert_eq!(kc["service_account"], "kc", "{kc}");
    assert_eq!(kc["local"]["interface"], node.pod("kc").host_if.as_str());

    // Endpoints change: traffic follows.
    cluster.apply(&slice(&["kb"]));
    eventually("traffic to kb", || answers(client) == vec!["kb"; 10]);

    // The API server stops: traffic flows on the last state, readiness
    // says why; it comes back (etcd kept everything) and the agent
    // resyncs, seeing what changed meanwhile once it is up again.
    let held = client.hold(vip);
    // Never a permission it lacked while the server ran settled.
    let settled_log = agent.log();
    assert!(
        !settled_log.contains("forbidden"),
        "the agent met an RBAC refusal:\n{settled_log}"
    );
    let relists = agent.metric("mesh_kubernetes_relists_total");
    cluster.stop_apiserver();
    eventually("readiness reports the outage", || {
        agent
            .http_get(READY_PORT, "/healthz/ready")
            .is_some_and(|(code, body)| code == 200 && body.contains("API server unreachable"))
    });
    assert_eq!(answers(client), vec!["kb"; 10]);
    cluster.restart_apiserver();
    eventually("reconnected", || {
        agent.metric("mesh_kubernetes_connected") == 1.0
    });
    // A restarted server's watch cache starts at etcd's current revision:
    // resuming from before it is refused (410), and the agent lists again.
    // (Just after the restart, before the server's RBAC caches fill, it
    // also refuses with 403 for a moment; the agent retries through that.)
    eventually("listed again", || {
        agent.metric("mesh_kubernetes_relists_total") > relists
    });
    cluster.apply(&slice(&["ka", "kb"]));
    eventually("traffic to both", || {
        let by = answers(client);
        by.contains(&"ka".to_owned()) && by.contains(&"kb".to_owned())
    });
    let report = held.release();
    assert!(report["error"].is_null(), "held connection broke: {report}");

    // A pod opts out by annotation, another is deleted: both leave the
    // model.
    let in_model = |name: &str| agent.workload(name).is_some();
    cluster
        .request(
            http::Method::PATCH,
            "/api/v1/namespaces/shop/pods/kb",
            Some((
                "application/merge-patch+json",
                json!({"metadata": {"annotations": {"mesh-agent.io/mesh": "disabled"}}}),
            )),
        )
        .expect("annotating kb");
    eventually("kb opted out", || !in_model("kb"));
    assert!(in_model("ka"));
    cluster.delete_pod("shop", "ka");
    eventually("ka gone", || !in_model("ka"));
    assert!(in_model("kc"));

    // The namespace opts out: its pods leave the mesh.
    cluster.apply(&objects::namespace("shop", false));
    eventually("pods detached", || {
        agent.stats()["kernel"]["pods"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
}

/// Two nodes in two zones on one real API server (the second reaches it
/// through a relay, as a node reaches a control plane it does not host):
/// a Service's annotations steer the balancing and follow edits, each
/// node's zone comes from its Node object, and a client reaches a pod on
/// the other node over HBONE with the identities of their
/// ServiceAccounts.
#[test]
fn two_nodes_follow_annotations_zones_and_service_accounts() {
    let mut n1 = Node::new("kzone", 1);
    let mut n2 = Node::new("kzone", 2);
    mesh_tests::topology::connect(&mut n1, &mut n2);
    n2.share_ca_with(&n1);
    let cluster = Cluster::start(&n1.netns, "kzone");
    cluster.reach_from(&n2.netns);
    cluster.apply_rbac(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh-agent.yaml"));
    cluster.namespace("shop", true);
    cluster.apply(&objects::node(&n1.name, "zone-a"));
    cluster.apply(&objects::node(&n2.name, "zone-b"));
    run_pod(&cluster, &mut n1, "kc", "frontend");
    run_pod(&cluster, &mut n1, "ka", "api");
    run_pod(&cluster, &mut n2, "ks", "api");
    let _servers = [
        n1.pod("ka").serve(8080, "ka", false),
        n2.pod("ks").serve(8080, "ks", false),
    ];
    let kubeconfig = cluster.service_account_kubeconfig("mesh-system", "mesh-agent");
    // Node 1's agent creates the shared CA; node 2's loads it.
    let agent1 = start_agent(&n1, &kubeconfig, "");
    let agent2 = start_agent(&n2, &kubeconfig, "");

    let mut service = objects::service("shop", "echo", VIP, 80, "http");
    service["metadata"]["annotations"] = json!({"mesh-agent.io/locality": "strict"});
    cluster.apply(&service);
    let mut slice = objects::endpoint_slice(
        "shop",
        "echo-1",
        "echo",
        8080,
        &[
            (n1.pod("ka").ip, n1.name.as_str(), "ka"),
            (n2.pod("ks").ip, n2.name.as_str(), "ks"),
        ],
    );
    slice["endpoints"][1]["zone"] = "zone-b".into();
    cluster.apply(&slice);
    let vip = SocketAddr::from((VIP, 80));
    let client = n1.pod("kc");
    // Strict locality: this node's endpoint only.
    eventually("traffic to ka", || {
        client
            .try_connect(vip, Connect::default())
            .is_ok_and(|r| answered_by(&r) == ["ka"])
    });
    assert_eq!(answers(client), vec!["ka"; 10]);
    // Each endpoint's zone against this node's, from the Node objects.
    let dump = agent1.config_dump();
    let echo = dump["services"]
        .as_array()
        .and_then(|services| services.iter().find(|s| s["name"] == "echo"))
        .unwrap_or_else(|| panic!("no echo in {dump}"));
    assert_eq!(echo["locality"], "strict", "{echo}");
    let zones: Vec<(&str, bool)> = echo["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["zone"].as_str().unwrap_or("?"), e["same_zone"] == true))
        .collect();
    assert_eq!(zones, [("zone-a", true), ("zone-b", false)], "{echo}");

    // The annotations are edited: no locality, round robin. Both
    // endpoints answer, the other node's over HBONE.
    service["metadata"]["annotations"] = json!({
        "mesh-agent.io/locality": "off",
        "mesh-agent.io/lb-policy": "round_robin",
        "mesh-agent.io/quota": "rate=1000,burst=1000,concurrent=100",
        "mesh-agent.io/faults": "delay=0:1",
    });
    cluster.apply(&service);
    eventually("the quota annotation applied", || {
        agent1.stats()["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["name"] == "echo"
                    && s["quota"]["concurrent"] == 100
                    && s["faults"]["delay"]["ms"] == 1
            })
    });
    eventually("traffic to both", || {
        let by = answers(client);
        by.contains(&"ka".to_owned()) && by.contains(&"ks".to_owned())
    });
    let streams = agent2.stats()["inbound"]["streams"].as_u64().unwrap_or(0);
    assert!(streams > 0, "nothing over HBONE to node 2");
    // The identities are the pods' ServiceAccounts: the client's agent
    // presents frontend's, the server's agent sees it.
    let frontend = "spiffe://cluster.local/ns/shop/sa/frontend";
    let certificates = agent1.stats()["certificates"].to_string();
    assert!(certificates.contains(frontend), "{certificates}");
    let server_log = agent2.log();
    assert!(
        server_log.contains(frontend),
        "the server's agent did not see the client's identity:\n{server_log}"
    );
    for agent in [&agent1, &agent2] {
        assert!(
            !agent.log().contains("forbidden"),
            "an agent met an RBAC refusal"
        );
    }
}

/// With the API server's watch cache off, a watch resumes straight from
/// etcd's history: a restart alone resumes every watch without a list,
/// while a compaction of that history (as the server's periodic one
/// would do) answers the resume with 410 Gone and the agent lists again.
#[test]
fn an_etcd_compaction_forces_a_list_and_a_restart_alone_does_not() {
    let mut node = Node::new("kcomp", 1);
    let mut cluster = Cluster::start_with(&node.netns, "kcomp", &["--watch-cache=false"]);
    cluster.apply_rbac(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh-agent.yaml"));
    cluster.namespace("shop", true);
    cluster.apply(&objects::node(&node.name, "zone-a"));
    for name in ["kc", "ka", "kb"] {
        run_pod(&cluster, &mut node, name, name);
    }
    let _servers = [
        node.pod("ka").serve(8080, "ka", false),
        node.pod("kb").serve(8080, "kb", false),
    ];
    let kubeconfig = cluster.service_account_kubeconfig("mesh-system", "mesh-agent");
    let agent = start_agent(&node, &kubeconfig, "");
    let vip = SocketAddr::from((VIP, 80));
    let client = node.pod("kc");
    let slice = |pod: &str| {
        objects::endpoint_slice(
            "shop",
            "echo-1",
            "echo",
            8080,
            &[(node.pod(pod).ip, node.name.as_str(), pod)],
        )
    };
    cluster.apply(&objects::service("shop", "echo", VIP, 80, "http"));
    let follows = |cluster: &Cluster, pod: &str| {
        cluster.apply(&slice(pod));
        eventually(&format!("traffic to {pod}"), || {
            client
                .try_connect(vip, Connect::default())
                .is_ok_and(|r| answered_by(&r) == [pod])
        });
    };
    follows(&cluster, "ka");
    let listed = agent.metric("mesh_kubernetes_relists_total");

    // A restart: every watch resumes where it was.
    cluster.stop_apiserver();
    cluster.restart_apiserver();
    eventually("reconnected", || {
        agent.metric("mesh_kubernetes_connected") == 1.0
    });
    follows(&cluster, "kb");
    assert_eq!(agent.metric("mesh_kubernetes_relists_total"), listed);

    // A compaction while the server is down: the resumes meet 410, the
    // agent lists again and follows.
    cluster.stop_apiserver();
    let revision = cluster.compact_etcd();
    cluster.restart_apiserver();
    eventually("listed again", || {
        agent.metric("mesh_kubernetes_relists_total") > listed
    });
    eprintln!(
        "etcd compacted at revision {revision}: {} watches listed again",
        agent.metric("mesh_kubernetes_relists_total") - listed
    );
    follows(&cluster, "ka");
}

/// Every object of `deploy/` passes the real server's validation and
/// admission (`kubectl apply --server-side --dry-run=server`), its
/// namespaces created first as `kubectl apply` would.
#[test]
fn the_manifests_pass_a_real_api_servers_validation() {
    let node = Node::new("kdry", 1);
    let cluster = Cluster::start(&node.netns, "kdry");
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut checked = Vec::new();
    for file in ["mesh-agent.yaml", "cleanup.yaml", "mesh-ca.yaml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        // Each document as its YAML text: the server reads it with its
        // own YAML rules (`0400` is octal there, as for kubectl).
        let documents: Vec<(Value, String)> = text
            .split("\n---\n")
            .filter(|d| d.lines().any(|l| l.starts_with("kind:")))
            .map(|d| (serde_yaml::from_str(d).unwrap(), d.to_owned()))
            .collect();
        for (object, _) in documents.iter().filter(|(o, _)| o["kind"] == "Namespace") {
            cluster.apply(object);
        }
        for (object, yaml) in documents.iter().filter(|(o, _)| o["kind"] != "Namespace") {
            let stored = cluster.dry_run_apply(object, yaml).unwrap_or_else(|error| {
                panic!(
                    "{file}: {} {}: {error}",
                    object["kind"], object["metadata"]["name"]
                )
            });
            assert_eq!(stored["kind"], object["kind"], "{stored}");
            checked.push(format!("{file}: {}", object["kind"]));
        }
    }
    assert!(checked.len() >= 6, "{checked:?}");
    eprintln!("validated by the server: {checked:?}");
}

/// The agent's resident memory, from /proc.
fn rss_kib(agent: &Agent) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Fills the cluster up to `pods` meshed pods on other nodes and
/// `services` Services, each with an EndpointSlice of five of them, the
/// way the controllers and kubelets would (created, then their status).
fn fill(cluster: &Cluster, from: (usize, usize), to: (usize, usize)) {
    let ip = |i: usize| {
        Ipv4Addr::new(
            10,
            20 + (i / 65_536) as u8,
            (i / 256 % 256) as u8,
            (i % 256) as u8,
        )
    };
    let apply = |object: Value| {
        let path = format!(
            "{}?fieldManager=mesh-tests&force=true",
            mesh_tests::cluster::object_path(&object)
        );
        (
            http::Method::PATCH,
            path,
            "application/apply-patch+yaml",
            object,
        )
    };
    let mut creates = Vec::new();
    let mut statuses = Vec::new();
    for i in from.0..to.0 {
        let name = format!("p{i}");
        let spec = PodSpec {
            namespace: "shop",
            name: &name,
            uid: "",
            node: &format!("other-{}", i % 50),
            ip: ip(i),
            service_account: "default",
            version: None,
        };
        let mut pod = objects::pod(&spec);
        let status = pod["status"].take();
        pod.as_object_mut().unwrap().remove("status");
        pod["metadata"].as_object_mut().unwrap().remove("uid");
        creates.push(apply(pod));
        statuses.push((
            http::Method::PATCH,
            format!("/api/v1/namespaces/shop/pods/{name}/status"),
            "application/merge-patch+json",
            json!({ "status": status }),
        ));
    }
    for i in from.1..to.1 {
        let name = format!("s{i}");
        let vip = Ipv4Addr::new(10, 96, 1 + (i / 256) as u8, (i % 256) as u8);
        let mut service = objects::service("shop", &name, vip, 80, "http");
        service["metadata"].as_object_mut().unwrap().remove("uid");
        creates.push(apply(service));
        let names: Vec<String> = (0..5).map(|k| format!("p{}", (i * 5 + k) % to.0)).collect();
        let nodes: Vec<String> = (0..5)
            .map(|k| format!("other-{}", (i * 5 + k) % to.0 % 50))
            .collect();
        let endpoints: Vec<(Ipv4Addr, &str, &str)> = (0..5)
            .map(|k| (ip((i * 5 + k) % to.0), nodes[k].as_str(), names[k].as_str()))
            .collect();
        creates.push(apply(objects::endpoint_slice(
            "shop",
            &format!("{name}-1"),
            &name,
            8080,
            &endpoints,
        )));
    }
    let failures = cluster.requests(creates, 32);
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let failures = cluster.requests(statuses, 32);
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

/// How the agent's start and memory grow with the cluster: an empty one,
/// 1,000 pods and 200 Services, 5,000 pods and 1,000 Services (every pod
/// on other nodes, so all of it is model, none of it is kernel
/// attachments). The model must be whole each time; the figures are
/// printed as ratios to the empty cluster's, measured in the same run.
#[test]
fn the_agent_syncs_a_cluster_of_5000_pods() {
    let node = Node::new("kscale", 1);
    let cluster = Cluster::start(&node.netns, "kscale");
    cluster.apply_rbac(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh-agent.yaml"));
    cluster.namespace("shop", true);
    cluster.apply(&objects::node(&node.name, "zone-a"));
    let kubeconfig = cluster.service_account_kubeconfig("mesh-system", "mesh-agent");
    let mut figures = Vec::new();
    let mut filled = (0, 0);
    for (pods, services) in [(0, 0), (1_000, 200), (5_000, 1_000)] {
        let started = std::time::Instant::now();
        fill(&cluster, filled, (pods, services));
        filled = (pods, services);
        let filling = started.elapsed();
        let started = std::time::Instant::now();
        let agent = start_agent(
            &node,
            &kubeconfig,
            "maps: { services: 4096, workloads: 16384 }\n",
        );
        let ready = started.elapsed();
        // Before /config_dump renders the model (which allocates).
        let rss = rss_kib(&agent);
        let dump = agent.config_dump();
        let workloads = dump["workloads"].as_array().map_or(0, Vec::len);
        let services_seen = dump["services"].as_array().map_or(0, Vec::len);
        assert_eq!(workloads, pods, "workloads in the model");
        assert!(
            services_seen >= services,
            "{services_seen} services in the model"
        );
        eprintln!(
            "{pods} pods, {services} services: filled in {filling:?}; agent ready in {ready:?}, {rss} KiB resident"
        );
        figures.push((pods, ready, rss));
        drop(agent);
    }
    let (_, ready0, rss0) = figures[0];
    for (pods, ready, rss) in &figures[1..] {
        eprintln!(
            "{pods} pods: start {:.2}x, memory {:.2}x the empty cluster's ({:.1} KiB per pod)",
            ready.as_secs_f64() / ready0.as_secs_f64(),
            *rss as f64 / rss0 as f64,
            (*rss as f64 - rss0 as f64) / *pods as f64
        );
    }
}

/// A node on a real API server with a client `kc`, a server `ka` behind
/// the `echo` Service, and an agent carrying traffic between them: where
/// the handover tests start.
struct HandoverNode {
    // The agent and the server go before the cluster and the node.
    old: Agent,
    _server: Server,
    kubeconfig: PathBuf,
    cluster: Cluster,
    node: Node,
}

fn handover_node(label: &str) -> HandoverNode {
    let mut node = Node::new(label, 1);
    let cluster = Cluster::start(&node.netns, label);
    cluster.apply_rbac(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh-agent.yaml"));
    cluster.namespace("shop", true);
    cluster.apply(&objects::node(&node.name, "zone-a"));
    for name in ["kc", "ka"] {
        run_pod(&cluster, &mut node, name, name);
    }
    let server = node.pod("ka").serve(8080, "ka", false);
    let kubeconfig = cluster.service_account_kubeconfig("mesh-system", "mesh-agent");
    let old = start_agent(&node, &kubeconfig, "");
    cluster.apply(&objects::service("shop", "echo", VIP, 80, "http"));
    let ka = [(node.pod("ka").ip, node.name.as_str(), "ka")];
    cluster.apply(&objects::endpoint_slice(
        "shop", "echo-1", "echo", 8080, &ka,
    ));
    eventually("traffic to ka", || {
        node.pod("kc")
            .try_connect(SocketAddr::from((VIP, 80)), Connect::default())
            .is_ok_and(|r| answered_by(&r) == ["ka"])
    });
    HandoverNode {
        old,
        _server: server,
        kubeconfig,
        cluster,
        node,
    }
}

impl HandoverNode {
    /// `new` is ready on the adopted kernel state, the old agent handed
    /// over, drained and exited cleanly, and traffic goes through `new`.
    fn handed_over_to(&mut self, new: &Agent) {
        let old = &mut self.old;
        new.wait_ready();
        assert!(new.log().contains("kernel=Adopted"), "{}", new.log());
        let status = old.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{status}:\n{}", old.log());
        assert!(
            old.log().contains("handover drain finished"),
            "{}",
            old.log()
        );
        old.handed_over();
        eventually("traffic through the new agent", || {
            answers(self.node.pod("kc")) == vec!["ka"; 10]
        });
    }
}

/// Told to stop while a new agent is taking over from it (the new one
/// waits for its API server's first lists), the old agent finishes the
/// handover first: it does not drain into the clean-up that would remove
/// the kernel state the new agent is about to adopt. (A rollout's kubelet
/// stops the old pod once the new one is ready, or a user deletes it.)
#[test]
fn told_to_stop_during_a_handover_the_old_agent_finishes_it_first() {
    let mut s = handover_node("kstop");
    s.cluster.stop_apiserver();
    let new = spawn_agent(&s.node, &s.kubeconfig, "");
    assert!(
        s.old
            .wait_log("a new agent asks to take over", 1, Duration::from_secs(10)),
        "{}",
        s.old.log()
    );
    s.old.sigterm();
    assert!(
        s.old
            .wait_log("finishing the handover first", 1, Duration::from_secs(10)),
        "{}",
        s.old.log()
    );
    // Still serving meanwhile, on the kernel state it keeps.
    let reports = s
        .node
        .pod("kc")
        .try_connect(SocketAddr::from((VIP, 80)), Connect::default());
    assert!(
        reports.as_ref().is_ok_and(|r| answered_by(r) == ["ka"]),
        "{reports:?}\n--- old agent:\n{}\n--- new agent:\n{}",
        s.old.log(),
        new.log()
    );
    s.cluster.restart_apiserver();
    s.handed_over_to(&new);
}

/// Told to stop before any new agent has connected (a rollout's new pod
/// can count as ready on the old agent's answer to its probe, the port
/// being shared, and the old pod is then stopped), an agent in a pod waits
/// a moment for the new agent instead of draining into the clean-up: the
/// new agent connecting then takes over as in any handover.
#[test]
fn stopped_just_before_its_successor_connects_the_agent_still_hands_over() {
    let mut s = handover_node("kearly");
    s.old.sigterm();
    assert!(
        s.old
            .wait_log("waiting for it before draining", 1, Duration::from_secs(10)),
        "{}",
        s.old.log()
    );
    let new = spawn_agent(&s.node, &s.kubeconfig, "");
    s.handed_over_to(&new);
}
