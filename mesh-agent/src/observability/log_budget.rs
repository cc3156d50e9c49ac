//! Log lines that a remote party can cause (a refused handshake, a
//! connection to an agent port) are rate limited: a flood must not turn
//! into a flood of log lines, which costs CPU and disk and buries the
//! lines that matter. What is not logged is still counted by the caller.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// Allows up to `per_second` lines in each wall-clock second.
pub struct LogBudget {
    per_second: u64,
    /// The second the count belongs to (high 32 bits) and the count (low).
    window: AtomicU64,
}

impl LogBudget {
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second: per_second as u64,
            window: AtomicU64::new(0),
        }
    }

    /// Whether one more line may be logged now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            & 0xffff_ffff;
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (second, count) = (current >> 32, current & 0xffff_ffff);
            let next = if second == now {
                if count >= self.per_second {
                    return false;
                }
                current + 1
            } else {
                (now << 32) | 1
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_gets_the_budget_and_no_more() {
        let budget = LogBudget::new(5);
        let allowed = (0..1000).filter(|_| budget.allow()).count();
        // The burst may straddle a second boundary: at most two windows.
        assert!((5..=10).contains(&allowed), "{allowed}");
    }
}
