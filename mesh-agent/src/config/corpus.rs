//! The bad-config corpus: every entry is a malformed config that must be
//! refused with the field it names (and, where the parser knows it, the
//! line), never a panic. `check` and `run` both go through
//! [`Config::parse_with`], so this is what either would say.

use super::*;

/// A config that passes; each corpus entry changes one thing in it.
const GOOD: &str = r#"node: { name: n1, cgroup: /sys/fs/cgroup/unified/mesh/n1, uplinks: [eth0] }
proxy: { outbound_port: 15001, inbound_port: 15008, connect_timeout_ms: 5000 }
identity: { trust_domain: cluster.local, cert_lifetime_s: 86400 }
hbone: { max_connections_per_peer: 4, streams_per_connection: 2, kernel_tls: auto }
workloads:
  - { name: a, namespace: shop, service_account: web, ips: [10.1.0.2], interface: veth-a, cgroup: a, quota: { rate: 10, concurrent: 4 } }
  - { name: b, ips: [10.1.0.3], node: n2 }
services:
  - name: echo
    vip: 10.96.0.10
    ports: [{ port: 80, target_port: 8080 }]
    endpoints: [{ ip: 10.1.0.3, subset: v1 }, { ip: 10.1.0.4, weight: 3, subset: v2 }]
    splits: [{ subset: v1, weight: 90 }, { subset: v2, weight: 10 }]
    resilience:
      connect_timeout_ms: 1000
      retry: { retries: 2, budget_percent: 20 }
      outlier_detection: { consecutive_failures: 5, base_ejection_ms: 1000, max_ejection_ms: 60000 }
      health_check: { interval_ms: 1000, timeout_ms: 500, healthy_threshold: 2, unhealthy_threshold: 3 }
      quota: { rate: 100, burst: 50, concurrent: 20, overall: { rate: 1000, concurrent: 500 } }
    faults: { from: { namespaces: [shop] }, delay: { percent: 10, ms: 100 }, refuse: { percent: 5 }, cut: { percent: 1, after_bytes: 4096 } }
authorization:
  default_action: allow
  rules:
    - { action: deny, from: { principals: ["spiffe://cluster.local/ns/x/*"], ip_blocks: [10.9.0.0/16] }, to: { ports: [80] } }
nodes: [{ name: n2, addresses: [192.168.0.2] }, { name: n3, addresses: [192.168.0.3] }]
tracing: { otlp_endpoint: "http://10.0.0.9:4317", protocol: grpc, sampling_ratio: 0.1, service_name: mesh }
"#;

/// (what changes, the text it replaces, its replacement, what the error
/// must name, the line it must give if any)
type Entry = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<usize>,
);

