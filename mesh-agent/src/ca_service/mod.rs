//! `mesh-agent ca serve`: the mesh's CA as a service, so that no node holds
//! the signing key. It answers Istio's certificate API
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`) over TLS 1.3
//! and signs a workload's certificate only for a node agent asking for a
//! meshed pod on its own node ([`authorize`]), from a CSR that asks for
//! exactly that identity ([`csr`]). The caller is authenticated by its
//! bearer ServiceAccount token (a TokenReview with the configured
//! audience); the pods are read from the API server at each request, so a
//! decision never rests on a stale cache. Every decision is logged and
//! counted; the key never is.

pub mod authorize;
pub mod csr;
mod serving;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::{Namespace, Pod},
};
use kube::api::{Api, ListParams, PostParams};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::authorize::Refusal;
use crate::{
    admin::{self, AdminState, AdminView, Role},
    identity::{EmbeddedCa, SpiffeId},
    istio_ca::{
        IstioCertificateRequest, IstioCertificateResponse, impersonated,
        server::{IstioCertificateService, IstioCertificateServiceServer},
    },
    source::kubernetes::records::{NamespaceRecord, PodRecord},
};

/// What `mesh-agent ca serve` is told.
pub struct Settings {
    /// Where the gRPC service listens.
    pub listen: SocketAddr,
    /// `/metrics`.
    pub metrics: SocketAddr,
    pub trust_domain: String,
    /// The audience a caller's token must be for.
    pub audience: String,
    /// Node agents' ServiceAccounts, `namespace/name`.
    pub node_accounts: Vec<String>,
    /// Lifetime when a request asks for none; the longest granted.
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    /// The names clients reach the service by, for its serving certificate.
    pub serving_names: Vec<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Default)]
struct Stats {
    issued: Counter,
    refused: Family<ReasonLabel, Counter>,
    failed: Counter,
}

struct CaService {
    ca: Arc<EmbeddedCa>,
    kube: kube::Client,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
}

/// Why a request got no certificate.
enum Failure {
    Refused(Refusal),
    /// The API server could not be asked, or signing failed: not the
    /// caller's fault, worth a retry.
    Internal(String),
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Failure::Refused(refusal)
    }
}

impl CaService {
    async fn decide(
        &self,
        token: Option<&str>,
        request: &IstioCertificateRequest,
    ) -> Result<(SpiffeId, Vec<String>), Failure> {
        let token = token.ok_or(Refusal::NoToken)?;
        let caller = self.review(token).await?;
        authorize::node_agent(&caller, &self.settings.node_accounts)?;
        let caller_pod = match &caller.pod {
            Some((name, _)) => self.pod(&caller.namespace, name).await?,
            None => None,
        };
        let node = authorize::caller_node(&caller, caller_pod.as_ref())?;
        let id = authorize::requested(
            impersonated(request.metadata.as_ref()),
            &self.settings.trust_domain,
        )?;
        let pods = self.pods_on(&id, &node).await?;
        let opted_in = self.namespace_opted_in(&id.namespace).await?;
        authorize::on_node(&id, &node, &pods, opted_in)?;
        let public_key = csr::check(&request.csr, &id.to_string()).map_err(Refusal::from)?;
        let lifetime = match u64::try_from(request.validity_duration) {
            Ok(0) | Err(_) => self.settings.default_lifetime,
            Ok(seconds) => Duration::from_secs(seconds).min(self.settings.max_lifetime),
        };
        let issued = self
            .ca
            .sign(&id, &public_key, lifetime)
            .map_err(|e| Failure::Internal(format!("signing: {e}")))?;
        let chain = issued
            .chain
            .iter()
            .chain(&self.ca_roots())
            .map(|cert| pem(cert))
            .collect();
        info!(caller = %caller.account(), %node, identity = %id, valid_for_s = lifetime.as_secs(), "certificate issued");
        Ok((id, chain))
    }

    fn ca_roots(&self) -> Vec<CertificateDer<'static>> {
        crate::identity::CertificateAuthority::roots(self.ca.as_ref())
    }

    async fn review(&self, token: &str) -> Result<authorize::Caller, Failure> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.settings.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.kube.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Failure::Internal(format!("TokenReview: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        Ok(authorize::caller(&status, &self.settings.audience)?)
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>, Failure> {
        Api::<Pod>::namespaced(self.kube.clone(), namespace)
            .get_opt(name)
            .await
            .map(|pod| pod.as_ref().map(PodRecord::from_pod))
            .map_err(|e| Failure::Internal(format!("reading pod {namespace}/{name}: {e}")))
    }

    async fn pods_on(&self, id: &SpiffeId, node: &str) -> Result<Vec<PodRecord>, Failure> {
        let params = ListParams::default().fields(&format!(
            "spec.nodeName={node},spec.serviceAccountName={}",
            id.service_account
        ));
        Api::<Pod>::namespaced(self.kube.clone(), &id.namespace)
            .list(&params)
            .await
            .map(|list| list.items.iter().map(PodRecord::from_pod).collect())
            .map_err(|e| Failure::Internal(format!("listing pods of {id}: {e}")))
    }

    async fn namespace_opted_in(&self, name: &str) -> Result<bool, Failure> {
        Api::<Namespace>::all(self.kube.clone())
            .get_opt(name)
            .await
            .map(|ns| {
                ns.as_ref()
                    .is_some_and(|ns| NamespaceRecord::from_namespace(ns).opted_in)
            })
            .map_err(|e| Failure::Internal(format!("reading namespace {name}: {e}")))
    }
}

fn pem(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "?".into(), |addr| addr.to_string());
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer"))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(str::to_owned);
        let request = request.into_inner();
        let asked = impersonated(request.metadata.as_ref())
            .unwrap_or("")
            .to_owned();
        match self.decide(token.as_deref(), &request).await {
            Ok((_, cert_chain)) => {
                self.stats.issued.inc();
                Ok(tonic::Response::new(IstioCertificateResponse {
                    cert_chain,
                }))
            }
            Err(Failure::Refused(refusal)) => {
                self.stats
                    .refused
                    .get_or_create(&ReasonLabel {
                        reason: refusal.reason(),
                    })
                    .inc();
                warn!(%peer, identity = %asked, reason = refusal.reason(), %refusal, "certificate refused");
                Err(tonic::Status::new(refusal.code(), refusal.to_string()))
            }
            Err(Failure::Internal(error)) => {
                self.stats.failed.inc();
                warn!(%peer, identity = %asked, %error, "certificate request failed");
                Err(tonic::Status::unavailable(error))
            }
        }
    }
}

/// `/metrics` of the service: issued, refused by reason, failed.
struct MetricsView {
    registry: Registry,
}

impl AdminView for MetricsView {
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn connections(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn graph(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn events(&self) -> tokio::sync::broadcast::Receiver<String> {
        tokio::sync::broadcast::channel(1).1
    }

    fn set_log_filter(&self, _filter: &str) -> Result<String, admin::LogFilterError> {
        Ok(String::new())
    }
}

/// Serves until `stop` fires: the gRPC service, and `/metrics` on a port
/// of its own.
pub async fn serve(
    settings: Settings,
    ca: EmbeddedCa,
    kube: kube::Client,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let ca = Arc::new(ca);
    let stats = Arc::new(Stats::default());
    let mut registry = Registry::with_prefix("mesh_ca");
    registry.register(
        "certificates_issued",
        "Workload certificates signed",
        stats.issued.clone(),
    );
    registry.register(
        "certificates_refused",
        "Requests refused, by reason",
        stats.refused.clone(),
    );
    registry.register(
        "certificate_failures",
        "Requests that failed for want of the API server or the signer",
        stats.failed.clone(),
    );
    let state = AdminState::default();
    let view: Arc<dyn AdminView> = Arc::new(MetricsView { registry });
    let _ = state.view.set(view);
    let endpoints = admin::bind(Role::Metrics, settings.metrics).await?;
    let incoming = serving::incoming(&settings, &ca).await?;
    info!(listen = %settings.listen, metrics = %settings.metrics, trust_domain = %settings.trust_domain, node_accounts = ?settings.node_accounts, "CA service serving");
    tokio::spawn(admin::serve(endpoints, Role::Metrics, state, stop.clone()));
    let service = CaService {
        ca,
        kube,
        settings,
        stats,
    };
    tonic::transport::Server::builder()
        .add_service(IstioCertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}
