//! A paged KV cache with automatic prefix caching, as vLLM's v1 block pool
//! behaves seen from outside:
//!
//! - `num_blocks` blocks, of which block 0 is vLLM's reserved null block, so
//!   `num_blocks - 1` are usable (`--num-gpu-blocks-override 128` gives 127).
//! - Only full blocks are hashed and cached. A block's hash chains its parent's
//!   hash, its tokens and its extra keys (the cache salt on the first block).
//! - Blocks are reference-counted. A block whose count drops to 0 goes to the
//!   tail of the free queue but keeps its hash, so it can still be hit; new
//!   blocks are taken from the head (least recently freed), and taking a block
//!   that still has a hash evicts it (`BlockRemoved`).
//! - A request frees its blocks tail first, so a prefix's last blocks are
//!   evicted before its first ones.

use std::collections::HashMap;
use std::hash::Hasher;

use kvgate_wire::vllm::{BlockRemoved, BlockStored, ExtraKey, KvEvent};
use siphasher::sip::SipHasher13;

/// vLLM's medium name for blocks in accelerator memory (its CPU build says the same).
pub const MEDIUM_GPU: &str = "GPU";

pub type BlockId = u32;
const NIL: BlockId = BlockId::MAX;

#[derive(Clone)]
struct Block {
    ref_cnt: u32,
    hash: Option<u64>,
    /// Free-queue links (valid only while the block is in the queue).
    prev: BlockId,
    next: BlockId,
    in_free_queue: bool,
}

/// The engine-side hash of one full block. The sim's own (not vLLM's sha256 over
/// pickle): subscribers must never depend on the engine's algorithm.
pub fn block_hash(parent: Option<u64>, tokens: &[u32], extra: Option<&str>) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6b76_6761_7465_7369, 0x6d2d_626c_6f63_6b73);
    h.write_u64(parent.unwrap_or(0x9e37_79b9_7f4a_7c15));
    h.write_usize(tokens.len());
    for t in tokens {
        h.write_u32(*t);
    }
    if let Some(e) = extra {
        h.write_u8(1);
        h.write(e.as_bytes());
    }
    h.finish()
}

/// What one block pool reports for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolUsage {
    pub usable_blocks: usize,
    pub free_blocks: usize,
    pub cached_blocks: usize,
}

impl PoolUsage {
    /// vLLM's `kv_cache_usage_perc`: share of usable blocks that are not free.
    pub fn usage(&self) -> f64 {
        if self.usable_blocks == 0 {
            return 0.0;
        }
        1.0 - self.free_blocks as f64 / self.usable_blocks as f64
    }
}

pub struct BlockPool {
    blocks: Vec<Block>,
    block_size: usize,
    /// Free queue: head = next to be reused.
    head: BlockId,
    tail: BlockId,
    free_count: usize,
    cached: HashMap<u64, BlockId>,
    /// Events since the last `take_events`, in the order they happened.
    events: Vec<KvEvent>,
    /// Evictions since the last `take_events` (for stats).
    evictions: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let n = num_blocks.max(1);
        let mut pool = Self {
            blocks: vec![
                Block {
                    ref_cnt: 0,
                    hash: None,
                    prev: NIL,
                    next: NIL,
                    in_free_queue: false,
                };
                n
            ],
            block_size: block_size.max(1),
            head: NIL,
            tail: NIL,
            free_count: 0,
            cached: HashMap::new(),
            events: Vec::new(),
            evictions: 0,
        };
        // Block 0 is the null block: never free, never cached.
        pool.blocks[0].ref_cnt = 1;
        for id in 1..n as BlockId {
            pool.push_tail(id);
        }
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_free(&self) -> usize {
        self.free_count
    }

    pub fn usage(&self) -> PoolUsage {
        PoolUsage {
            usable_blocks: self.blocks.len() - 1,
            free_blocks: self.free_count,
            cached_blocks: self.cached.len(),
        }
    }

