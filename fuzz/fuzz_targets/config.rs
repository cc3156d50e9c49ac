//! Any text as the agent's config file: refused with an error or
//! accepted, never a panic (what `check` and `run` both do first).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::config::Config;

fuzz_target!(|text: &str| {
    if let Ok(config) = Config::parse(text, "fuzz.yaml") {
        // What was accepted serializes (the agent logs it at start).
        let _ = serde_json_string(&config);
    }
});

fn serde_json_string(config: &Config) -> String {
    format!("{config:?}")
}
