//! kvgate's scheduling: which endpoint gets a request.
//!
//! One pipeline: filters (healthy, serves the model or adapter) -> scorers ->
//! pick. The cost-based policies combine every scorer into one number in units
//! of prefill tokens, an estimate of the work ahead of this request's first token:
//!
//! ```text
//! cost(e) = w.prefill_token        * (prompt tokens - cached tokens on e)
//!         + w.queued_prefill_token * (uncached tokens of requests routed to e, not yet started)
//!         + w.active_request       * (requests in flight on e)      // decode interference
//!         + w.engine_waiting       * (e's own waiting queue, scraped)
//!         + w.kv_usage             * (e's KV cache usage in [0, 1])
//!         - w.session_bonus        * (e is the session's home)
//! ```
//!
//! Cached tokens come from the precise index (engine events, tier-weighted) or,
//! for endpoints without events, from an approximate index that learns from the
//! gateway's own routing decisions. Simple baselines exist too.

pub mod load;

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

use kvgate_index::{EndpointId, EndpointMatch, IndexConfig, KvIndex, MAX_TIERS};
use kvgate_keys::{BlockHasher, BlockKey};
use serde::{Deserialize, Serialize};

pub use load::{LoadCounters, LoadSnapshot, RequestGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Cost function with cached tokens from engine KV events.
    #[default]
    PrecisePrefix,
    /// Cost function with cached tokens learned from routing decisions only.
    ApproxPrefix,
    RoundRobin,
    LeastLoad,
    /// Sticky by session id (rendezvous hashing), least load without one.
    Session,
    Random,
}

impl Policy {
    /// Whether the policy looks at the prompt's tokens (prefix or load in
    /// tokens); round robin and random do not, so the gateway skips tokenizing.
    pub fn uses_prompt_tokens(self) -> bool {
        !matches!(self, Policy::RoundRobin | Policy::Random)
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::PrecisePrefix => "precise_prefix",
            Policy::ApproxPrefix => "approx_prefix",
            Policy::RoundRobin => "round_robin",
            Policy::LeastLoad => "least_load",
            Policy::Session => "session",
            Policy::Random => "random",
        }
    }
}

/// Weights of the cost function, in prefill-token units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostWeights {
    pub prefill_token: f64,
    pub queued_prefill_token: f64,
    /// What one request in flight costs a newcomer, in prefill tokens
    /// (decode steps it shares the batch with).
    pub active_request: f64,
    pub engine_waiting: f64,
    pub kv_usage: f64,
    pub session_bonus: f64,
    /// Costs within this many tokens of the cheapest count as a tie. A tie
    /// goes to the endpoint caching most of the prompt, or, for a prefix
    /// cached nowhere, to its home endpoint (rendezvous hash of its block at
    /// AFFINITY_PREFIX_TOKENS) when that has no prefill queued. A group's
    /// requests then gather on one engine instead of copying the prefix into
    /// several caches. When every tie has prefill queued, the one given a
    /// request longest ago wins: its queue is likely the nearest to done.
    pub prefix_affinity_slack: f64,
    /// Worth of a cached block per tier (GPU, CPU, DISK, others).
    pub tier: [f64; MAX_TIERS],
}

impl Default for CostWeights {
    fn default() -> Self {
        Self {
            prefill_token: 1.0,
            // Queued work drains; a prefix copied to a second engine costs its
            // prefill again and splits the group's later requests. Counting
            // queued tokens at half keeps groups together under load (fleet
            // hit rate at the oracle's on the LLMD-73 ladder, vs 0.79x at 1.0).
            queued_prefill_token: 0.5,
            active_request: 64.0,
            engine_waiting: 256.0,
            kv_usage: 0.0,
            session_bonus: 0.0,
            prefix_affinity_slack: 256.0,
            tier: kvgate_index::DEFAULT_TIER_WEIGHTS,
        }
    }
}