const CORPUS: &[Entry] = &[
    // Syntax and types.
    ("not YAML", "node: {", "node: {{{", "config", None),
    (
        "unknown field",
        "name: echo",
        "name: echo\n    colour: blue",
        "unknown field `colour`",
        Some(10),
    ),
    (
        "unknown top-level section",
        "hbone:",
        "hbon:",
        "unknown field `hbon`",
        None,
    ),
    (
        "port as text",
        "outbound_port: 15001",
        "outbound_port: high",
        "proxy.outbound_port",
        None,
    ),
    (
        "port above 65535",
        "outbound_port: 15001",
        "outbound_port: 70000",
        "proxy.outbound_port",
        None,
    ),
    (
        "negative timeout",
        "connect_timeout_ms: 5000",
        "connect_timeout_ms: -1",
        "proxy.connect_timeout_ms",
        None,
    ),
    (
        "float lifetime",
        "cert_lifetime_s: 86400",
        "cert_lifetime_s: 1e12",
        "identity.cert_lifetime_s",
        None,
    ),
    (
        "bad IP",
        "vip: 10.96.0.10",
        "vip: 10.96.0.300",
        "services[0].vip",
        Some(10),
    ),
    (
        "IPv6 VIP",
        "vip: 10.96.0.10",
        "vip: fd00::1",
        "services[0].vip",
        Some(10),
    ),
    (
        "mode misspelt",
        "cgroup: a,",
        "cgroup: a, mode: stric,",
        "workloads[0].mode",
        None,
    ),
    (
        "policy misspelt",
        "name: echo",
        "name: echo\n    policy: fastest",
        "services[0].policy",
        None,
    ),
    (
        "prefix length with a sign",
        "10.9.0.0/16",
        "10.9.0.0/+8",
        "authorization.rules[0].from.ip_blocks",
        Some(24),
    ),
    (
        "prefix length above 32",
        "10.9.0.0/16",
        "10.9.0.0/33",
        "authorization.rules[0].from.ip_blocks",
        Some(24),
    ),
    (
        "action misspelt",
        "action: deny",
        "action: refuse",
        "authorization.rules[0].action",
        None,
    ),
    // Node and proxy.
    (
        "empty node name",
        "name: n1,",
        "name: '',",
        "node.name",
        Some(1),
    ),
    (
        "outbound port 0",
        "outbound_port: 15001",
        "outbound_port: 0",
        "proxy",
        Some(2),
    ),
    (
        "same proxy ports",
        "inbound_port: 15008",
        "inbound_port: 15001",
        "proxy.inbound_port",
        Some(2),
    ),
    (
        "proxy on the admin port",
        "outbound_port: 15001",
        "outbound_port: 15000",
        "proxy.outbound_port",
        Some(2),
    ),
    (
        "proxy on the metrics port",
        "inbound_port: 15008",
        "inbound_port: 15020",
        "proxy.inbound_port",
        Some(2),
    ),
    (
        "connect timeout 0",
        "connect_timeout_ms: 5000",
        "connect_timeout_ms: 0",
        "proxy.connect_timeout_ms",
        Some(2),
    ),
    (
        "connect timeout of days",
        "connect_timeout_ms: 5000",
        "connect_timeout_ms: 864000000",
        "proxy.connect_timeout_ms",
        Some(2),
    ),
    (
        "uplink with a slash",
        "uplinks: [eth0]",
        "uplinks: [eth/0]",
        "node.uplinks",
        Some(1),
    ),
    // Identity.
    (
        "trust domain with a space",
        "trust_domain: cluster.local",
        "trust_domain: cluster local",
        "identity.trust_domain",
        Some(3),
    ),
    (
        "trust domain with a slash",
        "trust_domain: cluster.local",
        "trust_domain: a/b",
        "identity.trust_domain",
        Some(3),
    ),
    (
        "trust domain in capitals",
        "trust_domain: cluster.local",
        "trust_domain: Cluster.Local",
        "identity.trust_domain",
        Some(3),
    ),
    (
        "empty trust domain",
        "trust_domain: cluster.local",
        "trust_domain: ''",
        "identity.trust_domain",
        Some(3),
    ),
    (
        "a CA address without TLS",
        "cert_lifetime_s: 86400",
        "cert_lifetime_s: 86400, istio: { address: 'http://ca:15012', roots: /r.pem, token: /t }",
        "identity.istio.address",
        Some(3),
    ),
    (
        "signing files and a CA service",
        "cert_lifetime_s: 86400",
        "cert_lifetime_s: 86400, istio: { address: 'https://ca:15012', roots: /r.pem, token: /t }, ca: { cert: /c, key: /k, roots: /r }",
        "identity.istio",
        Some(3),
    ),
    (
        "lifetime of 1 s",
        "cert_lifetime_s: 86400",
        "cert_lifetime_s: 1",
        "identity.cert_lifetime_s",
        Some(3),
    ),
    (
        "lifetime of 30,000 years",
        "cert_lifetime_s: 86400",
        "cert_lifetime_s: 1000000000000",
        "identity.cert_lifetime_s",
        Some(3),
    ),
    (
        "no HBONE connections",
        "max_connections_per_peer: 4",
        "max_connections_per_peer: 0",
        "hbone.max_connections_per_peer",
        Some(4),
    ),
    (
        "kernel TLS neither auto, on nor off",
        "kernel_tls: auto",
        "kernel_tls: sometimes",
        "unknown variant `sometimes`",
        Some(4),
    ),
    (
        "more streams than the server takes",
        "streams_per_connection: 2",
        "streams_per_connection: 1000",
        "hbone.streams_per_connection",
        Some(4),
    ),
    // Workloads.
    (
        "workload without IPs",
        "ips: [10.1.0.2]",
        "ips: []",
        "workloads[0].ips",
        Some(6),
    ),
    (
        "workload on 0.0.0.0",
        "ips: [10.1.0.2]",
        "ips: [0.0.0.0]",
        "workloads[0].ips",
        Some(6),
    ),
    (
        "workload on loopback",
        "ips: [10.1.0.2]",
        "ips: [127.0.0.1]",
        "workloads[0].ips",
        Some(6),
    ),
    (
        "workload on a multicast address",
        "ips: [10.1.0.2]",
        "ips: [224.0.0.1]",
        "workloads[0].ips",
        Some(6),
    ),
    (
        "two workloads, one IP",
        "ips: [10.1.0.3]",
        "ips: [10.1.0.2]",
        "workloads[1].ips",
        Some(7),
    ),
    (
        "workload name with a slash",
        "name: a,",
        "name: a/b,",
        "workloads[0].name",
        Some(6),
    ),
    (
        "workload name in capitals",
        "name: a,",
        "name: Web,",
        "workloads[0].name",
        Some(6),
    ),
    (
        "namespace with a space",
        "namespace: shop",
        "namespace: 'my shop'",
        "workloads[0].namespace",
        Some(6),
    ),
    (
        "service account of 300 bytes",
        "service_account: web",
        "service_account: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "workloads[0].service_account",
        Some(6),
    ),
    (
        "local workload without an interface",
        ", interface: veth-a",
        "",
        "workloads[0].interface",
        None,
    ),
    (
        "interface name too long",
        "interface: veth-a",
        "interface: veth-aaaaaaaaaaaaa",
        "workloads[0].interface",
        Some(6),
    ),
    (
        "interface name with white space",
        "interface: veth-a",
        "interface: 'veth a'",
        "workloads[0].interface",
        Some(6),
    ),
    (
        "remote workload with an interface",
        "node: n2 }",
        "node: n2, interface: veth-b }",
        "workloads[1].interface",
        Some(7),
    ),
    // Trust domain aliases.
    (
        "the trust domain as its own alias",
        "cert_lifetime_s: 86400 }",
        "cert_lifetime_s: 86400, trust_domain_aliases: [old.example, cluster.local] }",
        "identity.trust_domain_aliases[1]",
        Some(3),
    ),
    (
        "an alias that is no trust domain",
        "cert_lifetime_s: 86400 }",
        "cert_lifetime_s: 86400, trust_domain_aliases: ['Old Example'] }",
        "identity.trust_domain_aliases[0]",
        Some(3),
    ),
    // Nodes.
    (
        "a node without addresses",
        "addresses: [192.168.0.3]",
        "addresses: []",
        "nodes[1].addresses",
        Some(25),
    ),
    (
        "two nodes at one address",
        "addresses: [192.168.0.3]",
        "addresses: [192.168.0.2]",
        "nodes[1].addresses",
        Some(25),
    ),
    (
        "a node twice",
        "name: n3",
        "name: n2",
        "nodes[1].name",
        Some(25),
    ),
    (
        "a node name that is no name",
        "name: n3",
        "name: N_3",
        "nodes[1].name",
        Some(25),
    ),
    (
        "a node address that is no address",
        "addresses: [192.168.0.3]",
        "addresses: [192.168.0.300]",
        "nodes",
        Some(25),
    ),
    // Services.
    (
        "empty service name",
        "name: echo",
        "name: ''",
        "services[0].name",
        Some(9),
    ),
    (
        "two services, one name",
        "authorization:",
        "  - { name: echo, vip: 10.96.0.11, ports: [{ port: 80 }] }\nauthorization:",
        "services[1].name",
        Some(21),
    ),
    (
        "VIP on 0.0.0.0",
        "vip: 10.96.0.10",
        "vip: 0.0.0.0",
        "services[0].vip",
        Some(10),
    ),
    (
        "VIP on loopback",
        "vip: 10.96.0.10",
        "vip: 127.0.0.53",
        "services[0].vip",
        Some(10),
    ),
    (
        "VIP is a workload's IP",
        "vip: 10.96.0.10",
        "vip: 10.1.0.2",
        "services[0].vip",
        Some(10),
    ),
    (
        "service without ports",
        "ports: [{ port: 80, target_port: 8080 }]",
        "ports: []",
        "services[0].ports",
        Some(11),
    ),
    (
        "target port 0",
        "target_port: 8080",
        "target_port: 0",
        "services[0].ports[0]",
        Some(11),
    ),
    (
        "port listed twice",
        "ports: [{ port: 80, target_port: 8080 }]",
        "ports: [{ port: 80 }, { port: 80 }]",
        "services[0].ports[1]",
        Some(11),
    ),
    (
        "endpoint on 0.0.0.0",
        "{ ip: 10.1.0.3, subset: v1 }",
        "{ ip: 0.0.0.0, subset: v1 }",
        "services[0].endpoints[0].ip",
        Some(12),
    ),
    (
        "endpoint on loopback",
        "{ ip: 10.1.0.3, subset: v1 }",
        "{ ip: 127.0.0.1, subset: v1 }",
        "services[0].endpoints[0].ip",
        Some(12),
    ),
    (
        "endpoint listed twice",
        "ip: 10.1.0.4,",
        "ip: 10.1.0.3,",
        "services[0].endpoints[1].ip",
        Some(12),
    ),
    (
        "weight of billions",
        "weight: 3,",
        "weight: 3000000000,",
        "services[0].endpoints[1].weight",
        Some(12),
    ),
    (
        "split on an empty subset",
        "{ subset: v2, weight: 10 }",
        "{ subset: v3, weight: 10 }",
        "services[0].splits[1].subset",
        Some(13),
    ),
    (
        "split listed twice",
        "{ subset: v2, weight: 10 }",
        "{ subset: v1, weight: 10 }",
        "services[0].splits[1].subset",
        Some(13),
    ),
    (
        "every split at 0",
        "weight: 90 }, { subset: v2, weight: 10 }",
        "weight: 0 }, { subset: v2, weight: 0 }",
        "services[0].splits",
        Some(13),
    ),
    (
        "a quota of no connection a second",
        "quota: { rate: 100,",
        "quota: { rate: 0,",
        "services[0].resilience.quota.rate",
        Some(19),
    ),
    (
        "a quota that limits nothing",
        "quota: { rate: 100, burst: 50, concurrent: 20, overall: { rate: 1000, concurrent: 500 } }",
        "quota: { burst: 50 }",
        "services[0].resilience.quota",
        Some(19),
    ),
    (
        "refuse more than every connection",
        "refuse: { percent: 5 }",
        "refuse: { percent: 101 }",
        "services[0].faults.refuse.percent",
        Some(20),
    ),
    (
        "a delay of nothing",
        "ms: 100 }",
        "ms: 0 }",
        "services[0].faults.delay.ms",
        Some(20),
    ),
    (
        "a fault for a client that is no SPIFFE pattern",
        "from: { namespaces: [shop] }",
        "from: { principals: [shop/web] }",
        "services[0].faults.from.principals[0]",
        Some(20),
    ),
    (
        "a cut of no percentage",
        "cut: { percent: 1, after_bytes: 4096 }",
        "cut: { after_bytes: 4096 }",
        "services[0].faults.cut",
        Some(20),
    ),
    (
        "service connect timeout 0",
        "connect_timeout_ms: 1000",
        "connect_timeout_ms: 0",
        "services[0].resilience.connect_timeout_ms",
        Some(15),
    ),
    (
        "a thousand retries",
        "retries: 2",
        "retries: 1000",
        "services[0].resilience.retry.retries",
        Some(16),
    ),
    (
        "budget above 100%",
        "budget_percent: 20",
        "budget_percent: 500",
        "services[0].resilience.retry.budget_percent",
        Some(16),
    ),
    (
        "eject after a million failures",
        "consecutive_failures: 5",
        "consecutive_failures: 1000000",
        "services[0].resilience.outlier_detection.consecutive_failures",
        Some(17),
    ),
    (
        "base ejection above max",
        "base_ejection_ms: 1000",
        "base_ejection_ms: 120000",
        "services[0].resilience.outlier_detection.base_ejection_ms",
        Some(17),
    ),
    (
        "ejection of a year",
        "max_ejection_ms: 60000",
        "max_ejection_ms: 31536000000",
        "services[0].resilience.outlier_detection.max_ejection_ms",
        Some(17),
    ),
    (
        "health interval 0",
        "interval_ms: 1000",
        "interval_ms: 0",
        "services[0].resilience.health_check.interval_ms",
        Some(18),
    ),
    (
        "healthy after 0 probes",
        "healthy_threshold: 2",
        "healthy_threshold: 0",
        "services[0].resilience.health_check.healthy_threshold",
        Some(18),
    ),
    // Authorization.
    (
        "principal that is no SPIFFE ID",
        "spiffe://cluster.local/ns/x/*",
        "web",
        "authorization.rules[0].from.principals[0]",
        Some(24),
    ),
    (
        "overall limits without a limit",
        "overall: { rate: 1000, concurrent: 500 }",
        "overall: { burst: 10 }",
        "services[0].resilience.quota.overall",
        Some(19),
    ),
    (
        "a workload quota without a limit",
        "quota: { rate: 10, concurrent: 4 }",
        "quota: { burst: 4 }",
        "workloads[0].quota",
        Some(6),
    ),
    (
        "a workload quota of a million and one",
        "quota: { rate: 10, concurrent: 4 }",
        "quota: { rate: 1000001 }",
        "workloads[0].quota.rate",
        Some(6),
    ),
    // Tracing.
    (
        "a collector over TLS",
        "http://10.0.0.9:4317",
        "https://10.0.0.9:4317",
        "tracing.otlp_endpoint",
        Some(26),
    ),
    (
        "a gRPC collector with a path",
        "http://10.0.0.9:4317",
        "http://10.0.0.9:4317/v1/traces",
        "tracing.otlp_endpoint",
        Some(26),
    ),
    (
        "a sampling ratio over 1",
        "sampling_ratio: 0.1",
        "sampling_ratio: 10",
        "tracing.sampling_ratio",
        Some(26),
    ),
    (
        "an OTLP protocol that does not exist",
        "protocol: grpc",
        "protocol: thrift",
        "unknown variant `thrift`",
        Some(26),
    ),
    (
        "an empty service name",
        "service_name: mesh",
        "service_name: \"\"",
        "tracing.service_name",
        Some(26),
    ),
    // Kubernetes.
    (
        "API server without a scheme",
        "authorization:",
        "kubernetes: { api_server: apiserver:6443 }\nauthorization:",
        "kubernetes",
        None,
    ),
];

