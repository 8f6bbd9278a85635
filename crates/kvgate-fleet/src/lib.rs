//! kvgate's fleet: the endpoints behind every front and the one routing
//! transaction over them. No HTTP serving here.
//!
//! - [`endpoint`]: the one endpoint description (YAML, flags, discovery), validated once;
//! - [`discovery`]: where endpoint sets come from, as a stream of desired sets;
//! - [`dns`]: discovery by a name's A/AAAA records (a headless Service);
//! - [`engine_models`]: each discovered engine's `/v1/models` (its models and LoRA adapters);
//! - [`fleet`]: the registry: endpoints, their event feeds, reconcile;
//! - [`breaker`]: each endpoint's circuit breaker and health-check gate;
//! - [`probes`]: health checks and engine-metrics scrapes ([`engine_metrics`]);
//! - [`route`]: `RoutingInput` -> [`Fleet::route`] -> `Routed { endpoint, decision, guard }`.

pub mod breaker;
pub mod discovery;
pub mod dns;
pub mod endpoint;
pub mod engine_metrics;
pub mod engine_models;
pub mod fleet;
pub mod k8s_config;
pub mod probes;
pub mod route;

pub use breaker::Ejection;
pub use discovery::{Discovery, DiscoveryError, StaticDiscovery};
pub use dns::{DnsDiscovery, DnsDiscoveryConfig};
pub use endpoint::{validate_all, EndpointConfig, EndpointConfigError};
pub use engine_models::{follow_engine_models, ServedModels};
pub use fleet::{Endpoint, EventFeeds, Fleet, IndexOnly, Unfollow};
pub use k8s_config::K8sDiscoveryConfig;
pub use probes::{spawn_probes, ProbeConfig};
pub use route::{RouteQuery, Routed, RoutingInput};

/// Failed requests, or failed health checks, in a row that eject an endpoint
/// (one slow health answer from a busy engine is no outage).
pub const DEFAULT_EJECT_AFTER_FAILURES: u32 = 3;
/// How long an ejected endpoint waits before one probe request may pass.
pub const DEFAULT_EJECT_COOLDOWN_MS: u64 = 5_000;
