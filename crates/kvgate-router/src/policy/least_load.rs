//! The endpoint with the least load (the cost's load terms, no prefix).

use crate::{Choice, Decision, Policy, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("least_load", || Box::new(LeastLoad));

struct LeastLoad;

impl RoutingPolicy for LeastLoad {
    fn route(&self, c: &Choice<'_>) -> Decision {
        c.unscored(c.least_loaded(), "least_load")
    }
}
