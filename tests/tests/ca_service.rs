//! `mesh-agent ca serve` against the real API server of the Kubernetes
//! tests: TokenReview, pods and namespaces as they are, the CA service on
//! its own ServiceAccount with `deploy/mesh-ca.yaml`'s RBAC, and the
//! agent's client (`identity.istio`) asking as a node agent would, with a
//! token bound to its pod on node n1. Needs root (namespaces).

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
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
    agent::http_request,
    apiserver::objects::{self, PodSpec},
    cluster::{API_AUDIENCE, Cluster},
    eventually,
    kube_node::{run_pod, start_agent_with_identity},
    mesh_agent_bin,
    netns::NetNs,
    pod::Connect,
    process::{Guarded, enter},
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
        .stderr(std::fs::File::create(cluster.file("mesh-ca.log", "")).unwrap());
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
        "mesh_ca_certificates_issued_total 1",
        "mesh_ca_certificates_refused_total{reason=\"not_on_callers_node\"} 2",
        "mesh_ca_certificates_refused_total{reason=\"not_meshed\"} 1",
        "mesh_ca_certificates_refused_total{reason=\"not_a_node_agent\"} 1",
        "mesh_ca_certificates_refused_total{reason=\"unauthenticated\"} 3",
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

/// Two agents that hold no signing key (`identity.istio`): each gets its
/// pods' certificates from the CA service with a token bound to its own
/// pod, and a client on node 1 reaches a server on node 2 over HBONE
/// with them. Node 1's credential cannot get node 2's identity.
#[test]
fn agents_without_a_key_talk_over_hbone_with_certificates_from_the_ca_service() {
    let mut n1 = Node::new("kcab", 1);
    let mut n2 = Node::new("kcab", 2);
    mesh_tests::topology::connect(&mut n1, &mut n2);
    let cluster = Cluster::start(&n1.netns, "kcab");
    cluster.reach_from(&n2.netns);
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    cluster.apply_rbac(&manifests.join("mesh-agent.yaml"));
    cluster.apply_rbac(&manifests.join("mesh-ca.yaml"));
    cluster.namespace("shop", true);
    for node in [&n1, &n2] {
        cluster.apply(&objects::node(&node.name, "zone-a"));
    }
    run_pod(&cluster, &mut n1, "kc", "frontend");
    run_pod(&cluster, &mut n2, "ks", "api");
    let _server = n2.pod("ks").serve(8080, "ks", false);
    let ca_dir = std::env::temp_dir().join(mesh_tests::unique_name("kcab-ca"));
    mesh_tests::run(
        mesh_agent_bin().to_str().unwrap(),
        &["ca-init", "--dir", ca_dir.to_str().unwrap()],
    );
    let _ca = start_ca(&cluster, &n1.netns, &ca_dir);
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
    let identity = |token: &Path| {
        format!(
            "{{ istio: {{ address: 'https://127.0.0.1:{PORT}', roots: {}, token: {} }} }}",
            ca_dir.join("root-cert.pem").display(),
            token.display()
        )
    };
    let kubeconfig = cluster.service_account_kubeconfig("mesh-system", "mesh-agent");
    let agent1 = start_agent_with_identity(&n1, &kubeconfig, &identity(&tokens[0]), "");
    let agent2 = start_agent_with_identity(&n2, &kubeconfig, &identity(&tokens[1]), "");
    let vip = Ipv4Addr::new(10, 96, 0, 30);
    cluster.apply(&objects::service("shop", "echo", vip, 80, "http"));
    cluster.apply(&objects::endpoint_slice(
        "shop",
        "echo-1",
        "echo",
        8080,
        &[(n2.pod("ks").ip, n2.name.as_str(), "ks")],
    ));
    let client = n1.pod("kc");
    eventually("traffic to ks over HBONE", || {
        client
            .try_connect((vip, 80).into(), Connect::default())
            .is_ok_and(|r| answered_by(&r) == ["ks"])
    });
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
    // No signing key anywhere on either node.
    for node in [&n1, &n2] {
        assert!(!node.ca_dir.join("ca-key.pem").exists());
    }
    // Node 1's credential, stolen, still gets only node 1's identities.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    n1.netns.run(|| {
        runtime.block_on(async {
            let stolen = client_of(&ca_dir, &tokens[0]);
            let refused = ask(&stolen, &id("shop", "api")).await.unwrap_err();
            assert!(refused.contains("is scheduled on node"), "{refused}");
            assert_eq!(
                ask(&stolen, &id("shop", "frontend")).await,
                Ok(id("shop", "frontend"))
            );
        });
    });
    let _ = std::fs::remove_dir_all(&ca_dir);
}
