//! The kernel side of one agent: loads the programs embedded in the binary,
//! pins them with their maps and links under the agent's pin root, attaches
//! them, and keeps the maps and attachments in step with the mesh model.

mod attach;
pub mod direct;
pub mod fast_path;
pub mod features;
pub mod layout;
mod link_update;
pub mod maps;
pub mod pins;
pub mod policy_routing;
pub mod tc_filters;

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::SockHash,
    programs::{CgroupSockAddr, SchedClassifier, SkLookup, SkSkb, SockOps},
};
use mesh_common::{
    SETTING_SAME_NODE_DIRECT, SETTING_TIME_WAIT_HANDOFF, STEER_MARK, STEER_MARK_MASK, Settings,
    WORKLOAD_STRICT,
};
use tracing::{info, warn};

use self::{
    attach::{Attachment, PodAttachment, Target},
    direct::{DirectPlan, DirectServices},
    fast_path::FastPath,
    tc_filters::TcFilterRecords,
};
pub use self::{
    maps::{Capacity, Destinations, Fill, KernelMaps, conn_json},
    pins::PinLayout,
};
use crate::model::{MeshState, Workload, WorkloadMode};

/// The kernel object built by `cargo xtask build-ebpf`, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// This binary was built before `cargo xtask build-ebpf` ran: it
    /// embeds the build script's empty placeholder.
    #[error(
        "this binary embeds no kernel object: build it with `cargo xtask build` \
         (or run `cargo xtask build-ebpf` before cargo build)"
    )]
    NoKernelObject,
    #[error("pin root {}: {source}", path.display())]
    PinRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pin root {} is held by another running agent", .0.display())]
    PinRootBusy(PathBuf),
    #[error("loading the kernel object: {}", error_chain(.0))]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {}", error_chain(source))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning {}: {}", path.display(), error_chain(source))]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error(transparent)]
    Map(#[from] maps::KernelMapError),
    #[error("uplink {interface}: {source}")]
    Uplink {
        interface: String,
        source: Box<attach::AttachError>,
    },
    #[error("attaching sock_ops to cgroup {}: {message}", path.display())]
    Cgroup { path: PathBuf, message: String },
    #[error(transparent)]
    Kernel(#[from] features::MissingFeature),
    #[error("adopting the link pinned at {}: {source}", path.display())]
    Adopt {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How this agent came by its kernel state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "reason")]
pub enum Adoption {
    /// Nothing was pinned: loaded and attached afresh.
    Fresh,
    /// A previous agent's maps and links were kept, its programs replaced
    /// in place: nothing lapsed.
    Adopted,
    /// A previous agent's maps had another layout (the reason): removed
    /// and loaded afresh, so capture lapsed until the programs were
    /// attached again.
    Reloaded(String),
}

/// What the agent tells the programs about itself.
pub struct DataplaneSettings<'a> {
    pub pin_root: &'a Path,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// The cgroup subtree of the node's pods, for connection tracking.
    pub cgroup: Option<&'a Path>,
    /// Interfaces where HBONE from other nodes arrives.
    pub uplinks: &'a [String],
    /// The outbound and the inbound listener, for `mesh_listener_lookup`.
    pub listeners: [std::os::fd::BorrowedFd<'a>; 2],
    /// Entries the destination maps hold.
    pub capacity: Capacity,
    /// `proxy.fast_path`: load `mesh_splice` (where the kernel can). Off,
    /// nothing of the fast path runs in the kernel.
    pub fast_path: bool,
    /// `proxy.same_node_direct`: pairs of this node's pods that the policy
    /// allows talk pod to pod, without the agent (see [`direct`]).
    pub same_node_direct: bool,
}

pub struct Dataplane {
    pins: PinLayout,
    /// flock on the pin root: one agent per root.
    lock: File,
    ebpf: Ebpf,
    maps: KernelMaps,
    tc_filters: TcFilterRecords,
    /// `None` when the kernel cannot run it.
    fast_path: Option<std::sync::Arc<FastPath>>,
    sockops: Option<Attachment>,
    /// `mesh_connect4`, with `proxy.same_node_direct` and `node.cgroup`.
    connect4: Option<Attachment>,
    /// Reports of closed direct connections, until the agent takes them.
    direct_records: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    /// `mesh_listener_lookup` on the node's namespace, when the kernel has sk_lookup.
    listener_lookup: Option<Attachment>,
    uplinks: Vec<Attachment>,
    /// The interfaces of `uplinks`.
    uplink_names: Vec<String>,
    pods: BTreeMap<String, PodAttachment>,
    /// Wanted pod interfaces the last sync could not attach to.
    unattached: std::collections::BTreeSet<String>,
    capacity: Capacity,
    filled: [Fill; 2],
    same_node_direct: bool,
    /// Pairs the last sync left to the agent because `MESH_DIRECT` was full.
    direct_left_out: usize,
    adoption: Adoption,
    /// Links and filters of the previous agent this one has not taken
    /// over are removed after the first sync (pods gone meanwhile).
    pruned: bool,
    closed: bool,
}

impl Dataplane {
    pub fn load(settings: &DataplaneSettings<'_>) -> Result<Self, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoKernelObject);
        }
        let pins = PinLayout::new(settings.pin_root);
        let pin_root_err = |source| DataplaneError::PinRoot {
            path: pins.root().to_owned(),
            source,
        };
        pins.create().map_err(pin_root_err)?;
        let lock = lock_pin_root(&pins)?;
        let kernel = check_kernel()?;
        let adoption = match layout::inspect(&pins, OBJECT, settings.capacity) {
            layout::Pinned::Adoptable => {
                info!(
                    pin_root = %pins.root().display(),
                    "adopting the maps and links a previous agent pinned"
                );
                // Programs are replaced; their pins are only names.
                let progs = pins.root().join(mesh_common::pins::PROGS_DIR);
                std::fs::remove_dir_all(&progs).map_err(pin_root_err)?;
                pins.create().map_err(pin_root_err)?;
                Adoption::Adopted
            }
            pinned => {
                let reloaded = match pinned {
                    layout::Pinned::Incompatible(reason) => {
                        warn!(
                            pin_root = %pins.root().display(),
                            %reason,
                            "the pinned maps are not this agent's layout: removing them and \
                             loading afresh (capture lapses until the programs are attached)"
                        );
                        Adoption::Reloaded(reason)
                    }
                    _ => Adoption::Fresh,
                };
                if has_pins(&pins) {
                    warn!(pin_root = %pins.root().display(), "removing state a previous agent left behind");
                    remove_leftovers(&pins).map_err(pin_root_err)?;
                    pins.create().map_err(pin_root_err)?;
                }
                reloaded
            }
        };

        // Every map lives at its pin: created there, or, adopting, the
        // previous agent's opened from there, entries and all.
        let mut loader = aya::EbpfLoader::new();
        loader
            .map_max_entries(mesh_common::maps::SERVICES, settings.capacity.services)
            .map_max_entries(mesh_common::maps::WORKLOADS, settings.capacity.workloads);
        for name in mesh_common::maps::ALL {
            loader.map_pin_path(name, pins.map(name));
        }
        let mut ebpf = loader.load(OBJECT)?;
        let mut maps = KernelMaps::take(|name| {
            ebpf.take_map(name)
                .ok_or(maps::KernelMapError::Missing(name))
        })?;
        let tc_filters = TcFilterRecords::new(
            ebpf.take_map(mesh_common::maps::TC_FILTERS)
                .ok_or(maps::KernelMapError::Missing(mesh_common::maps::TC_FILTERS))?,
        )?;
        let fast_path = if settings.fast_path && kernel.fast_path {
            Some(std::sync::Arc::new(load_fast_path(&mut ebpf, &pins)?))
        } else {
            None
        };
        for name in [
            mesh_common::programs::FROM_POD,
            mesh_common::programs::TO_POD,
            mesh_common::programs::UPLINK,
        ] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
            pin_program(program.pin(pins.program(name)), &pins, name)?;
        }
        let name = mesh_common::programs::SOCKOPS;
        let sockops: &mut SockOps = program_mut(&mut ebpf, name)?;
        sockops
            .load()
            .map_err(|source| DataplaneError::Program { name, source })?;
        pin_program(sockops.pin(pins.program(name)), &pins, name)?;
        let listener_lookup = if kernel.listener_lookup {
            let name = mesh_common::programs::LISTENER_LOOKUP;
            let program: &mut SkLookup = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
            pin_program(program.pin(pins.program(name)), &pins, name)?;
            Some(attach::listener_lookup(
                &mut ebpf,
                &pins,
                settings.listeners,
            )?)
        } else {
            None
        };

        maps.write_settings(Settings {
            outbound_port: settings.outbound_port,
            inbound_port: settings.inbound_port,
            mark: STEER_MARK,
            mark_mask: STEER_MARK_MASK,
            layout: layout::version(),
            flags: if listener_lookup.is_some() {
                SETTING_TIME_WAIT_HANDOFF
            } else {
                0
            } | if settings.same_node_direct {
                SETTING_SAME_NODE_DIRECT
            } else {
                0
            },
        })?;

        let mut dataplane = Self {
            pins,
            lock,
            ebpf,
            maps,
            tc_filters,
            fast_path,
            sockops: None,
            connect4: None,
            direct_records: None,
            listener_lookup,
            uplinks: Vec::new(),
            uplink_names: settings.uplinks.to_vec(),
            pods: BTreeMap::new(),
            unattached: Default::default(),
            capacity: settings.capacity,
            filled: Destinations::default().fill(settings.capacity),
            same_node_direct: settings.same_node_direct,
            direct_left_out: 0,
            pruned: adoption != Adoption::Adopted,
            adoption,
            closed: false,
        };
        if let Some(cgroup) = settings.cgroup {
            dataplane.sockops = Some(attach::sockops(
                &mut dataplane.ebpf,
                &dataplane.pins,
                cgroup,
            )?);
            info!(cgroup = %cgroup.display(), "connection tracking attached");
            if settings.same_node_direct {
                let name = mesh_common::programs::CONNECT4;
                let program: &mut CgroupSockAddr = program_mut(&mut dataplane.ebpf, name)?;
                program
                    .load()
                    .map_err(|source| DataplaneError::Program { name, source })?;
                pin_program(
                    program.pin(dataplane.pins.program(name)),
                    &dataplane.pins,
                    name,
                )?;
                dataplane.connect4 = Some(attach::connect4(
                    &mut dataplane.ebpf,
                    &dataplane.pins,
                    cgroup,
                )?);
                info!(cgroup = %cgroup.display(), "same-node service balancing at connect attached");
                // sock_ops reports direct connections only where it runs.
                dataplane.direct_records =
                    Some(take(&mut dataplane.ebpf, mesh_common::maps::DIRECT_CLOSED)?);
            }
        } else if settings.same_node_direct {
            warn!(
                "proxy.same_node_direct without node.cgroup: connections to service VIPs go through the agent"
            );
        }
        for uplink in settings.uplinks {
            let attachment = attach::uplink(&mut dataplane.target(), uplink).map_err(|source| {
                DataplaneError::Uplink {
                    interface: uplink.clone(),
                    source: Box::new(source),
                }
            })?;
            dataplane.uplinks.push(attachment);
            info!(interface = %uplink, "inbound HBONE steering attached");
        }
        Ok(dataplane)
    }

    fn target(&mut self) -> Target<'_> {
        Target {
            ebpf: &mut self.ebpf,
            pins: &self.pins,
            records: &mut self.tc_filters,
        }
    }

    /// The reports of closed same-node direct connections (once; `None`
    /// without `proxy.same_node_direct` and `node.cgroup`).
    pub fn take_direct_records(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.direct_records.take()
    }

    /// The same-node fast path, when this kernel runs it.
    pub fn fast_path(&self) -> Option<std::sync::Arc<FastPath>> {
        self.fast_path.clone()
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    pub fn maps(&self) -> &KernelMaps {
        &self.maps
    }

    /// Brings maps and pod attachments in line with `state`. Map failures
    /// are errors; a pod that cannot be attached is reported and skipped so
    /// the rest of the node keeps working.
    pub fn sync(&mut self, state: &MeshState) -> Result<Vec<String>, DataplaneError> {
        // Refuse a model the maps cannot hold before anything changes.
        let plan = Destinations::plan(state, self.capacity)?;
        let mut problems = Vec::new();
        let wanted: BTreeMap<&str, &Workload> = state
            .local_workloads()
            .map(|(_, workload, local)| (local.interface.as_str(), workload))
            .collect();

        // Detach first: a new pod may reuse a gone pod's interface name.
        // An interface deleted and made again under its name (a pod
        // sandbox recreated: CNIs derive veth names from pod names) lost
        // its programs with the old one: it counts as gone, and is
        // attached afresh below.
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(ifname, pod)| {
                !wanted.contains_key(ifname.as_str()) || !pod.is_current(ifname)
            })
            .map(|(ifname, _)| ifname.clone())
            .collect();
        for ifname in gone {
            if let Some(pod) = self.pods.remove(&ifname) {
                self.maps.remove_pod_interface(pod.ifindex);
                pod.detach(&mut self.tc_filters);
                info!(interface = %ifname, "pod interface detached");
            }
        }
        // Destinations before attachments: a newly attached pod's first SYN
        // must already find its destinations meshed.
        self.maps.sync_destinations(&plan)?;
        self.filled = plan.fill(self.capacity);
        self.unattached.clear();
        for (&ifname, workload) in &wanted {
            if self.pods.contains_key(ifname) {
                continue;
            }
            let workload = workload.name.as_str();
            match attach::pod(&mut self.target(), ifname) {
                Ok(pod) => {
                    self.maps.add_pod_interface(pod.ifindex)?;
                    info!(
                        workload,
                        interface = ifname,
                        ifindex = pod.ifindex,
                        "pod interface attached"
                    );
                    self.pods.insert(ifname.to_owned(), pod);
                }
                Err(error) => {
                    self.unattached.insert(ifname.to_owned());
                    problems.push(format!("workload {workload}: interface {ifname}: {error}"));
                }
            }
        }
        // Modes by interface, for what carries no IPv4 address to look up.
        let flags = self
            .pods
            .iter()
            .filter_map(|(ifname, pod)| {
                let strict = wanted.get(ifname.as_str())?.mode == WorkloadMode::Strict;
                Some((pod.ifindex, if strict { WORKLOAD_STRICT } else { 0 }))
            })
            .collect();
        self.maps.sync_interface_flags(&flags)?;
        // After attachments: a pair goes direct only once both pods'
        // interfaces carry the programs that check it.
        let direct = if self.same_node_direct {
            let attached = |ifname: &str| self.pods.get(ifname).map(|pod| pod.ifindex);
            DirectPlan::of(state, attached, mesh_common::MAX_DIRECT as usize)
        } else {
            DirectPlan::default()
        };
        self.maps.sync_direct(&direct.entries)?;
        let services = if self.same_node_direct {
            let attached = self.hooked_workload_ips(state);
            DirectServices::of(
                state,
                &attached,
                (
                    mesh_common::MAX_DIRECT_SERVICES as usize,
                    mesh_common::MAX_DIRECT_ENDPOINTS as usize,
                ),
            )
        } else {
            DirectServices::default()
        };
        self.maps.sync_direct_services(&services)?;
        if direct.left_out > 0 && direct.left_out != self.direct_left_out {
            warn!(
                pairs = direct.left_out,
                capacity = mesh_common::MAX_DIRECT,
                "same-node pod pairs left to the agent: the direct map is full"
            );
        }
        self.direct_left_out = direct.left_out;
        if !self.pruned {
            self.pruned = true;
            self.prune_unadopted(&config_uplinks(&self.uplink_names));
        }
        Ok(problems)
    }

    /// After adopting: removes the links and netlink filters the previous
    /// agent left on hooks this one does not use (pods gone since, an
    /// uplink or cgroup no longer configured), and the counters of
    /// interfaces no longer meshed.
    fn prune_unadopted(&mut self, uplinks: &[(String, u32)]) {
        use std::collections::HashSet as Set;
        let mut ours: Set<PathBuf> = Set::new();
        for ifname in self.pods.keys() {
            ours.insert(self.pins.pod_link(ifname, "from_pod"));
            ours.insert(self.pins.pod_link(ifname, "to_pod"));
        }
        for (ifname, _) in uplinks {
            ours.insert(self.pins.pod_link(ifname, "uplink"));
        }
        for (name, kept) in [
            ("sockops", self.sockops.is_some()),
            ("connect4", self.connect4.is_some()),
            ("listener_lookup", self.listener_lookup.is_some()),
        ] {
            if kept {
                ours.insert(self.pins.link(name));
            }
        }
        let links = self.pins.root().join(mesh_common::pins::LINKS_DIR);
        for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
            let path = entry.path();
            if ours.contains(&path) {
                continue;
            }
            // Unpinning the last reference detaches the link.
            match aya::programs::links::PinnedLink::from_pin(&path).map(|link| link.unpin()) {
                Ok(_) => {
                    info!(link = %path.display(), "removed a link the previous agent left on a hook no longer meshed");
                }
                Err(error) => {
                    warn!(link = %path.display(), error = %error_chain(&error), "removing a link the previous agent left");
                }
            }
        }
        let kept_ifindexes: Set<u32> = self
            .pods
            .values()
            .map(|pod| pod.ifindex)
            .chain(uplinks.iter().map(|(_, ifindex)| *ifindex))
            .collect();
        for filter in self.tc_filters.list() {
            if kept_ifindexes.contains(&filter.ifindex) {
                continue;
            }
            if let Ok(ifname) = nix::net::if_::if_indextoname(filter.ifindex) {
                // Dropping a netlink link deletes the filter.
                drop(aya::programs::tc::SchedClassifierLink::attached(
                    &ifname.to_string_lossy(),
                    filter.attach_type,
                    filter.priority,
                    aya::programs::tc::TcHandle::from(filter.handle),
                    None,
                ));
            }
            self.tc_filters.forget(filter.ifindex, filter.attach_type);
            info!(
                ifindex = filter.ifindex,
                "removed a tc filter the previous agent left on a hook no longer meshed"
            );
        }
        let pods: Set<u32> = self.pods.values().map(|pod| pod.ifindex).collect();
        self.maps.retain_pod_interfaces(&pods);
    }

    /// How this agent came by its kernel state.
    pub fn adoption(&self) -> &Adoption {
        &self.adoption
    }

    /// Lets another agent lock the pin root (during a handover): this one
    /// must not change the kernel state until it locks it again.
    pub fn unlock(&self) {
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Takes the pin root back after a handover that did not complete.
    pub fn relock(&self) -> Result<(), DataplaneError> {
        // SAFETY: flock on a descriptor we own.
        let ret = unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret != 0 {
            return Err(DataplaneError::PinRootBusy(self.pins.root().to_owned()));
        }
        Ok(())
    }

    /// Gives up the kernel state without touching it: the successor
    /// adopted every program, map and link, which stay as they are.
    pub fn relinquish(&mut self) {
        self.closed = true;
        for (_, pod) in std::mem::take(&mut self.pods) {
            pod.keep_attached();
        }
        for attachment in [
            self.sockops.take(),
            self.connect4.take(),
            self.listener_lookup.take(),
        ]
        .into_iter()
        .flatten()
        .chain(std::mem::take(&mut self.uplinks))
        {
            attachment.keep_attached();
        }
    }

    /// Entries in the destination maps (as of the last sync) against
    /// their capacity.
    pub fn fill(&self) -> [Fill; 2] {
        self.filled
    }

    /// Whether a pod interface changed under the agent since the last
    /// sync: one it attached to was deleted (and maybe made again under
    /// the same name), or one it could not attach to has appeared. Then a
    /// sync of the same model re-attaches. Cheap: one name lookup per pod.
    pub fn interfaces_changed(&self) -> bool {
        self.pods
            .iter()
            .any(|(ifname, pod)| !pod.is_current(ifname))
            || self
                .unattached
                .iter()
                .any(|ifname| nix::net::if_::if_nametoindex(ifname.as_str()).is_ok())
    }

    /// IPs of this node's workloads whose interface carries our programs:
    /// what they send to a meshed address reaches the agent's sockets.
    pub fn hooked_workload_ips(&self, state: &MeshState) -> HashSet<Ipv4Addr> {
        state
            .local_workloads()
            .filter(|(_, _, local)| self.pods.contains_key(&local.interface))
            .flat_map(|(_, workload, _)| workload.ips.iter().copied())
            .collect()
    }

    /// Interfaces carrying our programs, with their ifindex.
    pub fn pod_interfaces(&self) -> impl Iterator<Item = (&str, u32)> {
        self.pods
            .iter()
            .map(|(name, pod)| (name.as_str(), pod.ifindex))
    }

    /// Detaches everything and removes every pin.
    pub fn close(mut self) -> std::io::Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        for (_, pod) in std::mem::take(&mut self.pods) {
            pod.detach(&mut self.tc_filters);
        }
        if let Some(sockops) = self.sockops.take() {
            sockops.detach(&mut self.tc_filters);
        }
        if let Some(connect4) = self.connect4.take() {
            connect4.detach(&mut self.tc_filters);
        }
        if let Some(lookup) = self.listener_lookup.take() {
            lookup.detach(&mut self.tc_filters);
        }
        for uplink in std::mem::take(&mut self.uplinks) {
            uplink.detach(&mut self.tc_filters);
        }
        self.pins.remove_all()
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            warn!(pin_root = %self.pins.root().display(), %error, "removing pins");
        }
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(DataplaneError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

fn pin_program(
    result: Result<(), aya::pin::PinError>,
    pins: &PinLayout,
    name: &str,
) -> Result<(), DataplaneError> {
    result.map_err(|source| DataplaneError::Pin {
        path: pins.program(name),
        source,
    })
}

fn lock_pin_root(pins: &PinLayout) -> Result<File, DataplaneError> {
    let dir = File::open(pins.root()).map_err(|source| DataplaneError::PinRoot {
        path: pins.root().to_owned(),
        source,
    })?;
    // SAFETY: flock on a descriptor we own.
    let ret = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret != 0 {
        return Err(DataplaneError::PinRootBusy(pins.root().to_owned()));
    }
    Ok(dir)
}

/// Takes a map out of the object as its typed handle.
fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let data = ebpf
        .take_map(name)
        .ok_or(maps::KernelMapError::Missing(name))?;
    T::try_from(data)
        .map_err(|source| DataplaneError::Map(maps::KernelMapError::Map { name, source }))
}

