//! `mesh-agent ca serve` against the real API server of the Kubernetes
//! tests: TokenReview, pods and namespaces as they are, the CA service on
//! its own ServiceAccount with `deploy/mesh-ca.yaml`'s RBAC, and the
//! agent's client (`identity.istio`) asking as a node agent would, with a
//! token bound to its pod on node n1. Needs root (namespaces).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_agent::{
    identity::{
        CertificateAuthority, SpiffeId,
        ca::CaError,
        istio::{IstioCa, IstioCaConfig},
    },
    istio_ca::TOKEN_AUDIENCE,
};
use mesh_tests::{
    StopOnDrop,
    agent::{Agent, http_request},
    apiserver::objects::{self, PodSpec},
    cluster::{API_AUDIENCE, Cluster},
    eventually,
    kube_node::{run_pod, start_agent_with_identity},
    mesh_agent_bin,
    netns::NetNs,
    pod::{Connect, Server},
    process::{Guarded, enter},
    raw_hbone,
    scenario::answered_by,
    topology::Node,
};
use rcgen::{CertificateParams, KeyPair, SanType};

const PORT: u16 = 15012;
const METRICS: u16 = 15014;

/// A pod object on `node`, running (no sandbox: the CA service reads only
/// the API). Returns its uid.
fn pod(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    account: &str,
    node: &str,
    ip: u8,
) -> String {
    let spec = PodSpec {
        namespace,
        name,
        uid: "",
        node,
        ip: Ipv4Addr::new(10, 1, 0, ip),
        service_account: account,
        version: None,
    };
    let uid = cluster.create_pod(&spec);
    cluster.pod_running(&PodSpec { uid: &uid, ..spec });
    uid
}

/// Starts the CA service in `netns` on its own ServiceAccount's token.
fn start_ca(cluster: &Cluster, netns: &NetNs, ca_dir: &Path) -> Guarded {
    let kubeconfig = cluster.service_account_kubeconfig("mesh-system", "mesh-ca");
    let mut command = Command::new(mesh_agent_bin());
    command
        .args(["ca", "serve", "--ca-dir"])
        .arg(ca_dir)
        .args([
            &format!("--listen=127.0.0.1:{PORT}"),
            &format!("--metrics=127.0.0.1:{METRICS}"),
            "--serving-name=127.0.0.1",
        ])
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        // Beside the API server's log, kept when the test fails.
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(cluster.dir().join("mesh-ca.log"))
                .unwrap(),
        );
    enter(&mut command, &netns.path(), None);
    let process = Guarded::new(command.spawn().expect("mesh-agent ca serve"));
    eventually("the CA service listens", || {
        netns.run(|| std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, PORT)).is_ok())
    });
    process
}

/// The agent's client, with `token` as its projected token file.
fn client(cluster: &Cluster, ca_dir: &Path, name: &str, token: &str) -> IstioCa {
    client_of(ca_dir, &cluster.file(name, token))
}

/// The agent's client reading its token from `file`.
fn client_of(ca_dir: &Path, file: &Path) -> IstioCa {
    IstioCa::new(&IstioCaConfig {
        address: format!("https://127.0.0.1:{PORT}"),
        roots: ca_dir.join("root-cert.pem"),
        token: file.to_owned(),
        server_name: None,
    })
    .expect("client")
}

fn id(namespace: &str, account: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", namespace, account)
}

/// What the CA answered `client` for `identity`: the leaf's identity, or
/// the refusal's text.
async fn ask(client: &IstioCa, identity: &SpiffeId) -> Result<SpiffeId, String> {
    let key = KeyPair::generate().unwrap();
    match client
        .issue(identity, &key, Duration::from_secs(3600))
        .await
    {
        Ok(issued) => Ok(SpiffeId::from_cert(&issued.chain[0]).unwrap()),
        Err(CaError::Remote(message)) => Err(message),
        Err(other) => panic!("{other}"),
    }
}

