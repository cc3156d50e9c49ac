//! What the agent needs from the running kernel, checked before anything
//! is loaded: program types, map types, helpers per program type, attach
//! modes. A missing requirement stops the agent with the feature's name and
//! the first kernel that has it, instead of a verifier dump or, worse, a
//! program that loads but misbehaves. A missing optional feature selects a
//! documented fallback.
//!
//! Helper probes load a two-instruction program calling the helper and read
//! the verifier's verdict (aya follows libbpf's strategy), so they answer
//! for this kernel's configuration, not for a version number.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};
use serde::Serialize;

/// How a feature is checked.
#[derive(Clone, Copy)]
enum Check {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// No probe exists short of attaching: the kernel version decides.
    KernelAtLeast(u8, u8),
}

struct Feature {
    name: &'static str,
    /// The first mainline kernel with the feature.
    since: &'static str,
    /// What uses it.
    used_by: &'static str,
    /// What the agent does without it; `None` means it cannot run.
    fallback: Option<&'static str>,
    check: Check,
}

const FEATURES: &[Feature] = &[
    Feature {
        name: "program type sched_cls (tc)",
        since: "4.1",
        used_by: "mesh_from_pod, mesh_to_pod, mesh_uplink",
        fallback: None,
        check: Check::Program(ProgramType::SchedClassifier),
    },
    Feature {
        name: "program type sock_ops",
        since: "4.13",
        used_by: "mesh_sockops",
        fallback: None,
        check: Check::Program(ProgramType::SockOps),
    },
    Feature {
        name: "program type cgroup_sock_addr",
        since: "4.17",
        used_by: "mesh_connect4 (same-node direct service balancing)",
        fallback: None,
        check: Check::Program(ProgramType::CgroupSockAddr),
    },
    Feature {
        name: "map type hash",
        since: "3.19",
        used_by: "MESH_SERVICES, MESH_WORKLOADS, MESH_TC_FILTERS",
        fallback: None,
        check: Check::Map(MapType::Hash),
    },
    Feature {
        name: "map type lru_hash",
        since: "4.10",
        used_by: "MESH_CONNS",
        fallback: None,
        check: Check::Map(MapType::LruHash),
    },
    Feature {
        name: "map type percpu_hash",
        since: "4.6",
        used_by: "MESH_POD_STATS",
        fallback: None,
        check: Check::Map(MapType::PerCpuHash),
    },
    Feature {
        name: "map type percpu_array",
        since: "4.6",
        used_by: "MESH_COUNTERS",
        fallback: None,
        check: Check::Map(MapType::PerCpuArray),
    },
    Feature {
        name: "helper bpf_skc_lookup_tcp in tc",
        since: "5.2",
        used_by: "mesh_from_pod, mesh_uplink (finding the agent's listener)",
        fallback: None,
        check: Check::Helper(
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_skc_lookup_tcp,
        ),
    },
    Feature {
        name: "helper bpf_sk_assign in tc",
        since: "5.7",
        used_by: "mesh_from_pod, mesh_uplink (handing a connection to the agent)",
        fallback: None,
        check: Check::Helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_sk_assign),
    },
    Feature {
        name: "helper bpf_redirect_peer in tc",
        since: "5.10",
        used_by: "mesh_from_pod (same-node direct connections, into the receiving pod)",
        fallback: None,
        check: Check::Helper(
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_redirect_peer,
        ),
    },
    Feature {
        name: "helper bpf_sk_release in tc",
        since: "4.20",
        used_by: "mesh_from_pod, mesh_uplink",
        fallback: None,
        check: Check::Helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_sk_release),
    },
    Feature {
        name: "helper bpf_get_socket_cookie in sock_ops",
        since: "5.0",
        used_by: "mesh_sockops (connection identity)",
        fallback: None,
        check: Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    },
    Feature {
        name: "helper bpf_sock_ops_cb_flags_set in sock_ops",
        since: "4.16",
        used_by: "mesh_sockops (close tracking)",
        fallback: None,
        check: Check::Helper(
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_sock_ops_cb_flags_set,
        ),
    },
    Feature {
        name: "cgroup BPF links",
        since: "5.7",
        used_by: "mesh_sockops (pinned attachment)",
        fallback: None,
        check: Check::KernelAtLeast(5, 7),
    },
    Feature {
        name: "program type sk_skb",
        since: "4.14",
        used_by: "mesh_splice (same-node fast path)",
        fallback: Some(FAST_PATH_FALLBACK),
        check: Check::Program(ProgramType::SkSkb),
    },
    Feature {
        name: "map type sockhash",
        since: "4.18",
        used_by: "MESH_SPLICE_TO, MESH_SPLICE_ON (same-node fast path)",
        fallback: Some(FAST_PATH_FALLBACK),
        check: Check::Map(MapType::SockHash),
    },
    Feature {
        name: "helper bpf_sk_redirect_hash in sk_skb",
        since: "4.18",
        used_by: "mesh_splice (same-node fast path)",
        fallback: Some(FAST_PATH_FALLBACK),
        check: Check::Helper(ProgramType::SkSkb, BpfHelper::BPF_FUNC_sk_redirect_hash),
    },
    Feature {
        name: "sk_skb stream verdict without a parser",
        since: "5.10",
        used_by: "mesh_splice (same-node fast path)",
        fallback: Some(FAST_PATH_FALLBACK),
        check: Check::KernelAtLeast(5, 10),
    },
    Feature {
        name: "program type sk_lookup",
        since: "5.9",
        used_by: "mesh_listener_lookup (a reused client port meets TIME_WAIT)",
        fallback: Some(
            "a client that reuses its port while the agent's socket of its \
             previous connection is in TIME_WAIT waits for TIME_WAIT to end",
        ),
        check: Check::Program(ProgramType::SkLookup),
    },
    Feature {
        name: "TCX attachment (tc links)",
        since: "6.6",
        used_by: "mesh_from_pod, mesh_to_pod, mesh_uplink",
        fallback: Some(
            "netlink tc filters on a clsact qdisc, recorded in the pinned map \
             MESH_TC_FILTERS so `mesh-agent cleanup` can remove them",
        ),
        check: Check::KernelAtLeast(6, 6),
    },
];

