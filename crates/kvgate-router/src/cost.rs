//! The cost function of the prefix policies (formula in the crate docs) and
//! its near-tie rules. The policies differ only in where cached tokens come
//! from, which they pass in as [`Cached`] per candidate.

use kvgate_index::{EndpointId, EndpointMatch, KvIndex};
use kvgate_keys::BlockKey;

use crate::pick::rendezvous;
use crate::{Candidate, Choice, CostWeights, Decision, LoadSnapshot, Score};

/// Work already on an endpoint, in prefill tokens (the cost's load terms).
pub(crate) fn load_tokens(w: &CostWeights, l: &LoadSnapshot) -> f64 {
    // The scraped queue is as old as the last scrape and holds the requests
    // this gateway counts itself (fresh) as pending: only the rest (other
    // clients' work) adds to what the gateway knows.
    let others_waiting = l.engine_waiting.saturating_sub(l.pending_requests);
    w.queued_prefill_token * l.pending_prefill_tokens as f64
        + w.active_request * l.in_flight as f64
        + w.engine_waiting * others_waiting as f64
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
    let believed: Vec<(f64, Cached)> = eligible
        .iter()
        .map(|&i| {
            let c = &candidates[i];
            let cached = cached_on(c);
            // The engine always computes the last prompt token.
            let tokens = (cached.blocks * f64::from(c.block_size))
                .min(req.prompt_tokens.saturating_sub(1) as f64);
            (tokens, cached)
        })
        .collect();
    let most_cached_anywhere = believed.iter().map(|(t, _)| *t).fold(0.0, f64::max);
    for (rank, (&i, (cached, believed))) in eligible.iter().zip(&believed).enumerate() {
        let c = &candidates[i];
        let Cached {
            in_flight_blocks,
            source,
            ..
        } = *believed;
        let cached = *cached;
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
        // Computing here what another endpoint caches is work the fleet
        // did not need. Requests waiting here say how busy it is: the
        // busier, the more requests arrive behind this one before the queue
        // empties, each delayed by that work. So it counts once more per
        // request waiting; spilling to an idle endpoint stays cheap.
        let waiting = c.load.pending_requests.max(c.load.engine_waiting) as f64;
        let lost = (most_cached_anywhere - cached)
            * (w.lost_prefix_token + w.lost_prefix_per_waiting_request * waiting);
        let cost = w.prefill_token * (req.prompt_tokens as f64 - cached) + load + lost - bonus;
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
            load_tokens: load + lost,
            cost,
        });
    }
    let mut chosen = best.map_or(eligible[0], |(_, _, i)| i);
    // Near-ties (within the slack) keep prefixes together: the endpoint
    // caching most of the prompt wins; a prefix cached nowhere goes where it
    // starts at once and fewest prefixes live (`cold_pick`).
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
            chosen = cold_pick(&near, chosen, candidates, |i| {
                let approx = ctx.approx;
                approx
                    .endpoint_id(candidates[i].name)
                    .map_or(0, |id| approx.tracked_entries(id))
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
/// Among those that start at once, the one whose routed prefixes take the
/// least room (`footprint`: blocks routed there lately) gets the new one: a
/// prefix brings its group's later requests with it, so spreading prefixes
/// evenly spreads the load that follows them (a hash would not: 44 groups
/// hashed onto 8 engines leave one with twice another's).
fn cold_pick(
    near: &[(usize, &Score)],
    best: usize,
    candidates: &[Candidate<'_>],
    footprint: impl Fn(usize) -> usize,
) -> usize {
    let idle = |i: usize| candidates[i].load.pending_prefill_tokens == 0;
    if near.iter().any(|(i, _)| idle(*i)) {
        return near
            .iter()
            .filter(|(i, _)| idle(*i))
            .min_by(|a, b| {
                footprint(a.0)
                    .cmp(&footprint(b.0))
                    .then(a.1.cost.total_cmp(&b.1.cost))
                    .then((a.0 != best).cmp(&(b.0 != best)))
            })
            .map_or(best, |(i, _)| *i);
    }
    near.iter()
        .map(|(i, _)| *i)
        .min_by_key(|i| (candidates[*i].load.last_routed, *i != best))
        .unwrap_or(best)
}
