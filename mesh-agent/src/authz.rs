//! L4 authorization. Rules allow or deny by source principal (SPIFFE ID,
//! with `*` wildcards), source namespace, source IP block, destination
//! workload and port. Deny rules win over allow rules; when neither
//! matches, the default action applies. In dry-run mode a deny is only
//! logged and the connection goes ahead.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::SpiffeId;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Authorization {
    pub default_action: Action,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub name: Option<String>,
    pub action: Action,
    #[serde(default)]
    pub from: Sources,
    #[serde(default)]
    pub to: Destinations,
}

/// Every list that is given must match (any of its entries); empty lists
/// match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sources {
    pub principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub ip_blocks: Vec<Cidr>,
}

impl Sources {
    /// Whether a client (`principal` when proven, `None` for plaintext)
    /// is one of these. `namespaces` name `trust_domain`'s only.
    pub fn matches(
        &self,
        principal: Option<&SpiffeId>,
        trust_domain: &str,
        source_ip: Ipv4Addr,
    ) -> bool {
        let any = |list: &[String], test: &dyn Fn(&str) -> bool| {
            list.is_empty() || list.iter().any(|e| test(e))
        };
        let named = principal.map(|p| p.to_string());
        any(&self.principals, &|pattern| {
            named.as_deref().is_some_and(|p| wildcard_match(pattern, p))
        }) && any(&self.namespaces, &|ns| {
            principal.is_some_and(|p| p.trust_domain == trust_domain && p.namespace == ns)
        }) && (self.ip_blocks.is_empty()
            || self.ip_blocks.iter().any(|block| block.contains(source_ip)))
    }

    /// Checks what serde cannot; errors are `(field path under the
    /// selector, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (p, principal) in self.principals.iter().enumerate() {
            if principal != "*" && !principal.starts_with("spiffe://") {
                return Err((
                    format!("principals[{p}]"),
                    format!("{principal:?} is not a SPIFFE ID pattern (spiffe://…, * allowed)"),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Destinations {
    /// `name` or `namespace/name`.
    pub workloads: Vec<String>,
    pub ports: Vec<u16>,
}

/// What is asking to connect to what.
pub struct Request<'a> {
    /// `None` for plaintext (no verified identity).
    pub principal: Option<&'a SpiffeId>,
    /// This mesh's trust domain: `namespaces` name namespaces of it only
    /// (another trust domain's `frontend` is not ours).
    pub trust_domain: &'a str,
    pub source_ip: Ipv4Addr,
    pub workload_namespace: &'a str,
    pub workload_name: &'a str,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by the named rule (or the default).
    Deny(String),
    /// Would be denied, but the policy is in dry-run mode.
    DryRunDeny(String),
}

/// A connection refused by a rule (or by the default action).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("denied by {rule}")]
pub struct Denied {
    /// The rule's name, `rules[i]`, or `default_action`.
    pub rule: String,
}

impl Decision {
    /// What the caller does with the decision: `Ok(dry_run_denied)` to go
    /// ahead, `Err(Denied)` to refuse. A dry-run deny is logged here, so every
    /// enforcement point reports it the same way.
    pub fn enforce(self, request: &Request<'_>) -> Result<bool, Denied> {
        match self {
            Decision::Allow => Ok(false),
            Decision::DryRunDeny(rule) => {
                tracing::info!(
                    principal = %request.principal.map(|p| p.to_string()).unwrap_or_default(),
                    source_ip = %request.source_ip,
                    workload = %format!("{}/{}", request.workload_namespace, request.workload_name),
                    port = request.port,
                    rule,
                    "dry run: would deny"
                );
                Ok(true)
            }
            Decision::Deny(rule) => Err(Denied { rule }),
        }
    }
}

impl Authorization {
    pub fn check(&self, request: &Request<'_>) -> Decision {
        let matching = |action: Action| {
            self.rules
                .iter()
                .enumerate()
                .find(|(_, rule)| rule.action == action && rule.matches(request))
                .map(|(index, rule)| {
                    rule.name
                        .clone()
                        .unwrap_or_else(|| format!("rules[{index}]"))
                })
        };
        let denied_by = match matching(Action::Deny) {
            Some(rule) => Some(rule),
            None if matching(Action::Allow).is_some() => None,
            None if self.default_action == Action::Deny => Some("default_action".to_owned()),
            None => None,
        };
        match denied_by {
            None => Decision::Allow,
            Some(rule) if self.dry_run => Decision::DryRunDeny(rule),
            Some(rule) => Decision::Deny(rule),
        }
    }

    /// Checks what serde cannot; errors are `(field path, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (index, rule) in self.rules.iter().enumerate() {
            rule.from.validate().map_err(|(field, message)| {
                (
                    format!("authorization.rules[{index}].from.{field}"),
                    message,
                )
            })?;
        }
        Ok(())
    }
}

impl Rule {
    fn matches(&self, request: &Request<'_>) -> bool {
        let any = |list: &[String], test: &dyn Fn(&str) -> bool| {
            list.is_empty() || list.iter().any(|e| test(e))
        };
        self.from
            .matches(request.principal, request.trust_domain, request.source_ip)
            && any(&self.to.workloads, &|w| match w.split_once('/') {
                Some((ns, name)) => {
                    ns == request.workload_namespace && name == request.workload_name
                }
                None => w == request.workload_name,
            })
            && (self.to.ports.is_empty() || self.to.ports.contains(&request.port))
    }
}

/// `*` matches any run of characters (including none).
///
/// Greedy with one backtrack point (the last `*` seen), so the cost is at
/// most pattern length times text length, whatever the number of `*`: a
/// recursive match is exponential in it, and patterns come from config.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    wildcard_match_counted(pattern, text).0
}

