//! W3C trace context: the ids a connection's span carries, and the
//! `traceparent` header that links the spans of one connection across
//! nodes. A peer's header is hostile input: it is parsed strictly and a
//! malformed one is dropped whole.

use serde::{Deserialize, Serialize};

/// W3C trace context: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

impl TraceParent {
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        let mut parts = value.trim().split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("too few fields");
        };
        fn hex(text: &str, len: usize) -> Option<&str> {
            (text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then_some(text)
        }
        let version = hex(version, 2).ok_or("version")?;
        // Version ff is invalid; 00 has exactly four fields, later ones may
        // add more after them.
        if version == "ff" || (version == "00" && parts.next().is_some()) {
            return Err("version");
        }
        let trace_id =
            u128::from_str_radix(hex(trace, 32).ok_or("trace id")?, 16).map_err(|_| "trace id")?;
        let parent_id = u64::from_str_radix(hex(parent, 16).ok_or("parent id")?, 16)
            .map_err(|_| "parent id")?;
        let flags = u8::from_str_radix(hex(flags, 2).ok_or("flags")?, 16).map_err(|_| "flags")?;
        if trace_id == 0 || parent_id == 0 {
            return Err("all-zero id");
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

impl std::fmt::Display for TraceParent {
    /// The header's value, version 00.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// A connection's place in a trace: its own span id, the trace it belongs
/// to, the span that caused it (the source agent's, across nodes), and
/// whether it is recorded. Travels with a connection a new agent takes
/// over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub sampled: bool,
}

impl TraceContext {
    /// A new trace; `sampled` is the caller's head-sampling decision.
    pub fn root(sampled: impl FnOnce(u128) -> bool) -> Self {
        let trace_id = loop {
            let id = fastrand::u128(..);
            if id != 0 {
                break id;
            }
        };
        Self {
            trace_id,
            span_id: new_span_id(),
            parent_id: None,
            sampled: sampled(trace_id),
        }
    }

    /// A span in the trace `parent` belongs to, recorded when the parent
    /// was (the decision is made once, at the trace's head).
    pub fn child_of(parent: TraceParent) -> Self {
        Self {
            trace_id: parent.trace_id,
            span_id: new_span_id(),
            parent_id: Some(parent.parent_id),
            sampled: parent.flags & SAMPLED != 0,
        }
    }

    /// What to send on to the next hop: this span as its parent.
    pub fn traceparent(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id,
            parent_id: self.span_id,
            flags: if self.sampled { SAMPLED } else { 0 },
        }
    }
}

fn new_span_id() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// Head sampling by trace id, as OpenTelemetry's `TraceIdRatioBased`
/// does it: the low 64 bits of a random id are uniform, so comparing them
/// with the ratio's share of the range samples that share, and every node
/// deciding on the same id decides alike.
pub fn sampled_at(ratio: f64, trace_id: u128) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 || ratio.is_nan() {
        return false;
    }
    let bound = (ratio * (1u128 << 64) as f64) as u128;
    u128::from(trace_id as u64) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(text).unwrap();
        assert_eq!(parsed.to_string(), text);
        let child = TraceContext::child_of(parsed);
        assert_eq!(child.trace_id, parsed.trace_id);
        assert_eq!(child.parent_id, Some(0x00f0_67aa_0ba9_02b7));
        assert!(child.sampled);
        assert_ne!(child.span_id, parsed.parent_id);
        let next = child.traceparent();
        assert_eq!(next.parent_id, child.span_id);
        assert_eq!(next.flags, 1);
        let unsampled = TraceParent::parse(&text.replace("-01", "-00")).unwrap();
        assert!(!TraceContext::child_of(unsampled).sampled);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_err(), "{bad:?}");
        }
        // A later version may add fields after the four.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_ok()
        );
    }

    #[test]
    fn the_ratio_samples_its_share() {
        assert!(sampled_at(1.0, 5));
        assert!(!sampled_at(0.0, 5));
        let ids = 100_000;
        let kept = (0..ids)
            .filter(|_| sampled_at(0.25, TraceContext::root(|_| false).trace_id))
            .count();
        let share = kept as f64 / ids as f64;
        assert!((share - 0.25).abs() < 0.01, "{share}");
    }
}
