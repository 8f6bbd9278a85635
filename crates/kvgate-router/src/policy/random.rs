//! A uniformly random eligible endpoint.

use crate::{Choice, Decision, Policy, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("random", || Box::new(Random));

struct Random;

impl RoutingPolicy for Random {
    fn uses_prompt_tokens(&self) -> bool {
        false
    }

    fn route(&self, c: &Choice<'_>) -> Decision {
        c.unscored(
            c.eligible[rand::random_range(0..c.eligible.len())],
            "random",
        )
    }
}