/// The match, and how many steps it took.
fn wildcard_match_counted(pattern: &str, text: &str) -> (bool, usize) {
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    let mut steps = 0;
    let (mut p, mut t) = (0, 0);
    // After the last `*`: where the pattern resumes, and the text position
    // it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        steps += 1;
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p + 1, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((resume, tried)) = star {
            // Let the last `*` take one more byte and try again.
            p = resume;
            t = tried + 1;
            star = Some((resume, tried + 1));
        } else {
            return (false, steps);
        }
    }
    (pattern[p..].iter().all(|&b| b == b'*'), steps)
}

/// An IPv4 block, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
        let addr = addr.parse().map_err(|_| format!("{text:?}: bad address"))?;
        // u8's parser takes a leading '+'; a prefix length is digits only.
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{text:?}: bad prefix length"));
        }
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{text:?}: bad prefix length"))?;
        if len > 32 {
            return Err(format!("{text:?}: prefix length above 32"));
        }
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(principal: Option<&'a SpiffeId>, ip: [u8; 4], port: u16) -> Request<'a> {
        Request {
            principal,
            trust_domain: "td",
            source_ip: Ipv4Addr::from(ip),
            workload_namespace: "default",
            workload_name: "web",
            port,
        }
    }

    fn policy(yaml: &str) -> Authorization {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn enforcing_lets_a_dry_run_deny_through_and_refuses_a_real_one() {
        let ask = request(None, [10, 1, 2, 3], 8080);
        assert_eq!(Decision::Allow.enforce(&ask), Ok(false));
        assert_eq!(Decision::DryRunDeny("r".into()).enforce(&ask), Ok(true));
        let denied = Decision::Deny("no-plaintext".into()).enforce(&ask);
        assert_eq!(
            denied,
            Err(Denied {
                rule: "no-plaintext".into()
            })
        );
        assert_eq!(denied.unwrap_err().to_string(), "denied by no-plaintext");
    }

    #[test]
    fn named_rules_are_reported_by_name_and_plaintext_matches_no_principal() {
        let policy = policy(
            "default_action: deny
rules:
  - { name: any-identity, action: allow, from: { principals: [\"*\"] } }
",
        );
        let id = SpiffeId::new("td", "default", "client");
        assert_eq!(
            policy.check(&request(Some(&id), [10, 1, 2, 3], 80)),
            Decision::Allow
        );
        // `*` matches any identity, never the lack of one.
        assert_eq!(
            policy.check(&request(None, [10, 1, 2, 3], 80)),
            Decision::Deny("default_action".into())
        );
    }

    #[test]
    fn validation_names_the_field_of_a_principal_that_is_no_spiffe_pattern() {
        let policy = policy(
            "rules:
  - { action: allow, from: { principals: [\"spiffe://td/*\", \"frontend\"] } }
",
        );
        let (field, message) = policy.validate().unwrap_err();
        assert_eq!(field, "authorization.rules[0].from.principals[1]");
        assert!(message.contains("\"frontend\""), "{message}");
    }

    #[test]
    fn deny_wins_then_allow_then_default() {
        let policy = policy(
            "default_action: deny
rules:
  - { action: allow, from: { namespaces: [frontend] } }
  - { name: no-legacy, action: deny, from: { principals: ['spiffe://td/ns/frontend/sa/legacy*'] } }
",
        );
        let good = SpiffeId::new("td", "frontend", "web");
        let legacy = SpiffeId::new("td", "frontend", "legacy-v1");
        let other = SpiffeId::new("td", "backend", "web");
        assert_eq!(
            policy.check(&request(Some(&good), [10, 0, 0, 1], 80)),
            Decision::Allow
        );
        assert_eq!(
            policy.check(&request(Some(&legacy), [10, 0, 0, 1], 80)),
            Decision::Deny("no-legacy".into())
        );
        assert_eq!(
            policy.check(&request(Some(&other), [10, 0, 0, 1], 80)),
            Decision::Deny("default_action".into())
        );
        assert_eq!(
            policy.check(&request(None, [10, 0, 0, 1], 80)),
            Decision::Deny("default_action".into())
        );
    }

    #[test]
    fn ip_blocks_ports_workloads_and_dry_run() {
        let policy = policy(
            "dry_run: true
rules:
  - { action: deny, from: { ip_blocks: [10.1.0.0/16] }, to: { workloads: [default/web], ports: [8080] } }
",
        );
        assert_eq!(
            policy.check(&request(None, [10, 1, 2, 3], 8080)),
            Decision::DryRunDeny("rules[0]".into())
        );
        assert_eq!(
            policy.check(&request(None, [10, 2, 2, 3], 8080)),
            Decision::Allow
        );
        assert_eq!(
            policy.check(&request(None, [10, 1, 2, 3], 9090)),
            Decision::Allow
        );
    }

    #[test]
    fn namespaces_are_this_trust_domains_only() {
        let policy = policy(
            "default_action: deny
rules:
  - { action: allow, from: { namespaces: [frontend] } }
",
        );
        let ours = SpiffeId::new("td", "frontend", "web");
        let theirs = SpiffeId::new("elsewhere", "frontend", "web");
        assert_eq!(
            policy.check(&request(Some(&ours), [10, 0, 0, 1], 80)),
            Decision::Allow
        );
        assert_eq!(
            policy.check(&request(Some(&theirs), [10, 0, 0, 1], 80)),
            Decision::Deny("default_action".into())
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match(
            "spiffe://td/ns/a/*",
            "spiffe://td/ns/a/sa/x"
        ));
        assert!(!wildcard_match(
            "spiffe://td/ns/a/*",
            "spiffe://td/ns/ab/sa/x"
        ));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match(
            "spiffe://*/ns/a/sa/x",
            "spiffe://td/ns/a/sa/x"
        ));
        for (pattern, text, expected) in [
            ("", "", true),
            ("", "a", false),
            ("**", "", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbYcZ", false),
            ("*c", "abcbc", true),
            ("a*a*a", "aaa", true),
            ("a*a*a", "aa", false),
            ("*/sa/*", "spiffe://td/ns/x/sa/y", true),
        ] {
            assert_eq!(
                wildcard_match(pattern, text),
                expected,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn many_stars_cost_no_more_than_the_text_is_long() {
        // Thirty stars before a byte the text lacks: the recursive matcher
        // tried every way to split 200 bytes into thirty runs (and never
        // returned); this one gives up within pattern length x text length.
        let pattern = format!("{}z", "a*".repeat(30));
        let text = "a".repeat(200);
        let (matched, steps) = wildcard_match_counted(&pattern, &text);
        assert!(!matched);
        assert!(steps <= (pattern.len() + 1) * (text.len() + 1), "{steps}");
    }

    #[test]
    fn prefix_lengths_are_digits_only() {
        for bad in [
            "10.0.0.0/+8",
            "10.0.0.0/",
            "10.0.0.0/ 8",
            "10.0.0.0/33",
            "10.0.0.0/08x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().len, 8);
    }
}
