//! kvgate's global KV block index.
//!
//! Fed by the engines' KV events, it knows which endpoint holds which prefix in
//! which tier, and answers "for these block keys, how many leading blocks does
//! each endpoint hold?".
//!
//! Concurrency: one `RwLock` around a single-writer core. Writers take it for one
//! event at a time (a bounded critical section: one event's blocks), so a lookup
//! never waits longer than one event's application; lookups share the read side
//! and never wait on each other.
//!
//! Memory bound: at most `max_tracked_blocks` (block, endpoint, tier) entries.
//! Past it, the entry stored longest ago is evicted first (re-storing a block
//! refreshes it). An optional TTL drops entries stored longer ago than it.

mod state;
pub mod tier;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvgate_keys::{BlockHasher, BlockKey, KeyError, RequestContext};
use kvgate_wire::vllm::{EngineHash, EventBatch};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

pub use tier::{Tier, TierNames, MAX_TIERS};

/// Dense endpoint id; ids of removed endpoints are reused.
pub type EndpointId = u16;

/// Default bound: ~1M (block, endpoint) entries, ~100 MB (see the crate README).
pub const DEFAULT_MAX_TRACKED_BLOCKS: usize = 1 << 20;
/// How long entries of an endpoint that lost events stay usable unverified.
pub const DEFAULT_STALE_GRACE_SECS: u32 = 60;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    /// Hard bound on tracked (block, endpoint, tier) entries.
    pub max_tracked_blocks: usize,
    /// Entries stored longer ago than this are dropped (None: never).
    pub ttl_secs: Option<u32>,
    /// After an unrecoverable event gap, how long pre-gap entries are kept.
    pub stale_grace_secs: u32,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            max_tracked_blocks: DEFAULT_MAX_TRACKED_BLOCKS,
            ttl_secs: None,
            stale_grace_secs: DEFAULT_STALE_GRACE_SECS,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Clone)]
pub enum IndexError {
    #[error("unknown endpoint id {0}")]
    UnknownEndpoint(EndpointId),
    #[error("endpoint {0:?} already exists with another model or block size")]
    EndpointConflict(String),
    #[error("too many endpoints")]
    TooManyEndpoints,
    #[error("invalid block size {0}")]
    InvalidBlockSize(u32),
    #[error("event block size {event} differs from the endpoint's {endpoint}")]
    BlockSizeMismatch { endpoint: u32, event: u32 },
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// What applying a batch did; the caller turns it into metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub stored_events: usize,
    pub removed_events: usize,
    pub cleared: usize,
    pub stored_blocks: usize,
    pub removed_blocks: usize,
    pub evicted_blocks: usize,
    pub orphan_blocks: usize,
    pub unknown_removals: usize,
    pub ignored_events: usize,
    /// Events rejected as inconsistent (bad sizes); the rest of the batch applies.
    pub rejected_events: usize,
}

/// One endpoint's match for a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMatch {
    pub endpoint: EndpointId,
    /// Consecutive blocks held from the first, in any tier.
    pub matched_blocks: u32,
    /// Of those, how many are held in each tier (a block in two tiers counts in both).
    pub tier_blocks: [u32; MAX_TIERS],
}

/// Relative worth of a cached block by tier (GPU, CPU, DISK, then others): a
/// block in a slower tier saves less prefill time.
pub const DEFAULT_TIER_WEIGHTS: [f64; MAX_TIERS] = [1.0, 0.8, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3];

impl EndpointMatch {
    /// Matched blocks credited fastest tier first (a block held in two tiers is
    /// served from the faster), each at its tier's weight.
    pub fn weighted_blocks(&self, tier_weights: &[f64; MAX_TIERS]) -> f64 {
        weighted_blocks(self.matched_blocks, &self.tier_blocks, tier_weights)
    }
}

/// See [`EndpointMatch::weighted_blocks`]; tiers are in speed order (GPU first).
pub fn weighted_blocks(
    matched: u32,
    tier_blocks: &[u32; MAX_TIERS],
    tier_weights: &[f64; MAX_TIERS],
) -> f64 {
    let mut left = matched;
    let mut credit = 0.0;
    for (n, w) in tier_blocks.iter().zip(tier_weights) {
        let take = left.min(*n);
        credit += f64::from(take) * w;
        left -= take;
        if left == 0 {
            break;
        }
    }
    credit
}

