//! Ways of picking among eligible endpoints that several policies share.

use std::hash::{Hash, Hasher};

use crate::cost::load_tokens;
use crate::{Candidate, Decision, PolicyContext, RouteRequest};

/// One decision's inputs, as the scheduler hands them to its policy.
#[derive(Clone, Copy)]
pub struct Choice<'a> {
    pub req: &'a RouteRequest<'a>,
    pub candidates: &'a [Candidate<'a>],
    /// Never empty; indexes `candidates`, as does [`Decision::chosen`].
    pub eligible: &'a [usize],
    pub ctx: &'a PolicyContext<'a>,
}

impl Choice<'_> {
    /// A decision that scored nothing: `chosen` for `reason`.
    pub fn unscored(&self, chosen: usize, reason: &'static str) -> Decision {
        unscored(self.req, chosen, reason)
    }

    /// The eligible endpoint with the least load.
    pub fn least_loaded(&self) -> usize {
        least_loaded(self.eligible, self.candidates, self.ctx)
    }

    /// The eligible endpoint `key` hashes to (stable while it stays eligible).
    pub fn rendezvous<K: Hash + ?Sized>(&self, key: &K) -> usize {
        rendezvous(key, self.eligible, self.candidates)
    }
}

/// A decision of a policy that does not score: nothing known cached.
pub(crate) fn unscored(req: &RouteRequest<'_>, chosen: usize, reason: &'static str) -> Decision {
    Decision {
        chosen,
        reason,
        scores: Vec::new(),
        expected_uncached_tokens: req.prompt_tokens as u64,
        expected_cached_tokens: 0,
    }
}

/// The eligible endpoint with the least load (the cost's load terms).
pub(crate) fn least_loaded(
    eligible: &[usize],
    candidates: &[Candidate<'_>],
    ctx: &PolicyContext<'_>,
) -> usize {
    let w = ctx.weights();
    let n = ctx.next_turn();
    // Ties rotate, so an idle fleet is not all sent to the first endpoint.
    let rotated = eligible
        .iter()
        .cycle()
        .skip(n % eligible.len())
        .take(eligible.len());
    rotated
        .min_by(|a, b| {
            load_tokens(w, &candidates[**a].load).total_cmp(&load_tokens(w, &candidates[**b].load))
        })
        .copied()
        .unwrap_or(eligible[0])
}

/// Highest-random-weight hashing: a session keeps its endpoint while it stays
/// eligible, and only sessions of a removed endpoint move.
pub(crate) fn rendezvous<K: Hash + ?Sized>(
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