    /// Engine hashes of every block that a new request could hit right now.
    pub fn cached_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.cached.keys().copied()
    }

    pub fn is_cached(&self, hash: u64) -> bool {
        self.cached.contains_key(&hash)
    }

    pub fn take_events(&mut self) -> (Vec<KvEvent>, u64) {
        (
            std::mem::take(&mut self.events),
            std::mem::take(&mut self.evictions),
        )
    }

    fn push_tail(&mut self, id: BlockId) {
        let tail = self.tail;
        {
            let b = &mut self.blocks[id as usize];
            b.prev = tail;
            b.next = NIL;
            b.in_free_queue = true;
        }
        if tail == NIL {
            self.head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.tail = id;
        self.free_count += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            (b.prev, b.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = NIL;
        b.in_free_queue = false;
        self.free_count -= 1;
    }

    /// The longest run of cached blocks at the start of `hashes`: the blocks a
    /// request can reuse. Does not take references (see [`Self::touch`]).
    pub fn longest_hit(&self, hashes: &[u64]) -> Vec<BlockId> {
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// Takes a reference on hit blocks (pulling free ones out of the free queue).
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            if self.blocks[id as usize].in_free_queue {
                self.unlink(id);
            }
            self.blocks[id as usize].ref_cnt += 1;
        }
    }

    /// Takes `n` new blocks from the head of the free queue, evicting cached
    /// ones. `None` (and nothing taken) if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free_count {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.head;
            self.unlink(id);
            if let Some(hash) = self.blocks[id as usize].hash.take() {
                if self.cached.get(&hash) == Some(&id) {
                    self.cached.remove(&hash);
                    self.evictions += 1;
                    self.events.push(KvEvent::BlockRemoved(BlockRemoved {
                        block_hashes: vec![hash],
                        medium: Some(MEDIUM_GPU.to_string()),
                        group_idx: 0,
                    }));
                }
            }
            self.blocks[id as usize].ref_cnt = 1;
            out.push(id);
        }
        Some(out)
    }

    /// Drops a request's references, its last block first. As in vLLM, freed
    /// blocks that cache nothing go to the head of the free queue (reused
    /// first, LIFO) and cached ones to the tail (evicted last, LRU).
    pub fn free(&mut self, ids: &[BlockId]) {
        let mut uncached = Vec::new();
        for &id in ids.iter().rev() {
            let b = &mut self.blocks[id as usize];
            b.ref_cnt = b.ref_cnt.saturating_sub(1);
            if b.ref_cnt == 0 && !b.in_free_queue {
                if b.hash.is_some() {
                    self.push_tail(id);
                } else {
                    uncached.push(id);
                }
            }
        }
        // Prepended as a run: the first freed ends up at the head.
        for &id in uncached.iter().rev() {
            self.push_head(id);
        }
    }

    fn push_head(&mut self, id: BlockId) {
        let head = self.head;
        {
            let b = &mut self.blocks[id as usize];
            b.prev = NIL;
            b.next = head;
            b.in_free_queue = true;
        }
        if head == NIL {
            self.tail = id;
        } else {
            self.blocks[head as usize].prev = id;
        }
        self.head = id;
        self.free_count += 1;
    }

    /// Registers newly full blocks as cached and records one `BlockStored` for
    /// them. `blocks[i]` holds `tokens[i*bs..(i+1)*bs]` with hash `hashes[i]`;
    /// `parent` is the hash of the block before the first. A hash that another
    /// block already caches is not cached twice (the first copy stays the one
    /// hits go to).
    pub fn cache_full_blocks(
        &mut self,
        blocks: &[BlockId],
        hashes: &[u64],
        tokens: &[u32],
        parent: Option<u64>,
        first_block_extra: Option<&str>,
        first_is_block_zero: bool,
    ) {
        let bs = self.block_size;
        let mut stored = BlockStored {
            block_hashes: Vec::new(),
            parent_block_hash: None,
            token_ids: Vec::new(),
            block_size: bs as u32,
            lora_id: None,
            medium: Some(MEDIUM_GPU.to_string()),
            lora_name: None,
            extra_keys: Some(Vec::new()),
            group_idx: 0,
            kv_cache_spec_kind: Some("full_attention".to_string()),
        };
        let mut prev = parent;
        for (i, (&id, &hash)) in blocks.iter().zip(hashes).enumerate() {
            let duplicate = self.cached.contains_key(&hash);
            if !duplicate {
                self.blocks[id as usize].hash = Some(hash);
                self.cached.insert(hash, id);
                if stored.block_hashes.is_empty() {
                    stored.parent_block_hash = prev;
                }
                // A stored run must be contiguous: a duplicate in the middle
                // starts a new event so each event's parent is exact.
                stored.block_hashes.push(hash);
                stored
                    .token_ids
                    .extend_from_slice(&tokens[i * bs..(i + 1) * bs]);
                let extra = (i == 0 && first_is_block_zero)
                    .then_some(first_block_extra)
                    .flatten()
                    .map(|s| vec![ExtraKey::Str(s.to_string())]);
                if let Some(ek) = stored.extra_keys.as_mut() {
                    ek.push(extra);
                }
            } else if !stored.block_hashes.is_empty() {
                self.flush_stored(&mut stored);
            }
            prev = Some(hash);
        }
        if !stored.block_hashes.is_empty() {
            self.flush_stored(&mut stored);
        }
    }

    fn flush_stored(&mut self, stored: &mut BlockStored) {
        let next = BlockStored {
            block_hashes: Vec::new(),
            parent_block_hash: None,
            token_ids: Vec::new(),
            extra_keys: Some(Vec::new()),
            ..stored.clone()
        };
        let done = std::mem::replace(stored, next);
        // vLLM leaves extra_keys all-None when no block has any.
        self.events.push(KvEvent::BlockStored(done));
    }

    /// vLLM's `reset_prefix_cache`: only when no block is in use. Forgets every
    /// hash and records `AllBlocksCleared`.
    pub fn reset(&mut self) -> bool {
        if self.free_count != self.blocks.len() - 1 {
            return false;
        }
        self.force_reset();
        true
    }

    /// Forgets everything, references included (an engine restart).
    pub fn force_reset(&mut self) {
        let n = self.blocks.len();
        *self = Self {
            events: std::mem::take(&mut self.events),
            ..Self::new(n, self.block_size)
        };
        self.events.push(KvEvent::AllBlocksCleared);
    }

    /// Internal consistency (tests): free count, queue links, cached map.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut n = 0;
        let mut id = self.head;
        let mut prev = NIL;
        while id != NIL {
            let b = &self.blocks[id as usize];
            if !b.in_free_queue || b.ref_cnt != 0 || b.prev != prev {
                return Err(format!("free queue corrupt at block {id}"));
            }
            n += 1;
            prev = id;
            id = b.next;
        }
        if n != self.free_count || prev != self.tail {
            return Err(format!("free count {} but queue has {n}", self.free_count));
        }
        for (h, &id) in &self.cached {
            if self.blocks[id as usize].hash != Some(*h) {
                return Err(format!("cached hash {h:x} points to block {id} without it"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(tokens: &[u32], bs: usize) -> Vec<u64> {
        let mut parent = None;
        tokens
            .chunks_exact(bs)
            .map(|c| {
                let h = block_hash(parent, c, None);
                parent = Some(h);
                h
            })
            .collect()
    }

    #[test]
    fn freed_uncached_blocks_are_reused_before_any_cached_block_is_evicted() {
        let mut p = BlockPool::new(5, 2);
        let toks = [1, 2, 3, 4, 5];
        let hs = hashes(&toks, 2);
        // Two full (cached) blocks and one partial block.
        let ids = p.allocate(3).unwrap_or_default();
        p.cache_full_blocks(&ids[..2], &hs, &toks[..4], None, None, true);
        p.free(&ids);
        // The fresh block and the freed partial block go first: no eviction.
        let a = p.allocate(2).unwrap_or_default();
        assert!(a.contains(&ids[2]), "the partial block is reused first");
        assert_eq!(p.take_events().1, 0);
        assert_eq!(p.longest_hit(&hs).len(), 2);
        // Only then the cached blocks, the request's last block first.
        p.allocate(1).unwrap_or_default();
        assert_eq!(p.take_events().1, 1);
        assert_eq!(p.longest_hit(&hs).len(), 1);
    }

    #[test]
    fn null_block_is_reserved_and_lru_evicts_tail_blocks_first() {
        let mut p = BlockPool::new(5, 2);
        assert_eq!(p.num_free(), 4);
        let toks = [1, 2, 3, 4, 5, 6];
        let hs = hashes(&toks, 2);
        let ids = p.allocate(3).unwrap_or_default();
        assert_eq!(ids.len(), 3);
        p.cache_full_blocks(&ids, &hs, &toks, None, None, true);
        p.free(&ids);
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.longest_hit(&hs).len(), 3);
        // The untouched free block goes first, then the request's last block.
        let a = p.allocate(2).unwrap_or_default();
        assert_eq!(a.len(), 2);
        assert_eq!(p.longest_hit(&hs).len(), 2);
        let (events, evictions) = p.take_events();
        assert_eq!(evictions, 1);
        assert!(matches!(&events[1], KvEvent::BlockRemoved(r) if r.block_hashes == vec![hs[2]]));
        assert!(p.allocate(3).is_none(), "only 2 free");
        p.check_invariants().unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn reset_only_when_idle() {
        let mut p = BlockPool::new(4, 2);
        let ids = p.allocate(1).unwrap_or_default();
        assert!(!p.reset());
        p.free(&ids);
        assert!(p.reset());
        let (events, _) = p.take_events();
        assert_eq!(events, vec![KvEvent::AllBlocksCleared]);
    }
}
