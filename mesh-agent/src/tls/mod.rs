//! TLS between agents: TLS 1.3 only, ALPN `h2`, AES-GCM first (ring), mutual
//! authentication with workload certificates.
//!
//! - The server presents the certificate of the workload that was
//!   addressed and requires a client certificate that chains to the trust
//!   roots and names a workload of this trust domain (no certificate,
//!   another CA, an expired one, or one of another trust domain that a
//!   shared root also signs: refused at the handshake).
//! - The client presents its source workload's certificate and accepts
//!   only a server whose chain verifies *and* whose SPIFFE ID is the one
//!   expected for the endpoint (names are not checked: SPIFFE certificates
//!   carry URIs, not DNS names).
//!
//! Both sides read the current certificate at each handshake, so rotation
//! needs no new config.

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::identity::{CertManager, SpiffeId};

pub mod kernel;
pub mod record_bounded;

pub use kernel::{HboneIo, KernelTls};
pub use record_bounded::RecordBounded;

pub const ALPN_H2: &[u8] = b"h2";

/// ring's provider with the AES-GCM suites first (hardware AES is the
/// common case; ChaCha20 stays as the fallback).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// Builds TLS configs over one certificate manager and trust roots.
pub struct TlsFactory {
    provider: Arc<CryptoProvider>,
    trust_domain: String,
    /// Domains whose identities count as `trust_domain`'s.
    aliases: Arc<Vec<String>>,
    certs: Arc<CertManager>,
    roots: Arc<RootCertStore>,
    anchors: Arc<Vec<rustls::pki_types::TrustAnchor<'static>>>,
    /// Hands finished handshakes to the kernel where it can cipher.
    pub kernel: KernelTls,
}

impl TlsFactory {
    pub fn new(
        certs: Arc<CertManager>,
        trust_domain: &str,
        kernel: KernelTls,
    ) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        for root in certs.ca().roots() {
            roots.add(root.clone())?;
            anchors.push(
                webpki::anchor_from_trusted_cert(&root)
                    .map_err(|e| Error::General(format!("trust root: {e}")))?
                    .to_owned(),
            );
        }
        Ok(Self {
            provider: provider(),
            trust_domain: trust_domain.to_owned(),
            aliases: Arc::default(),
            certs,
            roots: Arc::new(roots),
            anchors: Arc::new(anchors),
            kernel,
        })
    }

    /// Accepts peers of these other trust domains as this one's.
    pub fn with_aliases(mut self, aliases: Vec<String>) -> Self {
        self.aliases = Arc::new(aliases);
        self
    }

    /// A verified peer's identity as this trust domain names it (the
    /// verifiers refused every other domain).
    pub fn canonical(&self, peer: &SpiffeId) -> Option<SpiffeId> {
        peer.canonical(&self.trust_domain, &self.aliases)
    }

    /// The certificate `id` presents now.
    pub fn current_cert(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.certs.current(id)
    }

    /// Server side for the workload `local`.
    pub fn server(&self, local: SpiffeId) -> Result<ServerConfig, Error> {
        let chain =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| Error::General(e.to_string()))?;
        let verifier = Arc::new(TrustDomainClientVerifier {
            chain,
            trust_domain: self.trust_domain.clone(),
            aliases: self.aliases.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Current {
                certs: self.certs.clone(),
                id: local,
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Agents never resume sessions, and a ticket after the handshake
        // would reach a kernel-TLS peer as a control record to skip.
        config.send_tls13_tickets = 0;
        config.enable_secret_extraction = self.kernel.wanted();
        Ok(config)
    }

    /// Client side: present `source`, accept only `expected`.
    pub fn client(&self, source: SpiffeId, expected: SpiffeId) -> Result<ClientConfig, Error> {
        let verifier = SpiffeServerVerifier {
            anchors: self.anchors.clone(),
            algorithms: self.provider.signature_verification_algorithms,
            expected,
            aliases: self.aliases.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Current {
                certs: self.certs.clone(),
                id: source,
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_secret_extraction = self.kernel.wanted();
        Ok(config)
    }
}

/// Hands out the current certificate of one identity.
#[derive(Debug)]
struct Current {
    certs: Arc<CertManager>,
    id: SpiffeId,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertManager")
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.current(&self.id)
    }
}

impl ResolvesClientCert for Current {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certs.current(&self.id)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Chain to the roots, then a SPIFFE ID of this trust domain. A bundle of
/// several roots (a migration, a federation) would otherwise let any
/// workload that another domain's CA signs in as a workload of ours.
#[derive(Debug)]
struct TrustDomainClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    aliases: Arc<Vec<String>>,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented =
            SpiffeId::from_cert(end_entity).map_err(|e| Error::General(e.to_string()))?;
        if presented
            .canonical(&self.trust_domain, &self.aliases)
            .is_none()
        {
            return Err(Error::General(format!(
                "client identity {presented} is not of trust domain {} or its aliases",
                self.trust_domain
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Chain to the roots, then the SPIFFE ID the endpoint must have.
#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Arc<Vec<rustls::pki_types::TrustAnchor<'static>>>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: SpiffeId,
    /// The expected identity may come named in one of these domains.
    aliases: Arc<Vec<String>>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => {
                Error::InvalidCertificate(CertificateError::Expired)
            }
            webpki::Error::UnknownIssuer => {
                Error::InvalidCertificate(CertificateError::UnknownIssuer)
            }
            other => Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(other),
            ))),
        })?;
        let presented =
            SpiffeId::from_cert(end_entity).map_err(|e| Error::General(e.to_string()))?;
        let canonical = presented.canonical(&self.expected.trust_domain, &self.aliases);
        if canonical.as_ref() != Some(&self.expected) {
            return Err(Error::General(format!(
                "server identity {presented} is not the expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
