//! Workload identity: SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`),
//! the certificate authority that vouches for them ([`ca`]), and the
//! short-lived certificates the agent holds for its local workloads
//! ([`manager`]).

pub mod ca;
pub mod istio;
pub mod manager;

use std::{fmt, str::FromStr};

use serde::Serialize;

pub use self::{
    ca::{CertificateAuthority, EmbeddedCa, IssuedCert},
    manager::CertManager,
};

/// A workload's SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// The same workload named in `trust_domain`, when its own domain is
    /// one of `aliases` (or already `trust_domain`); None otherwise.
    pub fn canonical(&self, trust_domain: &str, aliases: &[String]) -> Option<Self> {
        if self.trust_domain == trust_domain {
            return Some(self.clone());
        }
        aliases
            .contains(&self.trust_domain)
            .then(|| Self::new(trust_domain, &self.namespace, &self.service_account))
    }

    /// The SPIFFE ID in a certificate's URI SAN.
    pub fn from_cert(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Certificate(e.to_string()))?
            .ok_or(IdentityError::NoSpiffeId)?;
        san.value
            .general_names
            .iter()
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                    uri.parse().ok()
                }
                _ => None,
            })
            .ok_or(IdentityError::NoSpiffeId)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::Malformed(text.to_owned());
        let rest = text.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [domain, "ns", namespace, "sa", account]
                if !domain.is_empty() && !namespace.is_empty() && !account.is_empty() =>
            {
                Ok(Self::new(domain, namespace, account))
            }
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID of the form spiffe://<domain>/ns/<ns>/sa/<sa>")]
    Malformed(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("certificate carries no SPIFFE ID")]
    NoSpiffeId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert!(
            "spiffe://cluster.local/ns/default"
                .parse::<SpiffeId>()
                .is_err()
        );
        assert!("https://x/ns/a/sa/b".parse::<SpiffeId>().is_err());
    }

    #[test]
    fn an_alias_names_the_same_workload_and_no_other_domain_does() {
        let aliases = ["old.example".to_owned()];
        let ours = SpiffeId::new("cluster.local", "shop", "api");
        let old = SpiffeId::new("old.example", "shop", "api");
        let other = SpiffeId::new("other.example", "shop", "api");
        assert_eq!(
            ours.canonical("cluster.local", &aliases),
            Some(ours.clone())
        );
        assert_eq!(old.canonical("cluster.local", &aliases), Some(ours));
        assert_eq!(other.canonical("cluster.local", &aliases), None);
        assert_eq!(old.canonical("cluster.local", &[]), None);
    }
}
