//! SPIFFE IDs from text (config, policy) and from certificates (a peer's
//! TLS handshake): never a panic, and an accepted ID prints back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    // Whatever DER a peer presents.
    let _ = SpiffeId::from_cert(data);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = text.parse::<SpiffeId>()
    {
        assert_eq!(id.to_string().parse::<SpiffeId>().ok(), Some(id));
    }
});
