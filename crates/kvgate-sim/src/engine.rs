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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvgate_wire::vllm::{EventBatch, KvEvent};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::cache::{block_hash, BlockId, BlockPool};
use crate::publisher::EventPublisher;

/// How long each step takes, in simulated time.
///
/// Defaults are calibrated on an 8B-class model on one H100 (see
/// `../shared/workloads.md`): ~35 us per uncached prompt token, plus a fixed
/// cost for every forward pass that carries prefill work. A ~10k-token prompt
/// then takes ~0.46 s cold (two chunks of the default 8192-token budget) and
/// ~0.056 s when all but its last block is cached: ~8x, the shape of llm-d's
/// single-pod anchor (~7x).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatencyModel {
    /// Every step (scheduling, sampling, kernel launches).
    pub step_overhead_ms: f64,
    /// Added to a step that computes any prefill tokens.
    pub prefill_overhead_ms: f64,
    /// Per prompt token computed (not cached).
    pub prefill_us_per_token: f64,
    /// Per sequence decoding in the step.
    pub decode_us_per_seq: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            step_overhead_ms: 5.0,
            prefill_overhead_ms: 50.0,
            prefill_us_per_token: 35.0,
            decode_us_per_seq: 60.0,
        }
    }
}

impl LatencyModel {
    /// Seconds for a step with `prefill_tokens` computed prompt tokens and
    /// `decode_seqs` sequences decoding.
    pub fn step_secs(&self, prefill_tokens: usize, decode_seqs: usize) -> f64 {
        let mut ms = self.step_overhead_ms;
        if prefill_tokens > 0 {
            ms +=
                self.prefill_overhead_ms + prefill_tokens as f64 * self.prefill_us_per_token / 1e3;
        }
        ms += decode_seqs as f64 * self.decode_us_per_seq / 1e3;
        ms / 1e3
    }
}

/// The engine's shape, as vLLM's flags set it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// `--block-size`.
    pub block_size: usize,
    /// `--num-gpu-blocks-override` (block 0 is reserved, as in vLLM).
    pub num_blocks: usize,
    /// `--max-num-seqs`.
    pub max_num_seqs: usize,
    /// `--max-num-batched-tokens`: the per-step token budget.
    pub max_num_batched_tokens: usize,
    /// Token ids sampled for output are drawn below this (the tokenizer's
    /// regular vocabulary).
    pub output_vocab: u32,
    pub latency: LatencyModel,
    /// Simulated seconds per wall-clock second (1 = real time).
    pub time_scale: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 4096,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            output_vocab: 32_000,
            latency: LatencyModel::default(),
            time_scale: 1.0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SimRequest {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: u32,
    pub cache_salt: Option<String>,
    pub lora_name: Option<String>,
}

/// What the HTTP layer hears about one request.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// Prefill done; `ttft_secs` is simulated time since arrival.
    FirstToken {
        cached_tokens: usize,
        ttft_secs: f64,
    },
    Token(u32),
    Done {
        completion_tokens: usize,
        cached_tokens: usize,
        e2e_secs: f64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is not running")]
    Stopped,
    #[error("the engine refuses requests (fault injection)")]
    Refusing,
    #[error("prompt of {tokens} tokens needs {blocks} KV blocks; the engine has {usable}")]
    TooLong {
        tokens: usize,
        blocks: usize,
        usable: usize,
    },
}

pub type RequestId = u64;

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

/// Tokens produced by one step, for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub id: RequestId,
    pub events: Vec<TokenEvent>,
    pub finished: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// Simulated duration of the step.
    pub duration_secs: f64,
    pub prefill_tokens: usize,
    pub decode_seqs: usize,
    pub kv_events: Vec<KvEvent>,
    pub outputs: Vec<RequestOutput>,
}

/// Counters with vLLM's metric meanings.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    /// Prompt tokens of requests looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached.
    pub prefix_cache_hits: u64,
    /// Prompt tokens computed (vLLM counts all prompt tokens of a request).
    pub prompt_tokens: u64,
    pub prompt_tokens_cached: u64,
    pub generation_tokens: u64,
    pub requests_finished: u64,
    pub preemptions: u64,
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    pub ttft: Histogram,
    pub e2e: Histogram,
}

/// A Prometheus histogram with vLLM's TTFT buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

/// vLLM's `time_to_first_token_seconds` buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self {
            bounds: TTFT_BUCKETS,
            counts: vec![0; TTFT_BUCKETS.len()],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
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

/// Faults a test can inject into a running engine.
#[derive(Debug, Default)]
pub struct Faults {
    /// Refuse new requests (503) as an overloaded or dying engine would.
    pub refuse: std::sync::atomic::AtomicBool,
    /// Multiplies every step's duration (1000 = 1.0x).
    pub slowdown_permille: std::sync::atomic::AtomicU64,
}

enum Command {
    Submit {
        req: SimRequest,
        tx: mpsc::UnboundedSender<TokenEvent>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    ResetPrefixCache(oneshot::Sender<bool>),
    Restart(oneshot::Sender<()>),
    CachedHashes(oneshot::Sender<Vec<u64>>),
}

/// A running engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    pub faults: Arc<Faults>,
    pub publisher: Option<Arc<EventPublisher>>,
    config: Arc<EngineConfig>,
    /// Wall-clock start (Unix seconds, f64 bits); a restart moves it, as a
    /// restarted vLLM process reports a new `process_start_time_seconds`.
    started_at: Arc<std::sync::atomic::AtomicU64>,
}

