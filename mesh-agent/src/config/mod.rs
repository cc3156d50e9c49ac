//! The agent's YAML config file: the node, its settings, and the workloads
//! and services of the mesh. This is one *source* of the mesh model
//! ([`crate::model`]); a Kubernetes watch is another.
//!
//! Parsing is strict (unknown fields are errors) and every error names the
//! field path, and the line where the parser knows it.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

#[cfg(test)]
mod corpus;
mod kubernetes;
mod lines;

use serde::{Deserialize, Serialize};

pub use self::kubernetes::{KubernetesConfig, MESH_LABEL};

use crate::{
    authz::Authorization,
    model::{Faults, Locality, Policy, Quota, Resilience, Split, WorkloadMode},
    observability::{metrics::MetricsConfig, spans::TracingConfig},
};

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    /// (The I/O error is part of the message, not a `source`, so chained
    /// reports do not print it twice.)
    #[error("reading config {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The YAML does not describe a config (bad syntax, type, or unknown field).
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    /// The config parses but is inconsistent.
    #[error("config {origin}: {field}{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        origin: String,
        field: String,
        line: Option<usize>,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub hbone: HboneConfig,
    #[serde(default)]
    pub maps: MapsConfig,
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// The mesh's nodes and their addresses: an HBONE peer at one of them
    /// may present only identities of workloads on that node.
    #[serde(default)]
    pub nodes: Vec<PeerNodeConfig>,
    #[serde(default)]
    pub authorization: Authorization,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Spans to an OpenTelemetry collector; off when absent.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// Learn workloads and services from the Kubernetes API server.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

/// Settings given on the command line rather than in the file (one
/// ConfigMap serves every node of a DaemonSet; the node name differs).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub node_name: Option<String>,
    /// Ports the agent's own endpoints take (flag name, port): the proxy's
    /// ports must differ from them.
    pub reserved_ports: Vec<(&'static str, u16)>,
}

/// Upper bounds on values: a value past them is a typo or an attack, and
/// some (a lifetime of 10^12 s) used to panic at start.
pub mod limits {
    pub const MAX_CERT_LIFETIME_S: u64 = 366 * 24 * 3600;
    pub const MAX_CONNECT_TIMEOUT_MS: u64 = 10 * 60 * 1000;
    pub const MAX_DRAIN_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
    pub const MAX_IDLE_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
    pub const MAX_CONNECTIONS_PER_PEER: usize = 64;
    /// The HBONE server's cap on streams per connection.
    pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
    pub const MAX_RETRIES: u32 = 10;
    pub const MAX_QUOTA: u32 = 1_000_000;
    pub const MAX_EJECTION_MS: u64 = 3600 * 1000;
    pub const MAX_HEALTH_INTERVAL_MS: u64 = 3600 * 1000;
    pub const MAX_THRESHOLD: u32 = 1000;
    pub const MAX_WEIGHT: u32 = 1_000_000;
    /// Kubernetes' limit on object names (DNS subdomain).
    pub const MAX_NAME_LEN: usize = 253;
    /// SPIFFE's limit on a trust domain.
    pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
    pub const MAX_TRUST_DOMAIN_ALIASES: usize = 16;
    /// Entries of one destination map (a hash map entry is about 100 bytes
    /// of kernel memory).
    pub const MAX_MAP_ENTRIES: u32 = 1 << 20;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// SPIFFE trust domain of every workload.
    pub trust_domain: String,
    /// Other trust domains whose identities count as this one's (a
    /// renamed domain, as Istio's `trustDomainAliases`): a peer's
    /// `spiffe://<alias>/ns/N/sa/S` is `spiffe://<trust_domain>/ns/N/sa/S`
    /// to authorization, logs and metrics. Any other domain is refused.
    pub trust_domain_aliases: Vec<String>,
    /// Directory of the embedded CA: created with a new root on first
    /// start, shared by every node that must trust each other.
    pub ca_dir: PathBuf,
    /// Alternatively, a signing CA (root or intermediate) and the roots.
    pub ca: Option<CaFiles>,
    /// Or no signing key on the node at all: certificates asked of a CA
    /// service over Istio's certificate API (`mesh-agent ca serve`, or
    /// istiod), with CSRs made here and the node's ServiceAccount token.
    pub istio: Option<crate::identity::istio::IstioCaConfig>,
    /// Lifetime of workload certificates, renewed at half-life.
    pub cert_lifetime_s: u64,
}

