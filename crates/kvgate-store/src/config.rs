//! `kvgate store`'s YAML config (the binary layers env and flags on it).

use serde::{Deserialize, Serialize};

use crate::scope::Unscoped;
use crate::server::{
    ConnectionLimits, DEFAULT_IO_TIMEOUT, DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CONNECTIONS,
};

/// LMCache's examples serve `lm://` on 65432.
pub const DEFAULT_STORE_LISTEN: &str = "0.0.0.0:65432";
/// The admin listener (probes, metrics, usage, status, shred) by default.
pub const DEFAULT_STORE_ADMIN_LISTEN: &str = "0.0.0.0:8091";
/// The memory tier's bound by default.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The `lm://` listener.
    pub listen: String,
    /// The HTTP admin listener.
    pub admin_listen: String,
    /// The admin token's SHA-256 (hex); unset: only the read-only admin
    /// routes are served.
    pub admin_token_sha256: Option<String>,
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
    /// The `service` label of `sentinel_kv_cache_size_gb`.
    pub service: String,
    /// Bytes each contract may hold (its own oldest chunks make room);
    /// unset: bounded by the tier alone.
    pub contract_quota_bytes: Option<u64>,
    /// Per-contract exceptions to `contract_quota_bytes`.
    pub quota_overrides: std::collections::BTreeMap<String, u64>,
    /// `lm://` listeners bound to one contract each (the sidecar layout):
    /// every chunk on one is its contract's, so an unmodified LMCache
    /// client needs no tag.
    pub contract_listeners: Vec<ContractListener>,
    /// `lm://` connections open at once, over every listener; one more is
    /// closed at accept.
    pub max_connections: usize,
    /// How long a request may take to arrive once begun, and a reply to be
    /// taken, in milliseconds; a client stalled longer is disconnected.
    pub io_timeout_ms: u64,
    /// The disk tier (sealed chunks; needs contracts). Unset: memory only.
    pub disk: Option<DiskConfig>,
    /// The Redis/Valkey tier (sealed chunks, shared by every store on the
    /// server; needs contracts). Unset: none.
    pub redis: Option<RedisConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// One server: `redis://[:password@]host:6379[/db]`, or `rediss://`
    /// for TLS (the server's certificate is always verified).
    #[serde(default)]
    pub url: Option<String>,
    /// Or a Redis Cluster: some of its nodes' URLs (the rest are found).
    #[serde(default)]
    pub cluster: Vec<String>,
    /// Certificates for `rediss://` URLs; unset: the server's certificate
    /// must chain to the system's roots, and no client certificate is sent.
    #[serde(default)]
    pub tls: Option<RedisTlsConfig>,
    /// Bytes this store keeps in Redis (oldest it wrote first out).
    pub max_bytes: u64,
    /// `back` (default): a chunk is sealed to Redis when memory evicts it.
    /// `through`: also when it is stored, so every store on the server
    /// sees it at once.
    #[serde(default)]
    pub write: WritePolicy,
}

/// TLS to Redis (`redis.tls`), for `rediss://` URLs. Files are PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisTlsConfig {
    /// The CA certificates the server's certificate must chain to (instead
    /// of the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// mTLS: this store's certificate chain, with `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// mTLS: the private key of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