impl EngineHandle {
    /// Starts an engine on the current tokio runtime. Events go to `publisher`.
    pub fn spawn(cfg: EngineConfig, publisher: Option<Arc<EventPublisher>>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let faults = Arc::new(Faults::default());
        faults
            .slowdown_permille
            .store(1000, std::sync::atomic::Ordering::Relaxed);
        let handle = Self {
            tx,
            stats: stats.clone(),
            faults: faults.clone(),
            publisher: publisher.clone(),
            config: Arc::new(cfg.clone()),
            started_at: Arc::new(std::sync::atomic::AtomicU64::new(wall_ts().to_bits())),
        };
        tokio::spawn(drive(EngineCore::new(cfg), rx, stats, faults, publisher));
        handle
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues a request; tokens arrive on the returned channel. Dropping the
    /// receiver aborts the request.
    pub async fn submit(
        &self,
        req: SimRequest,
    ) -> Result<mpsc::UnboundedReceiver<TokenEvent>, EngineError> {
        if self
            .faults
            .refuse
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(EngineError::Refusing);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Command::Submit { req, tx, reply })
            .map_err(|_| EngineError::Stopped)?;
        done.await.map_err(|_| EngineError::Stopped)??;
        Ok(rx)
    }

    pub async fn reset_prefix_cache(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::ResetPrefixCache(tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Fault: a restart. In-flight requests end without completing, the cache
    /// is emptied (`AllBlocksCleared`).
    pub async fn restart(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Restart(tx)).is_ok() {
            let _ = rx.await;
        }
        // Strictly later than the previous start, even within one clock tick.
        let previous = self.start_time_seconds();
        let now = wall_ts().max(previous + 1e-3);
        self.started_at
            .store(now.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    /// When this engine (last) started, Unix seconds.
    pub fn start_time_seconds(&self) -> f64 {
        f64::from_bits(self.started_at.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The engine hashes a new request could hit right now.
    pub async fn cached_hashes(&self) -> Vec<u64> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::CachedHashes(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub fn metrics_snapshot(&self) -> EngineStats {
        self.stats.lock().clone()
    }
}

fn wall_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn publish(publisher: &Option<Arc<EventPublisher>>, events: Vec<KvEvent>) {
    if events.is_empty() {
        return;
    }
    if let Some(p) = publisher {
        let batch = EventBatch {
            ts: wall_ts(),
            events,
            data_parallel_rank: None,
        };
        if let Err(e) = p.publish(&batch).await {
            tracing::warn!(error = %e, "publishing KV events failed");
        }
    }
}

async fn drive(
    mut core: EngineCore,
    mut rx: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    faults: Arc<Faults>,
    publisher: Option<Arc<EventPublisher>>,
) {
    let scale = if core.config().time_scale > 0.0 {
        core.config().time_scale
    } else {
        1.0
    };
    let started = Instant::now();
    let mut seed: u64 = 0x5eed;
    let mut streams: std::collections::HashMap<RequestId, mpsc::UnboundedSender<TokenEvent>> =
        std::collections::HashMap::new();
    // Wall-clock instant at which the current step ends. Steps are scheduled
    // back to back against this deadline so timer granularity never adds up.
    let mut deadline = Instant::now();
    loop {
        // Wait for work when idle, otherwise take whatever has arrived.
        if core.is_idle() {
            let Some(cmd) = rx.recv().await else {
                return;
            };
            let now = Instant::now();
            core.advance_to((now - started).as_secs_f64() * scale);
            deadline = now;
            handle_command(&mut core, cmd, &mut streams, &mut seed, &publisher).await;
        }
        while let Ok(cmd) = rx.try_recv() {
            handle_command(&mut core, cmd, &mut streams, &mut seed, &publisher).await;
        }
        let Some(out) = core.step() else {
            *stats.lock() = core.stats();
            continue;
        };
        let slow = faults
            .slowdown_permille
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1000.0;
        deadline += Duration::from_secs_f64(out.duration_secs * slow.max(0.0) / scale);
        // Past deadlines (catching up, or the first step after idling) must not
        // wait for the timer's next 1 ms tick.
        if deadline > Instant::now() {
            tokio::time::sleep_until(deadline.into()).await;
        } else {
            tokio::task::yield_now().await;
        }
        publish(&publisher, out.kv_events).await;
        // Counters first, so a client that has its response sees them.
        *stats.lock() = core.stats();
        let mut aborted = false;
        for o in out.outputs {
            let mut gone = false;
            if let Some(tx) = streams.get(&o.id) {
                for e in o.events {
                    if tx.send(e).is_err() {
                        gone = true;
                        break;
                    }
                }
            }
            if o.finished || gone {
                streams.remove(&o.id);
                if gone && !o.finished {
                    core.abort(o.id);
                    aborted = true;
                }
            }
        }
        if aborted {
            *stats.lock() = core.stats();
        }
    }
}

async fn handle_command(
    core: &mut EngineCore,
    cmd: Command,
    streams: &mut std::collections::HashMap<RequestId, mpsc::UnboundedSender<TokenEvent>>,
    seed: &mut u64,
    publisher: &Option<Arc<EventPublisher>>,
) {
    match cmd {
        Command::Submit { req, tx, reply } => {
            *seed = seed.wrapping_add(1);
            match core.add_request(req, *seed) {
                Ok(id) => {
                    streams.insert(id, tx);
                    let _ = reply.send(Ok(()));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        Command::ResetPrefixCache(reply) => {
            let ok = core.reset_prefix_cache();
            // vLLM flushes AllBlocksCleared with the next step's events; an idle
            // engine has no next step, so publish now.
            publish(publisher, core.take_events()).await;
            let _ = reply.send(ok);
        }
        Command::Restart(reply) => {
            for id in core.restart() {
                streams.remove(&id);
            }
            publish(publisher, core.take_events()).await;
            let _ = reply.send(());
        }
        Command::CachedHashes(reply) => {
            let _ = reply.send(core.pool().cached_hashes().collect());
        }
    }
}