impl IdentityConfig {
    pub fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.cert_lifetime_s)
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            trust_domain_aliases: Vec::new(),
            ca_dir: PathBuf::from("/var/lib/mesh-agent/ca"),
            ca: None,
            istio: None,
            cert_lifetime_s: 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub roots: PathBuf,
}

/// How many entries the kernel's destination maps hold (read at start).
/// A model that needs more is refused whole, and the last good one stays.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MapsConfig {
    /// Service VIP:port pairs (`MESH_SERVICES`).
    pub services: u32,
    /// Workload addresses (`MESH_WORKLOADS`).
    pub workloads: u32,
}

impl Default for MapsConfig {
    fn default() -> Self {
        Self {
            services: mesh_common::MAX_SERVICES,
            workloads: mesh_common::MAX_WORKLOADS,
        }
    }
}

/// HTTP/2 tunnel pooling between agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HboneConfig {
    /// Connections per (source identity, destination identity, node).
    pub max_connections_per_peer: usize,
    /// Open another connection once every pooled one carries this many streams.
    pub streams_per_connection: usize,
    /// `auto` (the default): after the TLS handshake the kernel ciphers
    /// the records (kTLS) where it has the `tls` module and can take new
    /// keys for TLS KeyUpdates, else rustls does; `on`: kTLS wherever the
    /// module is, even where a peer's KeyUpdate would end the connection;
    /// `off`: always rustls (see docs/config.md).
    pub kernel_tls: KernelTlsMode,
}

/// Whether HBONE connections hand their TLS records to the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelTlsMode {
    #[default]
    Auto,
    On,
    Off,
}

impl Default for HboneConfig {
    fn default() -> Self {
        Self {
            max_connections_per_peer: 4,
            streams_per_connection: 2,
            kernel_tls: KernelTlsMode::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; workloads without `node` run here. `run
    /// --node-name` (or `NODE_NAME`) overrides it.
    #[serde(default)]
    pub name: String,
    /// This node's zone, for locality (from the Node object under
    /// `kubernetes:`).
    #[serde(default)]
    pub zone: Option<String>,
    /// The cgroup v2 directory that contains every meshed pod's cgroup. The
    /// connection tracker (sock_ops) attaches here. Optional: without it the
    /// agent still captures and proxies, but does not track sockets.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Interfaces that carry traffic from other nodes: HBONE (port 15008)
    /// to local pods arriving there is steered to the agent.
    #[serde(default)]
    pub uplinks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Port of the transparent listener that captured pod connections land on.
    pub outbound_port: u16,
    /// Port of the inbound (HBONE) listener; never captured as outbound.
    pub inbound_port: u16,
    /// How long to wait for an endpoint to accept, in milliseconds.
    pub connect_timeout_ms: u64,
    /// On SIGTERM, how long open connections may finish, in milliseconds.
    pub drain_timeout_ms: u64,
    /// After handing over to a new agent, how long this one may go on
    /// serving the connections it carries, in milliseconds (30 minutes by
    /// default: a large download outlives an upgrade).
    pub handover_drain_timeout_ms: u64,
    /// Let the kernel move the bytes of plaintext proxied connections
    /// (same node, or to destinations outside the mesh) once admitted,
    /// where the kernel can (see `mesh-agent probe`). Read at start. Off by
    /// default: it saves agent CPU and latency but, on the machines
    /// measured, not throughput (docs/performance.md).
    pub fast_path: bool,
    /// Connect to a meshed pod on this node from the client's address (a
    /// local pod's, or a remote pod's for HBONE) rather than the node's, so
    /// the pod sees who called it. Only where the pod's replies come back
    /// through the agent's capture hook; elsewhere the node's address is
    /// used anyway. Read at start.
    pub preserve_client_ip: bool,
    /// Connections between two pods of this node that the authorization
    /// policy allows go pod to pod in the kernel, without the agent: the
    /// policy is evaluated for every pair of local pods ahead of time, and
    /// the kernel lets an allowed pair's segments pass instead of handing
    /// them to the agent. Denied and dry-run-denied pairs still go through
    /// the agent. A pod's connect() to a service whose endpoints all run
    /// here goes to one of them (with `node.cgroup`). sock_ops reports
    /// each closed direct connection for the access log.
    pub same_node_direct: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15008,
            connect_timeout_ms: 5_000,
            drain_timeout_ms: 5_000,
            handover_drain_timeout_ms: 30 * 60 * 1_000,
            fast_path: false,
            preserve_client_ip: true,
            same_node_direct: false,
        }
    }
}

