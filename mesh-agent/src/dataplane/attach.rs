//! Attaching programs: tc on pod interfaces, sock_ops on the node cgroup.
//!
//! Links are pinned where the kernel supports link objects (TCX on 6.6+,
//! cgroup links on 5.7+), so `bpftool link` shows them and `cleanup` can
//! detach them after a crash by unpinning. Netlink tc filters (before 6.6)
//! are held in memory, detached when dropped, and recorded in a pinned map
//! so `cleanup` can find them too (see [`super::tc_filters`]).

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::SockMap,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, SkLookup, SockOps, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcHandle},
    },
    util::KernelVersion,
};
use mesh_common::programs::{CONNECT4, FROM_POD, LISTENER_LOOKUP, SOCKOPS, TO_POD, UPLINK};

use super::{DataplaneError, PinLayout, error_chain, tc_filters::TcFilterRecords};

/// One attached program.
pub enum Attachment {
    /// A link object pinned in bpffs.
    Pinned(PinnedLink),
    /// A netlink tc filter (kernels before 6.6); detached on drop.
    Netlink {
        link: SchedClassifierLink,
        ifindex: u32,
        attach_type: TcAttachType,
    },
}

impl Attachment {
    /// Lets go of the attachment without detaching it: for an agent that
    /// handed the kernel state to its successor.
    pub fn keep_attached(self) {
        match self {
            // The pin keeps the link.
            Attachment::Pinned(link) => drop(link),
            // Dropping the handle would delete the filter.
            Attachment::Netlink { link, .. } => std::mem::forget(link),
        }
    }

    pub fn detach(self, records: &mut TcFilterRecords) {
        match self {
            // Unpinning drops the last reference we own: the link detaches.
            Attachment::Pinned(link) => drop(link.unpin()),
            Attachment::Netlink {
                link,
                ifindex,
                attach_type,
            } => {
                drop(link);
                records.forget(ifindex, attach_type);
            }
        }
    }
}

/// Both tc programs on one pod's host-side interface.
pub struct PodAttachment {
    pub ifindex: u32,
    links: Vec<Attachment>,
}

impl PodAttachment {
    /// Whether `ifname` still names the interface the programs are on.
    pub fn is_current(&self, ifname: &str) -> bool {
        ifindex(ifname).is_ok_and(|index| index == self.ifindex)
    }

    pub fn keep_attached(self) {
        self.links.into_iter().for_each(Attachment::keep_attached);
    }

    pub fn detach(self, records: &mut TcFilterRecords) {
        for link in self.links {
            link.detach(records);
        }
    }
}

/// Where the kernel lets us attach: the program object and the records of
/// netlink filters.
pub struct Target<'a> {
    pub ebpf: &'a mut Ebpf,
    pub pins: &'a PinLayout,
    pub records: &'a mut TcFilterRecords,
}

pub fn pod(target: &mut Target<'_>, ifname: &str) -> Result<PodAttachment, AttachError> {
    let ifindex = ifindex(ifname)?;
    let mut links = Vec::with_capacity(2);
    for (name, attach_type, suffix) in [
        (FROM_POD, TcAttachType::Ingress, "from_pod"),
        (TO_POD, TcAttachType::Egress, "to_pod"),
    ] {
        match tc(target, ifname, ifindex, name, attach_type, suffix) {
            Ok(link) => links.push(link),
            Err(error) => {
                // Leave nothing half-attached.
                links
                    .into_iter()
                    .for_each(|link: Attachment| link.detach(target.records));
                return Err(error);
            }
        }
    }
    Ok(PodAttachment { ifindex, links })
}

/// Inbound HBONE steering on one of the node's uplinks.
pub fn uplink(target: &mut Target<'_>, ifname: &str) -> Result<Attachment, AttachError> {
    let ifindex = ifindex(ifname)?;
    tc(
        target,
        ifname,
        ifindex,
        UPLINK,
        TcAttachType::Ingress,
        "uplink",
    )
}

fn ifindex(ifname: &str) -> Result<u32, AttachError> {
    nix::net::if_::if_nametoindex(ifname).map_err(AttachError::NoInterface)
}

