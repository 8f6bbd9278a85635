//! `kvgate store`: the KV chunk server LMCache and vLLM use as their remote
//! tier, speaking LMCache's `lm://` protocol so an LMCache user only changes
//! `remote_url`.
//!
//! This first step owns the wire format (`protocol.rs`, `key.rs`, checked
//! against vectors made by LMCache's own code), the memory tier
//! (`memory.rs`: LRU, bounded in bytes, buffers zeroized when dropped) and
//! the listener (`server.rs`). Contract scoping, encryption at rest, the
//! disk and Redis tiers, the admin listener and auditing are the next steps
//! (see the README).

pub mod admin;
pub mod config;
pub mod crypto;
pub mod disk;
pub mod key;
pub mod memory;
pub mod protocol;
pub mod scope;
pub mod server;
pub mod shred_keys;
pub mod tiers;

pub use config::{StoreConfig, StoreConfigError, WritePolicy};
pub use key::{ChunkKey, KeyError};
pub use protocol::{ChunkMeta, Command, ProtocolError, Reply, Request};
pub use scope::{Owner, ScopeError, Scopes, Unscoped};
pub use server::{serve, serve_scoped, Extras, Quotas, Store, DEFAULT_MAX_CHUNK_BYTES};
