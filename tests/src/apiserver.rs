//! A Kubernetes API server stand-in for the agent's watches: it serves
//! real Kubernetes JSON for list and watch of Namespaces, Nodes, Pods,
//! Services and EndpointSlices, with resourceVersions, field selectors
//! (`spec.nodeName`, `metadata.name`), bookmarks, a 410 Gone for a watch
//! that resumes from a compacted version, dropped connections and an
//! outage. HTTP/1.1 on std threads; watches are chunked streams of JSON
//! lines, as the real server sends them.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::Duration,
};

use serde_json::{Value, json};

use crate::netns::NetNs;

/// The collections served, by URL path.
const COLLECTIONS: &[(&str, &str, &str)] = &[
    ("/api/v1/namespaces", "Namespace", "v1"),
    ("/api/v1/nodes", "Node", "v1"),
    ("/api/v1/pods", "Pod", "v1"),
    ("/api/v1/services", "Service", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
];

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Current objects by (kind, namespace/name).
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, kind, event type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Watches from a version below this get 410 Gone.
    compacted_below: u64,
    /// Bumped to send every watch a bookmark.
    bookmarks: u64,
    /// Bumped to cut every open connection.
    cuts: u64,
    /// Requests are refused (connection closed at once).
    down: bool,
    /// Request lines seen, for assertions.
    requests: Vec<String>,
}

