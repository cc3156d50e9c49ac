//! Finds a pod on this node in the kernel: its cgroup (where kubelet put
//! it) and its host-side interface (where the host routes its IP). No CNI
//! plugin of our own: we read what kubelet and the CNI already built.
//!
//! cgroups, under cgroup v2 (or the `unified` hierarchy of a hybrid host):
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`
//!   (uid with `_` for `-`; Guaranteed pods sit directly in `kubepods.slice`),
//!   containers in `cri-containerd-<id>.scope` or `crio-<id>.scope`;
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>`, containers in `<id>`
//!   (containerd) or `crio-<id>` (CRI-O).
//!
//! Interfaces: the longest-prefix IPv4 route to the pod's IP must be a
//! host route (/32) on an interface that is not a bridge. That is how
//! Calico, Cilium (legacy host routing), kindnet and the ptp plugin wire
//! pods; with a bridge CNI the pod is reported unmapped.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// Why a pod, or the node's pods, cannot be found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("no cgroup v2 hierarchy at {} or {}/unified", .0.display(), .0.display())]
    NoCgroupV2(PathBuf),
    #[error("no kubepods.slice (systemd driver) or kubepods (cgroupfs driver) in {}", .0.display())]
    NoKubepods(PathBuf),
    #[error("no cgroup for pod uid {uid} ({qos}); looked at {looked_at}")]
    NoPodCgroup {
        uid: String,
        qos: String,
        looked_at: String,
    },
    #[error("no route to {0}")]
    NoRoute(Ipv4Addr),
    #[error("{ip} is routed via {gateway} ({route}): not a pod on this node")]
    ViaGateway {
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
        route: String,
    },
    #[error(
        "{ip} is reached through bridge {bridge} ({route}); bridge CNIs are not supported (a pod needs its own host route)"
    )]
    Bridge {
        ip: Ipv4Addr,
        bridge: String,
        route: String,
    },
    #[error("the route to {ip} is {route}, not a host route of its own")]
    SharedRoute { ip: Ipv4Addr, route: String },
}

/// How kubelet names cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// Where kubelet's pods live in this node's cgroup v2 tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KubepodsRoot {
    pub path: PathBuf,
    pub driver: CgroupDriver,
}

/// The cgroup v2 hierarchy under `mount`: the mount itself, or its
/// `unified` directory on a hybrid (v1 + v2) host.
pub fn unified_root(mount: &Path) -> Option<PathBuf> {
    [mount.to_owned(), mount.join("unified")]
        .into_iter()
        .find(|dir| dir.join("cgroup.controllers").is_file())
}

/// Finds kubelet's `kubepods` cgroup under the cgroup v2 mount.
pub fn kubepods_root(mount: &Path) -> Result<KubepodsRoot, MappingError> {
    let root = unified_root(mount).ok_or_else(|| MappingError::NoCgroupV2(mount.to_owned()))?;
    for (name, driver) in [
        ("kubepods.slice", CgroupDriver::Systemd),
        ("kubepods", CgroupDriver::Cgroupfs),
    ] {
        let path = root.join(name);
        if path.is_dir() {
            return Ok(KubepodsRoot { path, driver });
        }
    }
    Err(MappingError::NoKubepods(root))
}

/// A pod's cgroup and the containers found in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodCgroup {
    pub path: PathBuf,
    /// Running containers whose cgroup was found, as `(runtime, id)`.
    pub containers: Vec<(String, String)>,
}

