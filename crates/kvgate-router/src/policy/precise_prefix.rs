//! The cost function with cached tokens from engine KV events, trusting its
//! own recent routing decisions until their events arrive.

use crate::cost::{self, approx_cached, Cached, Matches};
use crate::{Choice, Decision, Policy, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("precise_prefix", || Box::new(PrecisePrefix));

struct PrecisePrefix;

impl RoutingPolicy for PrecisePrefix {
    fn speculates(&self) -> bool {
        true
    }

    fn route(&self, choice: &Choice<'_>) -> Decision {
        let (req, ctx) = (choice.req, choice.ctx);
        let precise = Matches::lookup(ctx.precise, req.keys);
        let speculative = Matches::lookup(ctx.speculative, req.keys);
        // Endpoints without events fall back to what routing taught.
        let approx = Matches::lookup(Some(ctx.approx), req.keys);
        let tiers = &ctx.weights().tier;
        cost::by_cost(choice, |c| {
            let Some(id) = c.index_id else {
                return approx_cached(ctx.approx, &approx, c);
            };
            let known = precise
                .of(c.block_size, id)
                .map_or(0.0, |m| m.weighted_blocks(tiers));
            let expected = ctx
                .speculative
                .and_then(|s| s.endpoint_id(c.name))
                .and_then(|id| speculative.of(c.block_size, id))
                .map_or(0.0, |m| f64::from(m.matched_blocks));
            if expected > known {
                Cached {
                    blocks: expected,
                    in_flight_blocks: expected - known,
                    source: "speculative",
                }
            } else {
                Cached {
                    blocks: known,
                    in_flight_blocks: 0.0,
                    source: "precise",
                }
            }
        })
    }
}
