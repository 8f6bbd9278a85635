//! The cost function with cached tokens learned from routing decisions only,
//! for fleets whose engines publish no KV events.

use crate::cost::{self, approx_cached, Matches};
use crate::{Candidate, Decision, Policy, PolicyContext, RouteRequest, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("approx_prefix", || Box::new(ApproxPrefix));

struct ApproxPrefix;

impl RoutingPolicy for ApproxPrefix {
    fn route(
        &self,
        req: &RouteRequest<'_>,
        candidates: &[Candidate<'_>],
        eligible: &[usize],
        ctx: &PolicyContext<'_>,
    ) -> Decision {
        let approx = Matches::lookup(Some(ctx.approx), req.keys);
        cost::by_cost(req, candidates, eligible, ctx, |c| {
            approx_cached(ctx.approx, &approx, c)
        })
    }
}