/// Finds the cgroup of the pod with `uid`. `qos` (the pod's
/// `status.qosClass`) picks the directory; without it every class is tried.
pub fn pod_cgroup(
    root: &KubepodsRoot,
    uid: &str,
    qos: Option<&str>,
    containers: &[(String, String)],
) -> Result<PodCgroup, MappingError> {
    let classes: &[&str] = match qos {
        Some("Guaranteed") => &["guaranteed"],
        Some("Burstable") => &["burstable"],
        Some("BestEffort") => &["besteffort"],
        _ => &["guaranteed", "burstable", "besteffort"],
    };
    let candidates: Vec<PathBuf> = classes
        .iter()
        .map(|class| match (root.driver, *class) {
            (CgroupDriver::Systemd, "guaranteed") => root
                .path
                .join(format!("kubepods-pod{}.slice", uid.replace('-', "_"))),
            (CgroupDriver::Systemd, class) => root
                .path
                .join(format!("kubepods-{class}.slice"))
                .join(format!(
                    "kubepods-{class}-pod{}.slice",
                    uid.replace('-', "_")
                )),
            (CgroupDriver::Cgroupfs, "guaranteed") => root.path.join(format!("pod{uid}")),
            (CgroupDriver::Cgroupfs, class) => root.path.join(class).join(format!("pod{uid}")),
        })
        .collect();
    let path = candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .ok_or_else(|| MappingError::NoPodCgroup {
            uid: uid.to_owned(),
            qos: qos.unwrap_or("QoS class unknown").to_owned(),
            looked_at: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let containers = containers
        .iter()
        .filter(|(runtime, id)| {
            container_dirs(root.driver, runtime, id)
                .iter()
                .any(|dir| path.join(dir).is_dir())
        })
        .cloned()
        .collect();
    Ok(PodCgroup { path, containers })
}

/// The names a container's cgroup may have inside its pod's cgroup.
fn container_dirs(driver: CgroupDriver, runtime: &str, id: &str) -> Vec<String> {
    match (driver, runtime) {
        (CgroupDriver::Systemd, "cri-o") => vec![format!("crio-{id}.scope")],
        (CgroupDriver::Systemd, "docker") => vec![format!("docker-{id}.scope")],
        (CgroupDriver::Systemd, _) => vec![format!("cri-containerd-{id}.scope")],
        (CgroupDriver::Cgroupfs, "cri-o") => vec![format!("crio-{id}")],
        (CgroupDriver::Cgroupfs, _) => vec![id.to_owned()],
    }
}

/// One line of `/proc/net/route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub interface: String,
    pub destination: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix_len: u32,
}

/// Parses `/proc/net/route` (addresses are hex in the kernel's byte order).
pub fn parse_routes(text: &str) -> Vec<Route> {
    const RTF_UP: u32 = 0x1;
    let hex_addr = |field: &str| {
        u32::from_str_radix(field, 16)
            .ok()
            .map(|value| Ipv4Addr::from(value.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            if flags & RTF_UP == 0 {
                return None;
            }
            Some(Route {
                interface: fields.first()?.to_string(),
                destination: hex_addr(fields.get(1)?)?,
                gateway: hex_addr(fields.get(2)?)?,
                prefix_len: u32::from(hex_addr(fields.get(7)?)?).count_ones(),
            })
        })
        .collect()
}

/// The host-side interface of the pod with `ip`: the interface of the
/// longest-prefix route to it, which must be a direct /32 route on an
/// interface that is not a bridge. `sys_class_net` tells bridges apart.
pub fn pod_interface(
    routes: &[Route],
    ip: Ipv4Addr,
    sys_class_net: &Path,
) -> Result<String, MappingError> {
    let best = routes
        .iter()
        .filter(|r| {
            let mask = u32::MAX.checked_shl(32 - r.prefix_len).unwrap_or(0);
            u32::from(ip) & mask == u32::from(r.destination) & mask
        })
        .max_by_key(|r| r.prefix_len)
        .ok_or(MappingError::NoRoute(ip))?;
    let shown = format!(
        "{}/{} dev {}",
        best.destination, best.prefix_len, best.interface
    );
    if !best.gateway.is_unspecified() {
        return Err(MappingError::ViaGateway {
            ip,
            gateway: best.gateway,
            route: shown,
        });
    }
    if sys_class_net.join(&best.interface).join("bridge").is_dir() {
        return Err(MappingError::Bridge {
            ip,
            bridge: best.interface.clone(),
            route: shown,
        });
    }
    if best.prefix_len != 32 {
        return Err(MappingError::SharedRoute { ip, route: shown });
    }
    Ok(best.interface.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
cali1\t0501F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
cni0\t0002F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn parses_proc_net_route() {
        let routes = parse_routes(ROUTES);
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[1].destination, Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(routes[1].prefix_len, 32);
        assert_eq!(routes[0].gateway, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(routes[2].prefix_len, 24);
    }
}
