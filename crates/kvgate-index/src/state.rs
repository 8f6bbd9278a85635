//! The index's single-writer core. [`crate::KvIndex`] wraps it in a lock.
//!
//! Layout, chosen for cheap lookups and a small footprint per (block, endpoint):
//! - `blocks`: block key -> holders, each holder one (endpoint, tier) with the
//!   engine's hash (to undo the engine map on eviction) and a store stamp;
//! - per endpoint, engine hash -> block key, so `BlockRemoved` (engine hashes
//!   only) applies in O(1) and a `BlockStored`'s parent resolves to its key;
//! - a FIFO of (key, endpoint, tier, stamp) in store order, with lazy deletion:
//!   the memory bound evicts the oldest-stored holder first, and TTL expiry pops
//!   the same queue from the front.
//!
//! This module holds the layout and the writes (events, purges, expiry, the
//! memory bound); the reads (lookups, dumps, sizes, invariant checks) are in
//! `query`.

mod query;

use std::collections::VecDeque;

use hashbrown::HashMap;
use kvgate_keys::{stored_block_keys, BlockHasher, BlockKey};
use kvgate_wire::vllm::{BlockRemoved, BlockStored, EngineHash, KvEvent};
use smallvec::SmallVec;

use crate::tier::{Tier, TierNames};
use crate::{ApplyStats, EndpointId, IndexConfig, IndexError};

/// Keys are already uniform 64-bit hashes: re-hashing them would only cost time.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyIdentity;

impl std::hash::BuildHasher for KeyIdentity {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

#[derive(Default)]
pub(crate) struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else defensively.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Engine hashes are truncated digests too, so the identity hash serves them.
type FastMap<K, V> = HashMap<K, V, KeyIdentity>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Holder {
    pub engine_hash: EngineHash,
    pub stamp: u32,
    pub endpoint: EndpointId,
    pub tier: Tier,
}

type Holders = SmallVec<[Holder; 1]>;

#[derive(Debug, Clone, Copy)]
struct QueueEntry {
    key: BlockKey,
    stamp: u32,
    stored_at: u32,
    endpoint: EndpointId,
    tier: Tier,
}

#[derive(Debug)]
pub(crate) struct EndpointState {
    pub name: String,
    pub model: String,
    pub block_size: u32,
    pub root: BlockKey,
    pub engine_to_key: FastMap<EngineHash, BlockKey>,
    /// Holders this endpoint owns (one per (block, tier)).
    pub holders: usize,
    pub last_seq: Option<i64>,
    /// Set when events were lost and could not be replayed: entries stored before
    /// `stale_before_stamp` are unverified and dropped once `stale_until` passes.
    pub stale: Option<Staleness>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Staleness {
    pub before_stamp: u32,
    pub until_secs: u32,
}

pub(crate) struct State {
    pub cfg: IndexConfig,
    pub hasher: BlockHasher,
    pub tiers: TierNames,
    blocks: FastMap<BlockKey, Holders>,
    pub endpoints: Vec<Option<EndpointState>>,
    queue: VecDeque<QueueEntry>,
    next_stamp: u32,
    pub holders_total: usize,
}

/// Stamps wrap; order is only compared between live entries, far fewer than 2^31 apart.
fn stamp_before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

impl State {
    pub fn new(cfg: IndexConfig, hasher: BlockHasher) -> Self {
        Self {
            cfg,
            hasher,
            tiers: TierNames::default(),
            blocks: FastMap::default(),
            endpoints: Vec::new(),
            queue: VecDeque::new(),
            next_stamp: 0,
            holders_total: 0,
        }
    }

    pub fn endpoint(&self, id: EndpointId) -> Option<&EndpointState> {
        self.endpoints.get(id as usize).and_then(Option::as_ref)
    }

    fn endpoint_mut(&mut self, id: EndpointId) -> Result<&mut EndpointState, IndexError> {
        self.endpoints
            .get_mut(id as usize)
            .and_then(Option::as_mut)
            .ok_or(IndexError::UnknownEndpoint(id))
    }

    pub fn find_endpoint(&self, name: &str) -> Option<EndpointId> {
        self.endpoints
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.name == name))
            .map(|i| i as EndpointId)
    }