/// Loads `mesh_splice`, attaches it to `MESH_SPLICE_ON` (a map
/// attachment lives as long as the map, which is pinned) and takes the
/// fast path's maps.
fn load_fast_path(ebpf: &mut Ebpf, pins: &PinLayout) -> Result<FastPath, DataplaneError> {
    use mesh_common::maps::{REDIRECTED, SPLICE_ON, SPLICE_TO};
    let name = mesh_common::programs::SPLICE;
    let to: SockHash<_, _> = take(ebpf, SPLICE_TO)?;
    let on: SockHash<_, _> = take(ebpf, SPLICE_ON)?;
    let redirected = take(ebpf, REDIRECTED)?;
    let program: &mut SkSkb = program_mut(ebpf, name)?;
    program
        .load()
        .map_err(|source| DataplaneError::Program { name, source })?;
    pin_program(program.pin(pins.program(name)), pins, name)?;
    program
        .attach(on.fd())
        .map_err(|source| DataplaneError::Program { name, source })?;
    Ok(FastPath::new(to, on, redirected))
}

/// Which optional parts this kernel runs.
struct KernelSupport {
    fast_path: bool,
    listener_lookup: bool,
}

/// Stops on a missing kernel feature; names the fallbacks taken.
fn check_kernel() -> Result<KernelSupport, features::MissingFeature> {
    let statuses = features::probe();
    features::require(&statuses)?;
    for status in statuses.iter().filter(|s| !s.available) {
        if let Some(fallback) = status.fallback {
            info!(
                kernel = %features::kernel_release(),
                feature = status.name,
                fallback,
                "kernel feature missing: using the fallback"
            );
        }
    }
    Ok(KernelSupport {
        fast_path: features::fast_path_supported(&statuses),
        listener_lookup: features::listener_lookup_supported(&statuses),
    })
}

