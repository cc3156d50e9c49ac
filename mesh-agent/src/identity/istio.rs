//! A CA reached over Istio's certificate API: the node holds no signing
//! key. For each identity the agent makes a key pair (it never leaves the
//! process) and a CSR for exactly that SPIFFE ID, and sends it with the
//! node's projected ServiceAccount token (read again each time: the
//! kubelet rotates it), naming the workload as `ImpersonatedIdentity` as
//! ztunnel does; the same client works against istiod. What comes back
//! is checked before it is used: the leaf must carry the asked-for
//! identity and this key.

use std::{fs, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use super::{
    SpiffeId,
    ca::{CaError, CertificateAuthority, IssueFuture, IssuedCert, pem_certs},
};
use crate::istio_ca::{
    IstioCertificateRequest, client::IstioCertificateServiceClient, impersonating,
};

/// Where the agent asks for certificates when it holds no signing key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IstioCaConfig {
    /// `https://host:port` of the CA service (the mesh's
    /// `https://mesh-ca.mesh-system.svc:15012`, or istiod's
    /// `https://istiod.istio-system.svc:15012`).
    pub address: String,
    /// PEM roots: the CA's serving certificate and every workload
    /// certificate chain to them.
    pub roots: PathBuf,
    /// A projected ServiceAccount token (audience `istio-ca`), read again
    /// for every request since the kubelet rotates it.
    pub token: PathBuf,
    /// The name the CA's certificate must carry (default: the address's
    /// host).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// The CA's usual port (istiod's too).
const DEFAULT_PORT: u16 = 15012;
/// Connecting and each request are bounded: renewal retries with back-off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct IstioCa {
    client: IstioCertificateServiceClient<Channel>,
    token: PathBuf,
    roots: Vec<CertificateDer<'static>>,
}

impl IstioCa {
    /// Reads the roots and prepares the connection (made at the first
    /// request, and again whenever it breaks).
    pub fn new(config: &IstioCaConfig) -> Result<Self, CaError> {
        let invalid = |message: String| CaError::Invalid {
            path: config.roots.clone(),
            message,
        };
        let roots_pem = fs::read_to_string(&config.roots).map_err(|source| CaError::File {
            path: config.roots.clone(),
            source,
        })?;
        let roots = pem_certs(&roots_pem).map_err(invalid)?;
        let mut store = RootCertStore::empty();
        for root in &roots {
            store
                .add(root.clone())
                .map_err(|e| invalid(format!("root certificate: {e}")))?;
        }
        if store.is_empty() {
            return Err(invalid("no root certificate".into()));
        }
        // ring's defaults: this is one connection to the CA, not the
        // data path (and `tls` depends on this module, not the reverse).
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CaError::Remote(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tls = TlsConnector::from(Arc::new(tls));
        let remote = |message: String| CaError::Remote(format!("{}: {message}", config.address));
        let uri: http::Uri = config.address.parse().map_err(|e| remote(format!("{e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| remote("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
        let name = config.server_name.clone().unwrap_or_else(|| host.clone());
        let name = ServerName::try_from(name)
            .map_err(|e| remote(format!("server name: {e}")))?
            .to_owned();
        // TLS is made here rather than by tonic: TLS 1.3 only, and the
        // mesh's roots only.
        let connector = tower::service_fn(move |_: http::Uri| {
            let (tls, host, name) = (tls.clone(), host.clone(), name.clone());
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel = Endpoint::from_shared(config.address.clone())
            .map_err(|e| remote(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .connect_with_connector_lazy(connector);
        Ok(Self {
            client: IstioCertificateServiceClient::new(channel),
            token: config.token.clone(),
            roots,
        })
    }

    async fn request(
        &self,
        id: &SpiffeId,
        key: &KeyPair,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(key)?.pem()?;
        let chain = self.send(csr, &id.to_string(), lifetime).await?;
        self.checked(id, key, chain)
    }

    /// Sends one request: `csr` (PEM) for `identity`, the token read now.
    /// Public for tests that send what a well-behaved agent never would.
    pub async fn send(
        &self,
        csr: String,
        identity: &str,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let token = fs::read_to_string(&self.token).map_err(|source| CaError::File {
            path: self.token.clone(),
            source,
        })?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(impersonating(identity)),
        });
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| CaError::Invalid {
                path: self.token.clone(),
                message: "not a token (characters a header cannot carry)".into(),
            })?;
        request.metadata_mut().insert("authorization", bearer);
        let answer = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| {
                CaError::Remote(format!("{:?}: {}", status.code(), status.message()))
            })?;
        let mut chain = Vec::new();
        for pem in answer.into_inner().cert_chain {
            chain.extend(pem_certs(&pem).map_err(CaError::Remote)?);
        }
        Ok(chain)
    }

    /// The chain as the agent presents it (leaf and intermediates, no
    /// root), once the leaf is seen to be for `id` and `key`.
    fn checked(
        &self,
        id: &SpiffeId,
        key: &KeyPair,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<IssuedCert, CaError> {
        let leaf = chain
            .first()
            .ok_or_else(|| CaError::Remote("an empty certificate chain".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| CaError::Remote(format!("the leaf does not parse: {e}")))?;
        let named = SpiffeId::from_cert(leaf).map_err(|e| CaError::Remote(e.to_string()))?;
        if named != *id {
            return Err(CaError::Remote(format!("signed {named}, not {id}")));
        }
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(CaError::Remote("the leaf certifies another key".into()));
        }
        let not_after = std::time::UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );
        let chain = chain
            .into_iter()
            .filter(|cert| !self.roots.contains(cert))
            .collect();
        Ok(IssuedCert { chain, not_after })
    }
}

impl CertificateAuthority for IstioCa {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
        key: &'a KeyPair,
        lifetime: Duration,
    ) -> IssueFuture<'a> {
        Box::pin(self.request(id, key, lifetime))
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}
