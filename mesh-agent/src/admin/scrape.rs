//! `/metrics`: a registry built for each scrape from what the agent holds
//! now (proxy counters, balancers, certificates) and what the kernel maps
//! hold (per-pod traffic, events, fill levels). Built fresh, so series of a
//! workload, endpoint or certificate that is gone are gone too.

use std::{collections::HashMap, sync::atomic::Ordering};

use prometheus_client::registry::Registry;

use super::view::AgentView;
use crate::{
    dataplane::KernelMaps,
    lb::MemberSnapshot,
    observability::metrics::{counter_family, gauge_family, render},
};

pub(super) fn render_metrics(sources: &AgentView) -> String {
    let mut registry = Registry::default();
    sources.sinks.metrics.register(&mut registry);
    let routes = sources.routes.borrow().clone();

    let services = routes.balancers.snapshot();
    let per_service = |value: fn(&crate::lb::state::ServiceCounters) -> u64| {
        services
            .iter()
            .map(move |s| {
                (
                    vec![
                        ("service", s.name.clone()),
                        ("namespace", s.namespace.clone()),
                    ],
                    value(&s.counters),
                )
            })
            .collect::<Vec<_>>()
    };
    counter_family(
        &mut registry,
        "mesh_service_overflows",
        "Connections refused by a circuit breaker",
        per_service(|c| c.overflows),
    );
    counter_family(
        &mut registry,
        "mesh_service_retries",
        "Connect retries on another endpoint",
        per_service(|c| c.retries),
    );
    counter_family(
        &mut registry,
        "mesh_service_retry_budget_exhausted",
        "Retries not made because the retry budget was spent",
        per_service(|c| c.retry_budget_exhausted),
    );
    counter_family(
        &mut registry,
        "mesh_service_no_endpoint",
        "Connections with no endpoint to go to",
        per_service(|c| c.no_endpoint),
    );
    counter_family(
        &mut registry,
        "mesh_service_connect_failures",
        "Failed connects to endpoints",
        per_service(|c| c.connect_failures),
    );

    let endpoints: Vec<(Vec<(&str, String)>, &MemberSnapshot)> = services
        .iter()
        .flat_map(|s| {
            s.endpoints.iter().map(move |e| {
                let labels = vec![
                    ("service", s.name.clone()),
                    ("namespace", s.namespace.clone()),
                    ("endpoint", e.state.ip.to_string()),
                ];
                (labels, e)
            })
        })
        .collect();
    let gauge = |f: fn(&MemberSnapshot) -> f64| {
        endpoints
            .iter()
            .map(move |(labels, e)| (labels.clone(), f(e)))
            .collect::<Vec<_>>()
    };
    gauge_family(
        &mut registry,
        "mesh_endpoint_active_connections",
        "Established connections per endpoint",
        gauge(|e| e.state.active as f64),
    );
    gauge_family(
        &mut registry,
        "mesh_endpoint_pending_connections",
        "Connects in progress per endpoint",
        gauge(|e| e.state.pending as f64),
    );
    gauge_family(
        &mut registry,
        "mesh_endpoint_healthy",
        "1 when active health checks pass (or none run)",
        gauge(|e| f64::from(u8::from(e.state.healthy))),
    );
    gauge_family(
        &mut registry,
        "mesh_endpoint_ejected",
        "1 while the endpoint is ejected by outlier detection",
        gauge(|e| f64::from(u8::from(e.state.ejected_for_ms.is_some()))),
    );
    gauge_family(
        &mut registry,
        "mesh_endpoint_connect_latency_ewma_seconds",
        "Peak-EWMA of connect latency",
        gauge(|e| e.state.ewma_ms / 1000.0),
    );

    let spans = sources.sinks.tracer.snapshot();
    counter_family(
        &mut registry,
        "mesh_agent_spans",
        "Sampled connection spans: exported, dropped (queue full or tracing off), failed (export lost)",
        [
            ("exported", spans.exported),
            ("dropped", spans.dropped),
            ("failed", spans.failed),
        ]
        .map(|(result, count)| (vec![("result", result.to_owned())], count))
        .to_vec(),
    );

    let outbound = sources.outbound.snapshot();
    let inbound = sources.inbound.snapshot();
    gauge_family(
        &mut registry,
        "mesh_outbound_active_connections",
        "Captured connections the outbound proxy carries now",
        [(vec![], outbound.active as f64)],
    );
    counter_family(
        &mut registry,
        "mesh_authorization_denied",
        "Connections denied by authorization",
        [
            (vec![("reporter", "source".to_owned())], outbound.denied),
            (vec![("reporter", "destination".to_owned())], inbound.denied),
        ],
    );
    counter_family(
        &mut registry,
        "mesh_hbone_refused",
        "Inbound HBONE connections refused (TLS, identity, target)",
        [(vec![], inbound.refused)],
    );
    counter_family(
        &mut registry,
        "mesh_hbone_connections_opened",
        "HBONE connections this agent opened to other nodes",
        [(
            vec![],
            sources.hbone.connections_opened.load(Ordering::Relaxed),
        )],
    );
    let lifecycle = &sources.lifecycle;
    gauge_family(
        &mut registry,
        "mesh_agent_kernel_start",
        "How this agent came by the kernel state (1 for its kind): fresh, adopted from the previous agent, or reloaded because the pinned layout differed (capture lapsed)",
        [(vec![("kind", lifecycle.kernel_kind().to_owned())], 1.0)],
    );
    counter_family(
        &mut registry,
        "mesh_agent_handovers_failed",
        "New agents that asked to take over from this one and did not",
        [(vec![], lifecycle.handovers_failed.load(Ordering::Relaxed))],
    );
    gauge_family(
        &mut registry,
        "mesh_agent_draining",
        "1 while this agent, handed over, serves only the connections it carried",
        [(
            vec![],
            f64::from(u8::from(lifecycle.draining.load(Ordering::Relaxed))),
        )],
    );
    let kernel_tls = sources.hbone.kernel_tls();
    counter_family(
        &mut registry,
        "mesh_hbone_kernel_tls_connections",
        "HBONE connections (inbound and outbound) whose TLS records the kernel ciphers",
        [(vec![], kernel_tls.connections.load(Ordering::Relaxed))],
    );
    counter_family(
        &mut registry,
        "mesh_hbone_kernel_tls_fallbacks",
        "HBONE connections left on rustls although kernel TLS was allowed",
        [(vec![], kernel_tls.fallbacks.load(Ordering::Relaxed))],
    );
    gauge_family(
        &mut registry,
        "mesh_certificate_expiry_timestamp_seconds",
        "When each workload certificate expires",
        sources
            .certs
            .snapshot()
            .into_iter()
            .map(|c| (vec![("identity", c.identity)], c.not_after as f64)),
    );

    if let Ok(maps) = KernelMaps::open_pinned(&sources.pins) {
        // ifindex -> (workload, namespace) for the pods on this node.
        let by_interface: HashMap<String, (String, String)> = routes
            .state
            .local_workloads()
            .map(|(_, w, local)| {
                (
                    local.interface.clone(),
                    (w.name.clone(), w.namespace.clone()),
                )
            })
            .collect();
        let pods: Vec<_> = maps
            .pod_stats()
            .into_iter()
            .filter_map(|(ifindex, stats)| {
                let name = nix::net::if_::if_indextoname(ifindex)
                    .ok()?
                    .to_string_lossy()
                    .into_owned();
                let (workload, namespace) = by_interface.get(&name)?.clone();
                Some((workload, namespace, stats))
            })
            .collect();
        let pod_labels = |w: &str, ns: &str, extra: Option<(&'static str, &str)>| {
            let mut labels = vec![("workload", w.to_owned()), ("namespace", ns.to_owned())];
            if let Some((k, v)) = extra {
                labels.push((k, v.to_owned()));
            }
            labels
        };
        counter_family(
            &mut registry,
            "mesh_pod_packets",
            "Packets on meshed pod interfaces, counted by tc",
            pods.iter().flat_map(|(w, ns, s)| {
                [
                    (
                        pod_labels(w, ns, Some(("direction", "from_pod"))),
                        s.packets_from_pod,
                    ),
                    (
                        pod_labels(w, ns, Some(("direction", "to_pod"))),
                        s.packets_to_pod,
                    ),
                ]
            }),
        );
        counter_family(
            &mut registry,
            "mesh_pod_bytes",
            "Bytes on meshed pod interfaces, counted by tc",
            pods.iter().flat_map(|(w, ns, s)| {
                [
                    (
                        pod_labels(w, ns, Some(("direction", "from_pod"))),
                        s.bytes_from_pod,
                    ),
                    (
                        pod_labels(w, ns, Some(("direction", "to_pod"))),
                        s.bytes_to_pod,
                    ),
                ]
            }),
        );
        counter_family(
            &mut registry,
            "mesh_pod_redirected_connections",
            "Connections of the pod handed to the agent by tc",
            pods.iter()
                .map(|(w, ns, s)| (pod_labels(w, ns, None), s.captured)),
        );
        counter_family(
            &mut registry,
            "mesh_pod_plaintext_connections",
            "Connections from outside the mesh to the pod",
            pods.iter().flat_map(|(w, ns, s)| {
                [
                    (
                        pod_labels(w, ns, Some(("verdict", "allowed"))),
                        s.plaintext_in,
                    ),
                    (
                        pod_labels(w, ns, Some(("verdict", "dropped"))),
                        s.plaintext_dropped,
                    ),
                ]
            }),
        );
        // One walk over the maps per scrape (MESH_CONNS can be large).
        let levels = maps.fill_levels(&sources.pins);
        counter_family(
            &mut registry,
            "mesh_kernel_events",
            "Events counted by the kernel programs",
            maps.counters()
                .into_iter()
                .map(|(name, value)| (vec![("event", name.to_owned())], value)),
        );
        gauge_family(
            &mut registry,
            "mesh_map_entries",
            "Entries in the agent's kernel maps",
            levels
                .iter()
                .map(|(name, used, _)| (vec![("map", (*name).to_owned())], *used as f64)),
        );
        gauge_family(
            &mut registry,
            "mesh_map_capacity",
            "Capacity of the agent's kernel maps",
            levels.iter().map(|(name, _, capacity)| {
                (vec![("map", (*name).to_owned())], f64::from(*capacity))
            }),
        );
    }
    if let Some(kube) = &sources.kube {
        register_kubernetes(&mut registry, &kube.status());
    }
    render(&registry)
}

