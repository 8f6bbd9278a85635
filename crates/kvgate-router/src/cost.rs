//! The cost function of the prefix policies (formula in the crate docs) and
//! its near-tie rules. The policies differ only in where cached tokens come
//! from, which they pass in as [`Cached`] per candidate.

use kvgate_index::{EndpointId, EndpointMatch, KvIndex};
use kvgate_keys::BlockKey;

use crate::pick::rendezvous;
use crate::{
    Candidate, Choice, CostWeights, Decision, LoadSnapshot, Score, AFFINITY_PREFIX_TOKENS,
};

/// Work already on an endpoint, in prefill tokens (the cost's load terms).
pub(crate) fn load_tokens(w: &CostWeights, l: &LoadSnapshot) -> f64 {
    w.queued_prefill_token * l.pending_prefill_tokens as f64
        + w.active_request * l.in_flight as f64
        + w.engine_waiting * l.engine_waiting as f64
        + w.kv_usage * l.engine_kv_usage
}

/// One index's matches for a prompt: one lookup per block size, shared by
/// the endpoints of that size.
pub(crate) struct Matches(Vec<(u32, Vec<EndpointMatch>)>);

impl Matches {
    /// No index: nothing matches.
    pub(crate) fn lookup(index: Option<&KvIndex>, keys: &[(u32, Vec<BlockKey>)]) -> Self {
        Self(index.map_or_else(Vec::new, |index| {
            keys.iter().map(|(bs, k)| (*bs, index.lookup(k))).collect()
        }))
    }

    /// What `endpoint` (an id of the looked-up index) holds of the prompt.
    pub(crate) fn of(&self, block_size: u32, endpoint: EndpointId) -> Option<&EndpointMatch> {
        self.0
            .iter()
            .find(|(bs, _)| *bs == block_size)
            .and_then(|(_, ms)| ms.iter().find(|m| m.endpoint == endpoint))
    }
}

/// What a candidate is believed to cache of the prompt.
pub(crate) struct Cached {
    /// Leading blocks cached (tier-weighted for the precise index).
    pub blocks: f64,
    /// Of those, blocks a request routed there moments ago is computing right
    /// now (no KV events yet).
    pub in_flight_blocks: f64,
    /// [`Score::cached_source`] when anything is cached.
    pub source: &'static str,
}

/// Cached blocks as learned from the gateway's own routing decisions.
pub(crate) fn approx_cached(approx: &KvIndex, matches: &Matches, c: &Candidate<'_>) -> Cached {
    Cached {
        blocks: approx
            .endpoint_id(c.name)
            .and_then(|id| matches.of(c.block_size, id))
            .map_or(0.0, |m| f64::from(m.matched_blocks)),
        in_flight_blocks: 0.0,
        source: "approx",
    }
}

/// Scores every eligible candidate and picks the cheapest, with the near-tie
/// rules of [`CostWeights::prefix_affinity_slack`].
pub(crate) fn by_cost(
    choice: &Choice<'_>,
    cached_on: impl Fn(&Candidate<'_>) -> Cached,
) -> Decision {
    let Choice {
        req,
        candidates,
        eligible,
        ctx,
    } = *choice;
    let w = ctx.weights();
    let home = req.session_id.map(|s| rendezvous(s, eligible, candidates));
    let n = ctx.next_turn();
    let mut scores = Vec::with_capacity(eligible.len());
    let mut best: Option<(f64, usize, usize)> = None; // (cost, rotation rank, candidate)
    for (rank, &i) in eligible.iter().enumerate() {
        let c = &candidates[i];
        let Cached {
            blocks: cached_blocks,
            in_flight_blocks,
            source,
        } = cached_on(c);
        // The engine always computes the last prompt token.
        let cached = (cached_blocks * f64::from(c.block_size))
            .min(req.prompt_tokens.saturating_sub(1) as f64);
        // That prefill is queued work here, but it is this prompt's own
        // prefix: joining it adds nothing, while going elsewhere computes
        // the prefix twice. So it does not count as load against us.
        let shared_prefill =
            (in_flight_blocks * f64::from(c.block_size)).min(c.load.pending_prefill_tokens as f64);
        let load = load_tokens(w, &c.load) - w.queued_prefill_token * shared_prefill;
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
