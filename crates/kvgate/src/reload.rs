//! Config reload on change for `kvgate gateway`, `kvgate sentinel` and `kvgate epp`: the
//! config file is checked every [`RELOAD_CHECK`] and, when it changed, loaded
//! again exactly as at start (file, env, flags, validation). Its `contracts`
//! section takes effect at once (credentials, contracts, statuses: see
//! `kvgate_auth::Sentinel::reload`), and so do the router's policy and weights
//! (`kvgate_router::Scheduler::set_routing`: requests being routed finish on
//! the old ones); other changed settings are logged as needing a restart. A config that fails to load or validate is refused with
//! an error log line and the running one stays.

use std::path::PathBuf;
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use kvgate_gateway::{ContractSource, Gateway, GatewayConfig, SourceTask};

/// How often the config file is checked for change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The config file and how to load it again.
pub struct ConfigReload {
    pub path: PathBuf,
    pub load: Box<dyn Fn() -> Result<GatewayConfig> + Send + Sync>,
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The config file as a contract source: watched until the gateway is
/// dropped.
pub struct ConfigFile {
    /// The config in effect (its `contracts` as last applied).
    pub running: GatewayConfig,
    pub reload: ConfigReload,
}

/// The audit subject of the config file's changes.
const SOURCE: &str = "config_file";

impl ContractSource for ConfigFile {
    fn name(&self) -> &'static str {
        SOURCE
    }

    fn run(self: Box<Self>, gw: Weak<Gateway>) -> SourceTask {
        Box::pin(watch(gw, self.running, self.reload))
    }
}

async fn watch(gw: Weak<Gateway>, mut running: GatewayConfig, reload: ConfigReload) {
    let mut seen = stamp(&reload.path);
    let mut tick = tokio::time::interval(RELOAD_CHECK);
    loop {
        tick.tick().await;
        let now = stamp(&reload.path);
        if now == seen {
            continue;
        }
        seen = now;
        let Some(gw) = gw.upgrade() else { return };
        let next = match (reload.load)() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(path = %reload.path.display(), error = format!("{e:#}"),
                    "config changed but does not load; the running config stays");
                continue;
            }
        };
        // What reloads: `contracts` (below) and the router's policy and weights.
        let restart_only = |c: &GatewayConfig| GatewayConfig {
            contracts: Default::default(),
            router: Default::default(),
            ..c.clone()
        };
        if restart_only(&next) != restart_only(&running) {
            tracing::warn!(path = %reload.path.display(),
                "config changed outside `contracts` and `router`: those settings take effect at a restart");
        }
        if next.router != running.router {
            match gw.fleet().scheduler().set_routing(next.router.clone()) {
                Ok(()) => {
                    tracing::info!(policy = %next.router.policy, "router policy and weights reloaded");
                    running.router = next.router.clone();
                }
                Err(e) => tracing::warn!(path = %reload.path.display(), error = %e,
                    "router settings refused; the running ones stay"),
            }
        }
        match gw.reload_contracts(&next.contracts, SOURCE).await {
            Ok((summary, dropped)) => {
                tracing::info!(added = ?summary.added, removed = ?summary.removed,
                    updated = ?summary.updated, rekeyed = ?summary.rekeyed,
                    status_changed = ?summary.status_changed, index_entries_dropped = dropped,
                    "contracts reloaded");
                running.contracts = next.contracts;
            }
            Err(e) => tracing::error!(path = %reload.path.display(), error = %e,
                "new contracts refused; the running ones stay"),
        }
    }
}