/// The Kubernetes source: reachability, watch churn, unmapped pods.
fn register_kubernetes(registry: &mut Registry, status: &crate::source::kubernetes::KubeStatus) {
    let one = |value: f64| [(Vec::new(), value)];
    gauge_family(
        registry,
        "mesh_kubernetes_connected",
        "1 while the API server answers; 0 while the agent serves its last state",
        one(if status.connected { 1.0 } else { 0.0 }),
    );
    gauge_family(
        registry,
        "mesh_kubernetes_synced",
        "1 once every watch listed its resources",
        one(if status.synced { 1.0 } else { 0.0 }),
    );
    gauge_family(
        registry,
        "mesh_kubernetes_unmapped_pods",
        "Meshed pods on this node not found in the kernel (no host route or cgroup)",
        one(status.unmapped.len() as f64),
    );
    counter_family(
        registry,
        "mesh_kubernetes_watch_events",
        "Watch events received",
        [(Vec::new(), status.events)],
    );
    counter_family(
        registry,
        "mesh_kubernetes_relists",
        "Complete re-lists after a watch could not resume (e.g. 410 Gone)",
        [(Vec::new(), status.relists)],
    );
    counter_family(
        registry,
        "mesh_kubernetes_watch_errors",
        "Failed watch or list requests",
        [(Vec::new(), status.watch_errors)],
    );
}