#[test]
fn every_malformed_config_is_refused_with_its_field() {
    let overrides = Overrides {
        node_name: None,
        reserved_ports: vec![("--admin", 15000), ("--ready", 15021), ("--metrics", 15020)],
    };
    Config::parse_with(GOOD, "good.yaml", &overrides).expect("the corpus's base config passes");
    assert!(CORPUS.len() >= 40, "{} entries", CORPUS.len());
    let mut failures = Vec::new();
    for &(what, from, to, field, line) in CORPUS {
        assert!(
            GOOD.contains(from),
            "{what}: {from:?} is not in the base config"
        );
        let text = GOOD.replacen(from, to, 1);
        let message =
            match std::panic::catch_unwind(|| Config::parse_with(&text, "bad.yaml", &overrides)) {
                Err(_) => {
                    failures.push(format!("{what}: panicked"));
                    continue;
                }
                Ok(Ok(_)) => {
                    failures.push(format!("{what}: accepted"));
                    continue;
                }
                Ok(Err(error)) => error.to_string(),
            };
        if !message.contains(field) {
            failures.push(format!("{what}: {message:?} does not name {field}"));
        }
        if let Some(line) = line
            && !message.contains(&format!("line {line}"))
        {
            failures.push(format!("{what}: {message:?} does not give line {line}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