impl ProxyConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    pub fn handover_drain_timeout(&self) -> Duration {
        Duration::from_millis(self.handover_drain_timeout_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub ips: Vec<Ipv4Addr>,
    /// The node the workload runs on; default: this node.
    #[serde(default)]
    pub node: Option<String>,
    /// Host-side interface of a workload on this node (its veth peer).
    #[serde(default)]
    pub interface: Option<String>,
    /// The workload's cgroup: absolute, or relative to `node.cgroup`.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// `strict`: the kernel drops plaintext connections from outside the
    /// mesh; `permissive` (default) lets them in, counted as plaintext.
    #[serde(default)]
    pub mode: WorkloadMode,
    /// Limits per client on the connections that arrive at it, as a
    /// service's `resilience.quota`.
    #[serde(default)]
    pub quota: Option<Quota>,
}

/// A node of the mesh, by the name workloads' `node` give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerNodeConfig {
    pub name: String,
    /// Where its agent's connections come from.
    pub addresses: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePortConfig>,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// How endpoints are chosen (default `p2c_ewma`).
    #[serde(default)]
    pub policy: Policy,
    /// Same-node preference (default `prefer`).
    #[serde(default)]
    pub locality: Locality,
    /// Shares of new connections per endpoint subset (canary, blue/green).
    #[serde(default)]
    pub splits: Vec<Split>,
    #[serde(default)]
    pub resilience: Resilience,
    /// Injected into a share of new connections, to try callers'
    /// resilience; none by default.
    #[serde(default)]
    pub faults: Faults,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortConfig {
    pub port: u16,
    /// The endpoints' port; default: `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub ip: Ipv4Addr,
    /// Relative share of new connections; 0 takes the endpoint out of rotation.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The subset (version) it belongs to, for `splits`.
    #[serde(default)]
    pub subset: Option<String>,
    /// The node it runs on; default: the node of the workload with this IP.
    #[serde(default)]
    pub node: Option<String>,
    /// Its zone: with `locality: prefer`, endpoints in `node.zone` come
    /// next after same-node ones.
    #[serde(default)]
    pub zone: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_service_account() -> String {
    "default".into()
}

fn default_weight() -> u32 {
    1
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, &Overrides::default())
    }

    /// Reads a config file, applies `overrides`, then validates.
    pub fn load_with(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse_with(&text, &path.display().to_string(), overrides)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_with(text, origin, &Overrides::default())
    }

    fn parse_with(text: &str, origin: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config: Config =
            serde_yaml::from_str(text).map_err(|error| ConfigError::Parse {
                origin: origin.to_owned(),
                message: error.to_string(),
            })?;
        if let Some(name) = &overrides.node_name {
            config.node.name = name.clone();
        }
        config
            .validate()
            .and_then(|()| config.validate_reserved_ports(&overrides.reserved_ports))
            .map_err(|(field, message)| ConfigError::Invalid {
                origin: origin.to_owned(),
                line: lines::line_of(text, &field),
                field,
                message,
            })?;
        Ok(config)
    }

