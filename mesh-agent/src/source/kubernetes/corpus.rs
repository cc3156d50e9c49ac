//! The bad-object corpus: Kubernetes objects that deserialize but say
//! something the mesh must not take as it is, each fed to the model on
//! top of a small good cluster. Each is either refused with a problem
//! naming the object (and the rest of the cluster still builds) or taken
//! with a documented default; none panics.

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};

use super::{
    mapping::CgroupDriver,
    model::{Built, NodeView, build},
    records::{NamespaceRecord, PodRecord, ServiceRecord, SliceRecord},
    store::ClusterState,
};

fn pod(name: &str, ip: &str) -> Value {
    json!({
        "metadata": { "namespace": "shop", "name": name, "uid": format!("uid-{name}"),
                      "labels": { "version": "v1" } },
        "spec": { "nodeName": "n2", "serviceAccountName": name, "containers": [] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
    })
}

fn service() -> Value {
    json!({
        "metadata": { "namespace": "shop", "name": "web" },
        "spec": { "clusterIP": "10.96.0.10", "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] }
    })
}

fn slice(addresses: &[&str]) -> Value {
    json!({
        "metadata": { "namespace": "shop", "name": "web-1",
                      "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080 }],
        "endpoints": addresses.iter().map(|a| json!({
            "addresses": [a], "nodeName": "n2", "conditions": { "ready": true }
        })).collect::<Vec<_>>()
    })
}

/// The good cluster: meshed namespace `shop`, pods `a` and `b` on another
/// node, Service `web` with both behind it.
struct Objects {
    namespace: Value,
    pods: Vec<Value>,
    services: Vec<Value>,
    slices: Vec<Value>,
}

fn good() -> Objects {
    Objects {
        namespace: json!({ "metadata": { "name": "shop", "labels": { "mesh-agent.io/mesh": "enabled" } } }),
        pods: vec![pod("a", "10.12.0.5"), pod("b", "10.12.0.6")],
        services: vec![service()],
        slices: vec![slice(&["10.12.0.5", "10.12.0.6"])],
    }
}

fn from<T: serde::de::DeserializeOwned>(value: &Value) -> T {
    serde_json::from_value(value.clone()).expect("deserializes")
}

fn built(objects: &Objects) -> Built {
    let mut cluster = ClusterState::default();
    let ns: Namespace = from(&objects.namespace);
    cluster
        .namespaces
        .live
        .insert("shop".into(), NamespaceRecord::from_namespace(&ns));
    for (index, value) in objects.pods.iter().enumerate() {
        let pod: Pod = from(value);
        cluster
            .pods
            .live
            .insert(format!("shop/p{index}"), PodRecord::from_pod(&pod));
    }
    for value in &objects.services {
        let service: Service = from(value);
        let record = ServiceRecord::from_service(&service);
        // Keyed `namespace/name`, as slices name their service.
        let key = format!("{}/{}", record.namespace, record.name);
        cluster.services.live.insert(key, record);
    }
    for (index, value) in objects.slices.iter().enumerate() {
        let slice: EndpointSlice = from(value);
        if let Some(record) = SliceRecord::from_slice(&slice) {
            cluster.slices.live.insert(format!("shop/s{index}"), record);
        }
    }
    let node = NodeView {
        name: "n1".into(),
        kubepods: Ok(super::mapping::KubepodsRoot {
            path: "/nonexistent".into(),
            driver: CgroupDriver::Systemd,
        }),
        routes: Vec::new(),
        sys_class_net: "/nonexistent".into(),
    };
    build(&cluster, &node)
}

/// How a bad object must come out.
enum Expect {
    /// Refused, with a problem that says this.
    Problem(&'static str),
    /// Taken with a default: the check says which.
    Default(fn(&Built) -> bool),
}
use Expect::{Default as Taken, Problem};

type Mutation = fn(&mut Objects);

const CORPUS: &[(&str, Mutation, Expect)] = &[
    (
        "pod IP 0.0.0.0",
        |o| o.pods.push(pod("z", "0.0.0.0")),
        Problem("0.0.0.0 is not a pod or service address"),
    ),
    (
        "pod IP on loopback",
        |o| o.pods.push(pod("z", "127.0.0.1")),
        Problem("127.0.0.1 is not"),
    ),
    (
        "pod IP multicast",
        |o| o.pods.push(pod("z", "224.0.0.1")),
        Problem("224.0.0.1 is not"),
    ),
    (
        "pod IP not an address",
        |o| o.pods.push(pod("z", "ten.twelve")),
        Taken(|b| b.workloads.len() == 2),
    ),
    (
        "pod on IPv6 only",
        |o| o.pods.push(pod("z", "fd00::1")),
        Taken(|b| b.workloads.len() == 2),
    ),
    (
        "pod name in capitals",
        |o| o.pods.push(pod("Zed", "10.12.0.9")),
        Problem("\"Zed\" is not a name"),
    ),
    (
        "pod name with a slash",
        |o| o.pods.push(pod("z/y", "10.12.0.9")),
        Problem("is not a name"),
    ),
    (
        "empty service account",
        |o| {
            let mut p = pod("z", "10.12.0.9");
            p["spec"]["serviceAccountName"] = json!("");
            o.pods.push(p);
        },
        Problem("\"\" is not a name"),
    ),
    (
        "service account of 300 bytes",
        |o| {
            let mut p = pod("z", "10.12.0.9");
            p["spec"]["serviceAccountName"] = json!("s".repeat(300));
            o.pods.push(p);
        },
        Problem("is not a name"),
    ),
    (
        "mode annotation misspelt",
        |o| {
            o.pods[0]["metadata"]["annotations"] = json!({ "mesh-agent.io/mode": "lenient" });
        },
        Problem("mesh-agent.io/mode"),
    ),
    (
        "two pods, one IP",
        |o| o.pods.push(pod("z", "10.12.0.5")),
        Problem("also the IP of pod"),
    ),
    (
        "namespace label not `enabled`",
        |o| {
            o.namespace["metadata"]["labels"]["mesh-agent.io/mesh"] = json!("yes");
        },
        Taken(|b| b.workloads.is_empty()),
    ),
    (
        "service on 0.0.0.0",
        |o| o.services[0]["spec"]["clusterIP"] = json!("0.0.0.0"),
        Problem("service shop/web: 0.0.0.0 is not"),
    ),
    (
        "service on loopback",
        |o| o.services[0]["spec"]["clusterIP"] = json!("127.0.0.53"),
        Problem("127.0.0.53 is not"),
    ),
    (
        "headless service",
        |o| o.services[0]["spec"]["clusterIP"] = json!("None"),
        Taken(|b| b.services.is_empty()),
    ),
    (
        "service port above 65535",
        |o| o.services[0]["spec"]["ports"][0]["port"] = json!(70000),
        Taken(|b| b.services.is_empty()),
    ),
    (
        "negative target port",
        |o| {
            o.services[0]["spec"]["ports"][0]["targetPort"] = json!(-1);
            o.slices[0]["ports"][0]["name"] = json!("other");
        },
        Taken(|b| b.services.is_empty()),
    ),
    (
        "service name with a space",
        |o| o.services[0]["metadata"]["name"] = json!("my web"),
        Problem("\"my web\" is not a name"),
    ),
    (
        "policy annotation misspelt",
        |o| {
            o.services[0]["metadata"]["annotations"] =
                json!({ "mesh-agent.io/lb-policy": "fastest" });
        },
        Problem("mesh-agent.io/lb-policy"),
    ),
    (
        "splits annotation at 0",
        |o| {
            o.services[0]["metadata"]["annotations"] = json!({ "mesh-agent.io/splits": "v1=0" });
        },
        Problem("mesh-agent.io/splits"),
    ),
    (
        "quota annotation of garbage",
        |o| {
            o.services[0]["metadata"]["annotations"] =
                json!({ "mesh-agent.io/quota": "100/s,,burst" });
        },
        Problem("mesh-agent.io/quota"),
    ),
    (
        "pod quota annotation without a limit",
        |o| {
            o.pods[0]["metadata"]["annotations"] = json!({ "mesh-agent.io/quota": "burst=5" });
        },
        Problem("mesh-agent.io/quota"),
    ),
    (
        "faults annotation over 100%",
        |o| {
            o.services[0]["metadata"]["annotations"] =
                json!({ "mesh-agent.io/faults": "refuse=150" });
        },
        Problem("mesh-agent.io/faults"),
    ),
    (
        "splits annotation of garbage",
        |o| {
            o.services[0]["metadata"]["annotations"] = json!({ "mesh-agent.io/splits": "=,=,,==" });
        },
        Problem("mesh-agent.io/splits"),
    ),
    (
        "endpoint on loopback",
        |o| o.slices[0] = slice(&["10.12.0.5", "127.0.0.1"]),
        Problem("endpoint 127.0.0.1 is not"),
    ),
    (
        "endpoint on 0.0.0.0",
        |o| o.slices[0] = slice(&["0.0.0.0"]),
        Problem("endpoint 0.0.0.0 is not"),
    ),
    (
        "endpoint not an address",
        |o| o.slices[0] = slice(&["10.12.0.5", "ten"]),
        Taken(|b| b.services[0].endpoints.len() == 1),
    ),
    (
        "IPv6 slice",
        |o| o.slices[0]["addressType"] = json!("IPv6"),
        Taken(|b| b.services[0].endpoints.is_empty()),
    ),
    (
        "slice of no service",
        |o| o.slices[0]["metadata"]["labels"] = json!({}),
        Taken(|b| b.services[0].endpoints.is_empty()),
    ),
];

#[test]
fn every_bad_object_is_refused_by_name_or_taken_with_its_default() {
    let base = built(&good());
    assert!(base.problems.is_empty(), "{:?}", base.problems);
    assert_eq!((base.workloads.len(), base.services.len()), (2, 1));
    assert!(CORPUS.len() >= 20, "{} entries", CORPUS.len());
    let mut failures = Vec::new();
    for (what, mutate, expect) in CORPUS {
        let mut objects = good();
        mutate(&mut objects);
        let Ok(built) = std::panic::catch_unwind(|| built(&objects)) else {
            failures.push(format!("{what}: panicked"));
            continue;
        };
        match expect {
            Problem(text) if !built.problems.iter().any(|p| p.contains(text)) => {
                failures.push(format!(
                    "{what}: no problem saying {text:?}: {:?}",
                    built.problems
                ));
            }
            Problem(_) => {
                // The rest of the cluster still builds.
                if built.workloads.is_empty() && !what.starts_with("namespace") {
                    failures.push(format!("{what}: the good pods went too"));
                }
            }
            Taken(check) if !check(&built) => {
                failures.push(format!("{what}: not taken as documented: {built:?}"));
            }
            Taken(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
