//! Helpers shared by the ZMQ interop tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate_index::{EndpointInfo, IndexConfig, KvIndex};
use kvgate_indexer::metrics::{EndpointLabels, IndexerMetrics, OutcomeLabels};
use kvgate_keys::BlockHasher;

/// A port that was free a moment ago (bind 127.0.0.1:0, read it, release it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn new_index() -> Arc<KvIndex> {
    Arc::new(KvIndex::new(
        IndexConfig::default(),
        BlockHasher::from_secret(b"zmq-tests"),
    ))
}

pub fn endpoint(index: &KvIndex, name: &str) -> Option<EndpointInfo> {
    index.endpoints().into_iter().find(|e| e.name == name)
}

/// (engine hash, tier) of every entry the index holds for `name`.
pub fn held(index: &KvIndex, name: &str) -> BTreeSet<(u64, String)> {
    index
        .dump()
        .endpoints
        .into_iter()
        .filter(|e| e.name == name)
        .flat_map(|e| e.entries)
        .map(|(_, hash, tier)| (hash, tier))
        .collect()
}

pub fn count(
    family: &prometheus_client::metrics::family::Family<
        EndpointLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    name: &str,
) -> u64 {
    family
        .get_or_create(&EndpointLabels {
            endpoint: name.to_string(),
        })
        .get()
}

pub fn replays(metrics: &IndexerMetrics, name: &str, outcome: &str) -> u64 {
    metrics
        .replays
        .get_or_create(&OutcomeLabels {
            endpoint: name.to_string(),
            outcome: outcome.to_string(),
        })
        .get()
}

/// Polls `cond` every 20 ms until it holds; false on timeout.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