    /// The proxy's ports against the ports the agent's endpoints take.
    fn validate_reserved_ports(&self, reserved: &[(&str, u16)]) -> Result<(), (String, String)> {
        for (field, port) in [
            ("proxy.outbound_port", self.proxy.outbound_port),
            ("proxy.inbound_port", self.proxy.inbound_port),
        ] {
            if let Some((flag, _)) = reserved.iter().find(|(_, p)| *p == port) {
                return Err((field.into(), format!("{port} is also the port of {flag}")));
            }
        }
        Ok(())
    }

    /// Checks what types alone cannot. Errors are `(field path, message)`.
    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |field: String, message: String| Err((field, message));
        if self.node.name.is_empty() {
            return fail(
                "node.name".into(),
                "must not be empty (set it, or pass --node-name / NODE_NAME)".into(),
            );
        }
        if let Some(kubernetes) = &self.kubernetes {
            kubernetes.validate()?;
            if !self.workloads.is_empty() || !self.services.is_empty() || !self.nodes.is_empty() {
                return fail(
                    "kubernetes".into(),
                    "workloads, services and nodes come from the API server; remove `workloads:`, `services:` and `nodes:`".into(),
                );
            }
        }
        let proxy = &self.proxy;
        if proxy.outbound_port == 0 || proxy.inbound_port == 0 {
            return fail("proxy".into(), "ports must not be 0".into());
        }
        if proxy.outbound_port == proxy.inbound_port {
            return fail(
                "proxy.inbound_port".into(),
                format!("{} is also the outbound port", proxy.inbound_port),
            );
        }
        in_range(
            "proxy.connect_timeout_ms",
            proxy.connect_timeout_ms,
            1,
            limits::MAX_CONNECT_TIMEOUT_MS,
        )?;
        in_range(
            "proxy.drain_timeout_ms",
            proxy.drain_timeout_ms,
            0,
            limits::MAX_DRAIN_TIMEOUT_MS,
        )?;
        in_range(
            "proxy.handover_drain_timeout_ms",
            proxy.handover_drain_timeout_ms,
            0,
            limits::MAX_DRAIN_TIMEOUT_MS,
        )?;
        if let Some(interface) = self.node.uplinks.iter().find(|i| !interface_name(i)) {
            return fail(
                "node.uplinks".into(),
                format!("{interface:?} is not an interface name"),
            );
        }

        let mut workload_ips: HashMap<Ipv4Addr, usize> = HashMap::new();
        let mut interfaces: HashMap<&str, usize> = HashMap::new();
        for (index, workload) in self.workloads.iter().enumerate() {
            let field = |name: &str| format!("workloads[{index}].{name}");
            name(&field("name"), &workload.name)?;
            name(&field("namespace"), &workload.namespace)?;
            name(&field("service_account"), &workload.service_account)?;
            if workload.ips.is_empty() {
                return fail(field("ips"), "a workload needs at least one IP".into());
            }
            if let Some(quota) = &workload.quota {
                validate_quota(quota, &field("quota"))?;
            }
            for ip in &workload.ips {
                routable(&field("ips"), *ip)?;
                if let Some(other) = workload_ips.insert(*ip, index) {
                    return fail(
                        field("ips"),
                        format!("{ip} is also the IP of workloads[{other}]"),
                    );
                }
            }
            let local = workload
                .node
                .as_deref()
                .is_none_or(|node| node == self.node.name);
            match (&workload.interface, local) {
                (None, true) => {
                    return fail(
                        field("interface"),
                        "required for a workload on this node".into(),
                    );
                }
                (Some(_), false) => {
                    return fail(
                        field("interface"),
                        "only a workload on this node has an interface here".into(),
                    );
                }
                (Some(interface), true) => {
                    if !interface_name(interface) {
                        return fail(
                            field("interface"),
                            format!("{interface:?} is not an interface name"),
                        );
                    }
                    if let Some(other) = interfaces.insert(interface, index) {
                        return fail(
                            field("interface"),
                            format!("{interface} is also the interface of workloads[{other}]"),
                        );
                    }
                }
                (None, false) => {}
            }
            if workload.cgroup.as_ref().is_some_and(|c| c.is_relative())
                && self.node.cgroup.is_none()
            {
                return fail(
                    field("cgroup"),
                    "a relative cgroup needs node.cgroup".into(),
                );
            }
        }