/// Why a tc program is not on an interface.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("not found ({0})")]
    NoInterface(nix::Error),
    #[error("program {0} is not loaded")]
    NotLoaded(&'static str),
    #[error("attaching {program}: {reason}")]
    Attach {
        program: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Record(#[from] super::tc_filters::TcFilterError),
    #[error("link {program}: {reason}")]
    Link {
        program: &'static str,
        reason: String,
    },
    #[error("pinning {}: {reason}", path.display())]
    Pin {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Attaches one tc program and pins its link (`<pin root>/links/<ifname>_<suffix>`).
fn tc(
    target: &mut Target<'_>,
    ifname: &str,
    ifindex: u32,
    name: &'static str,
    attach_type: TcAttachType,
    suffix: &str,
) -> Result<Attachment, AttachError> {
    let Target {
        ebpf,
        pins,
        records,
    } = target;
    if !has_tcx() {
        // Netlink tc needs the clsact qdisc; it may already be there.
        let _ = tc::qdisc_add_clsact(ifname);
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(AttachError::NotLoaded(name))?;
    if has_tcx() {
        let path = pins.pod_link(ifname, suffix);
        let fd = program.fd().map_err(|_| AttachError::NotLoaded(name))?;
        if let Some(adopted) = adopt_link(&path, fd.as_fd()).map_err(|e| AttachError::Attach {
            program: name,
            reason: format!("adopting {}: {e}", path.display()),
        })? {
            return Ok(adopted);
        }
    }
    // A filter the previous agent attached over netlink: replaced in place
    // (same priority and handle), so the hook never runs nothing.
    let recorded = (!has_tcx())
        .then(|| records.get(ifindex, attach_type))
        .flatten();
    let attached = match recorded {
        Some((priority, handle)) => SchedClassifierLink::attached(
            ifname,
            attach_type,
            priority,
            TcHandle::from(handle),
            None,
        )
        .map_err(aya::programs::ProgramError::from)
        .and_then(|link| program.attach_to_link(link))
        .or_else(|_| {
            // The recorded filter is gone with its interface.
            records.forget(ifindex, attach_type);
            program.attach(ifname, attach_type)
        }),
        None => program.attach(ifname, attach_type),
    };
    let link = attached
        .and_then(|id| program.take_link(id))
        .map_err(|e| AttachError::Attach {
            program: name,
            reason: error_chain(&e),
        })?;
    if !has_tcx() {
        records.record(ifindex, attach_type, name, &link)?;
        return Ok(Attachment::Netlink {
            link,
            ifindex,
            attach_type,
        });
    }
    // TCX: a real link object that can be pinned.
    let fd_link = FdLink::try_from(link).map_err(|e| AttachError::Link {
        program: name,
        reason: e.to_string(),
    })?;
    let path = pins.pod_link(ifname, suffix);
    let pinned = fd_link.pin(&path).map_err(|e| AttachError::Pin {
        reason: error_chain(&e),
        path,
    })?;
    Ok(Attachment::Pinned(pinned))
}

/// Attaches `mesh_sockops` (loaded and pinned by the caller) to the
/// node's pod cgroup subtree, as a pinned cgroup link.
pub fn sockops(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    cgroup: &Path,
) -> Result<Attachment, DataplaneError> {
    let program: &mut SockOps =
        loaded(ebpf, SOCKOPS).map_err(|message| DataplaneError::Cgroup {
            path: cgroup.to_owned(),
            message,
        })?;
    if let Some(adopted) = adopt_pinned(pins, "sockops", program.fd())? {
        return Ok(adopted);
    }
    cgroup_link(pins, cgroup, "sockops", |dir| {
        let program: &mut SockOps = loaded(ebpf, SOCKOPS)?;
        program
            .attach(dir, CgroupAttachMode::Single)
            .and_then(|id| program.take_link(id))
            .map_err(|e| error_chain(&e))
            .and_then(|link| FdLink::try_from(link).map_err(|e| e.to_string()))
    })
}

/// Attaches `mesh_connect4` (loaded and pinned by the caller) there too.
pub fn connect4(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    cgroup: &Path,
) -> Result<Attachment, DataplaneError> {
    let program: &mut CgroupSockAddr =
        loaded(ebpf, CONNECT4).map_err(|message| DataplaneError::Cgroup {
            path: cgroup.to_owned(),
            message,
        })?;
    if let Some(adopted) = adopt_pinned(pins, "connect4", program.fd())? {
        return Ok(adopted);
    }
    cgroup_link(pins, cgroup, "connect4", |dir| {
        let program: &mut CgroupSockAddr = loaded(ebpf, CONNECT4)?;
        program
            .attach(dir, CgroupAttachMode::Single)
            .and_then(|id| program.take_link(id))
            .map_err(|e| error_chain(&e))
            .and_then(|link| FdLink::try_from(link).map_err(|e| e.to_string()))
    })
}

/// A loaded program of the object, by name and type.
fn loaded<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| format!("program {name} is not loaded"))
}

/// Opens the cgroup, lets `attach` make the link there and pins it as
/// `links/<link_name>`. A cgroup link always coexists with other
/// programs on the cgroup; the link_create flags must be 0, which is what
/// `CgroupAttachMode::Single` passes.
fn cgroup_link(
    pins: &PinLayout,
    cgroup: &Path,
    link_name: &str,
    attach: impl FnOnce(&File) -> Result<FdLink, String>,
) -> Result<Attachment, DataplaneError> {
    let cgroup_err = |message: String| DataplaneError::Cgroup {
        path: cgroup.to_owned(),
        message,
    };
    let dir = File::open(cgroup).map_err(|e| cgroup_err(e.to_string()))?;
    let fd_link = attach(&dir).map_err(cgroup_err)?;
    let path = pins.link(link_name);
    let pinned = fd_link
        .pin(&path)
        .map_err(|source| DataplaneError::Pin { path, source })?;
    Ok(Attachment::Pinned(pinned))
}

/// aya attaches tc programs as TCX links from 6.6 on, as netlink filters before.
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0))
}

