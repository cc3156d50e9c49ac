//! The certificates of this node's workloads: one key pair and short-lived
//! certificate per identity, issued when a workload appears, renewed at
//! half-life (with back-off when the CA fails), dropped when it goes.
//!
//! TLS reads the current certificate at each handshake, so a renewal takes
//! effect for new connections while established ones carry on untouched.
//! Private keys live only in memory and are never logged.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock, Weak},
    time::{Duration, SystemTime},
};

use rcgen::KeyPair;
use rustls::{pki_types::PrivateKeyDer, sign::CertifiedKey};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{CertificateAuthority, SpiffeId, ca::CaError};
use crate::locks::{lock, read, write};

/// Longest pause between retries when the CA keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A certificate's half-life holds this many retries at the longest
/// pause at least, so a CA back before expiry is asked again in time.
const RETRIES_PER_HALF_LIFE: u32 = 5;
const MIN_BACKOFF: Duration = Duration::from_millis(500);

pub struct WorkloadCert {
    pub key: Arc<CertifiedKey>,
    pub issued: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, Serialize)]
pub struct CertSnapshot {
    pub identity: String,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
    pub renewals: u64,
}

pub struct CertManager {
    ca: Arc<dyn CertificateAuthority>,
    lifetime: Duration,
    certs: RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>>,
    renewals: Mutex<HashMap<SpiffeId, (JoinHandle<()>, u64)>>,
}

impl CertManager {
    pub fn new(ca: Arc<dyn CertificateAuthority>, lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            ca,
            lifetime,
            certs: RwLock::default(),
            renewals: Mutex::default(),
        })
    }

    pub fn ca(&self) -> &Arc<dyn CertificateAuthority> {
        &self.ca
    }

    /// Holds certificates for exactly `wanted`: issues what is missing (now,
    /// so the first connection finds it) and forgets the rest. Returns the
    /// identities that could not be issued, with why.
    pub async fn ensure(self: &Arc<Self>, wanted: &[SpiffeId]) -> Vec<(SpiffeId, CaError)> {
        let mut problems = Vec::new();
        {
            let mut renewals = lock(&self.renewals);
            renewals.retain(|id, (task, _)| {
                let keep = wanted.contains(id);
                if !keep {
                    task.abort();
                }
                keep
            });
            write(&self.certs).retain(|id, _| wanted.contains(id));
        }
        for id in wanted {
            if read(&self.certs).contains_key(id) {
                continue;
            }
            match self.issue(id).await {
                Ok(cert) => {
                    info!(identity = %id, valid_for_s = self.lifetime.as_secs(), "certificate issued");
                    self.install(id, cert);
                    let task = tokio::spawn(renew(Arc::downgrade(self), id.clone()));
                    lock(&self.renewals).insert(id.clone(), (task, 0));
                }
                Err(error) => problems.push((id.clone(), error)),
            }
        }
        problems
    }

    /// The current certificate and key for `id`.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        read(&self.certs).get(id).map(|cert| cert.key.clone())
    }

    pub fn snapshot(&self) -> Vec<CertSnapshot> {
        let renewals = lock(&self.renewals);
        let certs: BTreeMap<String, (u64, u64)> = read(&self.certs)
            .iter()
            .map(|(id, cert)| {
                let not_after = cert
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                (
                    id.to_string(),
                    (not_after, renewals.get(id).map_or(0, |(_, n)| *n)),
                )
            })
            .collect();
        certs
            .into_iter()
            .map(|(identity, (not_after, renewals))| CertSnapshot {
                identity,
                not_after,
                renewals,
            })
            .collect()
    }

    async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate()?;
        let issued = self.ca.issue(id, &key, self.lifetime).await?;
        let private = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::ring::sign::any_supported_type(&private)
            .map_err(|e| CaError::Key(e.to_string()))?;
        Ok(WorkloadCert {
            key: Arc::new(CertifiedKey::new(issued.chain, signing)),
            issued: SystemTime::now(),
            not_after: issued.not_after,
        })
    }

    fn install(&self, id: &SpiffeId, cert: WorkloadCert) {
        write(&self.certs).insert(id.clone(), Arc::new(cert));
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        lock(&self.renewals)
            .values()
            .for_each(|(task, _)| task.abort());
    }
}

/// The longest pause between renewal attempts for a certificate valid
/// for `lifetime`: 30 s, less for short lifetimes.
fn backoff_cap(lifetime: Duration) -> Duration {
    (lifetime / 2 / RETRIES_PER_HALF_LIFE).clamp(MIN_BACKOFF, MAX_BACKOFF)
}

/// Renews `id` at half-life, forever; backs off while the CA fails.
async fn renew(manager: Weak<CertManager>, id: SpiffeId) {
    loop {
        let Some(this) = manager.upgrade() else {
            return;
        };
        let Some(cert) = read(&this.certs).get(&id).cloned() else {
            return;
        };
        let lifetime = cert
            .not_after
            .duration_since(cert.issued)
            .unwrap_or(this.lifetime);
        let due = cert.issued + lifetime / 2;
        drop(this);
        if let Ok(wait) = due.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        let max_backoff = backoff_cap(lifetime);
        let mut backoff = MIN_BACKOFF;
        loop {
            let Some(this) = manager.upgrade() else {
                return;
            };
            match this.issue(&id).await {
                Ok(cert) => {
                    this.install(&id, cert);
                    if let Some((_, count)) = lock(&this.renewals).get_mut(&id) {
                        *count += 1;
                    }
                    info!(identity = %id, "certificate renewed");
                    break;
                }
                Err(error) => {
                    warn!(identity = %id, %error, retry_in_ms = backoff.as_millis() as u64, "renewing the certificate failed");
                    drop(this);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_come_often_enough_to_renew_before_expiry() {
        let s = Duration::from_secs;
        assert_eq!(backoff_cap(s(86_400)), s(30));
        assert_eq!(backoff_cap(s(70)), s(7));
        assert_eq!(backoff_cap(s(2)), Duration::from_millis(500));
    }
}
