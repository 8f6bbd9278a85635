//! The memory tier: chunks by key string, least recently used evicted first,
//! bounded in bytes. A chunk's buffer is zeroized when its last holder drops
//! it (evicted, overwritten or deleted, and no GET still writing it out).

use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use zeroize::Zeroizing;

use std::collections::HashMap;

use crate::protocol::ChunkMeta;
use crate::scope::Owner;

pub struct Chunk {
    pub owner: Owner,
    pub meta: ChunkMeta,
    pub data: Zeroizing<Vec<u8>>,
}

/// A tier's counters (registered on the admin listener's `/metrics`).
#[derive(Debug, Default)]
pub struct TierStats {
    pub hits: Counter,
    pub misses: Counter,
    pub evictions: Counter,
}

pub struct MemoryTier {
    max_bytes: u64,
    inner: Mutex<Inner>,
    pub stats: TierStats,
}

struct Inner {
    chunks: LruCache<String, Arc<Chunk>>,
    bytes: u64,
    by_owner: HashMap<Owner, u64>,
}

impl Inner {
    fn add(&mut self, owner: &Owner, size: u64) {
        self.bytes += size;
        *self.by_owner.entry(owner.clone()).or_default() += size;
    }

    fn remove(&mut self, chunk: &Chunk) {
        let size = chunk.data.len() as u64;
        self.bytes -= size;
        if let Some(b) = self.by_owner.get_mut(&chunk.owner) {
            *b -= size;
            if *b == 0 {
                self.by_owner.remove(&chunk.owner);
            }
        }
    }
}

impl MemoryTier {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            inner: Mutex::new(Inner {
                chunks: LruCache::unbounded(),
                bytes: 0,
                by_owner: HashMap::new(),
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

    /// Stores `chunk` under `key`: first its owner's own least recently used
    /// chunks make room under `quota` (the owner's byte bound, if any), then
    /// anyone's least recently used make room in the tier. Returns the
    /// evicted, for the audit log; Err (nothing stored) for a chunk larger
    /// than the tier or the quota.
    pub fn put(
        &self,
        key: String,
        chunk: Arc<Chunk>,
        quota: Option<u64>,
    ) -> Result<Vec<(String, Arc<Chunk>)>, Arc<Chunk>> {
        let size = chunk.data.len() as u64;
        if size > self.max_bytes.min(quota.unwrap_or(u64::MAX)) {
            return Err(chunk);
        }
        let mut evicted_all = Vec::new();
        let mut inner = self.inner.lock();
        let owner = chunk.owner.clone();
        if let Some(old) = inner.chunks.put(key.clone(), chunk) {
            inner.remove(&old);
        }
        inner.add(&owner, size);
        if let Some(quota) = quota {
            while inner.by_owner.get(&owner).copied().unwrap_or(0) > quota {
                // Oldest first; the new chunk itself is the newest.
                let Some(k) = inner
                    .chunks
                    .iter()
                    .rev()
                    .find(|(k, c)| c.owner == owner && **k != key)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                if let Some(evicted) = inner.chunks.pop(&k) {
                    inner.remove(&evicted);
                    self.stats.evictions.inc();
                    evicted_all.push((k, evicted));
                }
            }
        }
        while inner.bytes > self.max_bytes {
            let Some((k, evicted)) = inner.chunks.pop_lru() else {
                break;
            };
            inner.remove(&evicted);
            self.stats.evictions.inc();
            evicted_all.push((k, evicted));
        }
        Ok(evicted_all)
    }

    /// The chunk, now the most recently used.
    pub fn get(&self, key: &str) -> Option<Arc<Chunk>> {
        let hit = self.inner.lock().chunks.get(key).cloned();
        let counter = if hit.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.inc();
        hit
    }

    /// Bytes held for `owner`.
    pub fn owner_bytes(&self, owner: &Owner) -> u64 {
        self.inner.lock().by_owner.get(owner).copied().unwrap_or(0)
    }

    /// Removes every chunk of `owner` (each buffer zeroized once no GET
    /// still holds it): (chunks, bytes).
    pub fn shred(&self, owner: &Owner) -> (usize, u64) {
        let mut inner = self.inner.lock();
        let keys: Vec<String> = inner
            .chunks
            .iter()
            .filter(|(_, c)| c.owner == *owner)
            .map(|(k, _)| k.clone())
            .collect();
        let mut bytes = 0;
        for k in &keys {
            if let Some(c) = inner.chunks.pop(k) {
                bytes += c.data.len() as u64;
                inner.remove(&c);
            }
        }
        (keys.len(), bytes)
    }

    /// Whether the chunk is here (its recency unchanged: LMCache asks before
    /// every GET and for every chunk of a lookup).
    pub fn contains(&self, key: &str) -> bool {
        self.inner.lock().chunks.contains(key)
    }
}
