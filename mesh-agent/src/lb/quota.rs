//! A service's or workload's quotas ([`crate::model::Quota`]) enforced: a
//! token bucket of new connections and a count of open ones per client,
//! and one more of each for all clients together (`overall`). Kept with
//! the service's (workload's) state, so a reload does not refill a bucket.

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
    table: Mutex<Table>,
    /// Connections refused over a limit.
    pub refused: AtomicU64,
    /// Clients let through because the table was full.
    pub untracked: AtomicU64,
}

#[derive(Default)]
struct Table {
    clients: HashMap<String, Bucket>,
    /// Every client together, for a quota's `overall` limits.
    everyone: Option<Bucket>,
}

struct Bucket {
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
    #[error("over the rate of new connections of all clients together")]
    OverallRate,
    #[error("over the open connections of all clients together")]
    OverallConcurrent,
}

/// One open connection, counted for its client (and for everyone, under
/// an overall limit) until dropped.
pub struct QuotaGuard([Option<Arc<AtomicU64>>; 2]);

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        for open in self.0.iter().flatten() {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Bucket {
    fn new(quota: &Quota, now: Instant) -> Self {
        Self {
            tokens: burst(quota),
            refilled: now,
            open: Arc::default(),
        }
    }

    /// Refills to `now` and says whether one more connection fits,
    /// taking nothing yet.
    fn check(&mut self, quota: &Quota, now: Instant) -> Result<(), OverQuota> {
        if let Some(max) = quota.concurrent
            && self.open.load(Ordering::Relaxed) >= u64::from(max)
        {
            return Err(OverQuota::Concurrent);
        }
        if let Some(rate) = quota.rate {
            let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
            self.tokens = (self.tokens + elapsed * f64::from(rate)).min(burst(quota));
            self.refilled = now;
            if self.tokens < 1.0 {
                return Err(OverQuota::Rate);
            }
        }
        Ok(())
    }

    fn take(&mut self, quota: &Quota) -> Arc<AtomicU64> {
        if quota.rate.is_some() {
            self.tokens -= 1.0;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        self.open.clone()
    }
}

impl Quotas {
    /// Admits a new connection of `client` under `quota` (its per-client
    /// limits, then its overall ones), or says which limit it is over
    /// (and counts it `refused`). A refused connection takes nothing from
    /// either bucket.
    pub fn admit(
        &self,
        quota: &Quota,
        client: &str,
        now: Instant,
    ) -> Result<QuotaGuard, OverQuota> {
        let admitted = self.try_admit(quota, client, now);
        if admitted.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    fn try_admit(
        &self,
        quota: &Quota,
        client: &str,
        now: Instant,
    ) -> Result<QuotaGuard, OverQuota> {
        let mut table = lock(&self.table);
        let Table { clients, everyone } = &mut *table;
        if !clients.contains_key(client) && clients.len() >= MAX_CLIENTS {
            let burst = burst(quota);
            clients.retain(|_, c| c.open.load(Ordering::Relaxed) > 0 || c.tokens < burst);
        }
        let tracked = clients.contains_key(client) || clients.len() < MAX_CLIENTS;
        if !tracked {
            self.untracked.fetch_add(1, Ordering::Relaxed);
        }
        let mut entry = tracked.then(|| {
            clients
                .entry(client.to_owned())
                .or_insert_with(|| Bucket::new(quota, now))
        });
        if let Some(entry) = entry.as_deref_mut() {
            entry.check(quota, now)?;
        }
        let overall = quota.overall();
        let mut all = overall
            .as_ref()
            .map(|overall| everyone.get_or_insert_with(|| Bucket::new(overall, now)));
        if let (Some(all), Some(overall)) = (all.as_deref_mut(), &overall) {
            all.check(overall, now).map_err(|over| match over {
                OverQuota::Rate => OverQuota::OverallRate,
                _ => OverQuota::OverallConcurrent,
            })?;
        }
        let own = entry.map(|entry| entry.take(quota));
        let shared = all
            .zip(overall.as_ref())
            .map(|(all, overall)| all.take(overall));
        Ok(QuotaGuard([own, shared]))
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
        let quota = Quota::per_client(Some(10), Some(5), None);
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
        let quota = Quota::per_client(None, None, Some(2));
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

    #[test]
    fn overall_limits_hold_across_clients_and_a_refusal_takes_nothing() {
        let mut quota = Quota::per_client(None, None, Some(2));
        quota.overall = Some(crate::model::Overall {
            rate: None,
            burst: None,
            concurrent: Some(3),
        });
        let quotas = Quotas::default();
        let now = Instant::now();
        let a = [
            quotas.admit(&quota, "a", now).unwrap(),
            quotas.admit(&quota, "a", now).unwrap(),
        ];
        assert_eq!(
            quotas.admit(&quota, "a", now).err(),
            Some(OverQuota::Concurrent)
        );
        let b = quotas.admit(&quota, "b", now).unwrap();
        assert_eq!(
            quotas.admit(&quota, "c", now).err(),
            Some(OverQuota::OverallConcurrent)
        );
        // The refusal of c left b's own count alone: b may open one more
        // once there is room overall.
        drop(a);
        let _b2 = quotas.admit(&quota, "b", now).unwrap();
        assert_eq!(
            quotas.admit(&quota, "b", now).err(),
            Some(OverQuota::Concurrent)
        );
        drop(b);

        let mut rated = Quota::per_client(Some(100), None, None);
        rated.overall = Some(crate::model::Overall {
            rate: Some(1),
            burst: Some(2),
            concurrent: None,
        });
        let quotas = Quotas::default();
        assert!(quotas.admit(&rated, "a", now).is_ok());
        assert!(quotas.admit(&rated, "b", now).is_ok());
        assert_eq!(
            quotas.admit(&rated, "c", now).err(),
            Some(OverQuota::OverallRate)
        );
        let later = now + Duration::from_secs(1);
        assert!(quotas.admit(&rated, "c", later).is_ok());
    }
}