const FAST_PATH_FALLBACK: &str = "the agent copies same-node bytes in user space";

/// Whether `mesh_listener_lookup` can run.
pub fn listener_lookup_supported(statuses: &[FeatureStatus]) -> bool {
    statuses
        .iter()
        .any(|s| s.name == "program type sk_lookup" && s.available)
}

/// Whether the same-node fast path can run: every feature whose fallback
/// is the user-space copy is there.
pub fn fast_path_supported(statuses: &[FeatureStatus]) -> bool {
    statuses
        .iter()
        .filter(|s| s.fallback == Some(FAST_PATH_FALLBACK))
        .all(|s| s.available)
}

/// One feature's verdict on this kernel.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureStatus {
    pub name: &'static str,
    pub since: &'static str,
    pub used_by: &'static str,
    pub available: bool,
    /// Set when the probe itself failed (then `available` is false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<&'static str>,
}

impl FeatureStatus {
    pub fn required(&self) -> bool {
        self.fallback.is_none()
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "this kernel ({kernel}) lacks {feature}, which {used_by} needs; it first appeared in Linux {since}{detail}"
)]
pub struct MissingFeature {
    pub kernel: String,
    pub feature: &'static str,
    pub used_by: &'static str,
    pub since: &'static str,
    /// The probe's own error, when it could not even ask.
    pub detail: String,
}

/// Probes every feature.
pub fn probe() -> Vec<FeatureStatus> {
    FEATURES
        .iter()
        .map(|feature| {
            let (available, probe_error) = match run(feature.check) {
                Ok(available) => (available, None),
                Err(error) => (false, Some(error)),
            };
            FeatureStatus {
                name: feature.name,
                since: feature.since,
                used_by: feature.used_by,
                available,
                probe_error,
                fallback: feature.fallback,
            }
        })
        .collect()
}

/// The first missing required feature, as an error.
pub fn require(statuses: &[FeatureStatus]) -> Result<(), MissingFeature> {
    match statuses.iter().find(|s| s.required() && !s.available) {
        None => Ok(()),
        Some(status) => Err(MissingFeature {
            kernel: kernel_release(),
            feature: status.name,
            used_by: status.used_by,
            since: status.since,
            detail: status
                .probe_error
                .as_ref()
                .map(|e| format!(" (probe failed: {e})"))
                .unwrap_or_default(),
        }),
    }
}

/// `uname -r`, for messages.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn run(check: Check) -> Result<bool, String> {
    match check {
        Check::Program(program) => is_program_supported(program).map_err(|e| e.to_string()),
        Check::Map(map) => is_map_supported(map).map_err(|e| e.to_string()),
        Check::Helper(program, helper) => {
            is_helper_supported(program, helper).map_err(|e| e.to_string())
        }
        Check::KernelAtLeast(major, minor) => KernelVersion::current()
            .map(|version| version >= KernelVersion::new(major, minor, 0))
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(
        name: &'static str,
        available: bool,
        fallback: Option<&'static str>,
    ) -> FeatureStatus {
        FeatureStatus {
            name,
            since: "5.7",
            used_by: "mesh_from_pod",
            available,
            probe_error: None,
            fallback,
        }
    }

    #[test]
    fn a_missing_requirement_is_named_with_its_first_kernel() {
        let statuses = [
            status("TCX attachment (tc links)", false, Some("netlink")),
            status("helper bpf_sk_assign in tc", false, None),
        ];
        let error = require(&statuses).unwrap_err().to_string();
        assert!(
            error.contains("lacks helper bpf_sk_assign in tc"),
            "{error}"
        );
        assert!(error.contains("mesh_from_pod needs"), "{error}");
        assert!(error.contains("first appeared in Linux 5.7"), "{error}");
    }

    #[test]
    fn a_missing_optional_feature_takes_its_fallback() {
        let statuses = [status("TCX attachment (tc links)", false, Some("netlink"))];
        assert!(require(&statuses).is_ok());
    }

    #[test]
    fn this_kernel_has_everything_required() {
        // The suite's kernel (6.18 here, and every kernel of the matrix).
        require(&probe()).unwrap();
    }
}
