//! `kvgate store`'s YAML config (the binary layers env and flags on it).

use serde::{Deserialize, Serialize};

use crate::scope::Unscoped;
use crate::server::DEFAULT_MAX_CHUNK_BYTES;

/// LMCache's examples serve `lm://` on 65432.
pub const DEFAULT_STORE_LISTEN: &str = "0.0.0.0:65432";
/// The memory tier's bound by default.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The `lm://` listener.
    pub listen: String,
    /// The memory tier's bound, bytes.
    pub memory_bytes: u64,
    /// Largest chunk a PUT may carry; larger ones close the connection
    /// before anything is allocated.
    pub max_chunk_bytes: u32,
    /// The contracts, as the gateway has them (same `master_key` or keys):
    /// a chunk key's `cachesalt` tag maps to its contract. None configured:
    /// one shared namespace.
    pub contracts: kvgate_auth::AuthConfig,
    /// Keys without a `cachesalt` tag: `refuse` (default) or `shared`.
    pub unscoped: Unscoped,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_STORE_LISTEN.to_string(),
            memory_bytes: DEFAULT_MEMORY_BYTES,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
            contracts: kvgate_auth::AuthConfig::default(),
            unscoped: Unscoped::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreConfigError {
    #[error("{0} must be > 0")]
    Zero(&'static str),
    #[error("max_chunk_bytes ({chunk}) is over memory_bytes ({memory}): no chunk that large could be kept")]
    ChunkOverMemory { chunk: u32, memory: u64 },
}

impl StoreConfig {
    pub fn validate(&self) -> Result<(), StoreConfigError> {
        if self.memory_bytes == 0 {
            return Err(StoreConfigError::Zero("memory_bytes"));
        }
        if self.max_chunk_bytes == 0 {
            return Err(StoreConfigError::Zero("max_chunk_bytes"));
        }
        if u64::from(self.max_chunk_bytes) > self.memory_bytes {
            return Err(StoreConfigError::ChunkOverMemory {
                chunk: self.max_chunk_bytes,
                memory: self.memory_bytes,
            });
        }
        Ok(())
    }
}
