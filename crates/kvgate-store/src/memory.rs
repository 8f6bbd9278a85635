//! The memory tier: chunks by key string, least recently used evicted first,
//! bounded in bytes. A chunk's buffer is zeroized when its last holder drops
//! it (evicted, overwritten or deleted, and no GET still writing it out).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;
use zeroize::Zeroizing;

use crate::protocol::ChunkMeta;

pub struct Chunk {
    pub meta: ChunkMeta,
    pub data: Zeroizing<Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct TierStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
}

pub struct MemoryTier {
    max_bytes: u64,
    inner: Mutex<Inner>,
    pub stats: TierStats,
}

struct Inner {
    chunks: LruCache<String, Arc<Chunk>>,
    bytes: u64,
}

impl MemoryTier {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            inner: Mutex::new(Inner {
                chunks: LruCache::unbounded(),
                bytes: 0,
            }),
            stats: TierStats::default(),
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.inner.lock().chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `chunk` under `key`, evicting the least recently used until it
    /// fits. False (nothing stored) for a chunk larger than the whole tier.
    pub fn put(&self, key: String, chunk: Chunk) -> bool {
        let size = chunk.data.len() as u64;
        if size > self.max_bytes {
            return false;
        }
        let mut inner = self.inner.lock();
        if let Some(old) = inner.chunks.put(key, Arc::new(chunk)) {
            inner.bytes -= old.data.len() as u64;
        }
        inner.bytes += size;
        while inner.bytes > self.max_bytes {
            let Some((_, evicted)) = inner.chunks.pop_lru() else {
                break;
            };
            inner.bytes -= evicted.data.len() as u64;
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// The chunk, now the most recently used.
    pub fn get(&self, key: &str) -> Option<Arc<Chunk>> {
        let hit = self.inner.lock().chunks.get(key).cloned();
        let counter = if hit.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Whether the chunk is here (its recency unchanged: LMCache asks before
    /// every GET and for every chunk of a lookup).
    pub fn contains(&self, key: &str) -> bool {
        self.inner.lock().chunks.contains(key)
    }
}