#[derive(Clone, Default)]
pub struct ApiServer {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl ApiServer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listens on 127.0.0.1 in `netns` (or the test's own namespace) and
    /// serves until the test ends; returns the `http://` URL.
    pub fn listen(&self, netns: Option<&NetNs>) -> String {
        let bind = || TcpListener::bind("127.0.0.1:0").expect("bind fixture");
        let listener = match netns {
            Some(netns) => netns.run(bind),
            None => bind(),
        };
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let server = self.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let server = server.clone();
                thread::spawn(move || server.handle(stream));
            }
        });
        format!("http://{addr}")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.shared.1.notify_all();
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, mut object: Value) {
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = object["kind"].as_str().expect("kind").to_owned();
        let key = object_key(&object);
        let event = if state.objects.contains_key(&(kind.clone(), key.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert((kind.clone(), key), object.clone());
        state.history.push((rv, kind, event, object));
        drop(state);
        self.changed();
    }

    /// Deletes an object (DELETED to watchers).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.lock();
        let key = format!("{namespace}/{name}");
        let Some(mut object) = state.objects.remove(&(kind.to_owned(), key)) else {
            panic!("no {kind} {namespace}/{name} to delete");
        };
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.history.push((rv, kind.to_owned(), "DELETED", object));
        drop(state);
        self.changed();
    }

    /// Sends every open watch a BOOKMARK at the current version.
    pub fn bookmark(&self) {
        self.lock().bookmarks += 1;
        self.changed();
    }

    /// Forgets the history so far: a watch resuming from a version older
    /// than the current one gets 410 Gone and must list again.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted_below = state.resource_version;
        state.history.clear();
    }

    /// Cuts every open connection (a load balancer in between restarted).
    pub fn drop_connections(&self) {
        self.lock().cuts += 1;
        self.changed();
    }

    /// While down, every connection is closed at once, open ones included.
    pub fn set_down(&self, down: bool) {
        let mut state = self.lock();
        state.down = down;
        state.cuts += 1;
        drop(state);
        self.changed();
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    /// The request lines served so far.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn handle(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
        let mut stream = stream;
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" || header == "\n" {
                    break;
                }
            }
            let target = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_owned();
            {
                let mut state = self.lock();
                state.requests.push(request_line.trim().to_owned());
                if state.down {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let query = parse_query(query);
            if path == "/version" {
                let body = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fixture"});
                if respond(&mut stream, 200, &body).is_err() {
                    return;
                }
                continue;
            }
            let Some(&(_, kind, api_version)) = COLLECTIONS.iter().find(|c| c.0 == path) else {
                let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "NotFound", "code": 404,
                    "message": format!("the fixture does not serve {path}")});
                if respond(&mut stream, 404, &body).is_err() {
                    return;
                }
                continue;
            };
            let selector = query.get("fieldSelector").cloned().unwrap_or_default();
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let bookmarks =
                    query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
                self.watch(stream, kind, api_version, &selector, from, bookmarks);
                return;
            }
            let body = {
                let state = self.lock();
                let items: Vec<&Value> = state
                    .objects
                    .iter()
                    .filter(|((k, _), o)| k == kind && selects(&selector, o))
                    .map(|(_, o)| o)
                    .collect();
                json!({
                    "kind": format!("{kind}List"),
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": state.resource_version.to_string()},
                    "items": items,
                })
            };
            if respond(&mut stream, 200, &body).is_err() {
                return;
            }
        }
    }

    fn watch(
        &self,
        mut stream: TcpStream,
        kind: &str,
        api_version: &str,
        selector: &str,
        from: u64,
        bookmarks: bool,
    ) {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        let mut state = self.lock();
        if from != 0 && from < state.compacted_below {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", state.compacted_below)}});
            drop(state);
            let _ = write_chunk(&mut stream, &gone);
            let _ = stream.write_all(b"0\r\n\r\n");
            return;
        }
        let (cuts, mut seen_bookmarks, mut cursor) = (state.cuts, state.bookmarks, from);
        loop {
            if state.cuts != cuts {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            let mut out: Vec<Value> = state
                .history
                .iter()
                .filter(|(rv, k, _, o)| *rv > cursor && k == kind && selects(selector, o))
                .map(|(_, _, event, object)| json!({"type": event, "object": object}))
                .collect();
            cursor = state.resource_version;
            if bookmarks && state.bookmarks != seen_bookmarks {
                seen_bookmarks = state.bookmarks;
                out.push(json!({"type": "BOOKMARK", "object": {"kind": kind,
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": cursor.to_string()}}}));
            }
            drop(state);
            for event in &out {
                if write_chunk(&mut stream, event).is_err() {
                    return;
                }
            }
            state = self.lock();
            if state.history.last().is_none_or(|(rv, ..)| *rv <= cursor)
                && state.cuts == cuts
                && state.bookmarks == seen_bookmarks
            {
                state = self
                    .shared
                    .1
                    .wait_timeout(state, Duration::from_millis(500))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}

fn object_key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().expect("metadata.name")
    )
}

/// Field selectors of the form `a.b=value` (comma-separated: all must hold).
fn selects(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let Some((field, value)) = term.split_once('=') else {
            return false;
        };
        let found = field.split('.').fold(object, |o, part| &o[part]);
        found.as_str() == Some(value)
    })
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => out.push(byte),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(stream: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = if status == 200 { "OK" } else { "Not Found" };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn write_chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
    stream.flush()
}

/// Builders for the objects the agent reads, as the API server returns
/// them (only the fields that matter here, plus what makes them valid).
pub mod objects {
    use std::net::Ipv4Addr;

    use serde_json::{Value, json};

    pub fn namespace(name: &str, meshed: bool) -> Value {
        let labels = if meshed {
            json!({"kubernetes.io/metadata.name": name, "mesh-agent.io/mesh": "enabled"})
        } else {
            json!({"kubernetes.io/metadata.name": name})
        };
        json!({"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels},
            "status": {"phase": "Active"}})
    }

    pub fn node(name: &str, zone: &str) -> Value {
        json!({"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "uid": format!("node-{name}"),
                "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}}})
    }

    /// A running BestEffort pod with one containerd container.
    pub struct PodSpec<'a> {
        pub namespace: &'a str,
        pub name: &'a str,
        pub uid: &'a str,
        pub node: &'a str,
        pub ip: Ipv4Addr,
        pub service_account: &'a str,
        pub version: Option<&'a str>,
    }

    pub fn pod(spec: &PodSpec<'_>) -> Value {
        let mut labels = json!({"app": spec.name});
        if let Some(version) = spec.version {
            labels["version"] = json!(version);
        }
        json!({"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "uid": spec.uid,
                "labels": labels},
            "spec": {"nodeName": spec.node, "serviceAccountName": spec.service_account,
                "containers": [{"name": "main", "image": "registry.example/app:1"}]},
            "status": {"phase": "Running", "podIP": spec.ip.to_string(),
                "podIPs": [{"ip": spec.ip.to_string()}], "qosClass": "BestEffort",
                "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0,
                    "image": "registry.example/app:1", "imageID": "",
                    "containerID": format!("containerd://{}", container_id(spec.uid)),
                    "state": {"running": {}}}]}})
    }

    /// kubelet's systemd-driver cgroup of a BestEffort pod, relative to
    /// the cgroup root.
    pub fn besteffort_cgroup(uid: &str) -> String {
        format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        )
    }

    /// The container ID the fixture gives a pod's one container.
    pub fn container_id(uid: &str) -> String {
        format!("{:0<64}", uid.replace('-', ""))
    }

    pub fn service(namespace: &str, name: &str, vip: Ipv4Addr, port: u16, target: &str) -> Value {
        json!({"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("svc-{name}")},
            "spec": {"type": "ClusterIP", "clusterIP": vip.to_string(),
                "clusterIPs": [vip.to_string()],
                "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": target}]}})
    }

    /// An EndpointSlice of `service` with ready endpoints `(ip, node, pod)`.
    pub fn endpoint_slice(
        namespace: &str,
        name: &str,
        service: &str,
        port: u16,
        endpoints: &[(Ipv4Addr, &str, &str)],
    ) -> Value {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(ip, node, pod)| {
                json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                    "nodeName": node, "zone": "zone-a",
                    "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod}})
            })
            .collect();
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace,
                "labels": {"kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": port}],
            "endpoints": endpoints})
    }
}