/// A CSR for `identity` with more names in it.
fn csr_with(identity: &SpiffeId, more: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
    params.subject_alt_names.extend(more);
    params
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap()
        .pem()
        .unwrap()
}

#[test]
fn the_ca_signs_only_meshed_pods_on_the_callers_node() {
    let node = Node::new("kca", 1);
    let cluster = Cluster::start(&node.netns, "kca");
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    cluster.apply_rbac(&manifests.join("mesh-agent.yaml"));
    cluster.apply_rbac(&manifests.join("mesh-ca.yaml"));
    cluster.namespace("shop", true);
    cluster.namespace("plain", false);
    for name in ["n1", "n2"] {
        cluster.apply(&objects::node(name, "zone-a"));
    }
    let agent_uid = pod(
        &cluster,
        "mesh-system",
        "mesh-agent-n1",
        "mesh-agent",
        "n1",
        200,
    );
    pod(&cluster, "shop", "api-1", "api", "n1", 2);
    pod(&cluster, "shop", "web-1", "web", "n2", 3);
    pod(&cluster, "plain", "p-1", "p", "n1", 4);
    let ca_dir = std::env::temp_dir().join(mesh_tests::unique_name("kca-ca"));
    mesh_tests::run(
        mesh_agent_bin().to_str().unwrap(),
        &["ca-init", "--dir", ca_dir.to_str().unwrap()],
    );
    let _ca = start_ca(&cluster, &node.netns, &ca_dir);

    // Tokens as the kubelet projects them: for the CA's audience, bound to
    // the pod; and the ones an attacker or a mistake would bring.
    let agent_token = cluster.token(
        "mesh-system",
        "mesh-agent",
        TOKEN_AUDIENCE,
        Some(("mesh-agent-n1", &agent_uid)),
    );
    let api_uid = cluster
        .request(
            http::Method::GET,
            "/api/v1/namespaces/shop/pods/api-1",
            None,
        )
        .unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let workload_token = cluster.token("shop", "api", TOKEN_AUDIENCE, Some(("api-1", &api_uid)));
    let wrong_audience = cluster.token(
        "mesh-system",
        "mesh-agent",
        API_AUDIENCE,
        Some(("mesh-agent-n1", &agent_uid)),
    );
    let unbound = cluster.token("mesh-system", "mesh-agent", TOKEN_AUDIENCE, None);
    let expired = cluster.signed_again(&agent_token, -3600);
    // The same, unexpired: passes (so the signature above is right, and
    // only the expiry refuses it).
    let resigned = cluster.signed_again(&agent_token, 600);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    node.netns.run(|| {
        runtime.block_on(async {
            // (The client's channel needs the runtime it will run on.)
            let agent = client(&cluster, &ca_dir, "agent.token", &agent_token);
            // Its own node's meshed pod: signed, for exactly that identity.
            assert_eq!(ask(&agent, &id("shop", "api")).await, Ok(id("shop", "api")));
            let again = client(&cluster, &ca_dir, "resigned.token", &resigned);
            assert_eq!(ask(&again, &id("shop", "api")).await, Ok(id("shop", "api")));
            for (who, identity, expected) in [
                (
                    "another node's pod",
                    id("shop", "web"),
                    "is scheduled on node n1",
                ),
                ("a pod outside the mesh", id("plain", "p"), "is meshed"),
                (
                    "no such pod",
                    id("shop", "ghost"),
                    "is scheduled on node n1",
                ),
            ] {
                let refused = ask(&agent, &identity).await.unwrap_err();
                assert!(refused.contains(expected), "{who}: {refused}");
                assert!(refused.starts_with("PermissionDenied"), "{who}: {refused}");
            }
            for (who, token, expected) in [
                (
                    "a workload's own token",
                    &workload_token,
                    "is not a node agent",
                ),
                (
                    "a token for the API server",
                    &wrong_audience,
                    "not accepted",
                ),
                ("a token bound to no pod", &unbound, "not bound to a pod"),
                ("an expired token", &expired, "expired"),
                ("no token at all", &String::new(), "no bearer token"),
                ("garbage", &"x.y.z".to_owned(), "not accepted"),
            ] {
                let client = client(&cluster, &ca_dir, "other.token", token);
                let refused = ask(&client, &id("shop", "api")).await.unwrap_err();
                assert!(refused.contains(expected), "{who}: {refused}");
            }
            // CSRs a node agent never sends.
            let api = id("shop", "api");
            for (who, csr, expected) in [
                (
                    "an extra DNS name",
                    csr_with(&api, vec![SanType::DnsName("api.shop".try_into().unwrap())]),
                    "not allowed",
                ),
                (
                    "a second identity",
                    csr_with(
                        &api,
                        vec![SanType::URI(
                            "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
                        )],
                    ),
                    "2 URI SANs",
                ),
                ("a weak key", weak_csr(&api), "RSA of 1024 bits"),
            ] {
                let refused = agent
                    .send(csr, &api.to_string(), Duration::from_secs(60))
                    .await
                    .map(|_| ())
                    .unwrap_err()
                    .to_string();
                assert!(refused.contains("InvalidArgument"), "{who}: {refused}");
                assert!(refused.contains(expected), "{who}: {refused}");
            }
        });
    });
    // Every decision counted by reason.
    let (_, metrics) = http_request(&node.netns.path(), "GET", METRICS, "/metrics")
        .expect("the CA service's metrics");
    for line in [
        "mesh_ca_certificates_issued_total 2",
        "mesh_ca_certificates_refused_total{reason=\"not_on_callers_node\"} 2",
        "mesh_ca_certificates_refused_total{reason=\"not_meshed\"} 1",
        "mesh_ca_certificates_refused_total{reason=\"not_a_node_agent\"} 1",
        "mesh_ca_certificates_refused_total{reason=\"unauthenticated\"} 4",
        "mesh_ca_certificates_refused_total{reason=\"caller_node_unknown\"} 1",
        "mesh_ca_certificates_refused_total{reason=\"bad_csr\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }

    // Istio's own wire format: a client generated from Istio's proto by
    // Python's grpcio gets a chain for the same request, and a refusal
    // with the same status.
    let api = id("shop", "api");
    let csr = cluster.file("api.csr", &csr_with(&api, Vec::new()));
    let token = cluster.file("agent-py.token", &agent_token);
    let answer = python_client(&node.netns, &ca_dir, &token, &csr, &api);
    let chain: Vec<&str> = answer["cert_chain"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let leaf = mesh_agent::identity::ca::pem_certs(chain[0]).unwrap();
    assert_eq!(SpiffeId::from_cert(&leaf[0]).unwrap(), api);
    assert!(chain.len() >= 2, "the root goes last: {answer}");
    let web = id("shop", "web");
    let csr = cluster.file("web.csr", &csr_with(&web, Vec::new()));
    let answer = python_client(&node.netns, &ca_dir, &token, &csr, &web);
    assert_eq!(answer["code"], "PERMISSION_DENIED", "{answer}");
    let _ = std::fs::remove_dir_all(&ca_dir);
}

/// Runs tests/python/ca_client.py (grpcio, `cargo xtask` installs it) in
/// `netns` against the CA service; its JSON answer.
fn python_client(
    netns: &NetNs,
    ca_dir: &Path,
    token: &Path,
    csr: &Path,
    identity: &SpiffeId,
) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/ca_client.py");
    let mut command = Command::new("python3");
    command
        .arg(script)
        .arg(format!("127.0.0.1:{PORT}"))
        .arg(ca_dir.join("root-cert.pem"))
        .args([token, csr])
        .arg(identity.to_string());
    enter(&mut command, &netns.path(), None);
    let output = command.output().expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "ca_client.py: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// An RSA-1024 CSR for `identity`, made by openssl (neither rcgen nor
/// ring makes RSA keys).
fn weak_csr(identity: &SpiffeId) -> String {
    let output = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/",
        ])
        .arg("-addext")
        .arg(format!("subjectAltName=URI:{identity}"))
        .output()
        .expect("openssl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Two nodes whose agents hold no signing key (`identity.istio`): each
/// gets its pods' certificates from the CA service (on node 1, relayed to
/// node 2's loopback) with a token bound to its own pod. `kc`
/// (frontend) runs on node 1, `ks` (api) serves on node 2 behind the
/// Service `echo` at [`KeylessNodes::VIP`]:80. Fields drop in order.
struct KeylessNodes {
    agent2: Agent,
    agent1: Agent,
    /// The CA service's process, while it runs.
    ca: Mutex<Option<Guarded>>,
    _server: Server,
    ca_dir: PathBuf,
    tokens: [PathBuf; 2],
    cluster: Cluster,
    n2: Node,
    n1: Node,
}

impl KeylessNodes {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

    /// With certificates valid `cert_lifetime_s` when given.
    fn start(label: &str, cert_lifetime_s: Option<u64>) -> Self {
        let mut n1 = Node::new(label, 1);
        let mut n2 = Node::new(label, 2);
        mesh_tests::topology::connect(&mut n1, &mut n2);
        let cluster = Cluster::start(&n1.netns, label);
        cluster.reach_from(&n2.netns);
        let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        cluster.apply_rbac(&manifests.join("mesh-agent.yaml"));
        cluster.apply_rbac(&manifests.join("mesh-ca.yaml"));
        cluster.namespace("shop", true);
        for node in [&n1, &n2] {
            cluster.node_at(&node.name, "zone-a", node.ip);
        }
        run_pod(&cluster, &mut n1, "kc", "frontend");
        run_pod(&cluster, &mut n2, "ks", "api");
        let server = n2.pod("ks").serve(8080, "ks", false);
        let ca_dir = std::env::temp_dir().join(mesh_tests::unique_name(&format!("{label}-ca")));
        mesh_tests::run(
            mesh_agent_bin().to_str().unwrap(),
            &["ca-init", "--dir", ca_dir.to_str().unwrap()],
        );
        let ca = start_ca(&cluster, &n1.netns, &ca_dir);
        cluster.relay(PORT, &n2.netns);
        // Each agent's own pod on its node, and its projected token.
        let token_file = |node: &Node, ip: u8| {
            let name = format!("mesh-agent-{ip}");
            let uid = pod(&cluster, "mesh-system", &name, "mesh-agent", &node.name, ip);
            let token = cluster.token(
                "mesh-system",
                "mesh-agent",
                TOKEN_AUDIENCE,
                Some((&name, &uid)),
            );
            cluster.file(&format!("{name}.token"), &token)
        };
        let tokens = [token_file(&n1, 201), token_file(&n2, 202)];
        let lifetime = cert_lifetime_s
            .map(|s| format!(", cert_lifetime_s: {s}"))
            .unwrap_or_default();
        let identity = |token: &Path| {
            format!(
                "{{ istio: {{ address: 'https://127.0.0.1:{PORT}', roots: {}, token: {} }}{lifetime} }}",
                ca_dir.join("root-cert.pem").display(),
                token.display()
            )
        };
        let kubeconfig = cluster.service_account_kubeconfig("mesh-system", "mesh-agent");
        let agent1 = start_agent_with_identity(&n1, &kubeconfig, &identity(&tokens[0]), "");
        let agent2 = start_agent_with_identity(&n2, &kubeconfig, &identity(&tokens[1]), "");
        cluster.apply(&objects::service("shop", "echo", Self::VIP, 80, "http"));
        cluster.apply(&objects::endpoint_slice(
            "shop",
            "echo-1",
            "echo",
            8080,
            &[(n2.pod("ks").ip, n2.name.as_str(), "ks")],
        ));
        let t = Self {
            agent2,
            agent1,
            ca: Mutex::new(Some(ca)),
            _server: server,
            ca_dir,
            tokens,
            cluster,
            n2,
            n1,
        };
        eventually("traffic to ks over HBONE", || t.reaches_ks().is_ok());
        t
    }

    /// One new connection from `kc` to the Service: answered by `ks`, or
    /// why not.
    fn reaches_ks(&self) -> Result<(), String> {
        let reports = self
            .n1
            .pod("kc")
            .try_connect((Self::VIP, 80).into(), Connect::default())?;
        match answered_by(&reports) == ["ks"] {
            true => Ok(()),
            false => Err(format!("{reports:?}")),
        }
    }
}

impl Drop for KeylessNodes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.ca_dir);
    }
}

