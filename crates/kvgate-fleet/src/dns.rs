//! DNS discovery: the engines are the A/AAAA records of one name (a
//! Kubernetes headless Service: one record per Ready pod), re-resolved every
//! `refresh_ms`. Each address becomes an endpoint with the configured port,
//! models and block size, its KV-event and replay endpoints on the same
//! address (vLLM publishes on the pod's IP). A lookup that fails keeps the
//! last set (a DNS blip is no outage); a record that disappears removes its
//! endpoint, which closes its event subscription. With `models_from_engine`
//! (the default) each address's `/v1/models` says what it serves
//! ([`crate::engine_models`]).

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::discovery::{Discovery, DiscoveryError};
use crate::endpoint::{EndpointConfig, EndpointConfigError};
use crate::engine_models::{
    default_models_from_engine, default_models_refresh_ms, follow_engine_models, validate_template,
};

/// How often the name is resolved again by default.
pub const DEFAULT_DNS_REFRESH_MS: u64 = 5_000;

/// `dns:` in the gateway's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsDiscoveryConfig {
    /// e.g. `vllm.inference.svc.cluster.local` (a headless Service).
    pub name: String,
    /// The engines' HTTP port.
    pub port: u16,
    /// What every address serves; with `models_from_engine`, only for
    /// engines whose `/v1/models` has not answered yet (empty: such an
    /// engine is left out until it answers).
    #[serde(default)]
    pub models: Vec<String>,
    /// Ask each engine's `GET /v1/models` for its models and LoRA adapters.
    #[serde(default = "default_models_from_engine")]
    pub models_from_engine: bool,
    /// How often `/v1/models` is asked again (adapters load at runtime).
    #[serde(default = "default_models_refresh_ms")]
    pub models_refresh_ms: u64,
    pub block_size: u32,
    /// vLLM's KV-event PUB port on each address (unset: no events).
    #[serde(default)]
    pub events_port: Option<u16>,
    #[serde(default)]
    pub replay_port: Option<u16>,
    #[serde(default)]
    pub topic: String,
    #[serde(default = "default_refresh_ms")]
    pub refresh_ms: u64,
}

fn default_refresh_ms() -> u64 {
    DEFAULT_DNS_REFRESH_MS
}

impl DnsDiscoveryConfig {
    /// The endpoint at `ip`.
    pub fn endpoint(&self, ip: IpAddr) -> EndpointConfig {
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        EndpointConfig {
            url: format!("http://{host}:{}", self.port),
            models: self.models.clone(),
            adapters: Vec::new(),
            block_size: self.block_size,
            events: self.events_port.map(|p| format!("tcp://{host}:{p}")),
            replay: self.replay_port.map(|p| format!("tcp://{host}:{p}")),
            topic: self.topic.clone(),
            bind: false,
        }
    }

    /// Checks the endpoint an address would make (models, block size).
    pub fn validate(&self) -> Result<(), EndpointConfigError> {
        validate_template(
            &self.endpoint(IpAddr::from([127, 0, 0, 1])),
            self.models_from_engine,
        )
    }
}

/// Resolves a name to its addresses (the system resolver, or a test's).
pub type Resolve = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver (getaddrinfo, as `tokio::net::lookup_host`).
pub fn system_resolver() -> Resolve {
    Arc::new(|name: String| {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((name.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    })
}

/// Resolves in the background for as long as someone watches the set (the
/// fleet it was given to), whether or not this value is kept.
pub struct DnsDiscovery {
    tx: watch::Sender<Vec<EndpointConfig>>,
    /// The task's sign that this value still lives.
    _alive: Arc<()>,
}

impl DnsDiscovery {
    /// Resolves once now (so the first set is known at start, its engines
    /// asked for their models), then keeps resolving in the background.
    pub async fn start(cfg: DnsDiscoveryConfig, resolve: Resolve) -> Result<Self, DiscoveryError> {
        cfg.validate()?;
        let first = match resolve(cfg.name.clone()).await {
            Ok(ips) => endpoints(&cfg, ips),
            Err(e) => {
                tracing::warn!(name = %cfg.name, error = %e, "dns discovery: no answer yet");
                Vec::new()
            }
        };
        let raw = watch::Sender::new(first);
        let sender = raw.clone();
        let alive = Arc::new(());
        let owner = Arc::downgrade(&alive);
        let tx = if cfg.models_from_engine {
            let name_of = Arc::new(|e: &EndpointConfig| e.url.clone());
            follow_engine_models(
                raw.subscribe(),
                cfg.models_refresh_ms,
                name_of,
                owner.clone(),
            )
            .await?
        } else {
            raw
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(cfg.refresh_ms.max(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if owner.strong_count() == 0 && sender.is_closed() {
                    return;
                }
                match resolve(cfg.name.clone()).await {
                    Ok(ips) => {
                        let next = endpoints(&cfg, ips);
                        sender.send_if_modified(|current| {
                            let changed = *current != next;
                            if changed {
                                tracing::info!(name = %cfg.name, endpoints = next.len(), "dns discovery: endpoints changed");
                                *current = next;
                            }
                            changed
                        });
                    }
                    // The last set stays: a failed lookup is no proof the pods left.
                    Err(e) => {
                        tracing::warn!(name = %cfg.name, error = %e, "dns discovery: lookup failed")
                    }
                }
            }
        });
        Ok(Self { tx, _alive: alive })
    }
}

impl Discovery for DnsDiscovery {
    fn watch(&self) -> watch::Receiver<Vec<EndpointConfig>> {
        self.tx.subscribe()
    }
}

/// One endpoint per distinct address, in a stable order.
fn endpoints(cfg: &DnsDiscoveryConfig, ips: Vec<IpAddr>) -> Vec<EndpointConfig> {
    let unique: BTreeSet<IpAddr> = ips.into_iter().collect();
    unique.into_iter().map(|ip| cfg.endpoint(ip)).collect()
}
