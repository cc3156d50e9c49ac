//! Fast-path connections the old agent passed on at the handover: each
//! goes on in the kernel as it was, spliced from here now, and its record
//! is written here when it ends. Should yet another agent take over
//! meanwhile, they move on to it the same way.

use std::sync::{Arc, atomic::Ordering};

use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::{
    dataplane::fast_path::FastPath,
    handover::{Arrival, Arrivals},
    io::splice::{self, Adopted},
    observability::access::{Outcome, Record, Sinks},
    proxy,
};

/// Carries on every connection that arrives, until the old agent says it
/// sent them all.
pub async fn carry_on(
    mut arrivals: Arrivals,
    fast: Option<Arc<FastPath>>,
    sinks: Arc<Sinks>,
    tracker: TaskTracker,
) {
    let mut taken = 0u64;
    loop {
        let arrival = match arrivals.next().await {
            Ok(Some(arrival)) => arrival,
            Ok(None) => break,
            Err(error) => {
                warn!(%error, "receiving the old agent's connections");
                break;
            }
        };
        // Without a fast path of its own (a config that turned it off),
        // this agent cannot carry one: it closes with its descriptors.
        let Some(fast) = fast.clone() else {
            warn!("a fast-path connection arrived, but the fast path is off here; closed");
            continue;
        };
        match adopt(arrival) {
            Ok((connection, record)) => {
                taken += 1;
                fast.stats.migrated_in.fetch_add(1, Ordering::Relaxed);
                tracker.spawn(splice(connection, record, fast, sinks.clone()));
            }
            Err(error) => warn!(%error, "a connection from the old agent; closed"),
        }
    }
    info!(taken, "carrying on the old agent's fast-path connections");
}

fn adopt(arrival: Arrival) -> Result<(Adopted, Record), String> {
    let record: Record =
        serde_json::from_value(arrival.record).map_err(|e| format!("its record: {e}"))?;
    let stream = |fd| {
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        TcpStream::from_std(stream)
    };
    let client = stream(arrival.client).map_err(|e| format!("its client socket: {e}"))?;
    let upstream = stream(arrival.upstream).map_err(|e| format!("its upstream socket: {e}"))?;
    let connection = Adopted {
        client,
        upstream,
        passed_up: arrival.passed_up,
    };
    Ok((connection, record))
}

async fn splice(connection: Adopted, record: Record, fast: Arc<FastPath>, sinks: Arc<Sinks>) {
    let registration = record.opened(&sinks);
    let done = match splice::adopt(connection, None, &registration.bytes, &fast).await {
        Ok(done) => done,
        Err(error) => {
            warn!(%error, "a connection from the old agent; closed");
            return record.finish(&sinks, Outcome::Reset, 0, 0, Some(error.to_string()));
        }
    };
    proxy::conclude(done, record, &sinks, Some(&fast));
}
