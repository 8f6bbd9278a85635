//! Feeds the KV block index from engines' event streams and serves it.
//!
//! - [`subscriber`]: one ZMQ SUB per engine endpoint, sequence tracking, replay
//!   on gaps and reconnects, staleness when replay is unavailable;
//! - [`api`]: the HTTP locality/dump/metrics service;
//! - [`grpc`]: the locality API over gRPC (`proto/kvgate/index/v1/index.proto`),
//!   answered by the same query as HTTP's;
//! - [`metrics`]: the Prometheus metrics both export.

pub mod api;
pub mod grpc;
pub mod metrics;
pub mod subscriber;

/// The one endpoint description (also the index's event sources).
pub use kvgate_fleet::EndpointConfig;
