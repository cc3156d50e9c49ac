//! Load for the upgrade tests: new connections one client run after
//! another, a long checksummed transfer, and what the kernel keeps across
//! agents (its pinned links).

use std::{
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use serde_json::Value;

use crate::{bpftool, pod::Connect};

/// Runs `connect` with `options` (one `mesh-pod connect` to completion)
/// again and again until `stop`, counting each connection in `opened`;
/// returns every report that failed or took over a second, and every
/// client that could not connect at all.
pub fn churn(
    connect: impl Fn(Connect) -> Result<Vec<Value>, String>,
    options: Connect,
    stop: &AtomicBool,
    opened: &AtomicU64,
) -> Vec<String> {
    let mut problems = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match connect(options) {
            Ok(reports) => {
                for report in reports {
                    let slow = report["duration_ms"].as_u64().unwrap_or(0) > 1_000;
                    if !report["error"].is_null() || report["greeting"].is_null() || slow {
                        problems.push(report.to_string());
                    }
                    opened.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => problems.push(error),
        }
    }
    problems
}

/// Checks a long transfer's report: no error, `bytes` sent, and the
/// server's digest of what it read equal to the client's of what it sent.
/// Returns how long it took, in milliseconds.
pub fn check_transfer(report: &Value, bytes: u64) -> u64 {
    assert!(report["error"].is_null(), "{report}");
    assert_eq!(report["sent"], bytes, "{report}");
    let expected = format!("{bytes} {}", report["sent_sha256"].as_str().unwrap());
    assert_eq!(report["reply"], expected, "{report}");
    report["duration_ms"].as_u64().unwrap_or(0)
}

/// Ids of the links pinned under `pin_root`, sorted.
pub fn pinned_link_ids(pin_root: &Path) -> Vec<u64> {
    let root = pin_root.to_string_lossy();
    let mut ids: Vec<u64> = bpftool(&["-f", "link", "show"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|link| {
            link["pinned"].as_array().is_some_and(|paths| {
                paths
                    .iter()
                    .any(|p| p.as_str().is_some_and(|p| p.starts_with(&*root)))
            })
        })
        .filter_map(|link| link["id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}
