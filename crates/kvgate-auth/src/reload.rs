//! A new contracts config applied to a running `Sentinel`: credentials (API
//! keys, client certificates, JWT settings) are swapped whole, contracts are
//! reconciled by id (`ContractRegistry::reload`). New requests see the new
//! config; requests in flight keep the contract they were admitted under.
//! A config that fails to load, or that changes a setting only a restart
//! applies (the audit log, isolation, ...), is refused as a whole and the
//! running one stays.

use std::sync::Arc;

use crate::audit::{kind, AuditConfig, AuditRecord};
use crate::config::{AuthConfig, FieldPolicy, InFlightPolicy, Isolation};
use crate::principal::Authenticator;
use crate::{ReloadSummary, Sentinel, SetupError};

/// The settings a reload may not change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RestartOnly {
    isolation: Isolation,
    privileged_fields: FieldPolicy,
    lmcache_tag: bool,
    on_suspend: InFlightPolicy,
    pod_contract: Option<String>,
    state_file: Option<std::path::PathBuf>,
    audit: AuditConfig,
}

impl RestartOnly {
    pub(crate) fn of(cfg: &AuthConfig) -> Self {
        Self {
            isolation: cfg.isolation,
            privileged_fields: cfg.privileged_fields,
            lmcache_tag: cfg.lmcache_tag,
            on_suspend: cfg.on_suspend,
            pod_contract: cfg.pod_contract.clone(),
            state_file: cfg.state_file.clone(),
            audit: cfg.audit.clone(),
        }
    }

    /// The first setting that differs, by its config name.
    fn changed(&self, new: &Self) -> Option<&'static str> {
        [
            ("isolation", self.isolation != new.isolation),
            (
                "privileged_fields",
                self.privileged_fields != new.privileged_fields,
            ),
            ("lmcache_tag", self.lmcache_tag != new.lmcache_tag),
            ("on_suspend", self.on_suspend != new.on_suspend),
            ("pod_contract", self.pod_contract != new.pod_contract),
            ("state_file", self.state_file != new.state_file),
            ("audit", self.audit != new.audit),
        ]
        .into_iter()
        .find_map(|(name, differs)| differs.then_some(name))
    }
}

/// The credentials of `cfg`, each naming a contract `cfg` defines.
pub(crate) fn authenticator(cfg: &AuthConfig) -> Result<Authenticator, SetupError> {
    if let Some(k) = cfg
        .api_keys
        .iter()
        .chain(&cfg.client_certs)
        .find(|k| !cfg.contracts.iter().any(|c| c.id == k.contract))
    {
        return Err(SetupError::ApiKeyContract(k.contract.clone()));
    }
    Authenticator::new(&cfg.api_keys, cfg.jwt.as_ref())?.with_client_certs(&cfg.client_certs)
}

impl Sentinel {
    /// Applies a new contracts config (see the module docs) from `actor`
    /// (its source); audited as a `config_reload` record naming the
    /// contracts it touched.
    pub async fn reload(&self, cfg: &AuthConfig, actor: &str) -> Result<ReloadSummary, SetupError> {
        let result = self.try_reload(cfg).await;
        let rec = AuditRecord::new(kind::CONFIG_RELOAD).subject(actor);
        self.audit.record(match &result {
            Ok(summary) => rec
                .status(200)
                .detail(serde_json::to_value(summary).unwrap_or_default()),
            Err(e) => rec.status(400).reason(e.to_string()),
        });
        result
    }

    async fn try_reload(&self, cfg: &AuthConfig) -> Result<ReloadSummary, SetupError> {
        if let Some(name) = self.restart_only.changed(&RestartOnly::of(cfg)) {
            return Err(SetupError::NeedsRestart(name));
        }
        let auth = Arc::new(authenticator(cfg)?);
        auth.start_key_refresh().await?;
        let summary = self.contracts.reload(cfg)?;
        *self.auth.write() = auth;
        Ok(summary)
    }
}
