//! Peak-EWMA of connect latency (as in Finagle and linkerd2-proxy): a slower
//! observation is taken at once, a faster one is blended in, and the
//! estimate decays with time so an endpoint that was slow gets tried again.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    estimate_ns: f64,
    updated: Instant,
    decay_ns: f64,
}

impl PeakEwma {
    pub fn new(initial: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: initial.as_nanos() as f64,
            updated: now,
            decay_ns: decay.as_nanos() as f64,
        }
    }

    /// The estimate as of `now`, decayed since the last observation.
    pub fn estimate_ns(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
        self.estimate_ns * (-elapsed / self.decay_ns).exp()
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.estimate_ns(now);
        self.estimate_ns = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
            let w = (-elapsed / self.decay_ns).exp();
            current * w + rtt * (1.0 - w)
        };
        self.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_at_once_and_decays_slowly() {
        let start = Instant::now();
        let mut ewma = PeakEwma::new(Duration::from_millis(1), Duration::from_secs(10), start);
        ewma.observe(Duration::from_millis(50), start);
        assert!((ewma.estimate_ns(start) - 50e6).abs() < 1.0);
        let later = start + Duration::from_secs(10);
        let decayed = ewma.estimate_ns(later);
        assert!(decayed < 50e6 * 0.4 && decayed > 50e6 * 0.3, "{decayed}");
        ewma.observe(Duration::from_millis(1), later);
        assert!(ewma.estimate_ns(later) < decayed);
    }
}
