//! Feeds the KV block index from engines' event streams and serves it.
//!
//! - [`subscriber`]: one ZMQ SUB per engine endpoint, sequence tracking, replay
//!   on gaps and reconnects, staleness when replay is unavailable;
//! - [`api`]: the HTTP locality/dump/metrics service;
//! - [`metrics`]: the Prometheus metrics both export.

pub mod api;
pub mod metrics;
pub mod subscriber;

use serde::{Deserialize, Serialize};

/// Where one engine publishes its KV events, and what it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSource {
    /// The endpoint's name in the index (usually its base URL).
    pub name: String,
    pub model: String,
    pub block_size: u32,
    /// The engine's PUB endpoint, e.g. `tcp://10.0.0.5:5557`.
    pub events: String,
    /// The engine's replay ROUTER endpoint, if it has one.
    #[serde(default)]
    pub replay: Option<String>,
    /// Topic prefix to subscribe to ("" = everything); vLLM's default is "".
    #[serde(default)]
    pub topic: String,
    /// Bind instead of connect: vLLM *connects* its PUB when its endpoint has
    /// no wildcard host, and then the subscriber must bind.
    #[serde(default)]
    pub bind: bool,
}