/// Puts the agent's listeners into `MESH_LISTENERS` and attaches
/// `mesh_listener_lookup` to this process's network namespace (the
/// node's), pinned like the other links. `listeners` are the outbound and
/// the inbound listener, in that order.
pub fn listener_lookup(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    listeners: [BorrowedFd<'_>; 2],
) -> Result<Attachment, DataplaneError> {
    use mesh_common::{LISTENER_INBOUND, LISTENER_OUTBOUND, maps::LISTENERS};
    let program_err = |source| DataplaneError::Program {
        name: LISTENER_LOOKUP,
        source,
    };
    let map_err = |source| {
        DataplaneError::Map(super::maps::KernelMapError::Map {
            name: LISTENERS,
            source,
        })
    };
    let mut map = SockMap::try_from(
        ebpf.map_mut(LISTENERS)
            .ok_or(super::maps::KernelMapError::Missing(LISTENERS))?,
    )
    .map_err(map_err)?;
    for (index, listener) in [LISTENER_OUTBOUND, LISTENER_INBOUND]
        .into_iter()
        .zip(listeners)
    {
        map.set(index, &listener.as_raw_fd(), 0).map_err(map_err)?;
    }
    let netns = File::open("/proc/self/ns/net").map_err(|source| DataplaneError::PinRoot {
        path: "/proc/self/ns/net".into(),
        source,
    })?;
    let program: &mut SkLookup = ebpf
        .program_mut(LISTENER_LOOKUP)
        .and_then(|p| p.try_into().ok())
        .ok_or(program_err(aya::programs::ProgramError::NotLoaded))?;
    if let Some(adopted) = adopt_pinned(pins, "listener_lookup", program.fd())? {
        return Ok(adopted);
    }
    let link = program
        .attach(&netns)
        .and_then(|id| program.take_link(id))
        .map_err(program_err)?;
    let path = pins.link("listener_lookup");
    let pinned = FdLink::from(link)
        .pin(&path)
        .map_err(|source| DataplaneError::Pin { path, source })?;
    Ok(Attachment::Pinned(pinned))
}

/// The link a previous agent pinned at `path`, made to run `program`.
/// `None` when there is none, or when its hook is gone (the interface or
/// cgroup deleted): then the stale pin is removed and the caller attaches
/// afresh. Any other failure is an error: attaching a second program
/// beside the old one would run both.
fn adopt_link(path: &Path, program: BorrowedFd<'_>) -> io::Result<Option<Attachment>> {
    if !path.exists() {
        return Ok(None);
    }
    match super::link_update::replace_program(path, program) {
        Ok(()) => PinnedLink::from_pin(path)
            .map(|link| Some(Attachment::Pinned(link)))
            .map_err(|e| io::Error::other(error_chain(&e))),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLINK | libc::ENOENT)) => {
            std::fs::remove_file(path)?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// [`adopt_link`] for `links/<link_name>`, with the dataplane's errors.
fn adopt_pinned(
    pins: &PinLayout,
    link_name: &str,
    program: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
) -> Result<Option<Attachment>, DataplaneError> {
    let path = pins.link(link_name);
    let program = program.map_err(|source| DataplaneError::Program {
        name: "(adopting a link)",
        source,
    })?;
    adopt_link(&path, program.as_fd()).map_err(|source| DataplaneError::Adopt { path, source })
}
