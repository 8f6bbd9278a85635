//! Sticky by session id (rendezvous hashing), least load without one.

use crate::pick::{least_loaded, rendezvous, unscored};
use crate::{Candidate, Decision, Policy, PolicyContext, RouteRequest, RoutingPolicy};

pub(crate) const POLICY: Policy = Policy::new("session", || Box::new(Session));

struct Session;

impl RoutingPolicy for Session {
    fn route(
        &self,
        req: &RouteRequest<'_>,
        candidates: &[Candidate<'_>],
        eligible: &[usize],
        ctx: &PolicyContext<'_>,
    ) -> Decision {
        match req.session_id {
            Some(s) => unscored(req, rendezvous(s, eligible, candidates), "session"),
            None => unscored(req, least_loaded(eligible, candidates, ctx), "least_load"),
        }
    }
}