/// The two agents of [`KeylessNodes`] talk over HBONE with their
/// certificates from the CA service. Node 1's credential cannot get node
/// 2's identity, and node 2 refuses an identity shown from the wrong node.
#[test]
fn agents_without_a_key_talk_over_hbone_with_certificates_from_the_ca_service() {
    let t = KeylessNodes::start("kcab", None);
    let (n1, n2, agent1, agent2, ca_dir) = (&t.n1, &t.n2, &t.agent1, &t.agent2, &t.ca_dir);
    assert!(agent2.stats()["inbound"]["streams"].as_u64() > Some(0));
    let frontend = id("shop", "frontend").to_string();
    let certificates = agent1.stats()["certificates"].to_string();
    assert!(certificates.contains(&frontend), "{certificates}");
    assert!(
        agent2.stats()["certificates"]
            .to_string()
            .contains("/sa/api")
    );
    assert!(
        agent2.log().contains(&frontend),
        "the server's agent did not see the client"
    );
    // A meshed pod scheduled on node 1 whose sandbox is not there yet:
    // its certificate is fetched ahead, before its first connection.
    pod(&t.cluster, "shop", "fresh-1", "fresh", &n1.name, 50);
    eventually("the certificate of a pod about to start", || {
        agent1.stats()["certificates"]
            .to_string()
            .contains("/ns/shop/sa/fresh")
    });
    // No signing key anywhere on either node.
    for node in [&n1, &n2] {
        assert!(!node.ca_dir.join("ca-key.pem").exists());
    }
    // A certificate shown from the wrong node is refused. Node 1 with a
    // signing key (an embedded or files CA, or a CA that erred) could
    // mint `api`'s certificate; node 2 knows `api` runs only on itself.
    // `frontend`'s, from node 1 where it runs, passes.
    let gateway = SocketAddr::from((n2.pod("ks").ip, 15008));
    let target = SocketAddr::from((n2.pod("ks").ip, 8080));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = |as_who: &str| {
        runtime.block_on(async {
            let mut sender = raw_hbone::connect(
                &n1.netns,
                ca_dir,
                &id("shop", as_who),
                &id("shop", "api"),
                gateway,
            )
            .await?;
            raw_hbone::answer(&mut sender, raw_hbone::connect_request(target)).await
        })
    };
    assert_eq!(status("frontend"), Ok(200));
    let stolen = status("api");
    assert!(stolen.is_err(), "api's certificate from node 1: {stolen:?}");
    assert_eq!(agent2.stats()["inbound"]["not_on_peer_node"], 1);
    let refusal = format!(
        "{} is the identity of no workload on the peer's node {}",
        id("shop", "api"),
        n1.name
    );
    assert!(agent2.log().contains(&refusal), "{refusal}");
    // Node 1's credential, stolen, still gets only node 1's identities.
    n1.netns.run(|| {
        runtime.block_on(async {
            let stolen = client_of(ca_dir, &t.tokens[0]);
            let refused = ask(&stolen, &id("shop", "api")).await.unwrap_err();
            assert!(refused.contains("is scheduled on node"), "{refused}");
            assert_eq!(
                ask(&stolen, &id("shop", "frontend")).await,
                Ok(id("shop", "frontend"))
            );
        });
    });
}