impl RedisConfig {
    /// Every server URL configured (the one server, or the cluster's seeds).
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.url
            .as_deref()
            .into_iter()
            .chain(self.cluster.iter().map(String::as_str))
    }

    /// Whether the URLs ask for TLS (`rediss://`).
    pub fn uses_tls(&self) -> bool {
        self.urls().any(|u| u.starts_with("rediss://"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// One directory (e.g. the pod's `emptyDir` at `/mnt/cache`).
    pub dir: std::path::PathBuf,
    pub max_bytes: u64,
    /// `back` (default): a chunk is sealed to disk when memory evicts it.
    /// `through`: also when it is stored, so a crash or restart of the
    /// store loses no contract's chunk that disk has room for.
    #[serde(default)]
    pub write: WritePolicy,
}

/// When chunks reach the disk tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WritePolicy {
    #[default]
    Back,
    Through,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractListener {
    pub listen: String,
    pub contract: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_STORE_LISTEN.to_string(),
            admin_listen: DEFAULT_STORE_ADMIN_LISTEN.to_string(),
            admin_token_sha256: None,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
            contracts: kvgate_auth::AuthConfig::default(),
            unscoped: Unscoped::default(),
            service: kvgate_auth::DEFAULT_SERVICE.to_string(),
            contract_quota_bytes: None,
            quota_overrides: Default::default(),
            contract_listeners: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            io_timeout_ms: DEFAULT_IO_TIMEOUT.as_millis() as u64,
            disk: None,
            redis: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreConfigError {
    #[error("{0} must be > 0")]
    Zero(&'static str),
    #[error("max_chunk_bytes ({chunk}) is over memory_bytes ({memory}): no chunk that large could be kept")]
    ChunkOverMemory { chunk: u32, memory: u64 },
    #[error("admin_token_sha256 must be 64 hex characters")]
    AdminTokenHash,
    #[error("contract listener {0:?} names a contract not in contracts")]
    ListenerContract(String),
    #[error("disk needs contracts: chunks are sealed under their contract's key, and shared chunks never leave memory")]
    DiskWithoutContracts,
    #[error("redis needs contracts: chunks are sealed under their contract's key, and shared chunks never leave memory")]
    RedisWithoutContracts,
    #[error("redis needs exactly one of url (one server) or cluster (its nodes)")]
    RedisServers,
    #[error("redis URLs must all be redis:// or all rediss:// (TLS)")]
    RedisMixedSchemes,
    #[error("redis.tls is set but the URLs are redis://: use rediss:// for TLS")]
    RedisTlsWithoutRediss,
    #[error("redis.tls needs both cert_file and key_file (mTLS), or neither")]
    RedisTlsClientPair,
}

impl StoreConfig {
    pub fn validate(&self) -> Result<(), StoreConfigError> {
        if self.memory_bytes == 0 {
            return Err(StoreConfigError::Zero("memory_bytes"));
        }
        if self.max_chunk_bytes == 0 {
            return Err(StoreConfigError::Zero("max_chunk_bytes"));
        }
        if self.max_connections == 0 {
            return Err(StoreConfigError::Zero("max_connections"));
        }
        if self.io_timeout_ms == 0 {
            return Err(StoreConfigError::Zero("io_timeout_ms"));
        }
        if u64::from(self.max_chunk_bytes) > self.memory_bytes {
            return Err(StoreConfigError::ChunkOverMemory {
                chunk: self.max_chunk_bytes,
                memory: self.memory_bytes,
            });
        }
        self.admin_token()?;
        if let Some(l) = self
            .contract_listeners
            .iter()
            .find(|l| !self.contracts.contracts.iter().any(|c| c.id == l.contract))
        {
            return Err(StoreConfigError::ListenerContract(l.listen.clone()));
        }
        if let Some(d) = &self.disk {
            if d.max_bytes == 0 {
                return Err(StoreConfigError::Zero("disk.max_bytes"));
            }
            if self.contracts.contracts.is_empty() {
                return Err(StoreConfigError::DiskWithoutContracts);
            }
        }
        if let Some(r) = &self.redis {
            if r.max_bytes == 0 {
                return Err(StoreConfigError::Zero("redis.max_bytes"));
            }
            if r.url.is_some() != r.cluster.is_empty() {
                return Err(StoreConfigError::RedisServers);
            }
            if r.uses_tls() && !r.urls().all(|u| u.starts_with("rediss://")) {
                return Err(StoreConfigError::RedisMixedSchemes);
            }
            if let Some(t) = &r.tls {
                if !r.uses_tls() {
                    return Err(StoreConfigError::RedisTlsWithoutRediss);
                }
                if t.cert_file.is_some() != t.key_file.is_some() {
                    return Err(StoreConfigError::RedisTlsClientPair);
                }
            }
            if self.contracts.contracts.is_empty() {
                return Err(StoreConfigError::RedisWithoutContracts);
            }
        }
        if self.contract_quota_bytes == Some(0) || self.quota_overrides.values().any(|q| *q == 0) {
            return Err(StoreConfigError::Zero("contract quota"));
        }
        Ok(())
    }

    /// The quotas, as the store applies them.
    pub fn quotas(&self) -> crate::server::Quotas {
        crate::server::Quotas {
            default: self.contract_quota_bytes,
            overrides: self.quota_overrides.clone(),
        }
    }

    /// The connection limits, as the listeners apply them.
    pub fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            io_timeout: std::time::Duration::from_millis(self.io_timeout_ms),
        }
    }

    /// The admin token's SHA-256, if one is configured.
    pub fn admin_token(&self) -> Result<Option<[u8; 32]>, StoreConfigError> {
        let Some(h) = &self.admin_token_sha256 else {
            return Ok(None);
        };
        let mut out = [0u8; 32];
        hex::decode_to_slice(h.trim(), &mut out).map_err(|_| StoreConfigError::AdminTokenHash)?;
        Ok(Some(out))
    }
}
