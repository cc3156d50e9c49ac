//! A real Kubernetes control plane for the tests: etcd and kube-apiserver
//! (built from their Go modules by `cargo xtask`, see
//! `xtask/tools/{etcd,kube-apiserver}`), on 127.0.0.1 inside a test's
//! network namespace, with self-signed serving certificates, a
//! service-account signing key, RBAC on and the default admission
//! plugins. The test acts as a cluster admin (a static token); the agent
//! gets a kubeconfig with its own ServiceAccount's token (TokenRequest),
//! so it runs with exactly the permissions `deploy/mesh-agent.yaml` grants.
//! Nothing else of Kubernetes runs: the test writes what kubelet and the
//! controllers would (pod status, EndpointSlices, default ServiceAccounts).

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{apiserver::objects, netns::NetNs, process::Guarded, tool};

/// A free port on 127.0.0.1 in `netns`.
fn free_port(netns: &NetNs) -> u16 {
    netns.run(|| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    })
}

const ADMIN_TOKEN: &str = "mesh-tests-admin-token";
/// The API server's own audience (its `--api-audiences`).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc";

pub struct Cluster {
    dir: PathBuf,
    /// `https://127.0.0.1:<port>`, in the namespace given at start.
    pub url: String,
    ca_pem: String,
    _etcd: Guarded,
    apiserver: Option<Guarded>,
    apiserver_command: Vec<String>,
    /// kube-controller-manager and kube-scheduler, when started.
    controllers: Vec<Guarded>,
    netns: PathBuf,
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    /// Set when the cluster goes: the relays of [`Cluster::reach_from`] stop.
    stopping: Arc<AtomicBool>,
    /// etcd's client port (plain HTTP on the namespace's loopback).
    etcd_port: u16,
}

impl Cluster {
    /// Starts etcd and kube-apiserver in `netns` and waits until the API
    /// server is ready (seconds: it creates its bootstrap roles first).
    pub fn start(netns: &NetNs, label: &str) -> Self {
        Self::start_with(netns, label, &[])
    }

