//! `kvgate store`: the KV chunk server LMCache and vLLM use as their remote
//! tier, speaking LMCache's `lm://` protocol so an LMCache user only changes
//! `remote_url`.
//!
//! It owns the wire format (`protocol.rs`, `key.rs`, checked against vectors
//! made by LMCache's own code), the listener (`server.rs`), contract scoping
//! (`scope.rs`), the tiers (`memory.rs`, `disk.rs`, `redis_tier.rs`, and how
//! they work together in `tiers.rs`), encryption at rest (`crypto.rs`,
//! `sealed.rs`, `shred_keys.rs`) and the admin listener (`admin.rs`); the
//! README says what each guarantees.

pub mod admin;
pub mod config;
pub mod crypto;
pub mod disk;
pub mod key;
mod ledger;
pub mod memory;
pub mod protocol;
mod redis_client;
mod redis_rebuild;
pub mod redis_tier;
pub mod scope;
mod sealed;
pub mod server;
pub mod shred_keys;
pub mod tiers;

pub use config::{RedisConfig, RedisTlsConfig, StoreConfig, StoreConfigError, WritePolicy};
pub use key::{ChunkKey, KeyError};
pub use protocol::{ChunkMeta, Command, ProtocolError, Reply, Request};
pub use scope::{Owner, ScopeError, Scopes, Unscoped};
pub use server::{
    serve, serve_scoped, ConnectionLimits, Extras, Quotas, Store, DEFAULT_IO_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CONNECTIONS,
};