/// Default bound of the approximate index (entries) and its TTL.
pub const DEFAULT_APPROX_MAX_BLOCKS: usize = 1 << 18;
pub const DEFAULT_APPROX_TTL_SECS: u32 = 120;
/// Prompt depth (tokens) whose block names a prefix for affinity.
pub const AFFINITY_PREFIX_TOKENS: usize = 128;
/// A prefill of a long prompt under load takes seconds; its events follow.
pub const DEFAULT_SPECULATIVE_TTL_SECS: u32 = 5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    pub policy: Policy,
    pub weights: CostWeights,
    pub approx_max_blocks: usize,
    pub approx_ttl_secs: u32,
    /// How long the precise policy trusts its own recent routing decisions
    /// for prefixes whose KV events have not arrived yet (0: never).
    pub speculative_ttl_secs: u32,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            weights: CostWeights::default(),
            approx_max_blocks: DEFAULT_APPROX_MAX_BLOCKS,
            approx_ttl_secs: DEFAULT_APPROX_TTL_SECS,
            speculative_ttl_secs: DEFAULT_SPECULATIVE_TTL_SECS,
        }
    }
}

/// One endpoint as the scheduler sees it for one request.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub healthy: bool,
    /// Serves the requested model (or LoRA adapter).
    pub serves: bool,
    pub block_size: u32,
    /// Its id in the precise index, when it publishes KV events.
    pub index_id: Option<EndpointId>,
    pub load: LoadSnapshot,
}

/// What the scheduler needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub model: &'a str,
    pub prompt_tokens: usize,
    /// The prompt's block keys for each block size among the candidates.
    pub keys: &'a [(u32, Vec<BlockKey>)],
    pub session_id: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub endpoint: String,
    pub cached_tokens: f64,
    /// "precise", "speculative" (recently routed, events pending), "approx" or "none".
    pub cached_source: &'static str,
    pub load_tokens: f64,
    pub cost: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Index into the candidates slice.
    pub chosen: usize,
    /// Why: the policy, or for cost policies whether the prefix or load decided.
    pub reason: &'static str,
    /// Filtered-in candidates' scores (empty for baselines that do not score).
    pub scores: Vec<Score>,
    /// Uncached prompt tokens expected on the chosen endpoint.
    pub expected_uncached_tokens: u64,
    pub expected_cached_tokens: u64,
}

impl Decision {
    /// A compact, header-safe explanation: `name:cost/cached;...`.
    pub fn explain(&self) -> String {
        self.scores
            .iter()
            .map(|s| {
                format!(
                    "{}:{:.0}/{:.0}{}",
                    s.endpoint,
                    s.cost,
                    s.cached_tokens,
                    &s.cached_source[..1]
                )
            })
            .collect::<Vec<_>>()
            .join(";")
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("no endpoint serves model {0:?}")]
    UnknownModel(String),
    #[error("no healthy endpoint serves model {0:?}")]
    NoHealthyEndpoint(String),
}

pub struct Scheduler {
    cfg: RouterConfig,
    rr: AtomicUsize,
    /// Learns (keys -> endpoint) from routing decisions, for endpoints without events.
    approx: KvIndex,
    /// The same, kept briefly: what the precise policy assumes is being cached
    /// by requests in flight, until the engine's events say so.
    speculative: KvIndex,
}

