//! Certificate authorities. The agent asks a [`CertificateAuthority`] to
//! sign a workload's public key for its SPIFFE ID; [`EmbeddedCa`] does it in
//! process with a CA key kept on disk (mode 0600); [`super::istio::IstioCa`]
//! asks a CA service over Istio's certificate API.

use std::{
    fs,
    future::Future,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use rustls::pki_types::CertificateDer;

use super::SpiffeId;

/// A signed workload certificate.
#[derive(Clone)]
pub struct IssuedCert {
    /// Leaf first, then any intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA file {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA file {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("workload key: {0}")]
    Key(String),
    /// The CA service refused, failed, or answered something unusable.
    #[error("CA service: {0}")]
    Remote(String),
}

pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<IssuedCert, CaError>> + Send + 'a>>;

pub trait CertificateAuthority: Send + Sync {
    /// A certificate for `key` (generated here; only what the CA needs of
    /// it leaves the process: the public key, or a CSR signed with it)
    /// as `id`, valid for `lifetime` (a remote CA may shorten it).
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
        key: &'a KeyPair,
        lifetime: Duration,
    ) -> IssueFuture<'a>;

    /// The roots every workload certificate must chain to.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

/// File names inside a CA directory.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERTS: &str = "root-cert.pem";

/// An in-process CA: a signing certificate and key (a root, or an
/// intermediate under the roots in `root-cert.pem`).
pub struct EmbeddedCa {
    issuer: Certificate,
    key: KeyPair,
    /// The signing CA and any intermediates above it, unless it is a root.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl EmbeddedCa {
    /// Loads the CA from `dir`, or creates a new self-signed root there
    /// when the directory holds none yet (the default set-up).
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let file_err = |source| CaError::File {
            path: dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(file_err)?;
        // Agents starting together on a fresh directory: one creates, the
        // others wait on the lock and load what it wrote.
        let lock = fs::File::open(dir).map_err(file_err)?;
        // SAFETY: flock on a descriptor we own; released when `lock` closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(file_err(std::io::Error::last_os_error()));
        }
        if !dir.join(CA_KEY).exists() {
            Self::create(dir)?;
        }
        Self::load(&dir.join(CA_CERT), &dir.join(CA_KEY), &dir.join(ROOT_CERTS))
    }

    /// Writes a new root CA to `dir` (key mode 0600). Refuses to overwrite.
    pub fn create(dir: &Path) -> Result<(), CaError> {
        let file_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::File { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(file_err(dir))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "mesh-agent");
        name.push(DnType::CommonName, "mesh-agent root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let key_path = dir.join(CA_KEY);
        // create_new: two agents racing on a fresh directory must not both win.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(file_err(&key_path))?;
        file.write_all(key.serialize_pem().as_bytes())
            .map_err(file_err(&key_path))?;
        for name in [CA_CERT, ROOT_CERTS] {
            let path = dir.join(name);
            fs::write(&path, cert.pem()).map_err(file_err(&path))?;
        }
        Ok(())
    }

    /// Loads a signing CA (certificate + key) and the root bundle to trust.
    pub fn load(cert: &Path, key: &Path, roots_file: &Path) -> Result<Self, CaError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| CaError::File {
                path: path.to_owned(),
                source,
            })
        };
        let invalid = |path: &Path, message: String| CaError::Invalid {
            path: path.to_owned(),
            message,
        };
        let cert_pem = read(cert)?;
        let key = KeyPair::from_pem(&read(key)?).map_err(|e| invalid(key, e.to_string()))?;
        let chain = pem_certs(&cert_pem).map_err(|e| invalid(cert, e))?;
        let signing = chain
            .first()
            .ok_or_else(|| invalid(cert, "no certificate".into()))?;
        // rcgen signs with an issuer Certificate; rebuilding one from the
        // loaded CA keeps its name and key id, which is what children carry.
        let issuer = CertificateParams::from_ca_cert_der(signing)
            .map_err(|e| invalid(cert, e.to_string()))?
            .self_signed(&key)
            .map_err(|e| invalid(cert, e.to_string()))?;
        let roots = pem_certs(&read(roots_file)?).map_err(|e| invalid(roots_file, e))?;
        if roots.is_empty() {
            return Err(invalid(roots_file, "no root certificate".into()));
        }
        // What the cert file holds beyond the roots goes out with every leaf.
        let intermediates = chain
            .iter()
            .filter(|c| !roots.contains(c))
            .cloned()
            .collect();
        Ok(Self {
            issuer,
            key,
            intermediates,
            roots,
        })
    }
}

impl EmbeddedCa {
    /// Signs `public_key_der` (SubjectPublicKeyInfo) as `id`, valid for
    /// `lifetime`: the leaf, then the intermediates up to the roots.
    pub fn sign(
        &self,
        id: &SpiffeId,
        public_key_der: &[u8],
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign_leaf(params, public_key_der, lifetime)
    }

    /// A serving certificate for `names` (DNS names or IP addresses), for
    /// a service that workloads reach by name (the CA service itself).
    pub fn sign_server(
        &self,
        names: &[String],
        public_key_der: &[u8],
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign_leaf(params, public_key_der, lifetime)
    }

    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        public_key_der: &[u8],
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let public_key = SubjectPublicKeyInfo::from_der(public_key_der)?;
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let now = time::OffsetDateTime::now_utc();
        // A little back-dating absorbs clock skew between nodes.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        let cert = params.signed_by(&public_key, &self.issuer, &self.key)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(IssuedCert {
            chain,
            not_after: SystemTime::now() + lifetime,
        })
    }
}

impl CertificateAuthority for EmbeddedCa {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
        key: &'a KeyPair,
        lifetime: Duration,
    ) -> IssueFuture<'a> {
        let signed = self.sign(id, &key.public_key_der(), lifetime);
        Box::pin(async move { signed })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

/// Every certificate in a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}
