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
//!         + w.lost_prefix_per_waiting_request
//!             * (most cached tokens on any endpoint - cached tokens on e)
//!             * (requests waiting on e)                 // work the fleet did not need
//!         - w.session_bonus        * (e is the session's home)
//! ```
//!
//! Cached tokens come from the precise index (engine events, tier-weighted;
//! prefixes routed moments ago whose events are pending count as cached where
//! they were sent) or, for endpoints without events, from an approximate index
//! that learns from the gateway's own routing decisions. Simple baselines
//! exist too.
//!
//! Each policy is a [`RoutingPolicy`] in its own file under `policy/`, listed
//! once in that module's registry; [`Policy`] names one (the config's
//! `router.policy`) and [`policy_names`] lists them. The cost function lives in
//! `cost.rs`, shared helpers (rendezvous hashing, least load) in `pick.rs`.

mod cost;
pub mod load;
mod pick;
mod policy;
mod speculation;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use kvgate_index::{Clock, EndpointId, IndexConfig, KvIndex, MAX_TIERS};
use kvgate_keys::{BlockHasher, BlockKey};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

pub use load::{LoadCounters, LoadSnapshot, RequestGuard};
pub use pick::Choice;
pub use policy::{policy_names, Policy, PolicyContext, RoutingPolicy, UnknownPolicy};
pub use speculation::Speculated;
use speculation::Speculation;

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
    /// Per request waiting on an endpoint (routed, no first token yet, or
    /// its scraped queue), what each prompt token it would compute there
    /// though another endpoint caches it costs again: work the fleet did
    /// not need delays the requests arriving behind it. Under load a prefix
    /// stays where it is cached; an idle endpoint can still take it.
    pub lost_prefix_per_waiting_request: f64,
    /// The same, once whatever waits: a prefix copied to a second endpoint
    /// splits its group's later requests between two caches.
    pub lost_prefix_token: f64,
    /// Costs within this many tokens of the cheapest count as a tie. A tie
    /// goes to the endpoint caching most of the prompt, or, for a prompt
    /// cached nowhere, to one with no prefill queued, the one whose routed
    /// prefixes take the least room first: a group's later requests follow
    /// their prefix, so new prefixes are spread evenly. When every tie has
    /// prefill queued, the one given a request longest ago wins: its queue
    /// is likely the nearest to done.
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
            lost_prefix_per_waiting_request: 4.0,
            lost_prefix_token: 1.0,
            prefix_affinity_slack: 256.0,
            tier: kvgate_index::DEFAULT_TIER_WEIGHTS,
        }
    }
}

/// Default bound of the approximate index (entries) and its TTL.
pub const DEFAULT_APPROX_MAX_BLOCKS: usize = 1 << 18;
pub const DEFAULT_APPROX_TTL_SECS: u32 = 120;
/// After a request's first token, its KV events follow within milliseconds;
/// the index's clock counts whole seconds.
pub const DEFAULT_SPECULATIVE_TTL_SECS: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// A registered policy's name (`precise_prefix` by default); unknown names
    /// fail to parse, listing the known ones.
    pub policy: Policy,
    pub weights: CostWeights,
    pub approx_max_blocks: usize,
    pub approx_ttl_secs: u32,
    /// The precise policy trusts its own routing decisions for prefixes
    /// whose KV events have not arrived: while the request waits for its
    /// first token, then this many seconds more (0: not at all).
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
    /// The policy and weights in effect: swapped whole on a config reload
    /// ([`Scheduler::set_routing`]); each decision reads one snapshot.
    routing: RwLock<Arc<Routing>>,
    /// Shared turn counter: round robin's position and the tie rotations.
    rr: AtomicUsize,
    /// Learns (keys -> endpoint) from routing decisions, for endpoints without events.
    approx: KvIndex,
    /// What the precise policy assumes requests in flight are computing,
    /// until the engine's events say so.
    speculation: Arc<Speculation>,
}

/// A router config and the policy built from it.
struct Routing {
    cfg: Arc<RouterConfig>,
    policy: Box<dyn RoutingPolicy>,
}

impl Routing {
    fn new(cfg: RouterConfig) -> Arc<Self> {
        Arc::new(Self {
            policy: cfg.policy.build(),
            cfg: Arc::new(cfg),
        })
    }

    /// Whether routing decisions are remembered as speculative cache entries.
    fn speculating(&self) -> bool {
        self.policy.speculates() && self.cfg.speculative_ttl_secs > 0
    }
}