        let mut node_names: HashMap<&str, usize> = HashMap::new();
        let mut node_ips: HashMap<Ipv4Addr, usize> = HashMap::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let field = |name: &str| format!("nodes[{index}].{name}");
            name(&field("name"), &node.name)?;
            if let Some(other) = node_names.insert(&node.name, index) {
                return fail(
                    field("name"),
                    format!("{} is also the name of nodes[{other}]", node.name),
                );
            }
            if node.addresses.is_empty() {
                return fail(
                    field("addresses"),
                    "a node needs at least one address".into(),
                );
            }
            for ip in &node.addresses {
                routable(&field("addresses"), *ip)?;
                if let Some(other) = node_ips.insert(*ip, index) {
                    return fail(
                        field("addresses"),
                        format!("{ip} is also an address of nodes[{other}]"),
                    );
                }
            }
        }

        let trust_domain = &self.identity.trust_domain;
        check_trust_domain("identity.trust_domain", trust_domain)?;
        let aliases = &self.identity.trust_domain_aliases;
        if aliases.len() > limits::MAX_TRUST_DOMAIN_ALIASES {
            return fail(
                "identity.trust_domain_aliases".into(),
                format!("at most {} aliases", limits::MAX_TRUST_DOMAIN_ALIASES),
            );
        }
        for (index, alias) in aliases.iter().enumerate() {
            let field = format!("identity.trust_domain_aliases[{index}]");
            check_trust_domain(&field, alias)?;
            if alias == trust_domain || aliases[..index].contains(alias) {
                return fail(field, format!("{alias} is given twice"));
            }
        }
        if self.identity.ca.is_some() && self.identity.istio.is_some() {
            return fail(
                "identity.istio".into(),
                "a node signs with identity.ca or asks identity.istio, not both".into(),
            );
        }
        if let Some(istio) = &self.identity.istio {
            let uri: Result<http::Uri, _> = istio.address.parse();
            if !uri
                .as_ref()
                .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some())
            {
                return fail(
                    "identity.istio.address".into(),
                    format!("{:?} is not an https://host[:port] address", istio.address),
                );
            }
        }
        in_range(
            "identity.cert_lifetime_s",
            self.identity.cert_lifetime_s,
            2,
            limits::MAX_CERT_LIFETIME_S,
        )?;
        in_range(
            "hbone.max_connections_per_peer",
            self.hbone.max_connections_per_peer,
            1,
            limits::MAX_CONNECTIONS_PER_PEER,
        )?;
        in_range(
            "hbone.streams_per_connection",
            self.hbone.streams_per_connection,
            1,
            limits::MAX_STREAMS_PER_CONNECTION,
        )?;
        in_range(
            "maps.services",
            self.maps.services,
            1,
            limits::MAX_MAP_ENTRIES,
        )?;
        in_range(
            "maps.workloads",
            self.maps.workloads,
            1,
            limits::MAX_MAP_ENTRIES,
        )?;
        self.authorization.validate()?;
        self.metrics.validate()?;
        if let Some(tracing) = &self.tracing {
            tracing.validate()?;
        }

        let mut vips: HashMap<SocketAddrV4, usize> = HashMap::new();
        let mut names: HashMap<(&str, &str), usize> = HashMap::new();
        for (index, service) in self.services.iter().enumerate() {
            let field = |name: &str| format!("services[{index}].{name}");
            name(&field("name"), &service.name)?;
            name(&field("namespace"), &service.namespace)?;
            if let Some(other) = names.insert((&service.namespace, &service.name), index) {
                return fail(
                    field("name"),
                    format!(
                        "{}/{} is also services[{other}]",
                        service.namespace, service.name
                    ),
                );
            }
            routable(&field("vip"), service.vip)?;
            if let Some(workload) = workload_ips.get(&service.vip) {
                return fail(
                    field("vip"),
                    format!("{} is also the IP of workloads[{workload}]", service.vip),
                );
            }
            if service.ports.is_empty() {
                return fail(field("ports"), "a service needs at least one port".into());
            }
            for (port_index, port) in service.ports.iter().enumerate() {
                let port_field = format!("services[{index}].ports[{port_index}]");
                if port.port == 0 || port.target_port == Some(0) {
                    return fail(port_field, "ports must not be 0".into());
                }
                let vip = SocketAddrV4::new(service.vip, port.port);
                if let Some(other) = vips.insert(vip, index) {
                    let message = if other == index {
                        format!("port {} is listed twice", port.port)
                    } else {
                        format!(
                            "duplicate VIP {vip}: also services[{other}] ({})",
                            self.services[other].name
                        )
                    };
                    return fail(port_field, message);
                }
            }
            validate_policy(service).map_err(|(name, message)| (field(&name), message))?;
            let mut seen = HashMap::new();
            for (endpoint_index, endpoint) in service.endpoints.iter().enumerate() {
                let endpoint_field = format!("services[{index}].endpoints[{endpoint_index}]");
                routable(&format!("{endpoint_field}.ip"), endpoint.ip)?;
                in_range(
                    &format!("{endpoint_field}.weight"),
                    endpoint.weight,
                    0,
                    limits::MAX_WEIGHT,
                )?;
                if let Some(other) = seen.insert(endpoint.ip, endpoint_index) {
                    return fail(
                        format!("services[{index}].endpoints[{endpoint_index}].ip"),
                        format!("{} is also endpoints[{other}]", endpoint.ip),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Checks a service's splits and resilience settings. Errors are
/// `(field relative to the service, message)`.
fn validate_policy(service: &ServiceConfig) -> Result<(), (String, String)> {
    let fail = |field: String, message: String| Err((field, message));
    let mut subsets = HashMap::new();
    for (index, split) in service.splits.iter().enumerate() {
        if subsets.insert(split.subset.as_str(), index).is_some() {
            return fail(
                format!("splits[{index}].subset"),
                format!("{} is listed twice", split.subset),
            );
        }
        if !service
            .endpoints
            .iter()
            .any(|e| e.subset.as_deref() == Some(split.subset.as_str()))
        {
            return fail(
                format!("splits[{index}].subset"),
                format!("no endpoint is in subset {}", split.subset),
            );
        }
    }
    for (index, split) in service.splits.iter().enumerate() {
        in_range(
            &format!("splits[{index}].weight"),
            split.weight,
            0,
            limits::MAX_WEIGHT,
        )?;
    }
    if !service.splits.is_empty() && service.splits.iter().all(|s| s.weight == 0) {
        return fail(
            "splits".into(),
            "at least one split needs a weight above 0".into(),
        );
    }
    let r = &service.resilience;
    if let Some(timeout) = r.connect_timeout_ms {
        in_range(
            "resilience.connect_timeout_ms",
            timeout,
            1,
            limits::MAX_CONNECT_TIMEOUT_MS,
        )?;
    }
    if let Some(timeout) = r.idle_timeout_ms {
        in_range(
            "resilience.idle_timeout_ms",
            timeout,
            1,
            limits::MAX_IDLE_TIMEOUT_MS,
        )?;
    }
    in_range(
        "resilience.retry.retries",
        r.retry.retries,
        0,
        limits::MAX_RETRIES,
    )?;
    in_range(
        "resilience.retry.budget_percent",
        r.retry.budget_percent,
        0,
        100,
    )?;
    in_range(
        "resilience.outlier_detection.consecutive_failures",
        r.outlier_detection.consecutive_failures,
        // 0 turns ejection off.
        0,
        limits::MAX_THRESHOLD,
    )?;
    in_range(
        "resilience.outlier_detection.max_ejection_ms",
        r.outlier_detection.max_ejection_ms,
        1,
        limits::MAX_EJECTION_MS,
    )?;
    if r.outlier_detection.max_ejection_percent > 100 {
        return fail(
            "resilience.outlier_detection.max_ejection_percent".into(),
            "must be at most 100".into(),
        );
    }
    if r.outlier_detection.base_ejection_ms > r.outlier_detection.max_ejection_ms {
        return fail(
            "resilience.outlier_detection.base_ejection_ms".into(),
            "must not exceed max_ejection_ms".into(),
        );
    }
    if let Some(check) = &r.health_check {
        let max = limits::MAX_HEALTH_INTERVAL_MS;
        in_range(
            "resilience.health_check.interval_ms",
            check.interval_ms,
            1,
            max,
        )?;
        in_range(
            "resilience.health_check.timeout_ms",
            check.timeout_ms,
            1,
            max,
        )?;
        let max = limits::MAX_THRESHOLD;
        in_range(
            "resilience.health_check.healthy_threshold",
            check.healthy_threshold,
            1,
            max,
        )?;
        in_range(
            "resilience.health_check.unhealthy_threshold",
            check.unhealthy_threshold,
            1,
            max,
        )?;
    }
    if let Some(quota) = &r.quota {
        validate_quota(quota, "resilience.quota")?;
    }
    validate_faults(&service.faults)
}

/// Checks a quota; `at` is its path under the service or workload.
fn validate_quota(quota: &Quota, at: &str) -> Result<(), (String, String)> {
    if quota.rate.is_none() && quota.concurrent.is_none() && quota.overall.is_none() {
        return Err((at.into(), "needs a rate or a concurrent limit".into()));
    }
    for (field, value) in [
        ("rate", quota.rate),
        ("burst", quota.burst),
        ("concurrent", quota.concurrent),
    ] {
        if let Some(value) = value {
            in_range(&format!("{at}.{field}"), value, 1, limits::MAX_QUOTA)?;
        }
    }
    if let Some(overall) = quota.overall() {
        validate_quota(&overall, &format!("{at}.overall"))?;
    }
    Ok(())
}

/// Checks a service's faults; errors as [`validate_policy`]'s.
fn validate_faults(faults: &Faults) -> Result<(), (String, String)> {
    faults
        .from
        .validate()
        .map_err(|(field, message)| (format!("faults.from.{field}"), message))?;
    if let Some(delay) = &faults.delay {
        in_range("faults.delay.percent", delay.percent, 0, 100)?;
        in_range(
            "faults.delay.ms",
            delay.ms,
            1,
            limits::MAX_CONNECT_TIMEOUT_MS,
        )?;
    }
    if let Some(refuse) = &faults.refuse {
        in_range("faults.refuse.percent", refuse.percent, 0, 100)?;
    }
    if let Some(cut) = &faults.cut {
        in_range("faults.cut.percent", cut.percent, 0, 100)?;
    }
    Ok(())
}

/// `value` within `min..=max`, or an error naming `field` and the range.
fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), (String, String)> {
    if value < min || value > max {
        return Err((
            field.to_owned(),
            format!("{value} is outside {min}..={max}"),
        ));
    }
    Ok(())
}

fn name(field: &str, value: &str) -> Result<(), (String, String)> {
    check_name(value).map_err(|error| (field.to_owned(), error.to_string()))
}

/// A SPIFFE trust domain: lowercase letters, digits, '-', '.', '_'.
fn check_trust_domain(field: &str, value: &str) -> Result<(), (String, String)> {
    let ok = !value.is_empty()
        && value.len() <= limits::MAX_TRUST_DOMAIN_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        return Ok(());
    }
    Err((
        field.to_owned(),
        format!(
            "{value:?} is not a trust domain (lowercase letters, digits, '-', '.', '_'; at most {} bytes)",
            limits::MAX_TRUST_DOMAIN_LEN
        ),
    ))
}

fn routable(field: &str, ip: Ipv4Addr) -> Result<(), (String, String)> {
    check_address(ip).map_err(|error| (field.to_owned(), error.to_string()))
}

/// A name as Kubernetes allows it (a DNS subdomain): lowercase letters,
/// digits, '-' and '.', starting and ending with a letter or digit. Names
/// become parts of SPIFFE IDs, metric labels and log fields, whichever
/// source gave them.
pub fn check_name(value: &str) -> Result<(), ValueError> {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok = value.len() <= limits::MAX_NAME_LEN
        && edge(value.as_bytes().first())
        && edge(value.as_bytes().last())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ValueError::Name(value.chars().take(64).collect()))
    }
}

