//! Each eligible endpoint in turn; looks at nothing but the turn counter.

use crate::{Choice, Decision, Policy, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("round_robin", || Box::new(RoundRobin));

struct RoundRobin;

impl RoutingPolicy for RoundRobin {
    fn uses_prompt_tokens(&self) -> bool {
        false
    }

    fn route(&self, c: &Choice<'_>) -> Decision {
        let n = c.ctx.next_turn();
        c.unscored(c.eligible[n % c.eligible.len()], "round_robin")
    }
}
