//! The one routing transaction every front uses (the gateway, the Envoy
//! endpoint picker, the bench model): the endpoints serving the model, the
//! prompt's block keys per block size, candidates, schedule, admission, what
//! the scheduler learns from the decision, and the load guard.

use std::sync::Arc;

use kvgate_keys::{BlockKey, RequestContext};
use kvgate_router::{Candidate, Decision, RequestGuard, RouteError, RouteRequest};

use crate::fleet::{Endpoint, Fleet};

/// What a front knows of a request before routing it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteQuery<'a> {
    /// The requested model or LoRA adapter.
    pub model: &'a str,
    /// The prompt's tokens as the engine will see them (empty: route by load).
    pub tokens: &'a [u32],
    /// The `cache_salt` the engine will be sent (the tenant's, never the client's).
    pub cache_salt: Option<&'a str>,
    pub session_id: Option<&'a str>,
}

/// A request ready to route: the endpoints serving its model and its block
/// keys once per block size among them. Kept across retries.
#[derive(Debug)]
pub struct RoutingInput<'a> {
    pub model: &'a str,
    pub prompt_tokens: usize,
    pub session_id: Option<&'a str>,
    serving: Vec<Arc<Endpoint>>,
    keys: Vec<(u32, Vec<BlockKey>)>,
    excluded: Vec<usize>,
}

impl RoutingInput<'_> {
    pub fn serving(&self) -> &[Arc<Endpoint>] {
        &self.serving
    }

    /// The prompt's block keys, per block size.
    pub fn keys(&self) -> &[(u32, Vec<BlockKey>)] {
        &self.keys
    }

    /// Leaves `endpoint` out of later [`Fleet::route`] calls (it failed this request).
    pub fn exclude(&mut self, endpoint: &Endpoint) {
        if let Some(i) = self
            .serving
            .iter()
            .position(|e| std::ptr::eq(e.as_ref(), endpoint))
        {
            self.excluded.push(i);
        }
    }
}

/// A routed request. Hold `guard` for the life of the request (move it into
/// the response body): it releases the endpoint's load when dropped.
#[derive(Debug)]
pub struct Routed {
    pub endpoint: Arc<Endpoint>,
    pub decision: Decision,
    pub guard: RequestGuard,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.cfg.url)
            .field("index_id", &self.index_id)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// The endpoints serving `q.model` and the prompt's keys for each of
    /// their block sizes (no routing yet: the explain API stops here).
    pub fn routing_input<'a>(&self, q: &RouteQuery<'a>) -> Result<RoutingInput<'a>, RouteError> {
        let serving: Vec<Arc<Endpoint>> = self
            .snapshot()
            .iter()
            .filter(|e| e.serves(q.model))
            .cloned()
            .collect();
        if serving.is_empty() {
            return Err(RouteError::UnknownModel(q.model.to_string()));
        }
        let lora = serving
            .iter()
            .any(|e| e.cfg.adapters.iter().any(|a| a == q.model))
            .then_some(q.model);
        let mut keys: Vec<(u32, Vec<BlockKey>)> = Vec::new();
        for e in &serving {
            let bs = e.cfg.block_size;
            if keys.iter().any(|(b, _)| *b == bs) {
                continue;
            }
            // Keys are rooted at the endpoint's primary model name, the name
            // its KV events are indexed under.
            let ctx = RequestContext {
                model: e.cfg.root_model().unwrap_or(q.model),
                lora_name: lora,
                cache_salt: q.cache_salt,
                mm_items: &[],
            };
            if let Ok(k) = self
                .index
                .hasher()
                .request_keys(q.tokens, bs as usize, &ctx)
            {
                keys.push((bs, k));
            }
        }
        Ok(RoutingInput {
            model: q.model,
            prompt_tokens: q.tokens.len(),
            session_id: q.session_id,
            serving,
            keys,
            excluded: Vec::new(),
        })
    }

    /// Picks an endpoint for `input` and starts counting the request's load
    /// there. Endpoints excluded from `input`, or losing a half-open probe
    /// race, are passed over.
    pub fn route(&self, input: &RoutingInput<'_>) -> Result<Routed, RouteError> {
        let mut excluded = input.excluded.clone();
        let req = RouteRequest {
            model: input.model,
            prompt_tokens: input.prompt_tokens,
            keys: &input.keys,
            session_id: input.session_id,
        };
        loop {
            let candidates: Vec<Candidate<'_>> = input
                .serving
                .iter()
                .enumerate()
                .map(|(i, e)| Candidate {
                    name: e.name(),
                    healthy: !excluded.contains(&i) && e.is_available(),
                    serves: true,
                    block_size: e.cfg.block_size,
                    index_id: e.index_id,
                    load: e.load.snapshot(),
                })
                .collect();
            let decision = self
                .scheduler
                .schedule(&req, &candidates, Some(&self.index))?;
            let chosen = &input.serving[decision.chosen];
            if !chosen.admit() {
                excluded.push(decision.chosen);
                continue;
            }
            // Learned at decision time: requests that arrive before this
            // one's KV events do should still find its prefix here.
            let speculation = input
                .keys
                .iter()
                .find(|(bs, _)| *bs == chosen.cfg.block_size)
                .and_then(|(bs, keys)| {
                    let root = chosen.cfg.root_model().unwrap_or(input.model);
                    self.scheduler
                        .observe_routed(chosen.name(), root, *bs, keys)
                });
            let guard = chosen
                .load
                .start(decision.expected_uncached_tokens)
                .speculating(speculation);
            return Ok(Routed {
                endpoint: chosen.clone(),
                decision,
                guard,
            });
        }
    }
}
