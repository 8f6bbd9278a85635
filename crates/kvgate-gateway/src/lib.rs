//! kvgate's OpenAI-compatible, KV-cache-aware gateway.
//!
//! Requests are authenticated (tenant -> `cache_salt`), rendered and tokenized
//! as the engine will, keyed into blocks, scheduled by `kvgate-router` against
//! the KV block index fed by the endpoints' events, and proxied with responses
//! streamed chunk by chunk.

pub mod config;
pub mod fleet;
pub mod metrics;
pub mod scrape;
pub mod server;
pub mod tenancy;

pub use config::{EndpointConfig, GatewayConfig};
pub use fleet::{Discovery, StaticDiscovery};
pub use server::Gateway;