/// A snapshot of counters for gauges.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IndexStats {
    pub tracked_entries: usize,
    pub distinct_blocks: usize,
    pub endpoints: usize,
    pub approx_heap_bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointInfo {
    pub id: EndpointId,
    pub name: String,
    pub model: String,
    pub block_size: u32,
    pub tracked_entries: usize,
    pub last_seq: Option<i64>,
    pub stale: bool,
}

/// A portable copy of the index (debugging, bootstrapping a replica).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexDump {
    /// Which secret the keys were made with; a replica with another secret
    /// cannot use them.
    pub key_fingerprint: String,
    pub endpoints: Vec<DumpEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DumpEndpoint {
    pub name: String,
    pub model: String,
    pub block_size: u32,
    pub last_seq: Option<i64>,
    /// (block key, engine hash, tier name)
    pub entries: Vec<(BlockKey, EngineHash, String)>,
}

/// One cached copy of a block: which endpoint, which tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHolder {
    pub endpoint: String,
    pub tier: String,
}

/// Where an index reads the time of its TTLs and stale grace: the wall clock
/// (seconds since the index started), or seconds set by hand, for models that
/// run in simulated time. Clones share a hand-set clock.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<Arc<AtomicU32>>);

impl Clock {
    pub fn wall() -> Self {
        Self(None)
    }

    /// Starts at 0; only [`Clock::set_secs`] moves it.
    pub fn manual() -> Self {
        Self(Some(Arc::new(AtomicU32::new(0))))
    }

    /// Sets a manual clock (a wall clock ignores it).
    pub fn set_secs(&self, secs: u32) {
        if let Some(c) = &self.0 {
            c.store(secs, Ordering::Relaxed);
        }
    }
}

pub struct KvIndex {
    state: RwLock<state::State>,
    hasher: BlockHasher,
    started: Instant,
    clock: Clock,
}

impl KvIndex {
    pub fn new(cfg: IndexConfig, hasher: BlockHasher) -> Self {
        Self::with_clock(cfg, hasher, Clock::wall())
    }

