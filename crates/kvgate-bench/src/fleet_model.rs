//! A deterministic model of the gateway in front of a simulated fleet, in
//! simulated time: the real [`Scheduler`] and a real [`KvIndex`] fed by the
//! engines' KV events, over N real [`EngineCore`]s, with what the gateway adds
//! around them (load counters, the periodic metrics scrape, event delivery
//! delay, `observe_routed`).
//!
//! The HTTP benchmark measures the same thing with real sockets and timers, on
//! a machine shared with other work; this model answers "where would this
//! policy put these requests, and what TTFT would they see" exactly and in
//! seconds, so routing changes can be compared on many seeds and rates.
//!
//! The scheduler's clock (approximate-index TTL, speculation grace) is the
//! gateway's: simulated time over `time_scale`.
//!
//! What it leaves out: HTTP time (tokenizing time is a knob, off by
//! default) and the engines' pacing on a busy host.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use kvgate_fleet::{Ejection, Endpoint, EndpointConfig, Fleet, IndexOnly, RouteQuery};
use kvgate_index::{Clock, IndexConfig, IndexError, KvIndex};
use kvgate_keys::BlockHasher;
use kvgate_router::{RequestGuard, RouteError, RouterConfig};
use kvgate_sim::engine::{EngineConfig, EngineCore, RequestId, SimRequest, StepOutput, TokenEvent};
use kvgate_tokenize::{ChatInput, ModelTokenizer, TokenizeError};
use kvgate_wire::vllm::{EventBatch, KvEvent};

use peer::PeerRouter;
pub use peer::{CacheAwareConfig, PeerPolicy};

use crate::runner::percentile;
use crate::workload::{Body, RequestSpec};

/// The model name the engines serve (keys are rooted at it).
pub const MODEL: &str = "kvgate-sim";

#[derive(Debug, thiserror::Error)]
pub enum FleetModelError {
    #[error("request {0} has no arrival time")]
    NoArrival(usize),
    #[error("tokenizing request {index}: {source}")]
    Tokenize { index: usize, source: TokenizeError },
    #[error("index: {0}")]
    Index(#[from] IndexError),
    #[error("routing: {0}")]
    Route(#[from] RouteError),
    #[error("the fleet needs at least one engine with a block size > 0")]
    EmptyFleet,
}

/// The fleet and the gateway's timing around it.
#[derive(Debug, Clone)]
pub struct FleetModelConfig {
    pub engines: usize,
    pub engine: EngineConfig,
    pub router: RouterConfig,
    /// From the end of the engine step that produced them to the index
    /// (publish, ZMQ, decode, apply).
    pub event_delay_secs: f64,
    /// The gateway's `/metrics` scrape period (`metrics_interval_ms`).
    pub scrape_interval_secs: f64,
    /// Gateway to engine, one way: the request reaches the engine this long
    /// after it was routed.
    pub proxy_delay_secs: f64,
    /// Template + tokenize + keys before routing, for the policies that look
    /// at prompt tokens (round robin and random skip it). 0 by default, so
    /// policies are compared on placement alone.
    pub tokenize_secs: f64,
    /// Keep each decision's scores ([`RequestResult::explain`]).
    pub trace: bool,
    /// Engine seconds per gateway second, as the sim's `--time-scale`: the
    /// delays above are the gateway's (wall clock), so at 2 every signal is
    /// twice as stale next to the engines' work (as next to faster GPUs).
    pub time_scale: f64,
    /// Place requests as this peer router would, instead of by `router`.
    pub peer: Option<PeerPolicy>,
}

impl Default for FleetModelConfig {
    fn default() -> Self {
        Self {
            engines: 8,
            engine: EngineConfig::default(),
            router: RouterConfig::default(),
            event_delay_secs: 0.003,
            scrape_interval_secs: 0.2,
            proxy_delay_secs: 0.0005,
            tokenize_secs: 0.0,
            trace: false,
            time_scale: 1.0,
            peer: None,
        }
    }
}

/// One request, tokenized and keyed once, reusable across runs.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub at: f64,
    pub tokens: Vec<u32>,
    pub max_tokens: u32,
    pub group: usize,
}

/// A workload ready to run against any policy.
#[derive(Debug, Clone)]
pub struct ModelWorkload {
    pub requests: Vec<ModelRequest>,
}

impl ModelWorkload {
    /// Tokenizes `specs` as the gateway and the sim would (completions with
    /// special tokens, chats through the template). Every spec needs `at`.
    pub fn tokenize(specs: &[RequestSpec], tok: &ModelTokenizer) -> Result<Self, FleetModelError> {
        let requests = specs
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let at = s.at.ok_or(FleetModelError::NoArrival(index))?;
                let tokens = match &s.body {
                    Body::Completion(p) => tok.completion_tokens(p),
                    Body::Chat(messages) => tok.chat_tokens(&ChatInput {
                        messages,
                        tools: None,
                        add_generation_prompt: true,
                        continue_final_message: false,
                        template_kwargs: None,
                    }),
                }
                .map_err(|source| FleetModelError::Tokenize { index, source })?;
                Ok(ModelRequest {
                    at,
                    tokens,
                    max_tokens: s.max_tokens,
                    group: s.group,
                })
            })
            .collect::<Result<Vec<_>, FleetModelError>>()?;
        Ok(Self { requests })
    }

    /// The hit rate a single infinite cache shared by the fleet would get.
    pub fn oracle_hit_rate(&self, block_size: usize) -> f64 {
        crate::workload::Oracle::new(block_size).hit_rate(self.requests.iter().map(|r| &r.tokens))
    }
}

