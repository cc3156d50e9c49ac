//! Netlink tc filters, the attach mode before Linux 6.6 (no TCX), have no
//! link object to pin: they live as long as nobody deletes them. So the
//! agent records each one it attaches in the pinned `MESH_TC_FILTERS` map,
//! and [`remove_recorded`] deletes them after a crash, when the process
//! that held them is gone. On TCX kernels the map stays empty.

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{
        TcAttachType,
        tc::{SchedClassifierLink, TcHandle},
    },
};
use mesh_common::{TC_EGRESS, TC_INGRESS, TcFilterKey, TcFilterValue, maps::TC_FILTERS};

use super::{PinLayout, error_chain, maps::KernelMapError};

pub struct TcFilterRecords {
    map: HashMap<MapData, TcFilterKey, TcFilterValue>,
}

/// A filter as recorded: where it sits and which program it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedFilter {
    pub ifindex: u32,
    pub attach_type: TcAttachType,
    pub priority: u16,
    pub handle: u32,
    pub program: &'static str,
}

impl TcFilterRecords {
    pub fn new(map: Map) -> Result<Self, KernelMapError> {
        let map = HashMap::try_from(map).map_err(|source| KernelMapError::Map {
            name: TC_FILTERS,
            source,
        })?;
        Ok(Self { map })
    }

    pub fn open_pinned(pins: &PinLayout) -> Result<Self, KernelMapError> {
        let path = pins.map(TC_FILTERS);
        let map = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .map_err(|source| KernelMapError::Pinned { path, source })?;
        Self::new(map)
    }

    pub fn record(
        &mut self,
        ifindex: u32,
        attach_type: TcAttachType,
        program: &str,
        link: &SchedClassifierLink,
    ) -> Result<(), TcFilterError> {
        let (priority, handle) = link
            .priority()
            .and_then(|priority| Ok((priority, link.handle()?)))
            .map_err(|e| TcFilterError::Query {
                program: program.to_owned(),
                reason: error_chain(&e),
            })?;
        let program = mesh_common::programs::ALL
            .iter()
            .position(|name| *name == program)
            .unwrap_or(usize::MAX) as u32;
        let value = TcFilterValue {
            priority: priority.into(),
            handle: handle.into(),
            program,
        };
        self.map
            .insert(key(ifindex, attach_type), value, 0)
            .map_err(|e| TcFilterError::Record(error_chain(&e)))
    }

    /// Priority and handle of the filter recorded there, if any.
    pub fn get(&self, ifindex: u32, attach_type: TcAttachType) -> Option<(u16, u32)> {
        self.map
            .get(&key(ifindex, attach_type), 0)
            .ok()
            .map(|value| (value.priority as u16, value.handle))
    }

    pub fn forget(&mut self, ifindex: u32, attach_type: TcAttachType) {
        let _ = self.map.remove(&key(ifindex, attach_type));
    }

    pub fn list(&self) -> Vec<RecordedFilter> {
        self.map
            .iter()
            .flatten()
            .map(|(key, value)| RecordedFilter {
                ifindex: key.ifindex,
                attach_type: if key.direction == TC_EGRESS {
                    TcAttachType::Egress
                } else {
                    TcAttachType::Ingress
                },
                priority: value.priority as u16,
                handle: value.handle,
                program: mesh_common::programs::ALL
                    .get(value.program as usize)
                    .copied()
                    .unwrap_or("unknown"),
            })
            .collect()
    }
}

fn key(ifindex: u32, attach_type: TcAttachType) -> TcFilterKey {
    TcFilterKey {
        ifindex,
        direction: match attach_type {
            TcAttachType::Egress => TC_EGRESS,
            _ => TC_INGRESS,
        },
    }
}

/// Deletes every filter recorded under `pins` (in the current network
/// namespace, where the agent ran). Returns how many were deleted; an
/// interface that is gone took its filters with it and is not an error.
pub fn remove_recorded(pins: &PinLayout) -> Result<usize, TcFilterError> {
    if !pins.map(TC_FILTERS).exists() {
        return Ok(0);
    }
    let records = TcFilterRecords::open_pinned(pins)?;
    let mut removed = 0;
    for filter in records.list() {
        let Ok(ifname) = nix::net::if_::if_indextoname(filter.ifindex) else {
            continue;
        };
        let ifname = ifname.to_string_lossy();
        let link = SchedClassifierLink::attached(
            &ifname,
            filter.attach_type,
            filter.priority,
            TcHandle::from(filter.handle),
            None,
        )
        .map_err(|e| TcFilterError::Remove {
            interface: ifname.to_string(),
            reason: e.to_string(),
        })?;
        // Dropping a netlink link deletes the filter.
        drop(link);
        removed += 1;
    }
    Ok(removed)
}

/// Why a netlink filter could not be recorded or removed.
#[derive(Debug, thiserror::Error)]
pub enum TcFilterError {
    #[error("netlink filter of {program}: {reason}")]
    Query { program: String, reason: String },
    #[error("recording the netlink filter: {0}")]
    Record(String),
    #[error(transparent)]
    Records(#[from] KernelMapError),
    #[error("{interface}: {reason}")]
    Remove { interface: String, reason: String },
}
