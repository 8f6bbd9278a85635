//! A uniformly random eligible endpoint.

use crate::pick::unscored;
use crate::{Candidate, Decision, Policy, PolicyContext, RouteRequest, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("random", || Box::new(Random));

struct Random;

impl RoutingPolicy for Random {
    fn uses_prompt_tokens(&self) -> bool {
        false
    }

    fn route(
        &self,
        req: &RouteRequest<'_>,
        _candidates: &[Candidate<'_>],
        eligible: &[usize],
        _ctx: &PolicyContext<'_>,
    ) -> Decision {
        unscored(
            req,
            eligible[rand::random_range(0..eligible.len())],
            "random",
        )
    }
}
