//! The Kubernetes source against an API-server fixture that speaks real
//! Kubernetes JSON, kept for what the real server of `kube_apiserver.rs`
//! cannot be made to show on demand: the watch logic on its own (the model
//! after each event, bookmarks, 410 Gone, connections cut mid-watch, an
//! outage), the pod mapping over every kubelet and runtime layout (no
//! server at all), and a real agent through a cut and a compaction. The
//! agent's Kubernetes end to end (RBAC, services, endpoints, annotations,
//! zones, identities across nodes, opt-outs, a restart) runs against the
//! real server. Needs root for the last test.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_agent::{
    config::KubernetesConfig,
    source::kubernetes::{KubeSource, model::Built},
};
use mesh_tests::{
    agent::{Agent, Launch},
    apiserver::{
        ApiServer,
        objects::{self, PodSpec, besteffort_cgroup},
    },
    eventually,
    pod::Connect,
    scenario::answered_by,
    topology::Node,
    unique_name,
};
use serde_json::Value;

/// A node's cgroup tree and route table in a temporary directory.
struct NodeTree {
    root: PathBuf,
}

impl NodeTree {
    fn new() -> Self {
        let root = std::env::temp_dir().join(unique_name("kube-tree"));
        std::fs::create_dir_all(root.join("cgroup/kubepods.slice")).unwrap();
        std::fs::write(root.join("cgroup/cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::create_dir_all(root.join("net")).unwrap();
        let tree = Self { root };
        tree.routes(&[]);
        tree
    }

    fn add_pod_cgroup(&self, uid: &str) {
        let pod = self.root.join("cgroup").join(besteffort_cgroup(uid));
        let container = format!("cri-containerd-{}.scope", objects::container_id(uid));
        std::fs::create_dir_all(pod.join(container)).unwrap();
    }

    /// Writes `/proc/net/route` with a /32 host route per `(ip, interface)`.
    fn routes(&self, routes: &[(Ipv4Addr, &str)]) {
        let mut text = String::from(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n",
        );
        for (ip, interface) in routes {
            let hex = u32::from_ne_bytes(ip.octets());
            text.push_str(&format!(
                "{interface}\t{hex:08X}\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n"
            ));
        }
        std::fs::write(self.root.join("route"), text).unwrap();
    }

    fn config(&self, url: &str) -> KubernetesConfig {
        KubernetesConfig {
            api_server: Some(url.to_owned()),
            cgroup_root: self.root.join("cgroup"),
            proc_net_route: self.root.join("route"),
            sys_class_net: self.root.join("net"),
        }
    }
}

impl Drop for NodeTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 3);
const C_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 4);
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

fn pod(name: &str, uid: &str, node: &str, ip: Ipv4Addr, version: Option<&str>) -> Value {
    objects::pod(&PodSpec {
        namespace: "shop",
        name,
        uid,
        node,
        ip,
        service_account: name,
        version,
    })
}

/// Polls the source's model until `check` holds (up to 10 s) and returns
/// how long it took.
async fn until(source: &KubeSource, what: &str, check: impl Fn(&Built) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(built) = source.build()
            && check(&built)
        {
            let took = start.elapsed();
            println!("{what}: seen after {took:?}");
            return took;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for: {what}; model: {:?}; status: {:?}",
            source.build(),
            source.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn workload<'a>(built: &'a Built, name: &str) -> Option<&'a mesh_agent::model::Workload> {
    built.workloads.iter().find(|w| w.name == name)
}

