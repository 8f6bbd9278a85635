//! Pushes every contract status change to the KV chunk store
//! (`store_admin`), so the store maps the same salts as the gateway (it takes
//! the gateway's epoch) and shreds a suspended contract's chunks at once.
//! Each push is retried with backoff; one that still fails is logged and
//! counted (`kvgate_store_sync_errors_total`). Until a later push lands the
//! store keeps the old epoch: it refuses the contract's new salt (misses,
//! never a hit across contracts) and, after a failed suspension push, still
//! holds the old chunks, which is why failures are loud.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use crate::config::StoreAdminConfig;

/// Tries per push, and the wait before the first retry (doubling).
const TRIES: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) struct StoreSync {
    base: String,
    token: String,
    http: reqwest::Client,
    errors: Counter,
}

impl StoreSync {
    pub(crate) fn new(
        cfg: &StoreAdminConfig,
        http: reqwest::Client,
        errors: Counter,
    ) -> std::io::Result<Self> {
        let token = std::fs::read_to_string(&cfg.token_file)?.trim().to_string();
        Ok(Self {
            base: cfg.url.trim_end_matches('/').to_string(),
            token,
            http,
            errors,
        })
    }

    /// Sends `{suspended, epoch}` for `contract` in the background.
    pub(crate) fn push(&self, contract: &str, suspended: bool, epoch: u64) {
        let url = format!("{}/kvgate/store/v1/contracts/{contract}/status", self.base);
        let (http, token, errors) = (self.http.clone(), self.token.clone(), self.errors.clone());
        let contract = contract.to_string();
        tokio::spawn(async move {
            let body = serde_json::json!({"suspended": suspended, "epoch": epoch});
            let mut wait = FIRST_BACKOFF;
            for attempt in 1..=TRIES {
                let sent = http.post(&url).bearer_auth(&token).json(&body).send().await;
                let error = match sent {
                    Ok(r) if r.status().is_success() => {
                        tracing::info!(
                            contract,
                            suspended,
                            epoch,
                            "contract status pushed to the KV store"
                        );
                        return;
                    }
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => e.to_string(),
                };
                if attempt == TRIES {
                    errors.inc();
                    tracing::error!(
                        contract,
                        suspended,
                        epoch,
                        error,
                        "KV store not told of a contract status change"
                    );
                    return;
                }
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        });
    }
}
