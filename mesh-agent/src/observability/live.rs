//! What is happening now: the table of open connections (for
//! `/connections`) and the stream of finished ones (for `/events`, which
//! `mesh-agent observe` follows).

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::locks::lock;

/// Bytes moved so far, shared with the splice that moves them.
#[derive(Debug, Default)]
pub struct Bytes {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

struct Entry {
    client: SocketAddrV4,
    destination: SocketAddrV4,
    endpoint: Option<SocketAddrV4>,
    source_workload: String,
    destination_workload: String,
    mutual_tls: bool,
    started: Instant,
    bytes: Arc<Bytes>,
}

#[derive(Debug, Serialize)]
pub struct LiveConnection {
    pub id: u64,
    pub client: String,
    pub destination: String,
    pub endpoint: String,
    pub source_workload: String,
    pub destination_workload: String,
    pub mtls: bool,
    pub age_ms: u64,
    pub sent: u64,
    pub received: u64,
}

pub struct Live {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Entry>>,
    events: broadcast::Sender<String>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            open: Mutex::default(),
            // Observers that fall behind lose the oldest events, never the proxy's time.
            events: broadcast::channel(1024).0,
        }
    }
}

/// Removes its connection from the table when dropped.
pub struct Registration {
    live: Arc<Live>,
    id: u64,
    pub bytes: Arc<Bytes>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.live.open).remove(&self.id);
    }
}

impl Live {
    pub fn register(
        self: &Arc<Self>,
        client: SocketAddrV4,
        destination: SocketAddrV4,
        endpoint: Option<SocketAddrV4>,
        source_workload: &str,
        destination_workload: &str,
        mutual_tls: bool,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let bytes = Arc::new(Bytes::default());
        lock(&self.open).insert(
            id,
            Entry {
                client,
                destination,
                endpoint,
                source_workload: source_workload.to_owned(),
                destination_workload: destination_workload.to_owned(),
                mutual_tls,
                started: Instant::now(),
                bytes: bytes.clone(),
            },
        );
        Registration {
            live: self.clone(),
            id,
            bytes,
        }
    }

    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let open = lock(&self.open);
        open.iter()
            .map(|(id, e)| LiveConnection {
                id: *id,
                client: e.client.to_string(),
                destination: e.destination.to_string(),
                endpoint: e.endpoint.map(|a| a.to_string()).unwrap_or_default(),
                source_workload: e.source_workload.clone(),
                destination_workload: e.destination_workload.clone(),
                mtls: e.mutual_tls,
                age_ms: e.started.elapsed().as_millis() as u64,
                sent: e.bytes.sent.load(Ordering::Relaxed),
                received: e.bytes.received.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Publishes a finished connection (a JSON object) to observers.
    pub fn publish(&self, event: serde_json::Value) {
        // No observer is fine.
        let _ = self.events.send(event.to_string());
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }
}
