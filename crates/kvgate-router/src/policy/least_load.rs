//! The endpoint with the least load (the cost's load terms, no prefix).

use crate::pick::{least_loaded, unscored};
use crate::{Candidate, Decision, Policy, PolicyContext, RouteRequest, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("least_load", || Box::new(LeastLoad));

struct LeastLoad;

impl RoutingPolicy for LeastLoad {
    fn route(
        &self,
        req: &RouteRequest<'_>,
        candidates: &[Candidate<'_>],
        eligible: &[usize],
        ctx: &PolicyContext<'_>,
    ) -> Decision {
        unscored(req, least_loaded(eligible, candidates, ctx), "least_load")
    }
}