/// A reloaded router config changed what only a restart can apply.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("router settings {0:?} take effect at a restart (policy and weights reload)")]
pub struct RestartOnly(pub Vec<&'static str>);

impl Scheduler {
    pub fn new(cfg: RouterConfig) -> Self {
        Self::with_clock(cfg, Clock::wall())
    }

    /// A scheduler whose TTLs and speculation grace read `clock` (models in
    /// simulated time).
    pub fn with_clock(cfg: RouterConfig, clock: Clock) -> Self {
        let approx = KvIndex::with_clock(
            IndexConfig {
                max_tracked_blocks: cfg.approx_max_blocks.max(1),
                ttl_secs: Some(cfg.approx_ttl_secs),
                ..Default::default()
            },
            // Keys are computed by the caller; this secret only names the index.
            BlockHasher::from_secret(b"kvgate-approx-index"),
            clock.clone(),
        );
        let speculative = KvIndex::with_clock(
            IndexConfig {
                max_tracked_blocks: cfg.approx_max_blocks.max(1),
                ttl_secs: None,
                ..Default::default()
            },
            BlockHasher::from_secret(b"kvgate-speculative-index"),
            clock,
        );
        Self {
            speculation: Arc::new(Speculation::new(speculative, cfg.speculative_ttl_secs)),
            routing: RwLock::new(Routing::new(cfg)),
            rr: AtomicUsize::new(0),
            approx,
        }
    }

    /// The config in effect.
    pub fn config(&self) -> Arc<RouterConfig> {
        self.routing.read().cfg.clone()
    }

    /// Applies a reloaded config's policy and weights to the decisions that
    /// follow (those in progress finish on the old ones). The indexes' bounds,
    /// TTL and speculation grace were sized at start: a change to them is
    /// refused, and nothing changes.
    pub fn set_routing(&self, cfg: RouterConfig) -> Result<(), RestartOnly> {
        let now = self.config();
        let fixed: [(&'static str, bool); 3] = [
            (
                "approx_max_blocks",
                cfg.approx_max_blocks != now.approx_max_blocks,
            ),
            (
                "approx_ttl_secs",
                cfg.approx_ttl_secs != now.approx_ttl_secs,
            ),
            (
                "speculative_ttl_secs",
                cfg.speculative_ttl_secs != now.speculative_ttl_secs,
            ),
        ];
        let changed: Vec<&'static str> =
            fixed.iter().filter(|(_, c)| *c).map(|(n, _)| *n).collect();
        if !changed.is_empty() {
            return Err(RestartOnly(changed));
        }
        *self.routing.write() = Routing::new(cfg);
        Ok(())
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
        let routing = self.routing.read().clone();
        let ctx = PolicyContext::new(
            &routing.cfg,
            precise,
            &self.approx,
            routing.speculating().then_some(&self.speculation.index),
            &self.rr,
        );
        Ok(routing.policy.route(&Choice {
            req,
            candidates,
            eligible: &eligible,
            ctx: &ctx,
        }))
    }

    /// Teaches the approximate index that `endpoint` now caches these keys,
    /// and when the policy speculates, expects the request to compute them
    /// there: hold the returned handle until its first token
    /// ([`RequestGuard::speculating`] does).
    pub fn observe_routed(
        &self,
        endpoint: &str,
        model: &str,
        block_size: u32,
        keys: &[BlockKey],
    ) -> Option<Speculated> {
        if let Ok(id) = self.approx.add_endpoint(endpoint, model, block_size) {
            let _ = self.approx.record_keys(id, keys);
        }
        if !self.routing.read().speculating() {
            return None;
        }
        self.speculation.expect(endpoint, model, block_size, keys)
    }

    /// Forgets what was learned about an endpoint (removed, restarted).
    pub fn forget_endpoint(&self, endpoint: &str) {
        self.approx.remove_endpoint(endpoint);
        self.speculation.forget_endpoint(endpoint);
    }

    /// Forgets what was learned about these keys on every endpoint (a
    /// suspended contract's); returns entries dropped.
    pub fn forget_keys(&self, keys: &[BlockKey]) -> usize {
        self.approx.drop_keys(keys)
    }

    /// Drops expired approximate entries and speculation whose grace is over
    /// (call periodically).
    pub fn expire(&self) -> usize {
        self.approx.expire() + self.speculation.forget_released()
    }
}
