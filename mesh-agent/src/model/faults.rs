//! Faults a service injects into a share of its new connections, so that
//! its callers' timeouts, retries and breakers can be tried for real: a
//! delay before the endpoint is connected, a refusal (the client is reset
//! at once), or a cut after some bytes. Off unless configured; each fault
//! is drawn on its own for each connection the selector takes.

use std::{net::Ipv4Addr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{authz::Sources, identity::SpiffeId};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Which clients (authorization's selector: principals, namespaces,
    /// ip_blocks); empty takes every client.
    pub from: Sources,
    pub delay: Option<Delay>,
    pub refuse: Option<Refuse>,
    pub cut: Option<Cut>,
}

/// `percent` of new connections wait `ms` before their endpoint is
/// connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delay {
    pub percent: u32,
    pub ms: u64,
}

/// `percent` of new connections are reset at once, no endpoint tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refuse {
    pub percent: u32,
}

/// `percent` of new connections are reset once `after_bytes` have passed
/// (both directions together).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cut {
    pub percent: u32,
    pub after_bytes: u64,
}

/// What one connection gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub refuse: bool,
    pub cut_after: Option<u64>,
}

impl Injected {
    pub fn any(&self) -> bool {
        self.delay.is_some() || self.refuse || self.cut_after.is_some()
    }

    /// For the access log: what was injected, `-` for nothing.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(delay) = self.delay {
            parts.push(format!("delay={}ms", delay.as_millis()));
        }
        if self.refuse {
            parts.push("refuse".to_owned());
        }
        if let Some(bytes) = self.cut_after {
            parts.push(format!("cut={bytes}B"));
        }
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(",")
        }
    }
}

impl Faults {
    pub fn is_empty(&self) -> bool {
        self.delay.is_none() && self.refuse.is_none() && self.cut.is_none()
    }

    /// Draws this connection's faults, `roll` giving a number in 0..100
    /// for each.
    pub fn draw(
        &self,
        principal: Option<&SpiffeId>,
        trust_domain: &str,
        client: Ipv4Addr,
        mut roll: impl FnMut() -> u32,
    ) -> Injected {
        if self.is_empty() || !self.from.matches(principal, trust_domain, client) {
            return Injected::default();
        }
        let mut hit = |percent: u32| roll() < percent;
        Injected {
            delay: self
                .delay
                .as_ref()
                .filter(|d| hit(d.percent))
                .map(|d| Duration::from_millis(d.ms)),
            refuse: self.refuse.as_ref().is_some_and(|r| hit(r.percent)),
            cut_after: self
                .cut
                .as_ref()
                .filter(|c| hit(c.percent))
                .map(|c| c.after_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(yaml: &str) -> Faults {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn each_fault_is_drawn_on_its_own_for_selected_clients_only() {
        let f = faults(
            "{ from: { namespaces: [test] }, delay: { percent: 50, ms: 200 }, refuse: { percent: 10 } }",
        );
        let tester = SpiffeId::new("cluster.local", "test", "load");
        let other = SpiffeId::new("cluster.local", "prod", "web");
        let client = Ipv4Addr::new(10, 0, 0, 1);
        // Rolls: delay 49 (hit), refuse 10 (miss).
        let mut rolls = [49, 10].into_iter();
        let got = f.draw(Some(&tester), "cluster.local", client, || {
            rolls.next().unwrap()
        });
        assert_eq!(got.delay, Some(Duration::from_millis(200)));
        assert!(!got.refuse);
        assert_eq!(got.describe(), "delay=200ms");
        let mut rolls = [50, 9].into_iter();
        let got = f.draw(Some(&tester), "cluster.local", client, || {
            rolls.next().unwrap()
        });
        assert_eq!((got.delay, got.refuse), (None, true));
        let never = f.draw(Some(&other), "cluster.local", client, || 0);
        assert!(!never.any());
        // Plaintext clients have no namespace: not selected.
        assert!(!f.draw(None, "cluster.local", client, || 0).any());
        assert!(
            !Faults::default()
                .draw(None, "cluster.local", client, || 0)
                .any()
        );
    }
}
