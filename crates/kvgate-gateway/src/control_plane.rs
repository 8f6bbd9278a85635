//! Contract status from an HTTP control plane (`contracts.control_plane`;
//! the JSON it must answer is documented on `kvgate_auth::ControlPlaneConfig`).
//! Each contract is polled; a change of status at the control plane
//! suspends or reactivates it here (with everything a suspension does), so a
//! suspension there takes effect within one poll. Only changes are applied:
//! a contract suspended through the admin API stays suspended until the
//! admin or a later change at the control plane reactivates it. While the
//! control plane is unreachable the last known status stands.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use kvgate_auth::ControlPlaneConfig;
use serde::Deserialize;

use crate::Gateway;

#[derive(Deserialize)]
struct StatusDoc {
    status: String,
}

/// Starts polling when a control plane is configured; stops with the gateway.
pub(crate) fn spawn(gw: &Arc<Gateway>) {
    let Some(cfg) = gw.cfg.contracts.control_plane.clone() else {
        return;
    };
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
    let weak = Arc::downgrade(gw);
    tokio::spawn(poll(weak, cfg, token));
}

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
                        match gw.set_suspended(&id, suspended, "control_plane") {
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