    pub fn with_clock(cfg: IndexConfig, hasher: BlockHasher, clock: Clock) -> Self {
        Self {
            state: RwLock::new(state::State::new(cfg, hasher.clone())),
            hasher,
            started: Instant::now(),
            clock,
        }
    }

    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }

    /// Seconds since the index started: the clock of TTLs and stale grace.
    pub fn now_secs(&self) -> u32 {
        match &self.clock.0 {
            Some(c) => c.load(Ordering::Relaxed),
            None => u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX),
        }
    }

    /// Registers an endpoint (idempotent for the same model and block size).
    pub fn add_endpoint(
        &self,
        name: &str,
        model: &str,
        block_size: u32,
    ) -> Result<EndpointId, IndexError> {
        self.state.write().add_endpoint(name, model, block_size)
    }

    /// Removes an endpoint and purges its entries; returns entries purged.
    pub fn remove_endpoint(&self, name: &str) -> Option<usize> {
        let mut st = self.state.write();
        let id = st.find_endpoint(name)?;
        Some(st.purge_endpoint(id, true))
    }

    /// Drops an endpoint's entries but keeps it registered (engine restart).
    pub fn clear_endpoint(&self, id: EndpointId) -> usize {
        self.state.write().purge_endpoint(id, false)
    }

    /// Entries an endpoint holds (all tiers).
    pub fn tracked_entries(&self, id: EndpointId) -> usize {
        self.state.read().endpoint(id).map_or(0, |e| e.holders)
    }

    pub fn endpoint_id(&self, name: &str) -> Option<EndpointId> {
        self.state.read().find_endpoint(name)
    }

    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        let st = self.state.read();
        st.endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                e.as_ref().map(|e| EndpointInfo {
                    id: i as EndpointId,
                    name: e.name.clone(),
                    model: e.model.clone(),
                    block_size: e.block_size,
                    tracked_entries: e.holders,
                    last_seq: e.last_seq,
                    stale: e.stale.is_some(),
                })
            })
            .collect()
    }

    /// Applies one batch of an endpoint's events, one event per lock hold.
    /// Bad events are counted and skipped; the rest of the batch still applies.
    pub fn apply_batch(
        &self,
        id: EndpointId,
        batch: &EventBatch,
    ) -> Result<ApplyStats, IndexError> {
        self.apply_batch_at(id, batch, self.now_secs())
    }

    /// [`Self::apply_batch`] with an explicit clock (tests, replays).
    pub fn apply_batch_at(
        &self,
        id: EndpointId,
        batch: &EventBatch,
        now_secs: u32,
    ) -> Result<ApplyStats, IndexError> {
        let mut stats = ApplyStats::default();
        for event in &batch.events {
            let mut st = self.state.write();
            match st.apply_event(id, event, now_secs, &mut stats) {
                Ok(()) => {}
                Err(IndexError::UnknownEndpoint(e)) => return Err(IndexError::UnknownEndpoint(e)),
                Err(_) => stats.rejected_events += 1,
            }
        }
        Ok(stats)
    }

    /// Records that `id` holds `keys` without an engine event: the approximate
    /// prefix index learns from the gateway's own routing decisions this way.
    /// Each key stands in for its own engine hash.
    pub fn record_keys(&self, id: EndpointId, keys: &[BlockKey]) -> Result<usize, IndexError> {
        let now = self.now_secs();
        let mut st = self.state.write();
        if st.endpoint(id).is_none() {
            return Err(IndexError::UnknownEndpoint(id));
        }
        for &key in keys {
            st.restore_entry(id, key, key, Tier::GPU, now);
        }
        Ok(st.enforce_bound_now())
    }

    /// Drops what [`Self::record_keys`] recorded for `keys` on `id`; returns
    /// entries dropped.
    pub fn forget_keys(&self, id: EndpointId, keys: &[BlockKey]) -> usize {
        self.state.write().forget_recorded(id, keys)
    }

    /// Drops every endpoint's entries for `keys` (e.g. a suspended
    /// contract's: its salt changed, so nothing will look them up again);
    /// returns entries dropped. A later `BlockRemoved` for one is a no-op.
    pub fn drop_keys(&self, keys: &[BlockKey]) -> usize {
        self.state.write().drop_keys(keys)
    }

    /// Records the last sequence number applied for an endpoint.
    pub fn set_last_seq(&self, id: EndpointId, seq: i64) {
        if let Some(Some(ep)) = self.state.write().endpoints.get_mut(id as usize) {
            ep.last_seq = Some(seq);
        }
    }

    /// Events were lost and could not be replayed: keep the endpoint's current
    /// entries for the grace period (new blocks still chain onto them), then drop
    /// those not re-announced since.
    pub fn mark_stale(&self, id: EndpointId) {
        let now = self.now_secs();
        let mut st = self.state.write();
        let grace = st.cfg.stale_grace_secs;
        st.mark_stale(id, now, grace);
    }

    /// Applies TTL and stale-grace expiry; returns entries dropped.
    pub fn expire(&self) -> usize {
        self.expire_at(self.now_secs())
    }

    pub fn expire_at(&self, now_secs: u32) -> usize {
        self.state.write().expire(now_secs)
    }

    /// Per endpoint, leading blocks of `keys` held. Endpoints holding nothing are absent.
    pub fn lookup(&self, keys: &[BlockKey]) -> Vec<EndpointMatch> {
        self.state.read().lookup(keys)
    }

    /// For each key, the endpoints holding that block and in which tier (by
    /// name). Unlike [`lookup`](Self::lookup) this is per block, not a prefix
    /// match: it answers "is this exact block indexed", for audits and tests.
    pub fn block_holders(&self, keys: &[BlockKey]) -> Vec<Vec<BlockHolder>> {
        let st = self.state.read();
        keys.iter()
            .map(|k| {
                st.holders_of(k)
                    .into_iter()
                    .filter_map(|(id, tier)| {
                        let ep = st.endpoint(id)?;
                        Some(BlockHolder {
                            endpoint: ep.name.clone(),
                            tier: st.tiers.name(tier).to_string(),
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Locality of a request's tokens: keys are computed once per distinct block
    /// size among the endpoints serving `ctx.model`, and each endpoint is matched
    /// with the keys of its own block size.
    pub fn locality(
        &self,
        tokens: &[u32],
        ctx: &RequestContext<'_>,
    ) -> Result<Locality, IndexError> {
        let mut sizes: Vec<u32> = {
            let st = self.state.read();
            st.endpoints
                .iter()
                .flatten()
                .filter(|e| e.model == ctx.model)
                .map(|e| e.block_size)
                .collect()
        };
        sizes.sort_unstable();
        sizes.dedup();
        let mut out = Locality {
            prompt_tokens: tokens.len(),
            endpoints: Vec::new(),
        };
        for bs in sizes {
            let keys = self.hasher.request_keys(tokens, bs as usize, ctx)?;
            let st = self.state.read();
            let matches = st.lookup(&keys);
            for e in st.endpoints.iter().enumerate().filter_map(|(i, e)| {
                e.as_ref()
                    .filter(|e| e.model == ctx.model && e.block_size == bs)
                    .map(|e| (i as EndpointId, e))
            }) {
                let (id, ep) = e;
                let m = matches.iter().find(|m| m.endpoint == id);
                let matched_blocks = m.map_or(0, |m| m.matched_blocks);
                let tier_blocks = m.map_or([0; MAX_TIERS], |m| m.tier_blocks);
                out.endpoints.push(EndpointLocality {
                    endpoint: ep.name.clone(),
                    id,
                    block_size: bs,
                    total_blocks: keys.len() as u32,
                    matched_blocks,
                    matched_tokens: matched_blocks as usize * bs as usize,
                    tiers: tier_blocks
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| **n > 0)
                        .map(|(t, n)| (st.tiers.name(Tier(t as u8)).to_string(), *n))
                        .collect(),
                    tier_blocks,
                    stale: ep.stale.is_some(),
                });
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> IndexStats {
        let st = self.state.read();
        IndexStats {
            tracked_entries: st.holders_total,
            distinct_blocks: st.distinct_blocks(),
            endpoints: st.endpoints.iter().flatten().count(),
            approx_heap_bytes: st.approx_heap_bytes(),
        }
    }

    /// Verifies internal consistency (tests and debugging; O(entries)).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.state.read().check_invariants()
    }

    pub fn dump(&self) -> IndexDump {
        let st = self.state.read();
        let endpoints = st
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i as EndpointId, e)))
            .map(|(id, e)| DumpEndpoint {
                name: e.name.clone(),
                model: e.model.clone(),
                block_size: e.block_size,
                last_seq: e.last_seq,
                entries: st
                    .endpoint_entries(id)
                    .into_iter()
                    .map(|(k, h, t)| (k, h, st.tiers.name(t).to_string()))
                    .collect(),
            })
            .collect();
        IndexDump {
            key_fingerprint: self.hasher.fingerprint(),
            endpoints,
        }
    }

    /// Loads a dump made by a replica with the same key secret.
    pub fn restore(&self, dump: &IndexDump) -> Result<usize, RestoreError> {
        if dump.key_fingerprint != self.hasher.fingerprint() {
            return Err(RestoreError::KeyMismatch);
        }
        let now = self.now_secs();
        let mut st = self.state.write();
        let mut n = 0;
        for ep in &dump.endpoints {
            let id = st.add_endpoint(&ep.name, &ep.model, ep.block_size)?;
            for (key, hash, tier) in &ep.entries {
                let tier = st.tiers.intern(Some(tier));
                st.restore_entry(id, *key, *hash, tier, now);
                n += 1;
            }
            if let Some(Some(e)) = st.endpoints.get_mut(id as usize) {
                e.last_seq = ep.last_seq;
            }
        }
        st.enforce_bound_now();
        Ok(n)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("dump was made with another key secret")]
    KeyMismatch,
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Answer to a locality query.
#[derive(Debug, Clone, Serialize)]
pub struct Locality {
    pub prompt_tokens: usize,
    pub endpoints: Vec<EndpointLocality>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointLocality {
    pub endpoint: String,
    #[serde(skip)]
    pub id: EndpointId,
    pub block_size: u32,
    pub total_blocks: u32,
    pub matched_blocks: u32,
    pub matched_tokens: usize,
    /// Blocks of the matched prefix per tier name.
    pub tiers: Vec<(String, u32)>,
    /// The same, by tier id (speed order).
    #[serde(skip)]
    pub tier_blocks: [u32; MAX_TIERS],
    pub stale: bool,
}