fn endpoint_ips(built: &Built, service: &str) -> Vec<Ipv4Addr> {
    built
        .services
        .iter()
        .find(|s| s.name == service)
        .map(|s| s.endpoints.iter().map(|e| e.ip).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_the_cluster_through_relists_and_outages() {
    let tree = NodeTree::new();
    let api = ApiServer::new();
    let url = api.listen(None);
    tree.add_pod_cgroup("uid-a");
    tree.routes(&[(A_IP, "cali-a")]);
    api.apply(objects::namespace("shop", true));
    api.apply(objects::namespace("other", false));
    api.apply(objects::node("n1", "zone-a"));
    api.apply(pod("a", "uid-a", "n1", A_IP, None));
    api.apply(pod("b", "uid-b", "n2", B_IP, Some("v2")));
    api.apply(objects::service("shop", "api", API_VIP, 80, "http"));
    api.apply(objects::endpoint_slice(
        "shop",
        "api-1",
        "api",
        8080,
        &[(B_IP, "n2", "b")],
    ));

    let source = KubeSource::start(&tree.config(&url), "n1").await.unwrap();
    until(&source, "first lists", |_| true).await;
    let built = source.build().unwrap();
    let a = workload(&built, "a")
        .unwrap_or_else(|| panic!("pod a meshed: {built:?} {:?}", source.status()));
    let local = a.local.as_ref().expect("a runs here");
    assert_eq!(local.interface, "cali-a");
    assert_eq!(
        local.cgroup.as_deref(),
        Some(
            tree.root
                .join("cgroup")
                .join(besteffort_cgroup("uid-a"))
                .as_path()
        )
    );
    assert_eq!(a.service_account, "a");
    let b = workload(&built, "b").expect("pod b meshed");
    assert!(b.local.is_none() && b.node == "n2");
    let service = &built.services[0];
    assert_eq!(
        (
            service.vip,
            service.ports[0].port,
            service.ports[0].target_port
        ),
        (API_VIP, 80, 8080)
    );
    let endpoint = &service.endpoints[0];
    assert_eq!(endpoint.ip, B_IP);
    assert_eq!(
        endpoint.subset.as_deref(),
        Some("v2"),
        "version label of the pod"
    );
    assert_eq!(endpoint.node.as_deref(), Some("n2"));
    assert!(
        !endpoint.local && endpoint.same_zone,
        "zone-a on both sides"
    );
    let requests = api.requests().join("\n");
    assert!(
        requests.contains("fieldSelector=spec.nodeName%3Dn1"),
        "{requests}"
    );
    assert!(requests.contains("allowWatchBookmarks=true"), "{requests}");

    // Pod added on this node, before the CNI routed it: reported unmapped.
    api.apply(pod("c", "uid-c", "n1", C_IP, None));
    until(&source, "pod c reported unmapped", |b| {
        b.unmapped
            .iter()
            .any(|u| u.pod == "shop/c" && u.reason.contains("no route to 10.1.0.4"))
            && workload(b, "c").is_none()
    })
    .await;
    // Its route and cgroup appear: mapped at the next build.
    tree.add_pod_cgroup("uid-c");
    tree.routes(&[(A_IP, "cali-a"), (C_IP, "cali-c")]);
    let built = source.build().unwrap();
    assert_eq!(
        workload(&built, "c")
            .and_then(|w| w.local.as_ref())
            .map(|l| l.interface.as_str()),
        Some("cali-c")
    );
    assert!(built.unmapped.is_empty());

    // Endpoints changed.
    api.apply(objects::endpoint_slice(
        "shop",
        "api-1",
        "api",
        8080,
        &[(B_IP, "n2", "b"), (C_IP, "n1", "c")],
    ));
    until(&source, "endpoint c added", |b| {
        endpoint_ips(b, "api") == [B_IP, C_IP]
    })
    .await;

    // Pod deleted.
    api.delete("Pod", "shop", "b");
    until(&source, "pod b deleted", |b| workload(b, "b").is_none()).await;

    // A bookmark is taken (not an error) and changes nothing.
    let before = source.status();
    api.bookmark();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(endpoint_ips(&source.build().unwrap(), "api"), [B_IP, C_IP]);
    let after = source.status();
    assert_eq!(after.watch_errors, before.watch_errors, "{after:?}");
    // ... and used: after a cut, the namespace watch (whose last event is
    // older) resumes from the bookmark's version.
    let bookmarked = api.resource_version();
    api.drop_connections();
    let resumed = format!("resourceVersion={bookmarked}");
    let start = Instant::now();
    while !api.requests().iter().any(|r| {
        r.contains("/api/v1/namespaces?") && r.contains("watch=true") && r.contains(&resumed)
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:#?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Connections cut; while they are down an object is deleted and the
    // history compacted: the watches resume from a version the server no
    // longer has, get 410 Gone and list again, and the deletion (which only
    // a list can tell now) takes effect.
    let relists = source.status().relists;
    api.set_down(true);
    api.delete("EndpointSlice", "shop", "api-1");
    api.compact();
    api.set_down(false);
    until(&source, "re-list after 410 Gone", |b| {
        endpoint_ips(b, "api").is_empty()
    })
    .await;
    assert!(source.status().relists > relists, "{:?}", source.status());

    // The API server goes away: the model stays, and the status says so.
    api.set_down(true);
    let start = Instant::now();
    while source.status().connected {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "outage not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let built = source.build().unwrap();
    assert!(
        workload(&built, "a").is_some(),
        "last state kept: {built:?}"
    );
    assert!(source.status().last_error.is_some());
    api.set_down(false);
    // Namespace label flipped: every pod of it leaves the mesh.
    api.apply(objects::namespace("shop", false));
    until(&source, "namespace opted out", |b| b.workloads.is_empty()).await;
    let start = Instant::now();
    while !source.status().connected {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "recovery not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A pod opts in by label even so; another opts out by annotation.
    let mut labelled = pod("a", "uid-a", "n1", A_IP, None);
    labelled["metadata"]["labels"]["mesh-agent.io/mesh"] = "enabled".into();
    api.apply(labelled);
    api.apply(objects::namespace("shop", true));
    let mut opted_out = pod("c", "uid-c", "n1", C_IP, None);
    opted_out["metadata"]["annotations"] = serde_json::json!({"mesh-agent.io/mesh": "disabled"});
    api.apply(opted_out);
    until(&source, "pod c opted out, a in", |b| {
        workload(b, "a").is_some() && workload(b, "c").is_none()
    })
    .await;
}

/// The cgroup and interface of a pod in a layout: `(driver dir, qos dir,
/// pod dir, container dir)` for each kubelet driver and runtime.
#[test]
fn maps_pods_in_every_kubelet_and_runtime_layout() {
    use mesh_agent::source::kubernetes::mapping::{self, CgroupDriver};
    let uid = "8d0c4b3a-1f2e-4c5d-9e8f-0a1b2c3d4e5f";
    let under = uid.replace('-', "_");
    let id = "f00dfeed";
    let layouts: &[(&str, &str, &str, CgroupDriver, &str, String)] = &[
        (
            "systemd+containerd",
            "",
            "Burstable",
            CgroupDriver::Systemd,
            "containerd",
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{under}.slice/cri-containerd-{id}.scope"
            ),
        ),
        (
            "systemd+cri-o",
            "",
            "BestEffort",
            CgroupDriver::Systemd,
            "cri-o",
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice/crio-{id}.scope"
            ),
        ),
        (
            "systemd guaranteed",
            "",
            "Guaranteed",
            CgroupDriver::Systemd,
            "containerd",
            format!("kubepods.slice/kubepods-pod{under}.slice/cri-containerd-{id}.scope"),
        ),
        (
            "cgroupfs+containerd",
            "",
            "Burstable",
            CgroupDriver::Cgroupfs,
            "containerd",
            format!("kubepods/burstable/pod{uid}/{id}"),
        ),
        (
            "cgroupfs+cri-o",
            "",
            "BestEffort",
            CgroupDriver::Cgroupfs,
            "cri-o",
            format!("kubepods/besteffort/pod{uid}/crio-{id}"),
        ),
        (
            "hybrid systemd+containerd",
            "unified",
            "Guaranteed",
            CgroupDriver::Systemd,
            "containerd",
            format!("kubepods.slice/kubepods-pod{under}.slice/cri-containerd-{id}.scope"),
        ),
    ];
    for (name, unified, qos, driver, runtime, container_dir) in layouts {
        let mount = std::env::temp_dir().join(unique_name("layout"));
        let root = mount.join(unified);
        std::fs::create_dir_all(root.join(container_dir)).unwrap();
        std::fs::write(root.join("cgroup.controllers"), "").unwrap();
        let kubepods = mapping::kubepods_root(&mount).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(kubepods.driver, *driver, "{name}");
        let containers = [(runtime.to_string(), id.to_owned())];
        let found = mapping::pod_cgroup(&kubepods, uid, Some(qos), &containers)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            found.path,
            root.join(Path::new(container_dir).parent().unwrap()),
            "{name}"
        );
        assert_eq!(
            found.containers, containers,
            "{name}: container cgroup found"
        );
        // Without the QoS class every class is tried.
        let found = mapping::pod_cgroup(&kubepods, uid, None, &[]).unwrap();
        assert_eq!(
            found.path,
            root.join(Path::new(container_dir).parent().unwrap()),
            "{name}"
        );
        // Another pod is not found, and the error says where it looked.
        let error = mapping::pod_cgroup(&kubepods, "0000", Some(qos), &[])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("pod0000") || error.contains("pod0000.slice"),
            "{name}: {error}"
        );
        std::fs::remove_dir_all(&mount).unwrap();
    }

    // No cgroup v2 at all.
    let empty = std::env::temp_dir().join(unique_name("layout"));
    std::fs::create_dir_all(&empty).unwrap();
    let error = mapping::kubepods_root(&empty).unwrap_err().to_string();
    assert!(error.contains("no cgroup v2"), "{error}");
    std::fs::remove_dir_all(&empty).unwrap();
}

/// Route layouts of common CNIs: a host route per pod maps; a bridge, a
/// gateway or a shared subnet route is reported with the reason.
#[test]
fn maps_interfaces_from_host_routes_only() {
    use mesh_agent::source::kubernetes::mapping;
    let net = std::env::temp_dir().join(unique_name("sysnet"));
    std::fs::create_dir_all(net.join("cni0/bridge")).unwrap();
    std::fs::create_dir_all(net.join("cali123")).unwrap();
    let hex = |ip: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(ip));
    let table = format!(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
         eth0\t00000000\t{gw}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
         cali123\t{calico}\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
         cni0\t{bridge}\t00000000\t0001\t0\t0\t0\t{mask24}\t0\t0\t0\n\
         eth0\t{other}\t{gw}\t0003\t0\t0\t0\t{mask24}\t0\t0\t0\n\
         vxlan0\t{shared}\t00000000\t0001\t0\t0\t0\t{mask24}\t0\t0\t0\n\
         down0\t{down}\t00000000\t0000\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n",
        gw = hex([10, 0, 0, 1]),
        calico = hex([10, 244, 1, 5]),
        bridge = hex([10, 244, 2, 0]),
        other = hex([10, 244, 3, 0]),
        shared = hex([10, 244, 4, 0]),
        down = hex([10, 244, 5, 5]),
        mask24 = hex([255, 255, 255, 0]),
    );
    let routes = mapping::parse_routes(&table);
    let map = |ip: [u8; 4]| {
        mapping::pod_interface(&routes, Ipv4Addr::from(ip), &net).map_err(|e| e.to_string())
    };
    assert_eq!(map([10, 244, 1, 5]).unwrap(), "cali123");
    let bridge = map([10, 244, 2, 7]).unwrap_err();
    assert!(bridge.contains("bridge cni0"), "{bridge}");
    let routed = map([10, 244, 3, 7]).unwrap_err();
    assert!(routed.contains("via 10.0.0.1"), "{routed}");
    let shared = map([10, 244, 4, 7]).unwrap_err();
    assert!(shared.contains("10.244.4.0/24 dev vxlan0"), "{shared}");
    // A route that is down does not count: the default route wins.
    let down = map([10, 244, 5, 5]).unwrap_err();
    assert!(down.contains("via 10.0.0.1"), "{down}");
    std::fs::remove_dir_all(&net).unwrap();
}

// --- end to end: a real agent on a simulated node ---

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

/// What the real API server of `kube_apiserver.rs` cannot be made to do
/// on demand, against a real agent: its connections cut mid-watch, and a
/// change plus a compaction while it is unreachable (every watch then
/// meets 410 Gone and lists again; a cut alone resumes without a list).
#[test]
fn the_agent_lists_again_after_a_compaction_and_resumes_after_a_cut() {
    let mut node = Node::new("kube", 1);
    let uids = [("kc", "uid-kc"), ("ka", "uid-ka"), ("kb", "uid-kb")];
    for (name, uid) in uids {
        node.add_pod_in_cgroup(name, &besteffort_cgroup(uid));
    }
    let _servers = [
        node.pod("ka").serve(8080, "ka", false),
        node.pod("kb").serve(8080, "kb", false),
    ];
    let api = ApiServer::new();
    let url = api.listen(Some(&node.netns));
    api.apply(objects::namespace("shop", true));
    api.apply(objects::node(&node.name, "zone-a"));
    for (name, uid) in uids {
        api.apply(pod(name, uid, &node.name, node.pod(name).ip, None));
    }
    let slice = |pods: &[&str]| {
        let endpoints: Vec<(Ipv4Addr, &str, &str)> = pods
            .iter()
            .map(|p| (node.pod(p).ip, node.name.as_str(), *p))
            .collect();
        objects::endpoint_slice("shop", "echo-1", "echo", 8080, &endpoints)
    };
    let config = format!(
        "node: {{}}\nidentity: {{ ca_dir: {} }}\nkubernetes: {{ api_server: {url}, cgroup_root: {} }}\n",
        node.ca_dir.display(),
        node.cgroup.path().display()
    );
    let agent = Agent::start_with(
        &node,
        &config,
        &Launch {
            env: &[("NODE_NAME", node.name.as_str())],
            ..Default::default()
        },
    );
    let client = node.pod("kc");
    api.apply(objects::service("shop", "echo", VIP, 80, "http"));
    api.apply(slice(&["kb"]));
    let connect = || {
        client.connect(
            vip(),
            Connect {
                count: 20,
                ..Default::default()
            },
        )
    };
    eventually("traffic to kb", || {
        client
            .try_connect(vip(), Connect::default())
            .is_ok_and(|r| answered_by(&r) == ["kb"])
    });
    assert_eq!(answered_by(&connect()), vec!["kb"; 20]);
    // A connection open across every fault below.
    let held = client.hold(vip());

    // Connections cut, a change and a compaction while they are down: the
    // watches get 410 Gone, list again and follow.
    api.set_down(true);
    api.apply(slice(&["ka", "kb"]));
    api.compact();
    api.set_down(false);
    eventually("traffic to both", || {
        let by = answered_by(&connect());
        by.contains(&"ka".to_owned()) && by.contains(&"kb".to_owned())
    });
    // Every one of the six watches missed the compacted history.
    eventually("every watch listed again", || {
        agent.metric("mesh_kubernetes_relists_total") == 6.0
    });
    // A cut alone resumes without a list.
    let relists = agent.metric("mesh_kubernetes_relists_total");
    api.drop_connections();
    api.apply(slice(&["ka"]));
    eventually("traffic to ka again", || {
        answered_by(&connect()) == vec!["ka"; 20]
    });
    api.apply(slice(&["ka", "kb"]));
    eventually("traffic to both again", || {
        let by = answered_by(&connect());
        by.contains(&"ka".to_owned()) && by.contains(&"kb".to_owned())
    });
    assert_eq!(agent.metric("mesh_kubernetes_relists_total"), relists);
    let report = held.release();
    assert!(
        report.get("error").is_none(),
        "held connection broke: {report}"
    );
}
