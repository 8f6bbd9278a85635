//! The read side of the index core: prefix lookups, holders and dumps,
//! sizes, and the internal invariant check.

use kvgate_keys::BlockKey;
use kvgate_wire::vllm::EngineHash;
use smallvec::SmallVec;

use super::{Holder, Holders, QueueEntry, State};
use crate::tier::{Tier, MAX_TIERS};
use crate::{EndpointId, EndpointMatch};

impl State {
    /// Per endpoint, the number of consecutive blocks of `keys` held from the
    /// start (in any tier), and how many of those are in each tier.
    pub fn lookup(&self, keys: &[BlockKey]) -> Vec<EndpointMatch> {
        let Some(first) = keys.first().and_then(|k| self.blocks.get(k)) else {
            return Vec::new();
        };
        let words = self.endpoints.len().div_ceil(64);
        let mut alive: SmallVec<[u64; 4]> = smallvec::smallvec![0; words];
        let mut matches: Vec<EndpointMatch> = Vec::with_capacity(first.len());
        // slot -> position in `matches`, so per-holder work stays O(1).
        let mut pos: SmallVec<[u16; 64]> = smallvec::smallvec![u16::MAX; self.endpoints.len()];
        for h in first {
            let slot = h.endpoint as usize;
            if pos[slot] == u16::MAX {
                pos[slot] = matches.len() as u16;
                matches.push(EndpointMatch {
                    endpoint: h.endpoint,
                    matched_blocks: 0,
                    tier_blocks: [0; MAX_TIERS],
                });
                alive[slot / 64] |= 1 << (slot % 64);
            }
            matches[pos[slot] as usize].tier_blocks[h.tier.0 as usize] += 1;
        }
        let mut n_alive = matches.len();
        let mut next: SmallVec<[u64; 4]> = smallvec::smallvec![0; words];
        let mut depth = 1u32;
        // Keys are probed in groups: the probes are independent, so issuing a
        // group's table reads together lets their cache misses overlap (the
        // table is far larger than the CPU caches). The price is up to
        // LOOKAHEAD-1 wasted probes past the end of the match.
        const LOOKAHEAD: usize = 8;
        'groups: for group in keys[1..].chunks(LOOKAHEAD) {
            let mut found: [Option<&Holders>; LOOKAHEAD] = [None; LOOKAHEAD];
            for (slot, key) in found.iter_mut().zip(group) {
                *slot = self.blocks.get(key);
            }
            for holders in found.iter().take(group.len()) {
                let Some(holders) = holders else {
                    break 'groups;
                };
                next.iter_mut().for_each(|w| *w = 0);
                for h in holders.iter() {
                    let slot = h.endpoint as usize;
                    if alive[slot / 64] & (1 << (slot % 64)) != 0 {
                        next[slot / 64] |= 1 << (slot % 64);
                        matches[pos[slot] as usize].tier_blocks[h.tier.0 as usize] += 1;
                    }
                }
                for (w, (a, n)) in alive.iter_mut().zip(next.iter()).enumerate() {
                    let mut dropped = *a & !*n;
                    while dropped != 0 {
                        let bit = dropped.trailing_zeros() as usize;
                        dropped &= dropped - 1;
                        matches[pos[w * 64 + bit] as usize].matched_blocks = depth;
                        n_alive -= 1;
                    }
                    *a = *n;
                }
                if n_alive == 0 {
                    break 'groups;
                }
                depth += 1;
            }
        }
        for (w, a) in alive.iter().enumerate() {
            let mut rest = *a;
            while rest != 0 {
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                matches[pos[w * 64 + bit] as usize].matched_blocks = depth;
            }
        }
        matches
    }

    /// Who holds one block: (endpoint, tier) per copy, in no particular order.
    pub fn holders_of(&self, key: &BlockKey) -> Vec<(EndpointId, Tier)> {
        self.blocks
            .get(key)
            .map(|hs| hs.iter().map(|h| (h.endpoint, h.tier)).collect())
            .unwrap_or_default()
    }

    /// Every (key, engine hash, tier) an endpoint holds, for dumps.
    pub fn endpoint_entries(&self, id: EndpointId) -> Vec<(BlockKey, EngineHash, Tier)> {
        let Some(ep) = self.endpoint(id) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(ep.holders);
        for key in ep.engine_to_key.values() {
            if let Some(hs) = self.blocks.get(key) {
                out.extend(
                    hs.iter()
                        .filter(|h| h.endpoint == id)
                        .map(|h| (*key, h.engine_hash, h.tier)),
                );
            }
        }
        out
    }

    pub fn distinct_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Approximate heap bytes held, for the memory-per-entry report.
    pub fn approx_heap_bytes(&self) -> usize {
        let block_entry = std::mem::size_of::<(BlockKey, Holders)>() + 1;
        let spilled: usize = self
            .blocks
            .values()
            .filter(|h| h.spilled())
            .map(|h| h.capacity() * std::mem::size_of::<Holder>())
            .sum();
        let engine_entry = std::mem::size_of::<(EngineHash, BlockKey)>() + 1;
        let engine_cap: usize = self
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.engine_to_key.capacity())
            .sum();
        self.blocks.capacity() * block_entry
            + spilled
            + engine_cap * engine_entry
            + self.queue.capacity() * std::mem::size_of::<QueueEntry>()
    }

    /// Internal consistency: every holder's engine hash maps back to its key,
    /// and the counters equal what is stored.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut total = 0;
        for (key, hs) in &self.blocks {
            if hs.is_empty() {
                return Err(format!("block {key:x} has no holders"));
            }
            for h in hs {
                let ep = self.endpoint(h.endpoint).ok_or_else(|| {
                    format!("block {key:x} held by unknown endpoint {}", h.endpoint)
                })?;
                if ep.engine_to_key.get(&h.engine_hash) != Some(key) {
                    return Err(format!(
                        "engine hash {:x} does not map back to {key:x}",
                        h.engine_hash
                    ));
                }
            }
            total += hs.len();
        }
        if total != self.holders_total {
            return Err(format!(
                "{total} holders stored, counter says {}",
                self.holders_total
            ));
        }
        let per_ep: usize = self.endpoints.iter().flatten().map(|e| e.holders).sum();
        if per_ep != total {
            return Err(format!("{total} holders stored, endpoints count {per_ep}"));
        }
        Ok(())
    }
}
