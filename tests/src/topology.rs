//! Nodes and their pods, wired the way many CNIs do it (Calico-style):
//!
//! ```text
//!  pod netns                     node netns
//!  eth0 10.<10+n>.0.<k>/32 ──veth── p-<pod> (169.254.1.1/32, route to the pod's /32)
//!  default via 169.254.1.1       lo: node IP 10.0.0.<n>, ip_forward=1
//! ```
//!
//! Every test builds its own namespaces, so addresses repeat across tests
//! without clashing; only names must be unique, and [`unique_name`] sees to it.

use std::net::Ipv4Addr;

use crate::{
    cgroup::{Cgroup, cgroup2_root},
    netns::NetNs,
    pod::Pod,
    unique_name,
};

/// Address of the host side of every pod veth (the pods' gateway).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

pub struct Node {
    pub name: String,
    /// The embedded CA's directory; nodes of one test share it to share a root.
    pub ca_dir: std::path::PathBuf,
    owns_ca_dir: bool,
    pub index: u8,
    /// The node's own address (on its loopback).
    pub ip: Ipv4Addr,
    pub pin_root: std::path::PathBuf,
    /// Interfaces to other nodes.
    pub uplinks: Vec<String>,
    /// Pods go before the node's cgroup and namespace when dropped.
    pods: Vec<Pod>,
    pub cgroup: Cgroup,
    pub netns: NetNs,
}

impl Node {
    /// Node `index` (1..=9) of the test labelled `label`.
    pub fn new(label: &str, index: u8) -> Self {
        assert!((1..=9).contains(&index), "node index 1..=9");
        let name = unique_name(&format!("{label}-n{index}"));
        let netns = NetNs::create(&name);
        let cgroup = Cgroup::create(cgroup2_root().join("mesh-tests").join(&name));
        let ip = Ipv4Addr::new(10, 0, 0, index);
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        netns.sysctl("net.ipv4.ip_forward", "1");
        Self {
            pin_root: std::path::PathBuf::from("/sys/fs/bpf").join(&name),
            ca_dir: std::env::temp_dir().join(format!("{name}-ca")),
            owns_ca_dir: true,
            name,
            index,
            ip,
            uplinks: Vec::new(),
            pods: Vec::new(),
            cgroup,
            netns,
        }
    }

