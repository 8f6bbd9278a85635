//! Routing policies: one [`RoutingPolicy`] per file, each listed once in
//! [`REGISTRY`], which is where config names, help texts and errors find them.
//!
//! Adding a policy: a file here defining `pub(crate) const POLICY: Policy`,
//! its `mod` line and its line in [`REGISTRY`].

mod approx_prefix;
mod least_load;
mod precise_prefix;
mod random;
mod round_robin;
mod session;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvgate_index::KvIndex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Choice, CostWeights, Decision, RouterConfig};

/// Every policy, in the order help and error texts list them.
const REGISTRY: &[Policy] = &[
    precise_prefix::POLICY,
    approx_prefix::POLICY,
    round_robin::POLICY,
    least_load::POLICY,
    session::POLICY,
    random::POLICY,
];

/// Picks one endpoint for a request among those the scheduler's filters let
/// through. State a policy shares with the others (indexes, the turn
/// counter) lives in the scheduler and comes in through [`PolicyContext`].
pub trait RoutingPolicy: Send + Sync {
    /// Whether it reads the prompt's tokens or block keys; when not, the
    /// gateway skips tokenizing.
    fn uses_prompt_tokens(&self) -> bool {
        true
    }

    /// Whether it trusts its own recent routing decisions for prefixes whose
    /// KV events have not arrived: the scheduler then records each routed
    /// request in the speculative index (when `speculative_ttl_secs` > 0).
    fn speculates(&self) -> bool {
        false
    }

    /// Picks one of `choice.eligible`.
    fn route(&self, choice: &Choice<'_>) -> Decision;
}

/// What the scheduler shares with its policy for one decision.
pub struct PolicyContext<'a> {
    pub config: &'a RouterConfig,
    /// The KV event index (None: not available).
    pub precise: Option<&'a KvIndex>,
    /// Learned from routing decisions, for endpoints without events.
    pub approx: &'a KvIndex,
    /// Requests routed moments ago, events pending; None unless the policy
    /// [speculates](RoutingPolicy::speculates) and the TTL is not 0.
    pub speculative: Option<&'a KvIndex>,
    turns: &'a AtomicUsize,
}

impl<'a> PolicyContext<'a> {
    pub(crate) fn new(
        config: &'a RouterConfig,
        precise: Option<&'a KvIndex>,
        approx: &'a KvIndex,
        speculative: Option<&'a KvIndex>,
        turns: &'a AtomicUsize,
    ) -> Self {
        Self {
            config,
            precise,
            approx,
            speculative,
            turns,
        }
    }

    pub fn weights(&self) -> &'a CostWeights {
        &self.config.weights
    }

    /// The scheduler's turn counter, advanced: round robin's position and the
    /// start from which ties rotate.
    pub fn next_turn(&self) -> usize {
        self.turns.fetch_add(1, Ordering::Relaxed)
    }
}

/// A registered policy, by name: what `router.policy` holds. Parses from
/// (and serializes to) its name; [`Policy::named`] refuses unknown names.
#[derive(Clone, Copy)]
pub struct Policy {
    name: &'static str,
    build: fn() -> Box<dyn RoutingPolicy>,
}

// Named like the enum variants they replace, so configs built in code
// (`Policy::RoundRobin`) read as before. Policies added later need no
// constant here: `Policy::named("...")` finds them.
#[allow(non_upper_case_globals)]
impl Policy {
    pub const PrecisePrefix: Policy = precise_prefix::POLICY;
    pub const ApproxPrefix: Policy = approx_prefix::POLICY;
    pub const RoundRobin: Policy = round_robin::POLICY;
    pub const LeastLoad: Policy = least_load::POLICY;
    pub const Session: Policy = session::POLICY;
    pub const Random: Policy = random::POLICY;
}

impl Policy {
    /// For a policy file's `POLICY`; only [`REGISTRY`] makes it reachable by name.
    pub(crate) const fn new(name: &'static str, build: fn() -> Box<dyn RoutingPolicy>) -> Self {
        Self { name, build }
    }

