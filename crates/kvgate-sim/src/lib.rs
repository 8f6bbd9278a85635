//! kvgate's simulated vLLM engine.
//!
//! Seen from outside it behaves like vLLM: the OpenAI endpoints ([`server`]),
//! a paged KV cache with prefix caching ([`cache`]) driven by vLLM's
//! continuous-batching scheduler ([`engine`]), KV events over ZMQ in vLLM
//! 0.32's format with a replay socket ([`publisher`]), and vLLM's metrics.
//! Latency comes from a calibrated model, optionally faster than real time.
//! [`fleet`] starts one or many in a process.

pub mod cache;
pub mod engine;
pub mod fleet;
pub mod publisher;
pub mod server;

pub use engine::{EngineConfig, EngineCore, EngineHandle, LatencyModel, SimRequest, TokenEvent};
pub use fleet::{RunningSim, SimConfig, SimError};
