//! Feeds the KV block index from engines' event streams and serves it.
//!
//! - [`subscriber`]: one ZMQ SUB per engine endpoint, sequence tracking, replay
//!   on gaps and reconnects, staleness when replay is unavailable;
//! - [`api`]: the HTTP locality/dump/metrics service;
//! - [`metrics`]: the Prometheus metrics both export.

pub mod api;
pub mod metrics;
pub mod subscriber;

/// The one endpoint description (also the index's event sources).
pub use kvgate_fleet::EndpointConfig;
