//! The cost function with cached tokens learned from routing decisions only,
//! for fleets whose engines publish no KV events.

use crate::cost::{self, approx_cached, Matches};
use crate::{Choice, Decision, Policy, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("approx_prefix", || Box::new(ApproxPrefix));

struct ApproxPrefix;

impl RoutingPolicy for ApproxPrefix {
    fn route(&self, choice: &Choice<'_>) -> Decision {
        let (req, ctx) = (choice.req, choice.ctx);
        let approx = Matches::lookup(Some(ctx.approx), req.keys);
        cost::by_cost(choice, |c| approx_cached(ctx.approx, &approx, c))
    }
}