/// What happened to one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestResult {
    /// The engine it was routed to (None: the engine refused it).
    pub endpoint: Option<usize>,
    /// The scheduler's reason.
    pub reason: &'static str,
    pub prompt_tokens: usize,
    /// Prompt tokens the engine found cached.
    pub cached_tokens: usize,
    /// Uncached tokens the scheduler expected on the chosen engine.
    pub expected_uncached_tokens: u64,
    /// From arrival at the gateway to the first token there.
    pub ttft_secs: Option<f64>,
    pub e2e_secs: Option<f64>,
    /// The decision's scores (`name:cost/cached;...`), when tracing.
    pub explain: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ModelRun {
    pub requests: Vec<RequestResult>,
    /// Requests per engine.
    pub per_engine: Vec<usize>,
    pub preemptions: u64,
}

impl ModelRun {
    fn ttfts(&self) -> Vec<f64> {
        self.requests.iter().filter_map(|r| r.ttft_secs).collect()
    }

    /// TTFT quantile in seconds (the HTTP bench's nearest-rank definition).
    pub fn ttft_quantile(&self, q: f64) -> f64 {
        percentile(&mut self.ttfts(), q)
    }

    pub fn ttft_p50(&self) -> f64 {
        self.ttft_quantile(0.5)
    }

    pub fn ttft_p90(&self) -> f64 {
        self.ttft_quantile(0.9)
    }

    pub fn ttft_mean(&self) -> f64 {
        let t = self.ttfts();
        t.iter().sum::<f64>() / t.len().max(1) as f64
    }

    /// Cached prompt tokens over prompt tokens, fleet-wide.
    pub fn hit_rate(&self) -> f64 {
        let prompt: usize = self.requests.iter().map(|r| r.prompt_tokens).sum();
        let cached: usize = self.requests.iter().map(|r| r.cached_tokens).sum();
        cached as f64 / prompt.max(1) as f64
    }

    pub fn finished(&self) -> usize {
        self.requests
            .iter()
            .filter(|r| r.e2e_secs.is_some())
            .count()
    }
}

enum What {
    /// The request is ready to route (arrival + tokenizing).
    Arrive(usize),
    /// The routed request reaches its engine.
    Reach {
        engine: usize,
        request: usize,
    },
    StepEnd(usize),
    Events {
        engine: usize,
        events: Vec<KvEvent>,
    },
    Scrape,
}

struct Ev {
    t: f64,
    seq: u64,
    what: What,
}

