//! Attaching programs: tc on pod interfaces, sock_ops on the node cgroup.
//!
//! Links are pinned where the kernel supports link objects (TCX on 6.6+,
//! cgroup links on 5.7+), so `bpftool link` shows them and `cleanup` can
//! detach them after a crash by unpinning. Older attachments (netlink tc)
//! are held in memory and detached when dropped.

use std::{fs::File, path::Path};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, SchedClassifier, SockOps, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
    },
    util::KernelVersion,
};
use mesh_common::programs::{FROM_POD, SOCKOPS, TO_POD, UPLINK};

use super::{DataplaneError, PinLayout, error_chain};

/// One attached program.
pub enum Attachment {
    /// A link object pinned in bpffs.
    Pinned(PinnedLink),
    /// A netlink tc filter (kernels before 6.6); detached on drop.
    Netlink(SchedClassifierLink),
}

impl Attachment {
    pub fn detach(self) {
        match self {
            // Unpinning drops the last reference we own: the link detaches.
            Attachment::Pinned(link) => drop(link.unpin()),
            Attachment::Netlink(link) => drop(link),
        }
    }
}

/// Both tc programs on one pod's host-side interface.
pub struct PodAttachment {
    pub ifindex: u32,
    links: Vec<Attachment>,
}

impl PodAttachment {
    pub fn detach(self) {
        self.links.into_iter().for_each(Attachment::detach);
    }
}

pub fn pod(ebpf: &mut Ebpf, pins: &PinLayout, ifname: &str) -> Result<PodAttachment, String> {
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(|e| format!("not found ({e})"))?;
    let links = vec![
        tc(
            ebpf,
            pins,
            ifname,
            FROM_POD,
            TcAttachType::Ingress,
            "from_pod",
        )?,
        tc(ebpf, pins, ifname, TO_POD, TcAttachType::Egress, "to_pod")?,
    ];
    Ok(PodAttachment { ifindex, links })
}

/// Inbound HBONE steering on one of the node's uplinks.
pub fn uplink(ebpf: &mut Ebpf, pins: &PinLayout, ifname: &str) -> Result<Attachment, String> {
    nix::net::if_::if_nametoindex(ifname).map_err(|e| format!("not found ({e})"))?;
    tc(ebpf, pins, ifname, UPLINK, TcAttachType::Ingress, "uplink")
}

/// Attaches one tc program and pins its link (`<pin root>/links/<ifname>_<suffix>`).
fn tc(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    ifname: &str,
    name: &str,
    attach_type: TcAttachType,
    suffix: &str,
) -> Result<Attachment, String> {
    if !has_tcx() {
        // Netlink tc needs the clsact qdisc; it may already be there.
        let _ = tc::qdisc_add_clsact(ifname);
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| format!("program {name} is not loaded"))?;
    let link = program
        .attach(ifname, attach_type)
        .and_then(|id| program.take_link(id))
        .map_err(|e| format!("attaching {name}: {}", error_chain(&e)))?;
    if !has_tcx() {
        return Ok(Attachment::Netlink(link));
    }
    // TCX: a real link object that can be pinned.
    let fd_link = FdLink::try_from(link).map_err(|e| format!("link {name}: {e}"))?;
    let path = pins.pod_link(ifname, suffix);
    let pinned = fd_link
        .pin(&path)
        .map_err(|e| format!("pinning {}: {}", path.display(), error_chain(&e)))?;
    Ok(Attachment::Pinned(pinned))
}

pub fn sockops(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    cgroup: &Path,
) -> Result<Attachment, DataplaneError> {
    let cgroup_err = |message: String| DataplaneError::Cgroup {
        path: cgroup.to_owned(),
        message,
    };
    let dir = File::open(cgroup).map_err(|e| cgroup_err(e.to_string()))?;
    let program: &mut SockOps = ebpf
        .program_mut(SOCKOPS)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| cgroup_err(format!("program {SOCKOPS} is not loaded")))?;
    // A cgroup link always coexists with other programs on the cgroup; the
    // link_create flags must be 0, which is what `Single` passes.
    let link = program
        .attach(&dir, CgroupAttachMode::Single)
        .and_then(|id| program.take_link(id))
        .map_err(|e| cgroup_err(error_chain(&e)))?;
    let fd_link = FdLink::try_from(link).map_err(|e| cgroup_err(e.to_string()))?;
    let path = pins.link("sockops");
    let pinned = fd_link
        .pin(&path)
        .map_err(|source| DataplaneError::Pin { path, source })?;
    Ok(Attachment::Pinned(pinned))
}

/// aya attaches tc programs as TCX links from 6.6 on, as netlink filters before.
fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0))
}
