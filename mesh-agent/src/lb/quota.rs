//! A service's per-client quotas ([`crate::model::Quota`]) enforced: a
//! token bucket of new connections and a count of open ones per client.
//! Kept with the service's state, so a reload does not refill a bucket.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use crate::{locks::lock, model::Quota};

/// Clients tracked per service at most: past it, those with a full
/// bucket and nothing open are forgotten, and if that is not enough a new
/// client is let through untracked (and counted) rather than refused.
const MAX_CLIENTS: usize = 65_536;

#[derive(Default)]
pub struct Quotas {
    clients: Mutex<HashMap<String, Client>>,
    /// Clients let through because the table was full.
    pub untracked: AtomicU64,
}

struct Client {
    tokens: f64,
    refilled: Instant,
    open: Arc<AtomicU64>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverQuota {
    #[error("over the client's rate of new connections")]
    Rate,
    #[error("over the client's open connections")]
    Concurrent,
}

/// One open connection of a client, counted until dropped.
pub struct QuotaGuard(Option<Arc<AtomicU64>>);

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        if let Some(open) = &self.0 {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Quotas {
    /// Admits a new connection of `client` under `quota`, or says which
    /// limit it is over.
    pub fn admit(
        &self,
        quota: &Quota,
        client: &str,
        now: Instant,
    ) -> Result<QuotaGuard, OverQuota> {
        let mut clients = lock(&self.clients);
        if !clients.contains_key(client) && clients.len() >= MAX_CLIENTS {
            let burst = burst(quota);
            clients.retain(|_, c| c.open.load(Ordering::Relaxed) > 0 || c.tokens < burst);
            if clients.len() >= MAX_CLIENTS {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return Ok(QuotaGuard(None));
            }
        }
        let entry = clients.entry(client.to_owned()).or_insert_with(|| Client {
            tokens: burst(quota),
            refilled: now,
            open: Arc::default(),
        });
        if let Some(max) = quota.concurrent
            && entry.open.load(Ordering::Relaxed) >= u64::from(max)
        {
            return Err(OverQuota::Concurrent);
        }
        if let Some(rate) = quota.rate {
            let elapsed = now.saturating_duration_since(entry.refilled).as_secs_f64();
            entry.tokens = (entry.tokens + elapsed * f64::from(rate)).min(burst(quota));
            entry.refilled = now;
            if entry.tokens < 1.0 {
                return Err(OverQuota::Rate);
            }
            entry.tokens -= 1.0;
        }
        entry.open.fetch_add(1, Ordering::Relaxed);
        Ok(QuotaGuard(Some(entry.open.clone())))
    }
}

fn burst(quota: &Quota) -> f64 {
    f64::from(quota.bucket())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_its_rate_and_others_their_own() {
        let quota = Quota {
            rate: Some(10),
            burst: Some(5),
            concurrent: None,
        };
        let quotas = Quotas::default();
        let t0 = Instant::now();
        let admitted = (0..20)
            .filter(|_| quotas.admit(&quota, "a", t0).is_ok())
            .count();
        assert_eq!(admitted, 5);
        assert_eq!(quotas.admit(&quota, "a", t0).err(), Some(OverQuota::Rate));
        // A second later: ten more tokens, capped at the burst.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..20)
            .filter(|_| quotas.admit(&quota, "a", t1).is_ok())
            .count();
        assert_eq!(admitted, 5);
        // 300 ms later: three.
        let t2 = t1 + Duration::from_millis(300);
        let admitted = (0..20)
            .filter(|_| quotas.admit(&quota, "a", t2).is_ok())
            .count();
        assert_eq!(admitted, 3);
        assert!(quotas.admit(&quota, "b", t2).is_ok());
    }

    #[test]
    fn open_connections_are_capped_until_one_closes() {
        let quota = Quota {
            rate: None,
            burst: None,
            concurrent: Some(2),
        };
        let quotas = Quotas::default();
        let now = Instant::now();
        let first = quotas.admit(&quota, "a", now).unwrap();
        let _second = quotas.admit(&quota, "a", now).unwrap();
        assert_eq!(
            quotas.admit(&quota, "a", now).err(),
            Some(OverQuota::Concurrent)
        );
        drop(first);
        assert!(quotas.admit(&quota, "a", now).is_ok());
    }
}