/// Rotation and a CA outage under live HBONE traffic. Certificates are
/// valid 70 s, renewed at half-life; the CA service is stopped 15 s after
/// they were issued and started again 30 s later, so every renewal (due
/// at 35 s) first fails, and must catch up before expiry. All the while a
/// new connection every 100 ms and one long-lived stream cross the nodes:
/// none may fail, and the renewed certificates carry new HBONE
/// connections (a pooled connection on a replaced certificate takes no
/// new streams).
#[test]
fn renewals_ride_out_a_ca_outage_under_live_traffic() {
    const LIFETIME_S: u64 = 70;
    let t = KeylessNodes::start("kcar", Some(LIFETIME_S));
    let certificates = |agent: &Agent| -> Vec<(u64, u64)> {
        agent.stats()["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["not_after"].as_u64().unwrap(),
                    c["renewals"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let first: Vec<(u64, u64)> = [&t.agent1, &t.agent2]
        .iter()
        .flat_map(|a| certificates(a))
        .collect();
    assert_eq!(first.len(), 2, "{first:?}");
    // The earliest issue: the timeline is measured from it.
    let issued = UNIX_EPOCH
        + Duration::from_secs(first.iter().map(|(not_after, _)| *not_after).min().unwrap())
        - Duration::from_secs(LIFETIME_S);
    let at = |s: u64| issued + Duration::from_secs(s);
    let sleep_until = |when: SystemTime| {
        if let Ok(wait) = when.duration_since(SystemTime::now()) {
            std::thread::sleep(wait);
        }
    };
    let held = t.n1.pod("kc").hold((KeylessNodes::VIP, 80).into());
    assert_eq!(
        held.greeting.split(' ').next(),
        Some("ks"),
        "{}",
        held.greeting
    );
    let stop = AtomicBool::new(false);
    let (attempts, failures) = std::thread::scope(|scope| {
        // A failed assertion below must stop the traffic too, or the
        // scope would wait for it for ever.
        let _stop = StopOnDrop(&stop);
        let traffic = scope.spawn(|| {
            let (mut attempts, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                attempts += 1;
                if let Err(error) = t.reaches_ks() {
                    failures.push(format!(
                        "{:?}: {error}",
                        SystemTime::now().duration_since(issued)
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (attempts, failures)
        });
        sleep_until(at(15));
        drop(t.ca.lock().unwrap().take());
        sleep_until(at(45));
        // HBONE connections so far, all on the first certificates.
        let inbound = || t.agent2.stats()["inbound"]["connections"].as_u64().unwrap();
        let before = inbound();
        *t.ca.lock().unwrap() = Some(start_ca(&t.cluster, &t.n1.netns, &t.ca_dir));
        // Renewals catch up, well before the first certificates expire.
        let renewed = || {
            [&t.agent1, &t.agent2]
                .iter()
                .all(|a| certificates(a).iter().all(|(_, renewals)| *renewals >= 1))
        };
        while !renewed() {
            assert!(
                SystemTime::now() < at(LIFETIME_S - 5),
                "no renewal after the CA came back: {}",
                t.agent1.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eventually("HBONE connections on the renewed certificates", || {
            inbound() > before
        });
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap()
    });
    assert!(
        failures.is_empty(),
        "{} of {attempts} failed: {failures:#?}",
        failures.len()
    );
    assert!(attempts > 250, "{attempts} connections");
    println!("{attempts} new connections through the outage, none failed");
    let report = held.release();
    assert_eq!(
        report["reply"],
        format!("0 {}", report["sent_sha256"].as_str().unwrap()),
        "{report}"
    );
    for agent in [&t.agent1, &t.agent2] {
        assert!(
            agent.log().contains("renewing the certificate failed"),
            "the outage went unnoticed: {}",
            agent.log()
        );
        // Every certificate held now outlives the first ones.
        let first_expiry = first.iter().map(|(not_after, _)| *not_after).max().unwrap();
        assert!(
            certificates(agent)
                .iter()
                .all(|(not_after, _)| *not_after > first_expiry)
        );
    }
    assert_eq!(t.agent2.stats()["inbound"]["refused"], 0);
}