    pub fn add_endpoint(
        &mut self,
        name: &str,
        model: &str,
        block_size: u32,
    ) -> Result<EndpointId, IndexError> {
        if block_size == 0 {
            return Err(IndexError::InvalidBlockSize(block_size));
        }
        if let Some(id) = self.find_endpoint(name) {
            let ep = self.endpoint_mut(id)?;
            if ep.model != model || ep.block_size != block_size {
                return Err(IndexError::EndpointConflict(name.to_string()));
            }
            return Ok(id);
        }
        let state = EndpointState {
            name: name.to_string(),
            model: model.to_string(),
            block_size,
            root: self.hasher.root(model),
            engine_to_key: FastMap::default(),
            holders: 0,
            last_seq: None,
            stale: None,
        };
        // Reuse freed slots so endpoint ids stay dense (lookups use bitsets over them).
        if let Some(slot) = self.endpoints.iter().position(Option::is_none) {
            self.endpoints[slot] = Some(state);
            return Ok(slot as EndpointId);
        }
        if self.endpoints.len() > EndpointId::MAX as usize {
            return Err(IndexError::TooManyEndpoints);
        }
        self.endpoints.push(Some(state));
        Ok((self.endpoints.len() - 1) as EndpointId)
    }

    /// Drops every entry of `id`; with `forget` the endpoint itself goes too.
    pub fn purge_endpoint(&mut self, id: EndpointId, forget: bool) -> usize {
        let Some(ep) = self.endpoints.get_mut(id as usize).and_then(Option::as_mut) else {
            return 0;
        };
        let keys: Vec<BlockKey> = ep.engine_to_key.drain().map(|(_, k)| k).collect();
        ep.holders = 0;
        ep.stale = None;
        let mut removed = 0;
        for key in keys {
            removed += self.remove_holders(key, |h| h.endpoint == id);
        }
        if forget {
            self.endpoints[id as usize] = None;
        }
        removed
    }

    /// Removes the holders of `key` matching `pred`; returns how many.
    fn remove_holders(&mut self, key: BlockKey, pred: impl Fn(&Holder) -> bool) -> usize {
        let Some(holders) = self.blocks.get_mut(&key) else {
            return 0;
        };
        let before = holders.len();
        holders.retain(|h| !pred(h));
        let removed = before - holders.len();
        if holders.is_empty() {
            self.blocks.remove(&key);
        }
        self.holders_total -= removed;
        removed
    }

    /// Removes endpoint `id`'s holders of `key` matching `pred`, keeping the
    /// endpoint's counters and engine map in step: the engine hash stops
    /// resolving once no tier of the endpoint holds the key.
    fn remove_endpoint_holders(
        &mut self,
        id: EndpointId,
        key: BlockKey,
        engine_hash: EngineHash,
        pred: impl Fn(&Holder) -> bool,
    ) -> usize {
        let removed = self.remove_holders(key, |h| h.endpoint == id && pred(h));
        let still_held = self
            .blocks
            .get(&key)
            .is_some_and(|hs| hs.iter().any(|h| h.endpoint == id));
        if let Some(Some(ep)) = self.endpoints.get_mut(id as usize) {
            ep.holders -= removed;
            if !still_held {
                ep.engine_to_key.remove(&engine_hash);
            }
        }
        removed
    }

    pub fn apply_event(
        &mut self,
        id: EndpointId,
        event: &KvEvent,
        now_secs: u32,
        stats: &mut ApplyStats,
    ) -> Result<(), IndexError> {
        match event {
            KvEvent::BlockStored(ev) => self.apply_stored(id, ev, now_secs, stats),
            KvEvent::BlockRemoved(ev) => self.apply_removed(id, ev, stats),
            KvEvent::AllBlocksCleared => {
                self.endpoint_mut(id)?;
                stats.cleared += 1;
                stats.removed_blocks += self.purge_endpoint(id, false);
                Ok(())
            }
        }
    }

