//! The control-plane seam: where workloads and services come from.
//!
//! A source produces a [`MeshState`]; nothing downstream (dataplane,
//! balancers, proxy, certificates) knows which one it was. Two exist: the
//! config file ([`mod@file`]) and the Kubernetes API server's watches
//! ([`kubernetes`]). Node settings and policy (trust domain,
//! authorization) always come from the config file.

pub mod file;
pub mod file_watch;
pub mod kubernetes;

use std::{path::PathBuf, sync::Arc};

use tracing::warn;

use self::kubernetes::{KubeSource, KubeStatus, mapping, model::Unmapped};
use crate::{config::Config, model::MeshState};

/// Where workloads and services come from: the config file, or the API
/// server's watches. Cheap to clone (the watches are shared).
#[derive(Clone)]
pub struct ModelSource {
    kube: Option<Arc<KubeSource>>,
}

impl ModelSource {
    /// Starts the watches the config asks for (none for a file source).
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let kube = match &config.kubernetes {
            Some(settings) => Some(Arc::new(
                KubeSource::start(settings, &config.node.name).await?,
            )),
            None => None,
        };
        Ok(Self { kube })
    }

    /// The API server's watches, under `kubernetes:`.
    pub fn kube(&self) -> Option<&Arc<KubeSource>> {
        self.kube.as_ref()
    }

    /// The model under `config`; None until the API server listed
    /// everything once.
    pub async fn state(&self, config: &Config) -> Option<MeshState> {
        match &self.kube {
            None => Some(file::mesh_state(config)),
            Some(kube) => {
                // Thousands of pods and services: build on the blocking
                // pool, not on a worker the proxy needs.
                let kube = kube.clone();
                let built = tokio::task::spawn_blocking(move || kube.build())
                    .await
                    .ok()??;
                Some(
                    MeshState::new(
                        config.node.name.clone(),
                        config.identity.trust_domain.clone(),
                        config.authorization.clone(),
                        built.workloads,
                        built.services,
                    )
                    .with_nodes(built.nodes)
                    .with_upcoming(built.upcoming),
                )
            }
        }
    }

    /// Fires when the cluster changed; never without `kubernetes:`.
    pub async fn changed(&self) {
        match &self.kube {
            Some(kube) => kube.changed().await,
            None => std::future::pending().await,
        }
    }

    /// The cgroup the connection tracker attaches to: `node.cgroup`, or
    /// kubelet's kubepods cgroup.
    pub fn tracked_cgroup(&self, config: &Config) -> Option<PathBuf> {
        config.node.cgroup.clone().or_else(|| {
            let settings = config.kubernetes.as_ref()?;
            match mapping::kubepods_root(&settings.cgroup_root) {
                Ok(root) => Some(root.path),
                Err(error) => {
                    warn!(%error, "no kubepods cgroup: connections are not tracked");
                    None
                }
            }
        })
    }

    /// Logs meshed pods that newly cannot be mapped to the kernel, and
    /// returns the current set.
    pub fn report_unmapped(&self, before: &[Unmapped]) -> Vec<Unmapped> {
        let Some(kube) = &self.kube else {
            return Vec::new();
        };
        let status = kube.status();
        for pod in status.unmapped.iter().filter(|p| !before.contains(p)) {
            warn!(pod = %pod.pod, reason = %pod.reason, "meshed pod not mapped to the kernel; it stays outside the mesh until it is");
        }
        status.unmapped
    }

    /// The readiness answer's lines on the source: empty for a file.
    pub fn readiness(&self) -> String {
        self.kube
            .as_ref()
            .map(|kube| readiness_details(&kube.status()))
            .unwrap_or_default()
    }
}

/// The readiness answer's details under `kubernetes:`.
fn readiness_details(status: &KubeStatus) -> String {
    let mut text = match (status.synced, status.disconnected_for_s) {
        (false, _) => "kubernetes: waiting for the first lists\n".to_owned(),
        (true, None) => "kubernetes: connected\n".to_owned(),
        (true, Some(seconds)) => format!(
            "kubernetes: API server unreachable for {seconds} s, serving the last state ({})\n",
            status.last_error.as_deref().unwrap_or("no answer")
        ),
    };
    for pod in &status.unmapped {
        text.push_str(&format!("unmapped pod {}: {}\n", pod.pod, pod.reason));
    }
    text
}