    /// [`Cluster::start`], with more kube-apiserver flags.
    pub fn start_with(netns: &NetNs, label: &str, apiserver_flags: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name(&format!("{label}-cluster")));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let ca_pem = write_certificates(&dir);
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},mesh-tests-admin,mesh-tests-admin,\"system:masters\"\n"),
        )
        .unwrap();

        let (client_port, peer_port) = (free_port(netns), free_port(netns));
        let mut etcd = Command::new(tool("etcd"));
        etcd.arg("--data-dir")
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(log_file(&dir, "etcd.log"));
        crate::process::enter(&mut etcd, &netns.path(), None);
        let etcd = Guarded::new(etcd.spawn().expect("starting etcd"));

        let port = free_port(netns);
        let file = |name: &str| dir.join(name).display().to_string();
        let apiserver_command = vec![
            tool("kube-apiserver").display().to_string(),
            format!("--etcd-servers=http://127.0.0.1:{client_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // No kubernetes Service endpoints to keep: nothing in the
            // tests reaches the API server through a Service.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", file("serving.pem")),
            format!("--tls-private-key-file={}", file("serving-key.pem")),
            format!("--token-auth-file={}", file("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", file("sa.pem")),
            format!("--service-account-signing-key-file={}", file("sa-key.pem")),
            "--api-audiences=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            format!("--cert-dir={}", file("apiserver-certs")),
            "--profiling=false".into(),
        ];
        let mut apiserver_command = apiserver_command;
        apiserver_command.extend(apiserver_flags.iter().map(|f| f.to_string()));
        let url = format!("https://127.0.0.1:{port}");
        // The client's sockets must be made in `netns` (the API server
        // listens on its loopback): its runtime's threads enter it, and
        // every request runs as a task there.
        let netns_path = netns.path();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                let file = std::fs::File::open(&netns_path).expect("open netns");
                // SAFETY: setns on this runtime thread only.
                let ret = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            })
            .build()
            .unwrap();
        let config = kubeconfig(&url, &ca_pem, ADMIN_TOKEN);
        std::fs::write(dir.join("admin.kubeconfig"), &config).unwrap();
        let client = runtime
            .block_on(runtime.spawn(client_from(config)))
            .expect("client task");
        let mut cluster = Self {
            dir,
            url,
            ca_pem,
            _etcd: etcd,
            apiserver: None,
            apiserver_command,
            controllers: Vec::new(),
            netns: netns.path(),
            runtime,
            client,
            stopping: Arc::default(),
            etcd_port: client_port,
        };
        cluster.start_apiserver();
        cluster
    }

    fn start_apiserver(&mut self) {
        let mut command = Command::new(&self.apiserver_command[0]);
        command
            .args(&self.apiserver_command[1..])
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir, "kube-apiserver.log"));
        crate::process::enter(&mut command, &self.netns, None);
        self.apiserver = Some(Guarded::new(
            command.spawn().expect("starting kube-apiserver"),
        ));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let exited = self
                .apiserver
                .as_mut()
                .and_then(|p| p.child_mut().try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "kube-apiserver exited ({exited:?}):\n{}",
                self.log("kube-apiserver.log")
            );
            if self
                .request(http::Method::GET, "/readyz", None)
                .is_ok_and(|body| body.as_str() == Some("ok"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready in 120 s:\n{}",
                self.log("kube-apiserver.log")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts kube-controller-manager (the controllers a DaemonSet rollout
    /// and Services need: DaemonSets, EndpointSlices, ServiceAccounts and
    /// their root certificate, garbage collection, and node lifecycle,
    /// which lifts the not-ready taint kubelet registers its node with)
    /// and kube-scheduler, as
    /// the cluster admin, beside the API server. Until then the tests
    /// write what they would.
    pub fn start_controllers(&mut self) {
        let file = |name: &str| self.dir.join(name).display().to_string();
        let admin = format!("--kubeconfig={}", file("admin.kubeconfig"));
        let controller_manager = vec![
            admin.clone(),
            "--leader-elect=false".to_owned(),
            "--controllers=daemonset,endpointslice,serviceaccount,root-ca-cert-publisher,garbagecollector,nodelifecycle".to_owned(),
            format!("--root-ca-file={}", file("ca.pem")),
            "--secure-port=0".to_owned(),
        ];
        let scheduler = vec![
            admin,
            "--leader-elect=false".to_owned(),
            "--secure-port=0".to_owned(),
        ];
        for (name, args) in [
            ("kube-controller-manager", controller_manager),
            ("kube-scheduler", scheduler),
        ] {
            let mut command = Command::new(tool(name));
            command
                .args(&args)
                .stdout(Stdio::null())
                .stderr(log_file(&self.dir, &format!("{name}.log")));
            crate::process::enter(&mut command, &self.netns, None);
            let mut process = Guarded::new(
                command
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting {name}: {e}")),
            );
            std::thread::sleep(Duration::from_millis(500));
            let exited = process.child_mut().try_wait().ok().flatten();
            assert!(
                exited.is_none(),
                "{name} exited ({exited:?}):\n{}",
                self.log(&format!("{name}.log"))
            );
            self.controllers.push(process);
        }
    }

    /// Makes the API server reachable at the same URL from `other`'s
    /// loopback (another node's agent): a relay in the test process
    /// listens there and connects from the cluster's namespace, as a
    /// node reaches a control plane it does not host. Its serving
    /// certificate names 127.0.0.1, so the kubeconfigs work unchanged.
    pub fn reach_from(&self, other: &NetNs) {
        let port: u16 = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the URL's port");
        self.relay(port, other);
    }

    /// Relays 127.0.0.1:`port` of `other` to the same port on the
    /// cluster namespace's loopback (another service a test runs beside
    /// the API server, such as the CA service), until the cluster goes.
    pub fn relay(&self, port: u16, other: &NetNs) {
        let listener = other.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)));
        let listener = listener.unwrap_or_else(|e| panic!("port {port} in {}: {e}", other.name()));
        listener.set_nonblocking(true).unwrap();
        let (home, stopping) = (self.netns.clone(), self.stopping.clone());
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok((from, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = from.set_nonblocking(false);
                let Ok(to) = crate::netns::run_in(&home, || {
                    std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                }) else {
                    continue;
                };
                for (mut a, mut b) in [
                    (from.try_clone(), to.try_clone()),
                    (to.try_clone(), from.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
    }

    /// Compacts etcd's history up to its current revision, as the API
    /// server's periodic compaction would (through etcd's JSON gateway):
    /// a watch resumed from before it is refused with 410 Gone. Returns
    /// the revision.
    pub fn compact_etcd(&self) -> u64 {
        let call = |path: &str, body: Value| -> Value {
            let request = body.to_string();
            let response = crate::netns::run_in(&self.netns, || {
                use std::io::{Read, Write};
                let mut stream =
                    std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.etcd_port))?;
                write!(
                    stream,
                    "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{request}",
                    request.len()
                )?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                std::io::Result::Ok(response)
            })
            .unwrap_or_else(|e| panic!("etcd {path}: {e}"));
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
            assert!(head.starts_with("HTTP/1.1 200"), "etcd {path}: {response}");
            serde_json::from_str(body).unwrap_or_else(|e| panic!("etcd {path}: {e}: {body}"))
        };
        // Any key: the answer's header carries the store's revision (int64
        // as a string, as the gateway writes them).
        let range = call("/v3/kv/range", json!({"key": "Lw=="}));
        let revision: u64 = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {range}"));
        call(
            "/v3/kv/compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        );
        revision
    }

    /// Stops the API server (etcd keeps the state) until [`Cluster::restart_apiserver`].
    pub fn stop_apiserver(&mut self) {
        self.apiserver.take();
    }

    pub fn restart_apiserver(&mut self) {
        self.start_apiserver();
    }

    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// One request as the cluster admin; the body is JSON (or a string
    /// for a non-JSON answer such as `/readyz`).
    pub fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<(&str, Value)>,
    ) -> Result<Value, String> {
        let mut request = http::Request::builder().method(method).uri(path);
        let body = match body {
            Some((content_type, value)) => {
                request = request.header("content-type", content_type);
                serde_json::to_vec(&value).unwrap()
            }
            None => Vec::new(),
        };
        let request = request.body(body).map_err(|e| e.to_string())?;
        self.send(request)
    }

    fn send(&self, request: http::Request<Vec<u8>>) -> Result<Value, String> {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let text = tokio::time::timeout(Duration::from_secs(30), client.request_text(request))
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
        });
        self.runtime
            .block_on(task)
            .unwrap_or_else(|e| Err(e.to_string()))
    }

    fn request_raw(
        &self,
        method: http::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Value, String> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type)
            .body(body)
            .map_err(|e| e.to_string())?;
        self.send(request)
    }

    /// Server-side apply of `object` (its uid, resourceVersion and status
    /// left out: the server owns them). Returns the object as stored.
    pub fn apply(&self, object: &Value) -> Value {
        let mut object = object.clone();
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("uid");
            metadata.remove("resourceVersion");
        }
        if let Some(fields) = object.as_object_mut() {
            fields.remove("status");
        }
        let path = format!(
            "{}?fieldManager=mesh-tests&force=true",
            object_path(&object)
        );
        self.request(
            http::Method::PATCH,
            &path,
            Some(("application/apply-patch+yaml", object.clone())),
        )
        .unwrap_or_else(|e| panic!("applying {}: {e}", object_path(&object)))
    }

    /// Server-side apply with `dryRun=All`: validated and admitted as
    /// for real, stored nowhere. The server's refusal is the error.
    /// `yaml` is the object's own text (`object` parsed from it).
    pub fn dry_run_apply(&self, object: &Value, yaml: &str) -> Result<Value, String> {
        let path = format!(
            "{}?fieldManager=mesh-tests&force=true&dryRun=All",
            object_path(object)
        );
        let answer = self.request_raw(
            http::Method::PATCH,
            &path,
            "application/apply-patch+yaml",
            yaml.as_bytes().to_vec(),
        )?;
        if answer["kind"] == "Status" && answer["status"] == "Failure" {
            return Err(answer["message"].to_string());
        }
        Ok(answer)
    }

    /// Many requests at once (`parallel` in flight), for filling a
    /// cluster quickly: each is (method, path, content type, JSON body).
    /// Returns the failures.
    pub fn requests(
        &self,
        requests: Vec<(http::Method, String, &'static str, Value)>,
        parallel: usize,
    ) -> Vec<String> {
        let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
        let tasks: Vec<_> = requests
            .into_iter()
            .map(|(method, path, content_type, body)| {
                let (client, slots) = (self.client.clone(), slots.clone());
                self.runtime.spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    let request = http::Request::builder()
                        .method(method)
                        .uri(&path)
                        .header("content-type", content_type)
                        .body(serde_json::to_vec(&body).unwrap())
                        .unwrap();
                    client
                        .request_text(request)
                        .await
                        .map(drop)
                        .map_err(|e| format!("{path}: {e}"))
                })
            })
            .collect();
        self.runtime.block_on(async {
            let mut failures = Vec::new();
            for task in tasks {
                if let Ok(Err(error)) = task.await {
                    failures.push(error);
                }
            }
            failures
        })
    }

    /// Deletes a pod as a user would, then finishes it as kubelet does
    /// once the containers stopped (grace period 0); without a kubelet a
    /// bound pod would stay terminating.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        self.request(http::Method::DELETE, &path, None)
            .unwrap_or_else(|e| panic!("deleting {path}: {e}"));
        let now = format!("{path}?gracePeriodSeconds=0");
        self.request(http::Method::DELETE, &now, None)
            .unwrap_or_else(|e| panic!("deleting {now}: {e}"));
    }

    /// A namespace, with the `default` ServiceAccount the controller
    /// would make (admission refuses pods without it).
    pub fn namespace(&self, name: &str, meshed: bool) {
        self.apply(&objects::namespace(name, meshed));
        self.apply(&service_account(name, "default"));
    }

    /// Creates the pod (bound to its node, as the scheduler would) and
    /// returns the uid the server gave it: kubelet names the pod's cgroup
    /// after it, so the test makes the pod's sandbox only now.
    pub fn create_pod(&self, spec: &objects::PodSpec<'_>) -> String {
        if spec.service_account != "default" {
            self.apply(&service_account(spec.namespace, spec.service_account));
        }
        let created = self.apply(&objects::pod(spec));
        created["metadata"]["uid"].as_str().expect("uid").to_owned()
    }

    /// A Node in `zone` at `ip`, its address written as kubelet reports it.
    pub fn node_at(&self, name: &str, zone: &str, ip: Ipv4Addr) {
        self.apply(&objects::node(name, zone));
        let addresses = json!({"status": {"addresses": [
            {"type": "InternalIP", "address": ip.to_string()},
            {"type": "Hostname", "address": name}]}});
        self.request(
            http::Method::PATCH,
            &format!("/api/v1/nodes/{name}/status"),
            Some(("application/merge-patch+json", addresses)),
        )
        .unwrap_or_else(|e| panic!("node status: {e}"));
    }

    /// Writes the pod's status as kubelet would once it runs: its IP,
    /// ready, one containerd container (`spec.uid` is the server's).
    pub fn pod_running(&self, spec: &objects::PodSpec<'_>) {
        let mut status = objects::pod(spec)["status"].clone();
        status["conditions"] = json!([
            {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
            {"type": "PodScheduled", "status": "True"},
        ]);
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}/status",
            spec.namespace, spec.name
        );
        self.request(
            http::Method::PATCH,
            &path,
            Some(("application/merge-patch+json", json!({ "status": status }))),
        )
        .unwrap_or_else(|e| panic!("pod status: {e}"));
    }

    /// Whether `user` may `verb` `resource` (in `namespace`, or anywhere):
    /// `kubectl auth can-i --as`, through a SubjectAccessReview.
    pub fn can(&self, user: &str, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
        let mut attributes = json!({"verb": verb, "resource": resource});
        if let Some(namespace) = namespace {
            attributes["namespace"] = json!(namespace);
        }
        if resource == "endpointslices" {
            attributes["group"] = json!("discovery.k8s.io");
        }
        let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "resourceAttributes": attributes,
                "groups": ["system:serviceaccounts", "system:authenticated"]}});
        let answer = self
            .request(
                http::Method::POST,
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                Some(("application/json", review)),
            )
            .unwrap_or_else(|e| panic!("access review: {e}"));
        answer["status"]["allowed"] == true
    }

    /// Creates what `manifest` holds for the agent's identity (its
    /// Namespace, ServiceAccount, ClusterRole and ClusterRoleBinding), as
    /// `kubectl apply` would.
    pub fn apply_rbac(&self, manifest: &Path) {
        let text = std::fs::read_to_string(manifest).expect("manifest");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(document).expect("YAML");
            let kind = object["kind"].as_str().unwrap_or_default();
            if [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&kind)
            {
                self.apply(&object);
                if kind == "Namespace" {
                    let name = object["metadata"]["name"].as_str().unwrap();
                    self.apply(&service_account(name, "default"));
                }
            }
        }
    }

    /// A kubeconfig for `namespace/service_account` with a fresh token
    /// from the TokenRequest API, written next to the cluster's files.
    pub fn service_account_kubeconfig(&self, namespace: &str, service_account: &str) -> PathBuf {
        let token = self.token(namespace, service_account, API_AUDIENCE, None);
        let file = self.dir.join(format!("{service_account}.kubeconfig"));
        std::fs::write(&file, kubeconfig(&self.url, &self.ca_pem, &token)).unwrap();
        file
    }

    /// A token of `namespace/service_account` for `audience` (TokenRequest
    /// API, an hour), bound to the pod `(name, uid)` when given, as the
    /// kubelet's projected tokens are.
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        pod: Option<(&str, &str)>,
    ) -> String {
        let path =
            format!("/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token");
        let mut spec = json!({"audiences": [audience], "expirationSeconds": 3600});
        if let Some((name, uid)) = pod {
            spec["boundObjectRef"] =
                json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid});
        }
        let request =
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
        let answer = self
            .request(
                http::Method::POST,
                &path,
                Some(("application/json", request)),
            )
            .unwrap_or_else(|e| panic!("token for {namespace}/{service_account}: {e}"));
        answer["status"]["token"]
            .as_str()
            .expect("a token")
            .to_owned()
    }

    /// `token` with the same claims but issued two hours ago and expiring
    /// `expires_in_s` from now (negative: expired), signed again with the
    /// server's own service-account key. (The TokenRequest API gives at
    /// least 10 minutes, so an expired token must be made this way.)
    pub fn signed_again(&self, token: &str, expires_in_s: i64) -> String {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
        let mut parts = token.split('.');
        let (header, claims) = (parts.next().unwrap(), parts.next().unwrap());
        let mut claims: Value = serde_json::from_slice(&B64.decode(claims).unwrap()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        claims["iat"] = json!(now - 7200);
        claims["nbf"] = json!(now - 7200);
        claims["exp"] = json!(now.saturating_add_signed(expires_in_s));
        let signed = format!("{header}.{}", B64.encode(claims.to_string()));
        let key = std::fs::read_to_string(self.dir.join("sa-key.pem")).unwrap();
        let signature = es256(&key, signed.as_bytes());
        format!("{signed}.{}", B64.encode(signature))
    }

    /// The directory of the cluster's files (kept when a test fails).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in the cluster's directory (removed with it).
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.controllers.clear();
        self.apiserver.take();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("cluster files kept at {}", self.dir.display());
        }
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).expect("log file")
}

