//! Each eligible endpoint in turn; looks at nothing but the turn counter.

use crate::pick::unscored;
use crate::{Candidate, Decision, Policy, PolicyContext, RouteRequest, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("round_robin", || Box::new(RoundRobin));

struct RoundRobin;

impl RoutingPolicy for RoundRobin {
    fn uses_prompt_tokens(&self) -> bool {
        false
    }

    fn route(
        &self,
        req: &RouteRequest<'_>,
        _candidates: &[Candidate<'_>],
        eligible: &[usize],
        ctx: &PolicyContext<'_>,
    ) -> Decision {
        let n = ctx.next_turn();
        unscored(req, eligible[n % eligible.len()], "round_robin")
    }
}
