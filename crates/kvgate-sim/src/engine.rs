//! The simulated engine: vLLM v1's scheduler loop over [`BlockPool`].
//!
//! [`EngineCore`] is synchronous and deterministic: `add_request`, then `step()`
//! until idle; each step returns the events vLLM would publish for it, the
//! tokens it produced and how long it took under the [`LatencyModel`]. Tests
//! drive it directly. [`EngineHandle`] runs a core on a tokio task, sleeps each
//! step's modelled duration (divided by the time scale), publishes the events
//! and streams tokens to the HTTP layer.
//!
//! Scheduling follows vLLM v1: running requests first (decode 1 token, or the
//! next prefill chunk), within a per-step token budget; then waiting requests
//! in arrival order while seats (`max_num_seqs`) and budget remain. A new
//! request's prefix hit is looked up when it is first scheduled; at most
//! `prompt_len - 1` tokens can hit (the last prompt token is always computed).
//! Blocks are registered as cached when they are allocated for computation, so
//! a request scheduled in the same step as another with the same prefix hits
//! it. When a running request cannot get a block, the most recently admitted
//! running request is preempted (its blocks freed, recomputed later).
//!
//! This module holds the scheduler ([`EngineCore`]); its configuration
//! ([`EngineConfig`], [`LatencyModel`]), the types it takes and returns, and
//! the task that runs it ([`EngineHandle`]) live in submodules and are
//! re-exported here.

mod config;
mod handle;
mod types;

use std::collections::VecDeque;

use kvgate_wire::vllm::KvEvent;

use crate::cache::{block_hash, BlockId, BlockPool};

pub use config::{EngineConfig, LatencyModel};
pub use handle::{EngineHandle, Faults};
pub use types::{
    EngineError, EngineStats, Histogram, RequestId, RequestOutput, SimRequest, StepOutput,
    TokenEvent, TTFT_BUCKETS,
};

struct Request {
    id: RequestId,
    prompt_len: usize,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    max_tokens: usize,
    salt: Option<String>,
    /// Hashes of every full block of `tokens`.
    hashes: Vec<u64>,
    blocks: Vec<BlockId>,
    /// Leading blocks already registered as cached (hit or stored by us).
    cached_blocks: usize,
    computed: usize,
    /// Prefix-cache hit at first schedule (tokens).
    hit_tokens: usize,
    generated: usize,
    arrival: f64,
    first_token_at: Option<f64>,
    rng: u64,
}

impl Request {
    fn extend_hashes(&mut self, bs: usize) {
        while (self.hashes.len() + 1) * bs <= self.tokens.len() {
            let i = self.hashes.len();
            let parent = self.hashes.last().copied();
            let extra = if i == 0 { self.salt.as_deref() } else { None };
            self.hashes.push(block_hash(
                parent,
                &self.tokens[i * bs..(i + 1) * bs],
                extra,
            ));
        }
    }

    fn next_token(&mut self, vocab: u32) -> u32 {
        // splitmix64: cheap, deterministic per request.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % u64::from(vocab.max(1))) as u32
    }
}

pub struct EngineCore {
    cfg: EngineConfig,
    pool: BlockPool,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
    next_id: RequestId,
    /// Simulated seconds since the core started.
    now: f64,
    stats: EngineStats,
}

