//! kvgate's load generator: the published KV-cache workloads over the OpenAI
//! protocol, streamed so TTFT is measured at the client.

pub mod client;
pub mod compare;
pub mod envoy;
pub mod fake_backend;
pub mod fleet_model;
pub mod overhead;
pub mod peers;
pub mod plot;
pub mod report;
pub mod runner;
pub mod store;
pub mod sweep;
pub mod workload;

pub use client::Outcome;
pub use runner::{run_stage, summarize, StageOptions, StageSummary};
