//! The cluster as the watches last saw it: one table of records per
//! resource. A re-list (after a 410 Gone or a restarted watch) fills a
//! fresh table and swaps it in whole at the end, so objects deleted while
//! the watch was down disappear and the model never sees half a list.

use std::collections::BTreeMap;

use kube::runtime::watcher::Event;

use super::records::{NamespaceRecord, NodeRecord, PodRecord, ServiceRecord, SliceRecord};

#[derive(Debug, Clone)]
pub struct Table<R> {
    pub live: BTreeMap<String, R>,
    listing: Option<BTreeMap<String, R>>,
    /// The first complete list arrived.
    pub synced: bool,
    /// Complete lists after the first one (the watch could not resume).
    pub relists: u64,
}

impl<R> Default for Table<R> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            listing: None,
            synced: false,
            relists: 0,
        }
    }
}

impl<R: PartialEq> Table<R> {
    /// Applies one watch event, with the object already turned into its
    /// key and record (None: the object is not relevant, as if deleted).
    /// Returns whether the live table changed.
    pub fn apply(&mut self, event: Event<(String, Option<R>)>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply((key, record)) => {
                if let (Some(listing), Some(record)) = (self.listing.as_mut(), record) {
                    listing.insert(key, record);
                }
                false
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                if self.synced {
                    self.relists += 1;
                }
                self.synced = true;
                let changed = listed != self.live;
                self.live = listed;
                // The first list counts as a change even when empty.
                changed || self.relists == 0
            }
            Event::Apply((key, Some(record))) => {
                if self.live.get(&key) == Some(&record) {
                    return false;
                }
                self.live.insert(key, record);
                true
            }
            Event::Apply((key, None)) | Event::Delete((key, _)) => self.live.remove(&key).is_some(),
        }
    }
}

/// Every table the model is built from. Cloned (copy on write) only when
/// an event arrives while a model build holds a snapshot.
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    pub namespaces: Table<NamespaceRecord>,
    /// Every Node: this one's zone, and the addresses that tell which
    /// node an HBONE peer is.
    pub nodes: Table<NodeRecord>,
    /// Pods scheduled on this node (field selector on `spec.nodeName`).
    pub local_pods: Table<PodRecord>,
    /// Every pod in the cluster: identities, versions and opt-outs of
    /// remote endpoints.
    pub pods: Table<PodRecord>,
    pub services: Table<ServiceRecord>,
    pub slices: Table<SliceRecord>,
}

impl ClusterState {
    /// Every watch has delivered its first complete list.
    pub fn synced(&self) -> bool {
        self.namespaces.synced
            && self.nodes.synced
            && self.local_pods.synced
            && self.pods.synced
            && self.services.synced
            && self.slices.synced
    }

    pub fn relists(&self) -> u64 {
        self.namespaces.relists
            + self.nodes.relists
            + self.local_pods.relists
            + self.pods.relists
            + self.services.relists
            + self.slices.relists
    }
}