impl PartialEq for Ev {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ev {
    // Reversed: BinaryHeap pops the earliest, ties in scheduling order.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .t
            .total_cmp(&self.t)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

struct Engine {
    /// Its place in the fleet: name, load counters, index id.
    endpoint: Arc<Endpoint>,
    core: EngineCore,
    /// Requests received while a step runs; added when it ends.
    inbox: Vec<usize>,
    /// The step in progress (its effects land when it ends).
    stepping: Option<StepOutput>,
    ids: HashMap<RequestId, usize>,
    /// What its `/metrics` says: the counters after its last step.
    published: (u64, u64, f64),
    seed: u64,
}

/// Runs `workload` through a fresh fleet, index and scheduler.
pub fn simulate(
    cfg: &FleetModelConfig,
    workload: &ModelWorkload,
) -> Result<ModelRun, FleetModelError> {
    let bs = cfg.engine.block_size;
    if cfg.engines == 0 || bs == 0 {
        return Err(FleetModelError::EmptyFleet);
    }
    let index = Arc::new(KvIndex::new(
        IndexConfig::default(),
        BlockHasher::from_secret(b"kvgate-fleet-model"),
    ));
    // The gateway's own fleet and routing transaction; events are applied
    // here, in simulated time, instead of by ZMQ subscribers.
    let clock = Clock::manual();
    let fleet = Fleet::with_clock(
        cfg.router.clone(),
        Ejection::default(),
        index.clone(),
        Box::new(IndexOnly(index.clone())),
        clock.clone(),
    );
    let mut engines = Vec::with_capacity(cfg.engines);
    let mut by_name = HashMap::new();
    for i in 0..cfg.engines {
        let endpoint = fleet.join(EndpointConfig::new(format!("engine-{i}"), MODEL, bs as u32));
        if endpoint.index_id.is_none() {
            return Err(FleetModelError::EmptyFleet);
        }
        by_name.insert(endpoint.name().to_string(), i);
        engines.push(Engine {
            endpoint,
            core: EngineCore::new(cfg.engine.clone()),
            inbox: Vec::new(),
            stepping: None,
            ids: HashMap::new(),
            published: (0, 0, 0.0),
            seed: 0x5eed,
        });
    }
    let n = workload.requests.len();
    let mut results: Vec<RequestResult> = vec![RequestResult::default(); n];
    let mut guards: Vec<Option<RequestGuard>> = (0..n).map(|_| None).collect();
    let mut done = 0usize;
    let mut queue = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BinaryHeap<Ev>, t: f64, what: What| {
        seq += 1;
        queue.push(Ev { t, seq, what });
    };
    // The gateway's delays, in the engines' (simulated) time.
    let scale = if cfg.time_scale > 0.0 && cfg.time_scale.is_finite() {
        cfg.time_scale
    } else {
        1.0
    };
    let (event_delay, scrape_interval, proxy_delay) = (
        cfg.event_delay_secs * scale,
        (cfg.scrape_interval_secs * scale).max(1e-3),
        cfg.proxy_delay_secs * scale,
    );
    let mut peer = cfg.peer.map(|p| PeerRouter::new(p, cfg.engines));
    let tokenizes = peer.is_none() && cfg.router.policy.uses_prompt_tokens();
    let routing_delay = if tokenizes {
        cfg.tokenize_secs.max(0.0) * scale
    } else {
        0.0
    };
    for (i, r) in workload.requests.iter().enumerate() {
        push(&mut queue, r.at + routing_delay, What::Arrive(i));
    }
    push(&mut queue, 0.0, What::Scrape);

    while let Some(Ev { t, what, .. }) = queue.pop() {
        clock.set_secs((t / scale) as u32);
        match what {
            What::Arrive(i) => {
                let r = &workload.requests[i];
                let chosen = if let Some(p) = peer.as_mut() {
                    let (chosen, reason) = p.place(&r.tokens);
                    results[i] = RequestResult {
                        endpoint: Some(chosen),
                        reason,
                        prompt_tokens: r.tokens.len(),
                        expected_uncached_tokens: r.tokens.len() as u64,
                        ..Default::default()
                    };
                    chosen
                } else {
                    let input = fleet.routing_input(&RouteQuery {
                        model: MODEL,
                        tokens: &r.tokens,
                        ..RouteQuery::default()
                    })?;
                    let routed = fleet.route(&input)?;
                    let d = routed.decision;
                    let chosen = by_name
                        .get(routed.endpoint.name())
                        .copied()
                        .ok_or(FleetModelError::EmptyFleet)?;
                    guards[i] = Some(routed.guard);
                    results[i] = RequestResult {
                        endpoint: Some(chosen),
                        reason: d.reason,
                        prompt_tokens: r.tokens.len(),
                        expected_uncached_tokens: d.expected_uncached_tokens,
                        explain: cfg.trace.then(|| d.explain()),
                        ..Default::default()
                    };
                    chosen
                };
                push(
                    &mut queue,
                    t + proxy_delay,
                    What::Reach {
                        engine: chosen,
                        request: i,
                    },
                );
            }
            What::Reach { engine, request } => {
                engines[engine].inbox.push(request);
                if engines[engine].stepping.is_none() {
                    let failed = start_step(
                        &mut engines[engine],
                        t,
                        workload,
                        &mut push,
                        &mut queue,
                        engine,
                    );
                    for f in failed {
                        fail(&mut results[f], &mut guards[f], &mut done, peer.as_mut());
                    }
                }
            }
            What::StepEnd(ei) => {
                let e = &mut engines[ei];
                let Some(out) = e.stepping.take() else {
                    continue;
                };
                if !out.kv_events.is_empty() {
                    push(
                        &mut queue,
                        t + event_delay,
                        What::Events {
                            engine: ei,
                            events: out.kv_events,
                        },
                    );
                }
                let s = e.core.stats();
                e.published = (s.waiting as u64, s.running as u64, s.kv_usage);
                for o in out.outputs {
                    let Some(&i) = e.ids.get(&o.id) else {
                        continue;
                    };
                    let arrival = workload.requests[i].at;
                    for ev in o.events {
                        match ev {
                            TokenEvent::FirstToken { cached_tokens, .. } => {
                                results[i].cached_tokens = cached_tokens;
                                results[i].ttft_secs = Some(t - arrival);
                                if let Some(g) = guards[i].as_mut() {
                                    g.first_token();
                                }
                            }
                            TokenEvent::Done { .. } => {
                                results[i].e2e_secs = Some(t - arrival);
                                guards[i] = None;
                                if let Some(p) = peer.as_mut() {
                                    p.release(ei);
                                }
                                done += 1;
                            }
                            TokenEvent::Token(_) => {}
                        }
                    }
                    if o.finished {
                        e.ids.remove(&o.id);
                    }
                }
                let failed = start_step(e, t, workload, &mut push, &mut queue, ei);
                for f in failed {
                    fail(&mut results[f], &mut guards[f], &mut done, peer.as_mut());
                }
            }
            What::Events { engine, events } => {
                let e = &engines[engine];
                let batch = EventBatch {
                    ts: t,
                    events,
                    data_parallel_rank: None,
                };
                if let Some(id) = e.endpoint.index_id {
                    index.apply_batch_at(id, &batch, t as u32)?;
                }
            }
            What::Scrape => {
                fleet.scheduler().expire();
                for e in &engines {
                    let (waiting, running, usage) = e.published;
                    e.endpoint.load.set_engine(waiting, running, usage);
                }
                // Nothing else pending means nothing left to run.
                if done < n && !queue.is_empty() {
                    push(&mut queue, t + scrape_interval, What::Scrape);
                }
            }
        }
    }
    let mut per_engine = vec![0; cfg.engines];
    for r in &results {
        if let Some(e) = r.endpoint {
            per_engine[e] += 1;
        }
    }
    Ok(ModelRun {
        requests: results,
        per_engine,
        preemptions: engines.iter().map(|e| e.core.stats().preemptions).sum(),
    })
}

/// A request the engine refused (too long for its cache): it ends now.
fn fail(
    r: &mut RequestResult,
    guard: &mut Option<RequestGuard>,
    done: &mut usize,
    peer: Option<&mut PeerRouter>,
) {
    if let (Some(p), Some(e)) = (peer, r.endpoint) {
        p.release(e);
    }
    r.endpoint = None;
    *guard = None;
    *done += 1;
}

/// Adds what arrived and starts the engine's next step, as the sim's driver
/// loop does between steps. Returns the requests the engine refused.
fn start_step(
    e: &mut Engine,
    t: f64,
    workload: &ModelWorkload,
    push: &mut impl FnMut(&mut BinaryHeap<Ev>, f64, What),
    queue: &mut BinaryHeap<Ev>,
    ei: usize,
) -> Vec<usize> {
    e.core.advance_to(t);
    let mut failed = Vec::new();
    for i in std::mem::take(&mut e.inbox) {
        let r = &workload.requests[i];
        e.seed = e.seed.wrapping_add(1);
        let req = SimRequest {
            prompt_tokens: r.tokens.clone(),
            max_tokens: r.max_tokens,
            cache_salt: None,
            lora_name: None,
        };
        match e.core.add_request(req, e.seed) {
            Ok(id) => {
                e.ids.insert(id, i);
            }
            Err(_) => failed.push(i),
        }
    }
    if let Some(out) = e.core.step() {
        e.stepping = Some(out);
        push(queue, e.core.now(), What::StepEnd(ei));
    }
    failed
}

mod peer;
#[cfg(test)]
mod tests;
