//! The authorization matcher's `*` patterns, against a reference matcher
//! (memoized, quadratic) on short inputs: the fast one must agree, and
//! must stay fast on long ones.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::authz::wildcard_match;

fn reference(pattern: &[u8], text: &[u8]) -> bool {
    // matches[i][j]: pattern[i..] matches text[j..].
    let (p, t) = (pattern.len(), text.len());
    let mut matches = vec![vec![false; t + 1]; p + 1];
    matches[p][t] = true;
    for i in (0..p).rev() {
        for j in (0..=t).rev() {
            matches[i][j] = if pattern[i] == b'*' {
                matches[i + 1][j] || (j < t && matches[i][j + 1])
            } else {
                j < t && pattern[i] == text[j] && matches[i + 1][j + 1]
            };
        }
    }
    matches[0][0]
}

fuzz_target!(|input: (&str, &str)| {
    let (pattern, text) = input;
    let fast = wildcard_match(pattern, text);
    if pattern.len() <= 256 && text.len() <= 256 {
        assert_eq!(fast, reference(pattern.as_bytes(), text.as_bytes()), "{pattern:?} ~ {text:?}");
    }
});
