//! Sticky by session id (rendezvous hashing), least load without one.

use crate::{Choice, Decision, Policy, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("session", || Box::new(Session));

struct Session;

impl RoutingPolicy for Session {
    fn route(&self, c: &Choice<'_>) -> Decision {
        match c.req.session_id {
            Some(s) => c.unscored(c.rendezvous(s), "session"),
            None => c.unscored(c.least_loaded(), "least_load"),
        }
    }
}