    /// The registered policy of that name.
    pub fn named(name: &str) -> Result<Self, UnknownPolicy> {
        REGISTRY
            .iter()
            .find(|p| p.name == name)
            .copied()
            .ok_or_else(|| UnknownPolicy(name.to_string()))
    }

    /// Every registered policy.
    pub fn all() -> impl Iterator<Item = Policy> + Clone {
        REGISTRY.iter().copied()
    }

    pub fn name(self) -> &'static str {
        self.name
    }

    /// See [`RoutingPolicy::uses_prompt_tokens`]. Asks a fresh instance: the
    /// policies are unit structs, whose boxes do not allocate.
    pub fn uses_prompt_tokens(self) -> bool {
        self.build().uses_prompt_tokens()
    }

    /// A fresh instance, as a scheduler holds one.
    pub fn build(self) -> Box<dyn RoutingPolicy> {
        (self.build)()
    }
}

/// The names of every registered policy, for help and error texts.
pub fn policy_names() -> impl Iterator<Item = &'static str> + Clone {
    Policy::all().map(Policy::name)
}

fn names_list() -> String {
    policy_names().collect::<Vec<_>>().join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown routing policy {0:?} (known: {known})", known = names_list())]
pub struct UnknownPolicy(pub String);

impl Default for Policy {
    fn default() -> Self {
        Policy::PrecisePrefix
    }
}

// Names are unique in the registry (tested), so they identify a policy.
impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Policy {}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Policy").field(&self.name).finish()
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::named(s)
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Policy::named(&name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn the_registry_lists_every_policy_once() {
        let names: Vec<&str> = policy_names().collect();
        assert_eq!(
            names,
            [
                "precise_prefix",
                "approx_prefix",
                "round_robin",
                "least_load",
                "session",
                "random"
            ]
        );
        for p in [
            Policy::PrecisePrefix,
            Policy::ApproxPrefix,
            Policy::RoundRobin,
            Policy::LeastLoad,
            Policy::Session,
            Policy::Random,
        ] {
            assert_eq!(Policy::named(p.name()), Ok(p));
        }
        assert_eq!(Policy::default(), Policy::PrecisePrefix);
    }

    #[test]
    fn every_name_round_trips_through_the_config() {
        for name in policy_names() {
            let yaml = format!("policy: {name}\n");
            let cfg: RouterConfig = serde_yaml::from_str(&yaml).unwrap();
            assert_eq!(cfg.policy.name(), name);
            assert_eq!(cfg.policy.to_string(), name);
            assert_eq!(name.parse::<Policy>(), Ok(cfg.policy));
            let out = serde_yaml::to_string(&cfg).unwrap();
            assert!(out.contains(&yaml), "{out}");
            assert_eq!(serde_yaml::from_str::<RouterConfig>(&out).unwrap(), cfg);
        }
        let cfg: RouterConfig = serde_yaml::from_str("approx_ttl_secs: 1\n").unwrap();
        assert_eq!(cfg.policy, Policy::PrecisePrefix);
    }

    #[test]
    fn an_unknown_name_is_refused_with_the_known_ones() {
        let err = serde_yaml::from_str::<RouterConfig>("policy: fastest\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown routing policy \"fastest\""), "{err}");
        let err = Policy::named("fastest").unwrap_err().to_string();
        for name in policy_names() {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn only_the_baselines_route_without_tokens_and_only_precise_speculates() {
        let tokenless: Vec<&str> = Policy::all()
            .filter(|p| !p.uses_prompt_tokens())
            .map(Policy::name)
            .collect();
        assert_eq!(tokenless, ["round_robin", "random"]);
        let speculating: Vec<&str> = Policy::all()
            .filter(|p| p.build().speculates())
            .map(Policy::name)
            .collect();
        assert_eq!(speculating, ["precise_prefix"]);
    }
}