impl EngineCore {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            pool: BlockPool::new(cfg.num_blocks, cfg.block_size),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            now: 0.0,
            stats: EngineStats::default(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn now(&self) -> f64 {
        self.now
    }

    /// Lets simulated time pass while idle.
    pub fn advance_to(&mut self, t: f64) {
        if t > self.now {
            self.now = t;
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.running = self.running.len();
        s.waiting = self.waiting.len();
        s.kv_usage = self.pool.usage().usage();
        s
    }

    /// Queues a request. Errors if its prompt could never fit in the cache.
    pub fn add_request(&mut self, req: SimRequest, seed: u64) -> Result<RequestId, EngineError> {
        let bs = self.cfg.block_size.max(1);
        let usable = self.cfg.num_blocks.saturating_sub(1);
        // The whole sequence must fit, or it would preempt itself forever.
        let blocks = (req.prompt_tokens.len() + req.max_tokens.max(1) as usize).div_ceil(bs);
        if blocks > usable {
            return Err(EngineError::TooLong {
                tokens: req.prompt_tokens.len(),
                blocks,
                usable,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut r = Request {
            id,
            prompt_len: req.prompt_tokens.len(),
            tokens: req.prompt_tokens,
            max_tokens: req.max_tokens.max(1) as usize,
            salt: req.cache_salt,
            hashes: Vec::new(),
            blocks: Vec::new(),
            cached_blocks: 0,
            computed: 0,
            hit_tokens: 0,
            generated: 0,
            arrival: self.now,
            first_token_at: None,
            rng: seed ^ id.wrapping_mul(0xd6e8_feb8_6659_fd93),
        };
        r.extend_hashes(bs);
        self.waiting.push_back(r);
        Ok(id)
    }

    /// Drops a request (client went away); frees its blocks.
    pub fn abort(&mut self, id: RequestId) {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let r = self.running.remove(i);
            self.pool.free(&r.blocks);
        } else if let Some(i) = self.waiting.iter().position(|r| r.id == id) {
            if let Some(r) = self.waiting.remove(i) {
                self.pool.free(&r.blocks);
            }
        }
    }

    /// vLLM's `/reset_prefix_cache`: refused while requests hold blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset()
    }

    /// A restart: every request is dropped and the cache is emptied.
    /// Returns the ids of the dropped requests.
    pub fn restart(&mut self) -> Vec<RequestId> {
        let ids = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .map(|r| r.id)
            .collect();
        self.pool.force_reset();
        ids
    }

    /// Allocates blocks so `r` can compute `num_new` more tokens, and
    /// registers the blocks that become full as cached.
    fn allocate(pool: &mut BlockPool, bs: usize, r: &mut Request, num_new: usize) -> bool {
        let need = (r.computed + num_new)
            .div_ceil(bs)
            .saturating_sub(r.blocks.len());
        if need > 0 {
            match pool.allocate(need) {
                Some(ids) => r.blocks.extend(ids),
                None => return false,
            }
        }
        let full = ((r.computed + num_new).min(r.tokens.len()) / bs).min(r.hashes.len());
        if full > r.cached_blocks {
            let mut from = r.cached_blocks;
            // A block this request computed alongside an identical one that was
            // cached first is not registered; if that other copy has since been
            // evicted, the chain would break here. Re-register our own copies
            // so every cached block's parent is cached too.
            if from > 0 && !pool.is_cached(r.hashes[from - 1]) {
                from = r.hashes[..from]
                    .iter()
                    .position(|h| !pool.is_cached(*h))
                    .unwrap_or(from);
            }
            pool.cache_full_blocks(
                &r.blocks[from..full],
                &r.hashes[from..full],
                &r.tokens[from * bs..full * bs],
                from.checked_sub(1).map(|p| r.hashes[p]),
                r.salt.as_deref(),
                from == 0,
            );
            r.cached_blocks = full;
        }
        true
    }

    fn preempt(&mut self, r: Request) {
        let mut r = r;
        self.pool.free(&r.blocks);
        r.blocks.clear();
        r.cached_blocks = 0;
        r.computed = 0;
        self.stats.preemptions += 1;
        self.waiting.push_front(r);
    }

    /// One engine step. Returns `None` when there is nothing to do.
    pub fn step(&mut self) -> Option<StepOutput> {
        if self.is_idle() {
            return None;
        }
        let bs = self.cfg.block_size.max(1);
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        // (index into running, tokens to compute)
        let mut scheduled: Vec<(RequestId, usize)> = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let want = self.running[i].tokens.len() - self.running[i].computed;
            let num_new = want.min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            loop {
                if Self::allocate(&mut self.pool, bs, &mut self.running[i], num_new) {
                    scheduled.push((self.running[i].id, num_new));
                    budget -= num_new;
                    i += 1;
                    break;
                }
                // Out of blocks: preempt the most recently admitted request.
                preempted = true;
                let Some(victim) = self.running.pop() else {
                    break;
                };
                let victim_was_self = self.running.len() == i;
                scheduled.retain(|(id, _)| *id != victim.id);
                self.preempt(victim);
                if victim_was_self {
                    break;
                }
            }
        }
        // Admit waiting requests, unless this step had to preempt.
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(mut r) = self.waiting.pop_front() else {
                break;
            };
            let fresh = r.computed == 0 && r.blocks.is_empty();
            let mut hit: Vec<BlockId> = Vec::new();
            if fresh {
                let max_hit_blocks = (r.tokens.len() - 1) / bs;
                hit = self
                    .pool
                    .longest_hit(&r.hashes[..max_hit_blocks.min(r.hashes.len())]);
                self.pool.touch(&hit);
                r.blocks = hit.clone();
                r.cached_blocks = hit.len();
                r.computed = hit.len() * bs;
            }
            let num_new = (r.tokens.len() - r.computed).min(budget);
            if !Self::allocate(&mut self.pool, bs, &mut r, num_new) {
                // Not enough free blocks: undo the hit and wait.
                self.pool.free(&r.blocks);
                r.blocks.clear();
                r.cached_blocks = 0;
                r.computed = 0;
                self.waiting.push_front(r);
                break;
            }
            if fresh {
                let hit_tokens = hit.len() * bs;
                // vLLM counts queries and hits each time a request is scheduled
                // from the waiting queue (a preempted one counts again).
                self.stats.prefix_cache_queries += r.tokens.len() as u64;
                self.stats.prefix_cache_hits += hit_tokens as u64;
                if r.first_token_at.is_none() {
                    r.hit_tokens = hit_tokens;
                }
            }
            budget -= num_new;
            scheduled.push((r.id, num_new));
            self.running.push(r);
        }
        if scheduled.is_empty() {
            // Nothing fits (cannot happen for valid requests, but never spin).
            let (kv_events, evictions) = self.pool.take_events();
            self.account_events(&kv_events, evictions);
            return Some(StepOutput {
                duration_secs: self.cfg.latency.step_secs(0, 0),
                kv_events,
                ..Default::default()
            });
        }

        let mut prefill_tokens = 0;
        let mut decode_seqs = 0;
        for (id, n) in &scheduled {
            if let Some(r) = self.running.iter().find(|r| r.id == *id) {
                if r.computed < r.prompt_len {
                    prefill_tokens += n;
                } else {
                    decode_seqs += 1;
                }
            }
        }
        let duration = self.cfg.latency.step_secs(prefill_tokens, decode_seqs);
        self.now += duration;
        let now = self.now;

        let mut outputs = Vec::with_capacity(scheduled.len());
        let vocab = self.cfg.output_vocab;
        for (id, n) in scheduled {
            let Some(r) = self.running.iter_mut().find(|r| r.id == id) else {
                continue;
            };
            r.computed += n;
            if r.computed < r.tokens.len() {
                continue; // a prefill chunk; no token yet
            }
            let mut events = Vec::with_capacity(2);
            if r.first_token_at.is_none() {
                r.first_token_at = Some(now);
                events.push(TokenEvent::FirstToken {
                    cached_tokens: r.hit_tokens,
                    ttft_secs: now - r.arrival,
                });
                self.stats.ttft.observe(now - r.arrival);
                self.stats.prompt_tokens += r.prompt_len as u64;
                self.stats.prompt_tokens_cached += r.hit_tokens as u64;
            }
            let t = r.next_token(vocab);
            r.tokens.push(t);
            r.generated += 1;
            r.extend_hashes(bs);
            self.stats.generation_tokens += 1;
            events.push(TokenEvent::Token(t));
            let finished = r.generated >= r.max_tokens;
            if finished {
                events.push(TokenEvent::Done {
                    completion_tokens: r.generated,
                    cached_tokens: r.hit_tokens,
                    e2e_secs: now - r.arrival,
                });
                self.stats.e2e.observe(now - r.arrival);
                self.stats.requests_finished += 1;
            }
            outputs.push(RequestOutput {
                id,
                events,
                finished,
            });
        }
        for o in outputs.iter().filter(|o| o.finished) {
            if let Some(i) = self.running.iter().position(|r| r.id == o.id) {
                let r = self.running.remove(i);
                self.pool.free(&r.blocks);
            }
        }
        let (kv_events, evictions) = self.pool.take_events();
        self.account_events(&kv_events, evictions);
        Some(StepOutput {
            duration_secs: duration,
            prefill_tokens,
            decode_seqs,
            kv_events,
            outputs,
        })
    }

    /// Takes events recorded outside a step (a reset, a restart).
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        let (events, evictions) = self.pool.take_events();
        self.account_events(&events, evictions);
        events
    }

    fn account_events(&mut self, events: &[KvEvent], evictions: u64) {
        for e in events {
            if let KvEvent::BlockStored(s) = e {
                self.stats.blocks_stored += s.block_hashes.len() as u64;
            }
        }
        self.stats.blocks_removed += evictions;
    }

    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let held: usize = self.running.iter().map(|r| r.blocks.len()).sum();
        let usable = self.cfg.num_blocks.saturating_sub(1);
        if self.pool.num_free() > usable {
            return Err("more free blocks than usable".into());
        }
        // Shared hit blocks are counted once per holder, so only a lower bound.
        if held < usable - self.pool.num_free() && self.waiting.iter().all(|r| r.blocks.is_empty())
        {
            return Err(format!(
                "{} blocks in use but requests hold {held}",
                usable - self.pool.num_free()
            ));
        }
        Ok(())
    }
}
