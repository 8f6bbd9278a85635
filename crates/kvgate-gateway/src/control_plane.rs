//! Contract status from an HTTP control plane (`contracts.control_plane`;
//! the JSON it must answer is documented on `kvgate_auth::ControlPlaneConfig`).
//! Each contract is polled; a change of status at the control plane
//! suspends or reactivates it here (with everything a suspension does), so a
//! suspension there takes effect within one poll. Only changes are applied:
//! a contract suspended through the admin API stays suspended until the
//! admin or a later change at the control plane reactivates it. While the
//! control plane is unreachable the last known status stands.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use kvgate_auth::ControlPlaneConfig;
use serde::Deserialize;

use crate::{ContractSource, Gateway, SourceTask};

#[derive(Deserialize)]
struct StatusDoc {
    status: String,
}

/// The control plane's poller, when one is configured.
pub(crate) struct ControlPlane {
    cfg: ControlPlaneConfig,
    token: Option<String>,
}

impl ControlPlane {
    pub(crate) fn from_config(gw: &Gateway) -> Option<Self> {
        let cfg = gw.cfg.contracts.control_plane.clone()?;
        let token = match &cfg.token_file {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "control plane token not readable; polling without it");
                    None
                }
            },
            None => None,
        };
        Some(Self { cfg, token })
    }
}

impl ContractSource for ControlPlane {
    fn name(&self) -> &'static str {
        SOURCE
    }

    fn run(self: Box<Self>, gw: Weak<Gateway>) -> SourceTask {
        Box::pin(poll(gw, self.cfg, self.token))
    }
}

/// The audit subject of the control plane's changes.
const SOURCE: &str = "control_plane";

async fn poll(gw: Weak<Gateway>, cfg: ControlPlaneConfig, token: Option<String>) {
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.poll_ms.max(50)));
    let mut known: HashMap<String, bool> = HashMap::new();
    let mut reachable = true;
    loop {
        tick.tick().await;
        let Some(gw) = gw.upgrade() else { return };
        let ids: Vec<String> = gw
            .sentinel
            .contracts()
            .all()
            .iter()
            .map(|c| c.id().to_string())
            .collect();
        for id in ids {
            match fetch(&gw.http, &cfg.url, &id, token.as_deref()).await {
                Ok(status) => {
                    if !reachable {
                        tracing::info!(url = %cfg.url, "control plane reachable again");
                        reachable = true;
                    }
                    let suspended = status != "active";
                    if known.insert(id.clone(), suspended) != Some(suspended) {
                        match gw.set_suspended(&id, suspended, SOURCE) {
                            Ok((change, dropped)) if change.changed => tracing::info!(
                                contract = %id, status = %status, index_entries_dropped = dropped,
                                "contract status changed at the control plane"
                            ),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::error!(contract = %id, error = %e, "applying control plane status")
                            }
                        }
                    }
                }
                Err(e) => {
                    gw.metrics.control_plane_errors.inc();
                    if reachable {
                        tracing::warn!(url = %cfg.url, error = %e, "control plane unreachable; keeping the last known statuses");
                        reachable = false;
                    }
                }
            }
        }
    }
}

async fn fetch(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    token: Option<&str>,
) -> Result<String, String> {
    let mut url = reqwest::Url::parse(base).map_err(|e| e.to_string())?;
    url.path_segments_mut()
        .map_err(|_| "control plane url cannot take a path".to_string())?
        .pop_if_empty()
        .push("contracts")
        .push(id);
    let mut req = http.get(url).timeout(Duration::from_secs(2));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let doc: StatusDoc = resp.json().await.map_err(|e| e.to_string())?;
    Ok(doc.status)
}
