//! Active health checks and engine-metrics scrapes for every endpoint, and
//! the approximate indexes' expiry, until the fleet is dropped.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::engine_metrics::parse_engine_load;
use crate::fleet::{Endpoint, Fleet};

/// How often each endpoint's `/health` is checked (and expiry runs).
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 2_000;
/// How often each endpoint's `/metrics` is scraped for its queue and KV use.
pub const DEFAULT_METRICS_INTERVAL_MS: u64 = 1_000;
/// A health check or scrape slower than this counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Probing faster than this would load the engines for nothing.
const MIN_INTERVAL_MS: u64 = 50;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeConfig {
    pub health_interval_ms: u64,
    pub metrics_interval_ms: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            metrics_interval_ms: DEFAULT_METRICS_INTERVAL_MS,
        }
    }
}

/// Starts probing in the background; the task ends when the fleet is dropped.
pub fn spawn_probes(
    fleet: &Arc<Fleet>,
    http: reqwest::Client,
    cfg: ProbeConfig,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(probe_loop(Arc::downgrade(fleet), http, cfg))
}

async fn probe_loop(fleet: Weak<Fleet>, http: reqwest::Client, cfg: ProbeConfig) {
    let every = |ms: u64| {
        let mut t = tokio::time::interval(Duration::from_millis(ms.max(MIN_INTERVAL_MS)));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut health = every(cfg.health_interval_ms);
    let mut scrape = every(cfg.metrics_interval_ms);
    loop {
        tokio::select! {
            _ = health.tick() => {
                let Some(fleet) = fleet.upgrade() else { return };
                fleet.scheduler.expire();
                probe_all(&fleet, &http, "/health", |e, resp| async move {
                    e.record_check(resp.is_ok_and(|r| r.status().is_success()));
                })
                .await;
            }
            _ = scrape.tick() => {
                let Some(fleet) = fleet.upgrade() else { return };
                probe_all(&fleet, &http, "/metrics", |e, resp| async move {
                    if let Ok(text) = match resp { Ok(r) => r.text().await, Err(e) => Err(e) } {
                        let l = parse_engine_load(&text);
                        e.load.set_engine(l.waiting as u64, l.running as u64, l.kv_usage);
                    }
                })
                .await;
            }
        }
    }
}

/// GETs `path` on every endpoint at once and hands each answer to `then`.
async fn probe_all<F, Fut>(fleet: &Fleet, http: &reqwest::Client, path: &str, then: F)
where
    F: Fn(Arc<Endpoint>, reqwest::Result<reqwest::Response>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let endpoints = fleet.snapshot();
    let probes = endpoints.iter().map(|e| {
        let req = http
            .get(format!("{}{path}", e.cfg.url))
            .timeout(PROBE_TIMEOUT)
            .send();
        let e = e.clone();
        let then = &then;
        async move { then(e, req.await).await }
    });
    futures_util::future::join_all(probes).await;
}