    fn apply_stored(
        &mut self,
        id: EndpointId,
        ev: &BlockStored,
        now_secs: u32,
        stats: &mut ApplyStats,
    ) -> Result<(), IndexError> {
        stats.stored_events += 1;
        // Only full-attention groups decide prefix hits; other groups (sliding
        // window, mamba) mirror the same tokens and would double-count.
        if ev
            .kv_cache_spec_kind
            .as_deref()
            .is_some_and(|k| k != "full_attention")
        {
            stats.ignored_events += 1;
            return Ok(());
        }
        let tier = self.tiers.intern(ev.medium.as_deref());
        let ep = self.endpoint_mut(id)?;
        if ev.block_size != ep.block_size {
            return Err(IndexError::BlockSizeMismatch {
                endpoint: ep.block_size,
                event: ev.block_size,
            });
        }
        let parent = match ev.parent_block_hash {
            None => ep.root,
            Some(h) => match ep.engine_to_key.get(&h) {
                Some(k) => *k,
                None => {
                    // The parent was never seen (events lost, or evicted here):
                    // the chain cannot be keyed, and no request could match past
                    // the missing parent anyway.
                    stats.orphan_blocks += ev.block_hashes.len();
                    return Ok(());
                }
            },
        };
        let keys = stored_block_keys(
            &self.hasher,
            parent,
            &ev.token_ids,
            ev.block_size as usize,
            ev.block_hashes.len(),
            ev.extra_keys.as_deref(),
            ev.lora_name.as_deref(),
        )?;
        for (&engine_hash, &key) in ev.block_hashes.iter().zip(&keys) {
            self.insert_holder(id, key, engine_hash, tier, now_secs);
            stats.stored_blocks += 1;
        }
        self.enforce_bound(stats);
        Ok(())
    }

    fn insert_holder(
        &mut self,
        id: EndpointId,
        key: BlockKey,
        engine_hash: EngineHash,
        tier: Tier,
        now_secs: u32,
    ) {
        let stamp = self.next_stamp;
        self.next_stamp = self.next_stamp.wrapping_add(1);
        let holders = self.blocks.entry(key).or_default();
        let mut added = false;
        match holders
            .iter_mut()
            .find(|h| h.endpoint == id && h.tier == tier)
        {
            Some(h) => {
                h.stamp = stamp;
                h.engine_hash = engine_hash;
            }
            None => {
                holders.push(Holder {
                    engine_hash,
                    stamp,
                    endpoint: id,
                    tier,
                });
                added = true;
            }
        }
        if added {
            self.holders_total += 1;
        }
        let mut replaced = None;
        if let Some(Some(ep)) = self.endpoints.get_mut(id as usize) {
            if added {
                ep.holders += 1;
            }
            replaced = ep
                .engine_to_key
                .insert(engine_hash, key)
                .filter(|old| *old != key);
        }
        if let Some(old) = replaced {
            // The engine reused a hash for other content (an engine-side hash
            // collision): whatever the endpoint held under the old key is wrong.
            let removed = self.remove_holders(old, |h| h.endpoint == id);
            if let Some(Some(ep)) = self.endpoints.get_mut(id as usize) {
                ep.holders -= removed;
            }
        }
        self.queue.push_back(QueueEntry {
            key,
            stamp,
            stored_at: now_secs,
            endpoint: id,
            tier,
        });
        self.compact_queue_if_sparse();
    }

    fn apply_removed(
        &mut self,
        id: EndpointId,
        ev: &BlockRemoved,
        stats: &mut ApplyStats,
    ) -> Result<(), IndexError> {
        stats.removed_events += 1;
        let tier = self.tiers.intern(ev.medium.as_deref());
        self.endpoint_mut(id)?;
        for hash in &ev.block_hashes {
            let key = match self
                .endpoint(id)
                .and_then(|ep| ep.engine_to_key.get(hash).copied())
            {
                Some(k) => k,
                None => {
                    stats.unknown_removals += 1;
                    continue;
                }
            };
            stats.removed_blocks +=
                self.remove_endpoint_holders(id, key, *hash, |h| h.tier == tier);
        }
        Ok(())
    }

    /// Pops queue entries while `should_pop` says so; returns holders removed.
    fn pop_queue(&mut self, mut should_pop: impl FnMut(&QueueEntry, usize) -> bool) -> usize {
        let mut removed = 0;
        while let Some(front) = self.queue.front().copied() {
            if !should_pop(&front, self.holders_total) {
                break;
            }
            self.queue.pop_front();
            removed += self.evict_if_current(front);
        }
        removed
    }