fn service_account(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace}})
}

/// The REST path of a (namespaced or cluster) object of the kinds used here.
pub fn object_path(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"].as_str();
    let (group, plural) = match kind {
        "Namespace" => ("/api/v1", "namespaces"),
        "Node" => ("/api/v1", "nodes"),
        "Pod" => ("/api/v1", "pods"),
        "Service" => ("/api/v1", "services"),
        "ServiceAccount" => ("/api/v1", "serviceaccounts"),
        "ConfigMap" => ("/api/v1", "configmaps"),
        "DaemonSet" => ("/apis/apps/v1", "daemonsets"),
        "Deployment" => ("/apis/apps/v1", "deployments"),
        "EndpointSlice" => ("/apis/discovery.k8s.io/v1", "endpointslices"),
        "ClusterRole" => ("/apis/rbac.authorization.k8s.io/v1", "clusterroles"),
        "ClusterRoleBinding" => ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings"),
        "Role" => ("/apis/rbac.authorization.k8s.io/v1", "roles"),
        "RoleBinding" => ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
        other => panic!("no REST path for kind {other}"),
    };
    match namespace {
        Some(namespace) => format!("{group}/namespaces/{namespace}/{plural}/{name}"),
        None => format!("{group}/{plural}/{name}"),
    }
}

