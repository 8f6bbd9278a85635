//! A store over a Redis tier, for the Redis tests: chunk keys of one model,
//! 1000-byte payloads, and a memory tier that holds two of them.

use std::sync::Arc;

use kvgate_auth::audit::AuditLog;
use kvgate_auth::AuthConfig;
use kvgate_store::redis_tier::{RedisTier, RedisTierError};
use kvgate_store::{ChunkKey, Extras, RedisConfig, Scopes, Store, Unscoped, WritePolicy};
use tokio::net::TcpStream;

use super::redis_server::RedisServer;
use super::serve_store;

pub const MODEL: &str = "/models/secret-model";

/// A sealed 1000-byte chunk's bytes in Redis: version, nonce, meta, data, tag.
pub const FRAME: u64 = 1 + 12 + 24 + 1000 + 16;

pub fn key(hash: i64, salt: &str) -> ChunkKey {
    ChunkKey::parse(&format!("{MODEL}@1@0@{hash:x}@bfloat16@cachesalt%{salt}")).unwrap()
}

pub fn payload(h: i64) -> Vec<u8> {
    (0..1000u32)
        .map(|i| (i as u8) ^ (h as u8).wrapping_mul(31))
        .collect()
}

pub fn single(server: &RedisServer, write: WritePolicy, max_bytes: u64) -> RedisConfig {
    RedisConfig {
        url: Some(server.url()),
        cluster: Vec::new(),
        tls: None,
        max_bytes,
        write,
    }
}

/// The tier as the binary opens it: with the contracts of `cfg`.
pub fn open_tier(cfg: &AuthConfig, redis: &RedisConfig) -> Result<RedisTier, RedisTierError> {
    let scopes = Scopes::new(cfg, Unscoped::Refuse).unwrap();
    RedisTier::open(redis, scopes.contracts().unwrap())
}

/// A store whose memory holds two 1000-byte chunks, over `redis`.
pub async fn start(cfg: &AuthConfig, redis: &RedisConfig) -> (TcpStream, Arc<Store>) {
    start_audited(cfg, redis, AuditLog::disabled()).await
}

pub async fn start_audited(
    cfg: &AuthConfig,
    redis: &RedisConfig,
    audit: AuditLog,
) -> (TcpStream, Arc<Store>) {
    let store = Store::with(
        2000,
        1 << 16,
        Scopes::new(cfg, Unscoped::Refuse).unwrap(),
        audit,
        Extras {
            redis: Some(open_tier(cfg, redis).unwrap()),
            ..Default::default()
        },
    );
    let addr = serve_store(store.clone()).await;
    (TcpStream::connect(addr).await.unwrap(), store)
}

pub fn redis_of(store: &Store) -> &RedisTier {
    store.redis.as_ref().unwrap()
}