/// An address a pod, a service or an endpoint can have: not 0.0.0.0,
/// loopback, multicast or broadcast. An endpoint on loopback would have
/// the agent dial the node's own local services for any pod.
pub fn check_address(ip: Ipv4Addr) -> Result<(), ValueError> {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(ValueError::Address(ip));
    }
    Ok(())
}

/// A name or address no source may give, whichever gave it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The name (its first 64 characters).
    #[error(
        "{0:?} is not a name (lowercase letters, digits, '-' and '.', at most {max} bytes)",
        max = limits::MAX_NAME_LEN
    )]
    Name(String),
    #[error("{0} is not a pod or service address")]
    Address(Ipv4Addr),
}

/// A Linux interface name: 1 to 15 bytes, no '/', ':' or white space.
fn interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

impl ServicePortConfig {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// Address a listener binds for `port` on every local address.
pub fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: { name: n1, cgroup: /sys/fs/cgroup/unified/mesh/n1 }
workloads:
  - { name: a, ips: [10.1.0.2], interface: veth-a, cgroup: a }
  - { name: b, ips: [10.1.0.3], node: n2 }
services:
  - name: echo
    vip: 10.96.0.10
    ports: [{ port: 80, target_port: 8080 }]
    endpoints: [{ ip: 10.1.0.3 }, { ip: 10.1.0.4, weight: 3 }]
"#;