fn kubeconfig(url: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n"
    )
}

/// A kube client as the kubeconfig says.
async fn client_from(config: String) -> kube::Client {
    let kubeconfig: kube::config::Kubeconfig = serde_yaml::from_str(&config).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("admin kubeconfig");
    kube::Client::try_from(config).expect("admin client")
}

/// The cluster's CA, the API server's serving certificate (127.0.0.1)
/// and the service-account signing key, as PEM files in `dir`. Returns
/// the CA certificate.
fn write_certificates(dir: &Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mesh-tests cluster CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let serving_key = KeyPair::generate().unwrap();
    let mut serving = CertificateParams::new(vec!["kubernetes.default.svc".into()]).unwrap();
    serving
        .subject_alt_names
        .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    let serving = serving.signed_by(&serving_key, &ca, &ca_key).unwrap();
    let sa_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("serving.pem"), serving.pem()).unwrap();
    std::fs::write(dir.join("serving-key.pem"), serving_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("sa-key.pem"), sa_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("sa.pem"), sa_key.public_key_pem()).unwrap();
    ca.pem()
}

/// A JWS ES256 signature (r and s, 32 bytes each) of `message` with the
/// P-256 key in `key_pem`.
fn es256(key_pem: &str, message: &[u8]) -> Vec<u8> {
    use rustls::{
        SignatureScheme,
        pki_types::{PrivateKeyDer, pem::PemObject},
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("a PEM key");
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key)
        .expect("an ECDSA key")
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .expect("P-256");
    let der = signer.sign(message).expect("signed");
    // ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }, short lengths.
    let integer = |at: usize| {
        assert_eq!(der[at], 0x02, "an INTEGER");
        let len = usize::from(der[at + 1]);
        let value = &der[at + 2..at + 2 + len];
        let value = &value[value.len().saturating_sub(32)..];
        let mut padded = vec![0; 32 - value.len()];
        padded.extend_from_slice(value);
        (padded, at + 2 + len)
    };
    let (r, next) = integer(2);
    let (s, _) = integer(next);
    [r, s].concat()
}
