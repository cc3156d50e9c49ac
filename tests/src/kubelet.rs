//! A real Kubernetes node: kubelet and containerd (with runc and the ptp
//! CNI plugin) in a node's network namespace, registered with the real
//! API server of [`crate::cluster`]. Everything is built by `cargo xtask`
//! from its Go module (`xtask/tools/{kube-apiserver,containerd,runc}`);
//! the images its pods run are made from this build's binaries
//! ([`crate::image`]) and imported, since no registry is reachable.
//!
//! Pods are wired by the ptp plugin (a veth per pod, a /32 route to it on
//! the host side), as Calico and kindnet wire them; host-network pods (the
//! agent's DaemonSet) share the node's namespace. kubelet's cgroups go
//! under a root of their own (`/mesh-tests/<node>-kubelet` in every
//! hierarchy), so the node's pods are found there and removed with it.
//!
//! Two settings follow from this machine rather than from Kubernetes:
//! cgroup v1 is allowed (the host mounts the v1 controllers and an empty
//! cgroup v2 hierarchy beside them; runc puts every container in both),
//! and containerd restricts OOM score adjustments to its own score (the
//! sandbox lacks CAP_SYS_RESOURCE, so pause's -998 would be refused).

use std::{
    collections::HashSet,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{cluster::Cluster, netns::NetNs, process::Guarded, tool};

/// The image every pod sandbox runs (kubelet's `pause`, built by xtask).
pub const PAUSE_IMAGE: &str = "localhost/pause:mesh-tests";

pub struct RealNode {
    pub name: String,
    dir: PathBuf,
    /// kubelet's `cgroupRoot` (a path inside each hierarchy).
    cgroup_root: String,
    kubelet: Option<Guarded>,
    containerd: Option<Guarded>,
    /// Network namespaces that were there before containerd made its
    /// sandboxes' (`/run/netns/cni-*`), so only ours are removed.
    netns_before: HashSet<String>,
}

impl RealNode {
    /// Starts containerd and kubelet in `netns` as node `name` at `ip`
    /// (an address of that namespace), registering with `cluster` as its
    /// admin; imports `images` (archives from [`crate::image::build`]),
    /// and waits until the node is Ready.
    pub fn start(cluster: &Cluster, netns: &NetNs, name: &str, ip: Ipv4Addr) -> Self {
        let dir = cluster.dir().join(format!("node-{name}"));
        fs::create_dir_all(dir.join("cni")).unwrap();
        let cgroup_root = format!("/mesh-tests/{name}-kubelet");
        let netns_before = cni_namespaces();
        // The agent mounts the host's bpffs with HostToContainer
        // propagation, which the runtime allows only from a shared (or
        // slave) mount: as systemd mounts everything on a real node.
        nix::mount::mount(
            None::<&str>,
            "/sys/fs/bpf",
            None::<&str>,
            nix::mount::MsFlags::MS_SHARED,
            None::<&str>,
        )
        .expect("making /sys/fs/bpf a shared mount");
        for hierarchy in hierarchies() {
            make_cgroup(&hierarchy, &cgroup_root);
        }
        let mut node = Self {
            name: name.to_owned(),
            dir,
            cgroup_root,
            kubelet: None,
            containerd: None,
            netns_before,
        };
        node.start_containerd(netns);
        let archive = crate::image::build(&node.dir, PAUSE_IMAGE, "/pause", &[tool("pause")]);
        node.import(&archive);
        node.start_kubelet(cluster, netns, ip);
        node
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn start_containerd(&mut self, netns: &NetNs) {
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
# Not used by the test, and two of them need cgo.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs", "io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "{opt}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            root = self.file("containerd/root"),
            state = self.file("containerd/state"),
            socket = self.file("containerd.sock"),
            opt = self.file("containerd/opt"),
            cni = self.file("cni"),
            runc = tool("runc").display(),
        );
        fs::write(self.dir.join("containerd.toml"), config).unwrap();
        // The ptp plugin: a veth per pod, the host side holding the
        // gateway address and a /32 route to the pod.
        let cni = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "mesh-tests",
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.11.0.0/24"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.file("ipam"),
                },
            }],
        });
        fs::write(self.dir.join("cni/10-mesh-tests.conflist"), cni.to_string()).unwrap();
        let mut containerd = Command::new(tool("containerd"));
        containerd
            .arg("--config")
            .arg(self.dir.join("containerd.toml"))
            // The runc shim is found on PATH.
            .env("PATH", path_with_tools())
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir, "containerd.log"));
        crate::process::enter(&mut containerd, &netns.path(), None);
        self.containerd = Some(Guarded::new(
            containerd.spawn().expect("starting containerd"),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctr(&["version"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                self.log("containerd.log")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_kubelet(&mut self, cluster: &Cluster, netns: &NetNs, ip: Ipv4Addr) {
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
podLogsDir: {logs}
address: 127.0.0.1
readOnlyPort: 0
healthzPort: 0
authentication: {{anonymous: {{enabled: false}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
# Nothing is evicted for the machine's own disk or memory use.
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: ""
syncFrequency: 5s
"#,
            cgroup_root = self.cgroup_root,
            socket = self.file("containerd.sock"),
            logs = self.file("pod-logs"),
        );
        fs::write(self.dir.join("kubelet.yaml"), config).unwrap();
        let mut kubelet = Command::new(tool("kubelet"));
        kubelet
            .arg("--config")
            .arg(self.dir.join("kubelet.yaml"))
            .arg("--kubeconfig")
            .arg(cluster.dir().join("admin.kubeconfig"))
            .arg("--root-dir")
            .arg(self.dir.join("kubelet"))
            .arg("--cert-dir")
            .arg(self.dir.join("kubelet-pki"))
            .args(["--hostname-override", &self.name])
            .args(["--node-ip", &ip.to_string()])
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir, "kubelet.log"));
        crate::process::enter(&mut kubelet, &netns.path(), None);
        self.kubelet = Some(Guarded::new(kubelet.spawn().expect("starting kubelet")));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let node = cluster.request(
                http::Method::GET,
                &format!("/api/v1/nodes/{}", self.name),
                None,
            );
            let ready = node.as_ref().is_ok_and(is_ready);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} not Ready in 120 s: {node:?}\n{}",
                self.name,
                self.log("kubelet.log")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `ctr` against this node's containerd, in the namespace kubelet's
    /// images live in.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(tool("ctr"))
            .args([
                "--address",
                &self.file("containerd.sock"),
                "--namespace",
                "k8s.io",
            ])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Imports an image archive (its name is inside it).
    pub fn import(&self, archive: &Path) {
        self.ctr(&["images", "import", &archive.display().to_string()])
            .unwrap_or_else(|e| panic!("importing {}: {e}", archive.display()));
    }

    /// Gives image `from` the further name `to`.
    pub fn tag(&self, from: &str, to: &str) {
        self.ctr(&["images", "tag", "--force", from, to])
            .unwrap_or_else(|e| panic!("tagging {from} as {to}: {e}"));
    }

    /// The cgroup v2 directory holding kubelet's `kubepods` (what the
    /// agent's `kubernetes.cgroup_root` names).
    pub fn cgroup_v2_root(&self) -> PathBuf {
        let unified = crate::cgroup::cgroup2_root();
        unified.join(self.cgroup_root.trim_start_matches('/'))
    }

    /// The cgroup v2 directory of BestEffort pod `uid`.
    pub fn besteffort_pod_cgroup(&self, uid: &str) -> PathBuf {
        self.cgroup_v2_root()
            .join("kubepods/besteffort")
            .join(format!("pod{uid}"))
    }

    /// `program`, to run inside BestEffort pod `uid` as one of its
    /// containers would: in its network namespace, and in a cgroup of its
    /// own under the pod's (so the agent's sock_ops sees its sockets).
    pub fn pod_command(&self, uid: &str, program: &Path) -> Command {
        let cgroup = self.besteffort_pod_cgroup(uid).join("mesh-tests");
        let _ = fs::create_dir(&cgroup);
        let mut command = Command::new(program);
        crate::process::enter(&mut command, &self.pod_netns(uid), Some(&cgroup));
        command
    }

    /// Every log kubelet keeps of `container` in `namespace`'s pods, by
    /// pod name (the CRI's prefixes removed).
    pub fn container_logs(&self, namespace: &str, container: &str) -> Vec<(String, String)> {
        self.pod_log_dirs(namespace)
            .into_iter()
            .map(|(name, uid, _)| {
                let log = self.container_log(namespace, &name, &uid, container);
                (name, log)
            })
            .collect()
    }

    /// How many times kubelet has started `container` again in each of
    /// `namespace`'s pods, by pod name (a log file per start).
    pub fn container_restarts(&self, namespace: &str, container: &str) -> Vec<(String, usize)> {
        self.pod_log_dirs(namespace)
            .into_iter()
            .filter_map(|(name, _, dir)| {
                let starts = fs::read_dir(dir.join(container)).ok()?.count();
                Some((name, starts.saturating_sub(1)))
            })
            .collect()
    }

    /// kubelet's log directories of `namespace`'s pods: (name, uid, path).
    fn pod_log_dirs(&self, namespace: &str) -> Vec<(String, String, PathBuf)> {
        let prefix = format!("{namespace}_");
        fs::read_dir(self.dir.join("pod-logs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let dir = entry.file_name().to_string_lossy().into_owned();
                let (name, uid) = dir.strip_prefix(&prefix)?.rsplit_once('_')?;
                Some((name.to_owned(), uid.to_owned(), entry.path()))
            })
            .collect()
    }

    /// The network namespace of pod `uid` (BestEffort), as
    /// `/proc/<pid>/ns/net` of one of its processes.
    pub fn pod_netns(&self, uid: &str) -> PathBuf {
        let cgroup = self.besteffort_pod_cgroup(uid);
        let pid = fs::read_dir(&cgroup)
            .unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()))
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .find_map(|container| {
                fs::read_to_string(container.path().join("cgroup.procs"))
                    .ok()?
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no process in {}", cgroup.display()));
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    }

    /// What container `container` of pod `namespace/name` (uid `uid`) has
    /// written so far (kubelet's log file, the CRI's `<time> <stream> <tag>`
    /// prefixes removed); empty once kubelet removed the pod.
    pub fn container_log(&self, namespace: &str, name: &str, uid: &str, container: &str) -> String {
        let dir = self
            .dir
            .join("pod-logs")
            .join(format!("{namespace}_{name}_{uid}"))
            .join(container);
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|text| {
                text.lines()
                    .map(|line| line.splitn(4, ' ').nth(3).unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn log(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // kubelet first (it would restart what dies), then every
        // container, then containerd with its shims.
        self.kubelet.take();
        kill_cgroup(&self.cgroup_v2_root());
        self.containerd.take();
        kill_processes_mentioning(&self.file("containerd.sock"));
        unmount_below(&self.dir);
        for netns in cni_namespaces().difference(&self.netns_before) {
            let path = format!("/run/netns/{netns}");
            let _ = nix::mount::umount2(path.as_str(), nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&path);
        }
        for hierarchy in hierarchies() {
            remove_cgroup_tree(&hierarchy.join(self.cgroup_root.trim_start_matches('/')));
        }
    }
}

/// Every cgroup hierarchy mounted here: each v1 controller's and the v2 one.
fn hierarchies() -> Vec<PathBuf> {
    crate::cgroup::mounts_of(&["cgroup", "cgroup2"])
}

/// Makes `relative` (and its parents) in `hierarchy`. A new cpuset gets
/// its parent's CPUs and memory nodes (v1 starts it with none, and no
/// task could join it); under v2 the parents delegate the controllers
/// kubelet needs.
fn make_cgroup(hierarchy: &Path, relative: &str) {
    let mut path = hierarchy.to_path_buf();
    for level in relative.trim_start_matches('/').split('/') {
        let parent = path.clone();
        path.push(level);
        if path.exists() {
            continue;
        }
        if parent.join("cgroup.subtree_control").exists() {
            for controller in ["cpuset", "cpu", "io", "memory", "pids", "hugetlb"] {
                let _ = fs::write(
                    parent.join("cgroup.subtree_control"),
                    format!("+{controller}"),
                );
            }
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = fs::read_to_string(parent.join(file)) {
                let _ = fs::write(path.join(file), value.trim());
            }
        }
    }
}

/// Kills every process in the cgroup v2 subtree at `path`.
fn kill_cgroup(path: &Path) {
    if fs::write(path.join("cgroup.kill"), "1").is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && fs::read_to_string(path.join("cgroup.events"))
            .is_ok_and(|events| events.contains("populated 1"))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs every process whose command line mentions `needle` (the
/// containerd shims, which outlive containerd on purpose).
fn kill_processes_mentioning(needle: &str) {
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            // SAFETY: sending a signal; a stale pid is harmless (ESRCH).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Unmounts everything mounted under `dir` (volumes, container root
/// filesystems, shm), deepest first.
fn unmount_below(dir: &Path) {
    let prefix = dir.display().to_string();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The sandboxes' network namespaces containerd names `cni-*`.
fn cni_namespaces() -> HashSet<String> {
    fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("cni-"))
        .collect()
}

/// Removes the cgroup at `path` and those below it, deepest first,
/// retrying while killed processes finish exiting.
fn remove_cgroup_tree(path: &Path) {
    fn remove(path: &Path) -> std::io::Result<()> {
        for entry in fs::read_dir(path)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove(&entry.path())?;
            }
        }
        fs::remove_dir(path)
    }
    for _ in 0..100 {
        if !path.exists() || remove(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_with_tools() -> String {
    let tools = tool("containerd");
    let tools = tools.parent().expect("target/tools");
    format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn log_file(dir: &Path, name: &str) -> fs::File {
    fs::File::create(dir.join(name)).expect("log file")
}

/// An object's status conditions (a pod's, a node's) say it is Ready.
pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}
