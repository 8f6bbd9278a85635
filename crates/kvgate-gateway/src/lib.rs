//! kvgate's OpenAI-compatible, KV-cache-aware gateway.
//!
//! Data flows one way: `http` (the edge) -> `pipeline` (contract, validation,
//! tokens) -> the fleet's routing transaction (`kvgate_fleet::Fleet::route`:
//! keys, score, pick, load guard) -> `proxy` (upstream, retries, streaming).

pub mod admin;
pub mod config;
mod contract_keys;
pub mod contract_source;
mod control_plane;
mod gateway;
pub mod http;
pub mod metrics;
pub mod pick;
pub mod pipeline;
pub mod proxy;
pub mod request_end;
mod store_sync;
mod usage;

pub use config::{ConfigError, GatewayConfig, StoreAdminConfig};
pub use contract_source::{ContractSource, SourceTask};
pub use gateway::{Gateway, GatewayError};
pub use http::{EXPLAIN_CHAT_PATH, EXPLAIN_COMPLETIONS_PATH};
pub use kvgate_fleet::{Discovery, EndpointConfig, StaticDiscovery};
