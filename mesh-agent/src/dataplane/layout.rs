//! Whether the maps a previous agent pinned can be adopted as they are.
//!
//! A new agent (a handover, or a restart after a crash) keeps the pinned
//! maps, so every entry the old programs rely on (live connections, the
//! tc filter records, the fast path's sockets) stays, and swaps its own
//! programs into the old links. That is only sound when the new programs
//! read the maps as the old ones wrote them: same map types, key and value
//! sizes, capacities, and the same [`mesh_common::LAYOUT_VERSION`] for
//! what sizes cannot tell. Anything else is a clean reload.

use std::fmt;

use aya::maps::{Array, Map, MapData};
use mesh_common::{Settings, maps};

use super::{Capacity, PinLayout, error_chain};

/// What the pin root holds, as far as adopting it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinned {
    /// No maps: a fresh start.
    Nothing,
    /// Maps this agent reads as the previous one wrote them.
    Adoptable,
    /// Maps it must not adopt, and why.
    Incompatible(String),
}

/// The layout version this build writes and accepts. Debug builds take
/// `MESH_TEST_LAYOUT_VERSION` instead, so a test can play a build whose
/// layout differs.
pub fn version() -> u32 {
    #[cfg(debug_assertions)]
    if let Some(version) = std::env::var("MESH_TEST_LAYOUT_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return version;
    }
    mesh_common::LAYOUT_VERSION
}

struct Mismatch<'a> {
    map: &'a str,
    what: &'static str,
    pinned: u32,
    wanted: u32,
}

impl fmt::Display for Mismatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "map {}: {} {} pinned, {} wanted",
            self.map, self.what, self.pinned, self.wanted
        )
    }
}

/// Compares the maps pinned under `pins` with the object's definitions
/// (and the configured capacities).
pub fn inspect(pins: &PinLayout, object: &[u8], capacity: Capacity) -> Pinned {
    let pinned: Vec<&str> = maps::ALL
        .iter()
        .copied()
        .filter(|name| pins.map(name).exists())
        .collect();
    if pinned.is_empty() {
        return Pinned::Nothing;
    }
    match compare(pins, object, capacity, &pinned) {
        Ok(()) => Pinned::Adoptable,
        Err(reason) => Pinned::Incompatible(reason),
    }
}

fn compare(
    pins: &PinLayout,
    object: &[u8],
    capacity: Capacity,
    pinned: &[&str],
) -> Result<(), String> {
    let object = aya_obj::Object::parse(object).map_err(|e| format!("the kernel object: {e}"))?;
    // A map a new build added is created; one it dropped would stay
    // pinned with nobody to clean it: both mean a different layout.
    if pinned.len() != maps::ALL.len() {
        let missing: Vec<&str> = maps::ALL
            .iter()
            .copied()
            .filter(|name| !pinned.contains(name))
            .collect();
        return Err(format!("maps not pinned: {}", missing.join(", ")));
    }
    for &name in pinned {
        let path = pins.map(name);
        let info = MapData::from_pin(&path)
            .and_then(|map| map.info())
            .map_err(|e| format!("map {name}: {}", error_chain(&e)))?;
        let definition = object
            .maps
            .get(name)
            .ok_or_else(|| format!("map {name}: not in this build's object"))?;
        let wanted_entries = match name {
            maps::SERVICES => capacity.services,
            maps::WORKLOADS => capacity.workloads,
            _ => definition.max_entries(),
        };
        let pinned_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        for (what, pinned, wanted) in [
            ("type", pinned_type, definition.map_type()),
            ("key size", info.key_size(), definition.key_size()),
            ("value size", info.value_size(), definition.value_size()),
            ("flags", info.map_flags(), definition.map_flags()),
            ("capacity", info.max_entries(), wanted_entries),
        ] {
            if pinned != wanted {
                return Err(Mismatch {
                    map: name,
                    what,
                    pinned,
                    wanted,
                }
                .to_string());
            }
        }
    }
    let settings = MapData::from_pin(pins.map(maps::SETTINGS))
        .map(Map::Array)
        .and_then(Array::<MapData, Settings>::try_from)
        .and_then(|array| array.get(&0, 0))
        .map_err(|e| format!("map {}: {}", maps::SETTINGS, error_chain(&e)))?;
    if settings.layout != version() {
        return Err(format!(
            "layout version {} pinned, this agent's is {}",
            settings.layout,
            version()
        ));
    }
    Ok(())
}
