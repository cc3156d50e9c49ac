//! The Kubernetes source of the mesh model: watches on the API server
//! (kube-rs), turned into the same workloads and services the config file
//! describes.
//!
//! Watches: Namespaces (the opt-in label), every Node (this one's zone, their addresses), the
//! Pods on this node (field selector `spec.nodeName`), every Pod (the
//! identities, versions and opt-outs of remote endpoints), Services and
//! EndpointSlices. Each watch lists, then watches from the list's
//! resourceVersion with bookmarks; kube-runtime resumes a broken watch and
//! re-lists after a 410 Gone, with back-off. The tables keep the last state
//! through it all, so the agent keeps serving while the API server is away;
//! a probe of `/version` every two seconds says whether it is reachable.

#[cfg(test)]
mod corpus;
pub mod mapping;
pub mod model;
pub mod records;
pub mod store;

use std::{
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use self::{
    model::{Built, NodeView, Unmapped},
    records::{NamespaceRecord, NodeRecord, PodRecord, ServiceRecord, SliceRecord},
    store::{ClusterState, Table},
};
use crate::{config::KubernetesConfig, locks::lock};

const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// `(API group, resource)` of everything watched: what the ClusterRole in
/// `deploy/` must grant (get, list, watch), and no more.
pub const WATCHED: &[(&str, &str)] = &[
    ("", "namespaces"),
    ("", "nodes"),
    ("", "pods"),
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
];

/// The watches and what they hold.
pub struct KubeSource {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    config: KubernetesConfig,
    node: String,
}

#[derive(Default)]
struct Shared {
    /// The watches' tables. Events change them in place (copy on write);
    /// a model build takes a snapshot and builds without the lock, so it
    /// never holds up the watches or a runtime worker.
    cluster: Mutex<Arc<ClusterState>>,
    status: Mutex<Health>,
    changed: Notify,
}

#[derive(Default)]
struct Health {
    /// Since when the API server has been unreachable.
    down_since: Option<Instant>,
    last_error: Option<String>,
    events: u64,
    watch_errors: u64,
    unmapped: Vec<Unmapped>,
    problems: Vec<String>,
}

/// How the source is doing, for readiness details, metrics and the
/// config dump.
#[derive(Debug, Clone, Serialize)]
pub struct KubeStatus {
    /// Every watch delivered its first list.
    pub synced: bool,
    /// The API server answered the last probe and no watch failed since.
    pub connected: bool,
    pub disconnected_for_s: Option<u64>,
    pub last_error: Option<String>,
    pub events: u64,
    pub relists: u64,
    pub watch_errors: u64,
    pub unmapped: Vec<Unmapped>,
    pub problems: Vec<String>,
}

impl KubeSource {
    /// Connects (without waiting for the server) and starts every watch.
    pub async fn start(config: &KubernetesConfig, node: &str) -> anyhow::Result<Self> {
        let client = match &config.api_server {
            Some(url) => {
                let uri = url
                    .parse()
                    .with_context(|| format!("kubernetes.api_server: {url:?}"))?;
                Client::try_from(kube::Config::new(uri))
                    .with_context(|| format!("kubernetes client for {url}"))?
            }
            None => Client::try_default()
                .await
                .context("kubernetes client (in-cluster or kubeconfig)")?,
        };
        let shared = Arc::new(Shared::default());
        let on_node = format!("spec.nodeName={node}");
        let tasks = vec![
            spawn_watch(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
                &shared,
                |n| Some(NamespaceRecord::from_namespace(n)),
                |c| &mut c.namespaces,
            ),
            spawn_watch(
                Api::<Node>::all(client.clone()),
                watcher::Config::default(),
                &shared,
                |n| Some(NodeRecord::from_node(n)),
                |c| &mut c.nodes,
            ),
            spawn_watch(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields(&on_node),
                &shared,
                |p| Some(PodRecord::from_pod(p)),
                |c| &mut c.local_pods,
            ),
            spawn_watch(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default(),
                &shared,
                |p| Some(PodRecord::from_pod(p)),
                |c| &mut c.pods,
            ),
            spawn_watch(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
                &shared,
                |s| Some(ServiceRecord::from_service(s)),
                |c| &mut c.services,
            ),
            spawn_watch(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default(),
                &shared,
                SliceRecord::from_slice,
                |c| &mut c.slices,
            ),
            tokio::spawn(probe(client, shared.clone())),
        ];
        Ok(Self {
            shared,
            tasks,
            config: config.clone(),
            node: node.to_owned(),
        })
    }

    /// Waits until a table changed since the last call.
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    /// Builds the model from the tables, reading the node's routes and
    /// cgroups now; None until every watch has listed once.
    pub fn build(&self) -> Option<Built> {
        let view = NodeView {
            name: self.node.clone(),
            kubepods: mapping::kubepods_root(&self.config.cgroup_root),
            routes: std::fs::read_to_string(&self.config.proc_net_route)
                .map(|text| mapping::parse_routes(&text))
                .unwrap_or_default(),
            sys_class_net: self.config.sys_class_net.clone(),
        };
        let built = {
            let cluster = lock(&self.shared.cluster).clone();
            if !cluster.synced() {
                return None;
            }
            tracing::debug!(
                namespaces = cluster.namespaces.live.len(),
                local_pods = cluster.local_pods.live.len(),
                pods = cluster.pods.live.len(),
                services = cluster.services.live.len(),
                slices = cluster.slices.live.len(),
                "building the model from the cluster"
            );
            model::build(&cluster, &view)
        };
        let mut health = lock(&self.shared.status);
        for problem in built
            .problems
            .iter()
            .filter(|p| !health.problems.contains(p))
        {
            warn!(problem, "cluster object not used as it is");
        }
        health.unmapped = built.unmapped.clone();
        health.problems = built.problems.clone();
        Some(built)
    }

    pub fn status(&self) -> KubeStatus {
        let (synced, relists) = {
            let cluster = lock(&self.shared.cluster);
            (cluster.synced(), cluster.relists())
        };
        let health = lock(&self.shared.status);
        KubeStatus {
            synced,
            connected: health.down_since.is_none(),
            disconnected_for_s: health.down_since.map(|t| t.elapsed().as_secs()),
            last_error: health.last_error.clone(),
            events: health.events,
            relists,
            watch_errors: health.watch_errors,
            unmapped: health.unmapped.clone(),
            problems: health.problems.clone(),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Shared {
    fn failed(&self, error: String) {
        let mut health = lock(&self.status);
        if health.down_since.is_none() {
            warn!(%error, "API server unreachable; serving the last state");
            health.down_since = Some(Instant::now());
        }
        health.last_error = Some(error);
    }

    fn reachable(&self) {
        let mut health = lock(&self.status);
        if let Some(since) = health.down_since.take() {
            info!(
                after_s = since.elapsed().as_secs(),
                "API server reachable again"
            );
        }
    }
}

/// Runs one watch for the life of the agent, applying what it sees to
/// its table.
fn spawn_watch<K, R>(
    api: Api<K>,
    config: watcher::Config,
    shared: &Arc<Shared>,
    convert: fn(&K) -> Option<R>,
    table: fn(&mut ClusterState) -> &mut Table<R>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
    R: PartialEq + Send + 'static,
{
    let shared = shared.clone();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    tokio::spawn(async move {
        let mut events =
            std::pin::pin!(watcher::watcher(api, config).backoff(RetryDelay::default()));
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    lock(&shared.status).watch_errors += 1;
                    shared.failed(format!("watching {kind}: {error}"));
                    continue;
                }
            };
            let keyed = |object: K| {
                // Namespaced objects by `namespace/name`, the others by name.
                let key = match object.namespace() {
                    Some(namespace) => records::key(&namespace, &object.name_any()),
                    None => object.name_any(),
                };
                let record = convert(&object);
                (key, record)
            };
            let event = match event {
                Event::Init => Event::Init,
                Event::InitApply(o) => Event::InitApply(keyed(o)),
                Event::InitDone => Event::InitDone,
                Event::Apply(o) => Event::Apply(keyed(o)),
                Event::Delete(o) => Event::Delete(keyed(o)),
            };
            lock(&shared.status).events += 1;
            let changed = table(Arc::make_mut(&mut lock(&shared.cluster))).apply(event);
            if changed {
                shared.changed.notify_one();
            }
        }
    })
}

/// Delays between attempts of a failing watch: 100 ms doubling to 5 s,
/// back to 100 ms after a success. (kube's default starts at 800 ms and
/// grows to 30 s; the mesh wants changes within a second of the server's
/// return, and a node agent's few requests do not burden it.)
struct RetryDelay {
    next: Duration,
}

impl RetryDelay {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);
}

impl Default for RetryDelay {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for RetryDelay {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for RetryDelay {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Asks the API server for its version every [`PROBE_INTERVAL`]: a watch
/// that is merely quiet says nothing about whether the server is there.
async fn probe(client: Client, shared: Arc<Shared>) {
    loop {
        match tokio::time::timeout(PROBE_INTERVAL, client.apiserver_version()).await {
            Ok(Ok(_)) => shared.reachable(),
            Ok(Err(error)) => shared.failed(format!("probing /version: {error}")),
            Err(_) => shared.failed("probing /version: no answer within 2 s".into()),
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}