    /// Evicts the holder a queue entry refers to, unless it was re-stored or
    /// removed since (lazy deletion).
    fn evict_if_current(&mut self, e: QueueEntry) -> usize {
        let Some(holders) = self.blocks.get(&e.key) else {
            return 0;
        };
        let Some(h) = holders
            .iter()
            .find(|h| h.endpoint == e.endpoint && h.tier == e.tier && h.stamp == e.stamp)
            .copied()
        else {
            return 0;
        };
        self.remove_endpoint_holders(e.endpoint, e.key, h.engine_hash, |x| *x == h)
    }

    fn enforce_bound(&mut self, stats: &mut ApplyStats) {
        let max = self.cfg.max_tracked_blocks;
        stats.evicted_blocks += self.pop_queue(|_, total| total > max);
    }

    /// Drops holders older than the TTL and stale entries past their grace.
    pub fn expire(&mut self, now_secs: u32) -> usize {
        let mut removed = 0;
        if let Some(ttl) = self.cfg.ttl_secs {
            removed += self.pop_queue(|e, _| now_secs.saturating_sub(e.stored_at) >= ttl);
        }
        for id in 0..self.endpoints.len() {
            let due = self.endpoints[id]
                .as_ref()
                .and_then(|ep| ep.stale)
                .filter(|s| now_secs >= s.until_secs);
            if let Some(s) = due {
                removed += self.drop_stamped_before(id as EndpointId, s.before_stamp);
                if let Some(Some(ep)) = self.endpoints.get_mut(id) {
                    ep.stale = None;
                }
            }
        }
        removed
    }

    fn drop_stamped_before(&mut self, id: EndpointId, before: u32) -> usize {
        let Some(ep) = self.endpoint(id) else {
            return 0;
        };
        let entries: Vec<(EngineHash, BlockKey)> =
            ep.engine_to_key.iter().map(|(h, k)| (*h, *k)).collect();
        let mut removed = 0;
        for (hash, key) in entries {
            removed +=
                self.remove_endpoint_holders(id, key, hash, |h| stamp_before(h.stamp, before));
        }
        removed
    }

    pub fn mark_stale(&mut self, id: EndpointId, now_secs: u32, grace_secs: u32) {
        let before_stamp = self.next_stamp;
        if let Some(Some(ep)) = self.endpoints.get_mut(id as usize) {
            // A second gap during the grace keeps the first (older) boundary.
            if ep.stale.is_none() {
                ep.stale = Some(Staleness {
                    before_stamp,
                    until_secs: now_secs.saturating_add(grace_secs),
                });
            }
        }
    }

    /// Lazy deletion leaves dead queue entries behind; rebuild when they dominate.
    fn compact_queue_if_sparse(&mut self) {
        if self.queue.len() < 1024 || self.queue.len() < 2 * self.holders_total + 1024 {
            return;
        }
        let blocks = &self.blocks;
        self.queue.retain(|e| {
            blocks.get(&e.key).is_some_and(|hs| {
                hs.iter()
                    .any(|h| h.endpoint == e.endpoint && h.tier == e.tier && h.stamp == e.stamp)
            })
        });
    }

    /// Drops what [`Self::restore_entry`] recorded for `keys` (each its own
    /// engine hash) on endpoint `id`; returns holders removed.
    pub fn forget_recorded(&mut self, id: EndpointId, keys: &[BlockKey]) -> usize {
        keys.iter()
            .map(|&k| self.remove_endpoint_holders(id, k, k, |_| true))
            .sum()
    }

    /// Removes every holder of `keys`, on every endpoint and tier.
    pub fn drop_keys(&mut self, keys: &[BlockKey]) -> usize {
        let mut removed = 0;
        for &key in keys {
            let holders: Holders = self.blocks.get(&key).cloned().unwrap_or_default();
            for h in holders {
                removed += self
                    .remove_endpoint_holders(h.endpoint, key, h.engine_hash, |x| x.tier == h.tier);
            }
        }
        removed
    }

    /// Restores one dumped entry (bootstrap from another replica).
    pub fn restore_entry(
        &mut self,
        id: EndpointId,
        key: BlockKey,
        engine_hash: EngineHash,
        tier: Tier,
        now_secs: u32,
    ) {
        self.insert_holder(id, key, engine_hash, tier, now_secs);
    }

    pub fn enforce_bound_now(&mut self) -> usize {
        let mut stats = ApplyStats::default();
        self.enforce_bound(&mut stats);
        stats.evicted_blocks
    }
}