impl Scheduler {
    pub fn new(cfg: RouterConfig) -> Self {
        let approx = KvIndex::new(
            IndexConfig {
                max_tracked_blocks: cfg.approx_max_blocks.max(1),
                ttl_secs: Some(cfg.approx_ttl_secs),
                ..Default::default()
            },
            // Keys are computed by the caller; this secret only names the index.
            BlockHasher::from_secret(b"kvgate-approx-index"),
        );
        let speculative = KvIndex::new(
            IndexConfig {
                max_tracked_blocks: cfg.approx_max_blocks.max(1),
                ttl_secs: Some(cfg.speculative_ttl_secs),
                ..Default::default()
            },
            BlockHasher::from_secret(b"kvgate-speculative-index"),
        );
        Self {
            cfg,
            rr: AtomicUsize::new(0),
            approx,
            speculative,
        }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Picks an endpoint. `precise` is the KV event index (None: not available).
    pub fn schedule(
        &self,
        req: &RouteRequest<'_>,
        candidates: &[Candidate<'_>],
        precise: Option<&KvIndex>,
    ) -> Result<Decision, RouteError> {
        let serving: Vec<usize> = (0..candidates.len())
            .filter(|i| candidates[*i].serves)
            .collect();
        if serving.is_empty() {
            return Err(RouteError::UnknownModel(req.model.to_string()));
        }
        let eligible: Vec<usize> = serving
            .into_iter()
            .filter(|i| candidates[*i].healthy)
            .collect();
        if eligible.is_empty() {
            return Err(RouteError::NoHealthyEndpoint(req.model.to_string()));
        }
        let pick = |chosen: usize, reason| Decision {
            chosen,
            reason,
            scores: Vec::new(),
            expected_uncached_tokens: req.prompt_tokens as u64,
            expected_cached_tokens: 0,
        };
        Ok(match self.cfg.policy {
            Policy::RoundRobin => {
                let n = self.rr.fetch_add(1, Ordering::Relaxed);
                pick(eligible[n % eligible.len()], "round_robin")
            }
            Policy::Random => pick(eligible[rand::random_range(0..eligible.len())], "random"),
            Policy::LeastLoad => pick(self.least_loaded(&eligible, candidates), "least_load"),
            Policy::Session => match req.session_id {
                Some(s) => pick(rendezvous(s, &eligible, candidates), "session"),
                None => pick(self.least_loaded(&eligible, candidates), "least_load"),
            },
            Policy::PrecisePrefix | Policy::ApproxPrefix => {
                self.by_cost(req, candidates, &eligible, precise)
            }
        })
    }

    fn load_tokens(&self, l: &LoadSnapshot) -> f64 {
        let w = &self.cfg.weights;
        w.queued_prefill_token * l.pending_prefill_tokens as f64
            + w.active_request * l.in_flight as f64
            + w.engine_waiting * l.engine_waiting as f64
            + w.kv_usage * l.engine_kv_usage
    }

    fn least_loaded(&self, eligible: &[usize], candidates: &[Candidate<'_>]) -> usize {
        let n = self.rr.fetch_add(1, Ordering::Relaxed);
        // Ties rotate, so an idle fleet is not all sent to the first endpoint.
        let rotated = eligible
            .iter()
            .cycle()
            .skip(n % eligible.len())
            .take(eligible.len());
        rotated
            .min_by(|a, b| {
                self.load_tokens(&candidates[**a].load)
                    .total_cmp(&self.load_tokens(&candidates[**b].load))
            })
            .copied()
            .unwrap_or(eligible[0])
    }

    fn by_cost(
        &self,
        req: &RouteRequest<'_>,
        candidates: &[Candidate<'_>],
        eligible: &[usize],
        precise: Option<&KvIndex>,
    ) -> Decision {
        let w = &self.cfg.weights;
        let use_precise = self.cfg.policy == Policy::PrecisePrefix;
        let home = req.session_id.map(|s| rendezvous(s, eligible, candidates));
        // One lookup per block size, shared by the endpoints of that size.
        let mut precise_matches: Vec<(u32, Vec<EndpointMatch>)> = Vec::new();
        let mut approx_matches: Vec<(u32, Vec<EndpointMatch>)> = Vec::new();
        let mut speculative_matches: Vec<(u32, Vec<EndpointMatch>)> = Vec::new();
        let speculate = use_precise && self.cfg.speculative_ttl_secs > 0;
        for (bs, keys) in req.keys {
            if let (true, Some(index)) = (use_precise, precise) {
                precise_matches.push((*bs, index.lookup(keys)));
            }
            if speculate {
                speculative_matches.push((*bs, self.speculative.lookup(keys)));
            }
            approx_matches.push((*bs, self.approx.lookup(keys)));
        }
        let n = self.rr.fetch_add(1, Ordering::Relaxed);
        let mut scores = Vec::with_capacity(eligible.len());
        let mut best: Option<(f64, usize, usize)> = None; // (cost, rotation rank, candidate)
        for (rank, &i) in eligible.iter().enumerate() {
            let c = &candidates[i];
            // Blocks of this prompt that a request routed here moments ago is
            // computing right now (no KV events yet).
            let mut in_flight_blocks = 0.0;
            let (cached_blocks, source) = match (use_precise, c.index_id) {
                (true, Some(id)) => {
                    let known = find(&precise_matches, c.block_size, |m| m.endpoint == id)
                        .map_or(0.0, |m| m.weighted_blocks(&w.tier));
                    let expected = self
                        .speculative
                        .endpoint_id(c.name)
                        .and_then(|id| {
                            find(&speculative_matches, c.block_size, |m| m.endpoint == id)
                        })
                        .map_or(0.0, |m| f64::from(m.matched_blocks));
                    if expected > known {
                        in_flight_blocks = expected - known;
                        (expected, "speculative")
                    } else {
                        (known, "precise")
                    }
                }
                _ => (
                    self.approx
                        .endpoint_id(c.name)
                        .and_then(|id| find(&approx_matches, c.block_size, |m| m.endpoint == id))
                        .map_or(0.0, |m| f64::from(m.matched_blocks)),
                    "approx",
                ),
            };
            // The engine always computes the last prompt token.
            let cached = (cached_blocks * f64::from(c.block_size))
                .min(req.prompt_tokens.saturating_sub(1) as f64);
            // That prefill is queued work here, but it is this prompt's own
            // prefix: joining it adds nothing, while going elsewhere computes
            // the prefix twice. So it does not count as load against us.
            let shared_prefill = (in_flight_blocks * f64::from(c.block_size))
                .min(c.load.pending_prefill_tokens as f64);
            let load = self.load_tokens(&c.load) - w.queued_prefill_token * shared_prefill;
            let bonus = if home == Some(i) {
                w.session_bonus
            } else {
                0.0
            };
            let cost = w.prefill_token * (req.prompt_tokens as f64 - cached) + load - bonus;
            let source = if cached > 0.0 { source } else { "none" };
            // Equal costs rotate (rank relative to a moving start).
            let rot = (rank + eligible.len() - n % eligible.len()) % eligible.len();
            if best.is_none_or(|(bc, br, _)| cost < bc || (cost == bc && rot < br)) {
                best = Some((cost, rot, i));
            }
            scores.push(Score {
                endpoint: c.name.to_string(),
                cached_tokens: cached,
                cached_source: source,
                load_tokens: load,
                cost,
            });
        }
        let mut chosen = best.map_or(eligible[0], |(_, _, i)| i);
        // The prefix is named by its block at ~AFFINITY_PREFIX_TOKENS (or its
        // last full block): past a chat template's fixed header, short enough
        // that a group's requests agree on it.
        let prefix_key = req.keys.first().and_then(|(bs, k)| {
            let depth = (AFFINITY_PREFIX_TOKENS / (*bs).max(1) as usize).max(1);
            k.get(depth.min(k.len()).checked_sub(1)?)
        });
        // Near-ties (within the slack) keep prefixes together: the endpoint
        // caching most of the prompt wins; a prefix cached nowhere goes home
        // if that costs it no wait (`cold_pick`).
        if let Some((best_cost, _, _)) = best {
            let near: Vec<(usize, &Score)> = eligible
                .iter()
                .copied()
                .zip(&scores)
                .filter(|(_, s)| s.cost <= best_cost + w.prefix_affinity_slack)
                .collect();
            let most_cached = near
                .iter()
                .map(|(_, s)| s.cached_tokens)
                .fold(0.0, f64::max);
            if most_cached > 0.0 {
                if let Some((i, _)) = near
                    .iter()
                    .filter(|(_, s)| s.cached_tokens == most_cached)
                    .min_by(|a, b| a.1.cost.total_cmp(&b.1.cost))
                {
                    chosen = *i;
                }
            } else if scores.iter().all(|s| s.cached_tokens == 0.0) {
                chosen = cold_pick(&near, chosen, candidates, || {
                    prefix_key.map(|k| rendezvous(&k.to_le_bytes(), eligible, candidates))
                });
            }
        }
        let chosen_score = eligible
            .iter()
            .position(|i| *i == chosen)
            .and_then(|p| scores.get(p));
        let cached = chosen_score.map_or(0.0, |s| s.cached_tokens);
        let max_cached = scores.iter().map(|s| s.cached_tokens).fold(0.0, f64::max);
        let reason = if max_cached == 0.0 {
            "load_no_prefix"
        } else if cached >= max_cached {
            "prefix"
        } else {
            "load_over_prefix"
        };
        Decision {
            chosen,
            reason,
            scores,
            expected_uncached_tokens: (req.prompt_tokens as f64 - cached).max(0.0) as u64,
            expected_cached_tokens: cached as u64,
        }
    }

    /// Teaches the approximate index that `endpoint` now caches these keys.
    pub fn observe_routed(&self, endpoint: &str, model: &str, block_size: u32, keys: &[BlockKey]) {
        let learn = |index: &KvIndex| {
            if let Ok(id) = index.add_endpoint(endpoint, model, block_size) {
                let _ = index.record_keys(id, keys);
            }
        };
        learn(&self.approx);
        if self.cfg.policy == Policy::PrecisePrefix && self.cfg.speculative_ttl_secs > 0 {
            learn(&self.speculative);
        }
    }

    /// Forgets what was learned about an endpoint (removed, restarted).
    pub fn forget_endpoint(&self, endpoint: &str) {
        self.approx.remove_endpoint(endpoint);
        self.speculative.remove_endpoint(endpoint);
    }

    /// Drops expired approximate entries (call periodically).
    pub fn expire(&self) -> usize {
        self.approx.expire() + self.speculative.expire()
    }
}

/// Where a prompt cached nowhere goes among the near-ties (`near`, which
/// holds `best`). Queued prefill tokens say nothing of how far along they are,
/// so near-ties with some queued are not equal: an endpoint with none starts
/// the prompt at once, and among busy ones, the one given a request longest
/// ago is likely the nearest to done (what round robin gets by construction).
/// The prefix's home (`home()`) wins only when it starts at once too: a
/// group's requests then meet there at no cost to this one.
fn cold_pick(
    near: &[(usize, &Score)],
    best: usize,
    candidates: &[Candidate<'_>],
    home: impl FnOnce() -> Option<usize>,
) -> usize {
    let idle = |i: usize| candidates[i].load.pending_prefill_tokens == 0;
    if near.iter().any(|(i, _)| idle(*i)) {
        if let Some(h) = home().filter(|h| idle(*h) && near.iter().any(|(i, _)| i == h)) {
            return h;
        }
        if idle(best) {
            return best;
        }
        return near
            .iter()
            .filter(|(i, _)| idle(*i))
            .min_by(|a, b| a.1.cost.total_cmp(&b.1.cost))
            .map_or(best, |(i, _)| *i);
    }
    near.iter()
        .map(|(i, _)| *i)
        .min_by_key(|i| (candidates[*i].load.last_routed, *i != best))
        .unwrap_or(best)
}

fn find(
    matches: &[(u32, Vec<EndpointMatch>)],
    block_size: u32,
    pred: impl Fn(&EndpointMatch) -> bool,
) -> Option<&EndpointMatch> {
    matches
        .iter()
        .find(|(bs, _)| *bs == block_size)
        .and_then(|(_, ms)| ms.iter().find(|m| pred(m)))
}

/// Highest-random-weight hashing: a session keeps its endpoint while it stays
/// eligible, and only sessions of a removed endpoint move.
fn rendezvous<K: Hash + ?Sized>(
    session: &K,
    eligible: &[usize],
    candidates: &[Candidate<'_>],
) -> usize {
    eligible
        .iter()
        .copied()
        .max_by_key(|i| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            session.hash(&mut h);
            candidates[*i].name.hash(&mut h);
            h.finish()
        })
        .unwrap_or(eligible[0])
}