/// Whether each program of the embedded object passes this kernel's
/// verifier, loaded on its own (nothing pinned or attached). For
/// `mesh-agent probe` and the kernel matrix.
pub fn probe_programs() -> Vec<ProgramStatus> {
    let loaded = if OBJECT.is_empty() {
        Err(DataplaneError::NoKernelObject.to_string())
    } else {
        Ebpf::load(OBJECT).map_err(|error| error_chain(&error))
    };
    let mut ebpf = match loaded {
        Ok(ebpf) => ebpf,
        Err(error) => {
            return mesh_common::programs::ALL
                .iter()
                .map(|name| ProgramStatus {
                    name,
                    loaded: false,
                    error: Some(format!("loading the object: {error}")),
                })
                .collect();
        }
    };
    mesh_common::programs::ALL
        .iter()
        .map(|&name| {
            let result = match ebpf.program_mut(name) {
                Some(aya::programs::Program::SchedClassifier(p)) => p.load(),
                Some(aya::programs::Program::SockOps(p)) => p.load(),
                Some(aya::programs::Program::SkSkb(p)) => p.load(),
                Some(aya::programs::Program::SkLookup(p)) => p.load(),
                Some(aya::programs::Program::CgroupSockAddr(p)) => p.load(),
                _ => Err(aya::programs::ProgramError::NotLoaded),
            };
            ProgramStatus {
                name,
                loaded: result.is_ok(),
                error: result.err().map(|e| verifier_tail(&error_chain(&e))),
            }
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    pub loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The end of a verifier log is where it says why; the start is the
/// program listing.
fn verifier_tail(message: &str) -> String {
    let lines: Vec<&str> = message.lines().collect();
    let keep = lines.len().saturating_sub(12);
    if keep == 0 {
        return message.to_owned();
    }
    format!("{}\n...\n{}", lines[0], lines[keep..].join("\n"))
}

/// Removes what a previous agent on this pin root left: its netlink tc
/// filters (which hold their programs in the kernel), then every pin.
pub fn remove_leftovers(pins: &PinLayout) -> std::io::Result<()> {
    match tc_filters::remove_recorded(pins) {
        Ok(0) => {}
        Ok(count) => info!(count, "removed netlink tc filters a previous agent left"),
        Err(error) => warn!(%error, "removing recorded netlink tc filters"),
    }
    pins.remove_all()
}

fn has_pins(pins: &PinLayout) -> bool {
    use mesh_common::pins::{LINKS_DIR, MAPS_DIR, PROGS_DIR};
    [LINKS_DIR, PROGS_DIR, MAPS_DIR].iter().any(|dir| {
        std::fs::read_dir(pins.root().join(dir)).is_ok_and(|mut entries| entries.next().is_some())
    })
}

/// An error with its causes, for messages: aya's errors keep the errno in
/// their source.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The configured uplinks with their ifindex (those that exist).
fn config_uplinks(names: &[String]) -> Vec<(String, u32)> {
    names
        .iter()
        .filter_map(|name| {
            let index = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
            Some((name.clone(), index))
        })
        .collect()
}
