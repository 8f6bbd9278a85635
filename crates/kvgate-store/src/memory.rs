//! The memory tier: chunks by key string, bounded in bytes, segmented LRU so
//! that one huge scan cannot flush the hot set. A chunk starts in the
//! probation segment; a GET that hits it moves it to the protected segment
//! (at most [`PROTECTED_SHARE`] of the tier; its least recently used go back
//! to probation). Room is made from probation's least recently used first,
//! so chunks stored once and never read (a scan, a prompt no one repeats)
//! only displace each other. A chunk's buffer is zeroized when its last
//! holder drops it (evicted, overwritten or deleted, and no GET still
//! writing it out).

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

/// The protected segment's bound, as a share of the tier: SLRU's customary
/// 80%, leaving a fifth for new chunks to prove themselves by a hit.
pub const PROTECTED_SHARE: f64 = 0.8;

pub struct MemoryTier {
    max_bytes: u64,
    inner: Mutex<Inner>,
    pub stats: TierStats,
}

struct Inner {
    probation: LruCache<String, Arc<Chunk>>,
    protected: LruCache<String, Arc<Chunk>>,
    bytes: u64,
    protected_bytes: u64,
    protected_max: u64,
    by_owner: HashMap<Owner, u64>,
}

impl Inner {
    /// Takes `key` out of whichever segment holds it (bytes accounted).
    fn take(&mut self, key: &str) -> Option<Arc<Chunk>> {
        let c = match self.protected.pop(key) {
            Some(c) => {
                self.protected_bytes -= c.data.len() as u64;
                c
            }
            None => self.probation.pop(key)?,
        };
        self.remove(&c);
        Some(c)
    }

    /// The least recently used chunk, probation first.
    fn pop_lru(&mut self) -> Option<(String, Arc<Chunk>)> {
        let (k, c) = match self.probation.pop_lru() {
            Some(e) => e,
            None => {
                let e = self.protected.pop_lru()?;
                self.protected_bytes -= e.1.data.len() as u64;
                e
            }
        };
        self.remove(&c);
        Some((k, c))
    }

    /// `owner`'s least recently used chunk other than `except`, probation first.
    fn oldest_of(&self, owner: &Owner, except: &str) -> Option<String> {
        let pick = |seg: &LruCache<String, Arc<Chunk>>| {
            seg.iter()
                .rev()
                .find(|(k, c)| c.owner == *owner && k.as_str() != except)
                .map(|(k, _)| k.clone())
        };
        pick(&self.probation).or_else(|| pick(&self.protected))
    }

    /// Moves a hit chunk to protected, demoting protected's least recently
    /// used to probation while it is over its share.
    fn protect(&mut self, key: String, chunk: Arc<Chunk>) {
        self.protected_bytes += chunk.data.len() as u64;
        self.protected.put(key.clone(), chunk);
        while self.protected_bytes > self.protected_max {
            let Some((k, c)) = self
                .protected
                .peek_lru()
                .map(|(k, c)| (k.clone(), c.clone()))
            else {
                break;
            };
            if k == key {
                break;
            }
            self.protected.pop(&k);
            self.protected_bytes -= c.data.len() as u64;
            self.probation.put(k, c);
        }
    }

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
                probation: LruCache::unbounded(),
                protected: LruCache::unbounded(),
                bytes: 0,
                protected_bytes: 0,
                protected_max: (max_bytes as f64 * PROTECTED_SHARE) as u64,
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
        let inner = self.inner.lock();
        inner.probation.len() + inner.protected.len()
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
        // A chunk written again keeps its segment.
        let was_protected = inner.protected.contains(&key);
        inner.take(&key);
        inner.add(&owner, size);
        if was_protected {
            inner.protect(key.clone(), chunk);
        } else {
            inner.probation.put(key.clone(), chunk);
        }
        if let Some(quota) = quota {
            while inner.by_owner.get(&owner).copied().unwrap_or(0) > quota {
                // Oldest first; the new chunk itself is the newest.
                let Some(k) = inner.oldest_of(&owner, &key) else {
                    break;
                };
                if let Some(evicted) = inner.take(&k) {
                    self.stats.evictions.inc();
                    evicted_all.push((k, evicted));
                }
            }
        }
        while inner.bytes > self.max_bytes {
            let Some((k, evicted)) = inner.pop_lru() else {
                break;
            };
            self.stats.evictions.inc();
            evicted_all.push((k, evicted));
        }
        Ok(evicted_all)
    }

    /// The chunk, now the most recently used.
    pub fn get(&self, key: &str) -> Option<Arc<Chunk>> {
        let hit = {
            let mut inner = self.inner.lock();
            match inner.protected.get(key).cloned() {
                Some(c) => Some(c),
                None => inner
                    .probation
                    .pop(key)
                    .inspect(|c| inner.protect(key.to_string(), c.clone())),
            }
        };
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
            .probation
            .iter()
            .chain(inner.protected.iter())
            .filter(|(_, c)| c.owner == *owner)
            .map(|(k, _)| k.clone())
            .collect();
        let mut bytes = 0;
        for k in &keys {
            if let Some(c) = inner.take(k) {
                bytes += c.data.len() as u64;
            }
        }
        (keys.len(), bytes)
    }

    /// Whether the chunk is here (its recency unchanged: LMCache asks before
    /// every GET and for every chunk of a lookup).
    pub fn contains(&self, key: &str) -> bool {
        let inner = self.inner.lock();
        inner.probation.contains(key) || inner.protected.contains(key)
    }
}