    /// Where this node's agent serves its handover socket: one per node,
    /// as one per real node.
    pub fn handover_socket(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("{}.handover.sock", self.name))
    }

    /// Adds a pod called `name` (at most 13 characters: it names the veth).
    pub fn add_pod(&mut self, name: &str) -> &Pod {
        self.add_pod_in_cgroup(name, name)
    }

    /// Adds a pod whose cgroup is `cgroup` (a path relative to the node's
    /// cgroup; kubelet's layouts nest it several levels deep).
    pub fn add_pod_in_cgroup(&mut self, name: &str, cgroup: &str) -> &Pod {
        let host_if = format!("p-{name}");
        assert!(
            host_if.len() <= 15,
            "pod name {name} too long for an interface name"
        );
        let ip = Ipv4Addr::new(10, 10 + self.index, 0, 2 + self.pods.len() as u8);
        let netns = NetNs::create(&format!("{}-{name}", self.name));
        let cgroup = self.cgroup.child(cgroup);
        let pod = Pod {
            name: name.to_owned(),
            ip,
            host_if,
            cgroup,
            netns,
        };
        self.wire(&pod);
        self.pods.push(pod);
        self.pods.last().expect("just pushed")
    }

    /// The pod's veth pair, addresses and routes.
    fn wire(&self, pod: &Pod) {
        let (ip, host_if, netns) = (pod.ip, &pod.host_if, &pod.netns);
        crate::run(
            "ip",
            &[
                "link",
                "add",
                host_if,
                "netns",
                self.netns.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns.name(),
            ],
        );
        self.netns
            .ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", host_if]);
        self.netns.ip(&["link", "set", host_if, "up"]);
        self.netns.ip(&[
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            host_if,
            "src",
            &self.ip.to_string(),
        ]);
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&["route", "add", &GATEWAY.to_string(), "dev", "eth0"]);
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &GATEWAY.to_string(),
            "dev",
            "eth0",
        ]);
    }

    /// Deletes pod `name`'s veth pair and makes it again under the same
    /// names and addresses (a sandbox recreated): a new interface index.
    pub fn recreate_pod_interface(&self, name: &str) {
        let pod = self.pod(name);
        self.netns.ip(&["link", "del", &pod.host_if]);
        self.wire(pod);
    }

    /// Gives pod `name` more addresses (for clients that must look like
    /// many): each on its `eth0`, each routed to it from the node.
    pub fn add_pod_ips(&self, name: &str, ips: &[Ipv4Addr]) {
        let pod = self.pod(name);
        for ip in ips {
            pod.netns
                .ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            self.netns.ip(&[
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &pod.host_if,
                "src",
                &self.ip.to_string(),
            ]);
        }
    }

    /// Routes `cidr` from the node to a pod `void` that owns none of it and
    /// does not forward: connections there get no answer and time out (a
    /// silent, dead endpoint).
    pub fn add_silent_route(&mut self, cidr: &str) {
        self.add_pod("void");
        let host_if = self.pod("void").host_if.clone();
        self.netns.ip(&["route", "add", cidr, "dev", &host_if]);
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on {}", self.name))
    }

    /// Trusts the same CA as `other` (the first node's agent creates it).
    pub fn share_ca_with(&mut self, other: &Node) {
        self.ca_dir = other.ca_dir.clone();
        self.owns_ca_dir = false;
    }

    /// The config's `node:` and `identity:` sections for this node.
    pub fn node_yaml(&self) -> String {
        format!(
            "node: {{ name: {}, cgroup: {}{} }}\nidentity: {{ ca_dir: {} }}\n",
            self.name,
            self.cgroup.path().display(),
            self.uplinks_yaml(),
            self.ca_dir.display()
        )
    }

    fn uplinks_yaml(&self) -> String {
        if self.uplinks.is_empty() {
            String::new()
        } else {
            format!(", uplinks: [{}]", self.uplinks.join(", "))
        }
    }

    /// A `workloads:` entry for one of this node's pods whose service
    /// account is its own name (each pod its own identity).
    pub fn own_identity_workload_yaml(&self, pod: &str) -> String {
        let p = self.pod(pod);
        format!(
            "  - {{ name: {pod}, service_account: {pod}, ips: [{}], interface: {}, cgroup: {pod} }}\n",
            p.ip, p.host_if
        )
    }

    /// The same pod as another node's agent sees it: on this node.
    pub fn remote_workload_yaml(&self, pod: &str) -> String {
        format!(
            "  - {{ name: {pod}, service_account: {pod}, ips: [{}], node: {} }}\n",
            self.pod(pod).ip,
            self.name
        )
    }

    /// A `workloads:` entry for one of this node's pods.
    pub fn workload_yaml(&self, pod: &str) -> String {
        let pod = self.pod(pod);
        format!(
            "  - {{ name: {}, ips: [{}], interface: {}, cgroup: {} }}\n",
            pod.name, pod.ip, pod.host_if, pod.name
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.owns_ca_dir {
            let _ = std::fs::remove_dir_all(&self.ca_dir);
        }
    }
}

/// Wires two nodes together like a flat network: a veth pair `up<n>`
/// between their namespaces, node addresses `10.0.0.<n>/24` on it, and a
/// route to each other's pod range (`10.<10+n>.0.0/16`) via the other node.
pub fn connect(a: &mut Node, b: &mut Node) {
    let a_if = format!("up{}", b.index);
    let b_if = format!("up{}", a.index);
    crate::run(
        "ip",
        &[
            "link",
            "add",
            &a_if,
            "netns",
            a.netns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            b.netns.name(),
        ],
    );
    let (a_index, b_index) = (a.index, b.index);
    for (node, ifname, peer) in [(&mut *a, &a_if, b_index), (&mut *b, &b_if, a_index)] {
        node.netns.ip(&[
            "addr",
            "add",
            &format!("10.0.0.{}/24", node.index),
            "dev",
            ifname,
        ]);
        node.netns.ip(&["link", "set", ifname, "up"]);
        node.netns.ip(&[
            "route",
            "add",
            &format!("10.{}.0.0/16", 10 + peer),
            "via",
            &format!("10.0.0.{peer}"),
            "dev",
            ifname,
        ]);
        node.uplinks.push(ifname.clone());
    }
    b.share_ca_with(a);
}