    fn error(text: &str) -> String {
        Config::parse(text, "test.yaml").unwrap_err().to_string()
    }

    #[test]
    fn parses_a_good_config_with_defaults() {
        let config = Config::parse(GOOD, "test.yaml").unwrap();
        assert_eq!(config.proxy.outbound_port, 15001);
        assert_eq!(config.workloads[0].namespace, "default");
        assert_eq!(config.services[0].ports[0].target(), 8080);
        assert_eq!(config.services[0].endpoints[0].weight, 1);
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let text = GOOD.replace("name: echo", "name: echo\n    colour: blue");
        let message = error(&text);
        assert!(message.contains("unknown field `colour`"), "{message}");
        assert!(message.contains("line 8"), "{message}");
    }

    #[test]
    fn bad_ip_is_named() {
        let message = error(&GOOD.replace("10.96.0.10", "10.96.0.300"));
        assert!(message.contains("services[0].vip"), "{message}");
        assert!(message.contains("line 8"), "{message}");
    }

    #[test]
    fn duplicate_vip_is_named() {
        let text =
            format!("{GOOD}  - {{ name: other, vip: 10.96.0.10, ports: [{{ port: 80 }}] }}\n");
        let message = error(&text);
        assert!(
            message.contains("services[1].ports[0] (line 11)"),
            "{message}"
        );
        assert!(message.contains("duplicate VIP 10.96.0.10:80"), "{message}");
    }

    #[test]
    fn local_workload_needs_an_interface() {
        let message = error(&GOOD.replace(", interface: veth-a", ""));
        assert!(message.contains("workloads[0].interface"), "{message}");
    }

    #[test]
    fn missing_file_is_named() {
        let message = Config::load(Path::new("/nonexistent/mesh.yaml"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("/nonexistent/mesh.yaml"), "{message}");
    }
}
