//! The gateway: its fleet, tokenizers, contracts and metrics, started together.

use std::sync::Arc;
use std::time::Duration;

use kvgate_fleet::{Discovery, Fleet};
use kvgate_index::KvIndex;
use kvgate_indexer::metrics::IndexerMetrics;
use kvgate_indexer::subscriber::IngestManager;
use kvgate_keys::BlockHasher;
use kvgate_tokenize::{Construction, ModelTokenizer, TokenizerRegistry};
use prometheus_client::registry::Registry;

use crate::config::{ConfigError, GatewayConfig};
use crate::metrics::{GatewayMetrics, TokenizerLabels};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("tokenizer for {model:?}: {source}")]
    Tokenizer {
        model: String,
        source: kvgate_tokenize::TokenizeError,
    },
    #[error("random secret: {0}")]
    Entropy(#[from] kvgate_keys::KeyError),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("contracts: {0}")]
    Contracts(#[from] kvgate_auth::SetupError),
    #[error("upstream_tls: {0}")]
    UpstreamTls(#[from] kvgate_tls::TlsError),
    #[error("store_admin token file {0}")]
    StoreAdmin(String),
}

pub struct Gateway {
    pub(crate) cfg: GatewayConfig,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) tokenizers: TokenizerRegistry,
    pub(crate) sentinel: kvgate_auth::Sentinel,
    pub(crate) contract_keys: crate::contract_keys::ContractKeys,
    /// `sentinel_pending_requests{service}`, resolved once (not per request).
    pub(crate) pending_gauge: prometheus_client::metrics::gauge::Gauge,
    pub(crate) http: reqwest::Client,
    /// Tells the KV store of status changes (`store_admin`).
    store_sync: Option<crate::store_sync::StoreSync>,
    pub metrics: GatewayMetrics,
    pub index_metrics: Arc<IndexerMetrics>,
    pub(crate) registry: Registry,
    pub(crate) render_failures: crate::pipeline::RenderFailures,
    /// Set on SIGTERM: `/ready` answers 503 (and the picker's gRPC
    /// readiness NOT_SERVING) while in-flight requests finish.
    draining: std::sync::atomic::AtomicBool,
}

impl Gateway {
    /// Validates `cfg`, builds the gateway, joins the endpoints `discovery`
    /// reports (following its changes), and starts health checks, metrics
    /// scraping and expiry in the background.
    pub async fn start(
        cfg: GatewayConfig,
        discovery: Arc<dyn Discovery>,
    ) -> Result<Arc<Self>, GatewayError> {
        cfg.validate()?;
        let hasher = match &cfg.key_secret {
            Some(s) => BlockHasher::from_secret(s.as_bytes()),
            None => BlockHasher::random()?,
        };
        let index = Arc::new(KvIndex::new(cfg.index.clone(), hasher));
        let index_metrics = Arc::new(IndexerMetrics::default());
        let tokenizers = load_tokenizers(&cfg)?;
        let sentinel = kvgate_auth::Sentinel::new(&cfg.contracts)?;
        sentinel.start_key_refresh().await?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .pool_max_idle_per_host(256)
            // Drop idle connections before the engine does (vLLM's uvicorn
            // closes them after 5 s): a request sent on a connection the
            // server is closing fails with no response and is not retried.
            .pool_idle_timeout(Duration::from_millis(cfg.upstream_idle_timeout_ms))
            .tcp_nodelay(true);
        let http = match &cfg.upstream_tls {
            Some(t) => t.apply(http)?,
            None => http,
        }
        .build()?;
        let metrics = GatewayMetrics::default();
        let pending_gauge = metrics
            .pending_requests
            .get_or_create(&crate::metrics::ServiceLabels {
                service: cfg.service.clone(),
            })
            .clone();
        announce_tokenizers(&tokenizers, &metrics);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        index_metrics.register(&mut registry);
        let feeds = IngestManager::new(index.clone(), index_metrics.clone());
        let fleet = Arc::new(Fleet::new(
            cfg.router.clone(),
            cfg.ejection(),
            index,
            Box::new(feeds),
        ));
        fleet.follow(discovery.as_ref()).await;
        kvgate_fleet::spawn_probes(&fleet, http.clone(), cfg.probes());
        let store_sync = cfg
            .store_admin
            .as_ref()
            .map(|s| {
                crate::store_sync::StoreSync::new(
                    s,
                    http.clone(),
                    metrics.store_sync_errors.clone(),
                )
                .map_err(|e| GatewayError::StoreAdmin(format!("{}: {e}", s.token_file.display())))
            })
            .transpose()?;
        let gw = Arc::new(Self {
            store_sync,
            sentinel,
            contract_keys: Default::default(),
            pending_gauge,
            fleet,
            tokenizers,
            http,
            metrics,
            index_metrics,
            registry,
            render_failures: Default::default(),
            draining: Default::default(),
            cfg,
        });
        if let Some(cp) = crate::control_plane::ControlPlane::from_config(&gw) {
            gw.add_source(Box::new(cp));
        }
        Ok(gw)
    }

    pub fn index(&self) -> &Arc<KvIndex> {
        self.fleet.index()
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &GatewayConfig {
        &self.cfg
    }

    /// Goes not-ready for good (shutting down): load balancers stop sending
    /// while what is in flight finishes.
    pub fn start_drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ready to take requests: not draining and some endpoint available.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.fleet.snapshot().iter().any(|e| e.is_available())
    }

    /// Suspends or reactivates a contract: new requests refused (or
    /// admitted) at once, its salt epoch moved, and the index entries of its
    /// prompts dropped (nothing will look them up again).
    pub fn set_suspended(
        &self,
        contract: &str,
        suspended: bool,
        actor: &str,
    ) -> Result<(kvgate_auth::StatusChange, usize), kvgate_auth::SetupError> {
        let change = self.sentinel.set_suspended(contract, suspended, actor)?;
        let keys = self.contract_keys.take(contract);
        let dropped = self.index().drop_keys(&keys) + self.fleet.scheduler().forget_keys(&keys);
        if let (Some(s), true) = (&self.store_sync, change.changed) {
            s.push(contract, suspended, change.epoch);
        }
        Ok((change, dropped))
    }

    /// Applies a new contracts config (`kvgate_auth::Sentinel::reload`). The
    /// prompts of contracts removed, re-keyed or with a changed status are
    /// never looked up under their old salts again: their index entries go
    /// at once, as on a suspension.
    pub async fn reload_contracts(
        &self,
        cfg: &kvgate_auth::AuthConfig,
        actor: &str,
    ) -> Result<(kvgate_auth::ReloadSummary, usize), kvgate_auth::SetupError> {
        let summary = self.sentinel.reload(cfg, actor).await?;
        let mut dropped = 0;
        for id in summary
            .removed
            .iter()
            .chain(&summary.rekeyed)
            .chain(&summary.status_changed)
        {
            let keys = self.contract_keys.take(id);
            dropped += self.index().drop_keys(&keys) + self.fleet.scheduler().forget_keys(&keys);
            if let (Some(s), Some(c)) = (&self.store_sync, self.sentinel.contracts().get(id)) {
                s.push(id, c.is_suspended(), c.epoch());
            }
        }
        Ok((summary, dropped))
    }

    /// The contract layer (contracts, suspension, the audit log).
    pub fn sentinel(&self) -> &kvgate_auth::Sentinel {
        &self.sentinel
    }
}

/// Says, once at start-up, which tokenizers are rebuilt by their class's
/// rules and which kvgate cannot reproduce (those route by load alone).
fn announce_tokenizers(tokenizers: &TokenizerRegistry, metrics: &GatewayMetrics) {
    for (model, tok) in tokenizers.models() {
        match tok.construction() {
            Construction::AsWritten => {}
            Construction::Rebuilt { class } => tracing::info!(
                model,
                class = class.as_str(),
                "tokenizer rebuilt by its class's rules, as vLLM (transformers) builds it"
            ),
            Construction::Unsupported { class } => {
                tracing::warn!(
                    model,
                    class = class.as_str(),
                    "vLLM builds this tokenizer by the rules of a class kvgate does not reproduce: \
                     this model's requests are routed by load alone"
                );
                metrics
                    .unsupported_tokenizers
                    .get_or_create(&TokenizerLabels {
                        model: model.to_string(),
                        class: class.clone(),
                    })
                    .set(1);
            }
        }
    }
}

/// `[{model, class, built}]` for `/ready`: how each model's tokenizer was built.
pub(crate) fn tokenizer_report(tokenizers: &TokenizerRegistry) -> Vec<serde_json::Value> {
    let mut out: Vec<_> = tokenizers
        .models()
        .map(|(model, tok)| {
            let built = match tok.construction() {
                Construction::AsWritten => "as_written",
                Construction::Rebuilt { .. } => "rebuilt",
                Construction::Unsupported { .. } => "unsupported",
            };
            serde_json::json!({"model": model, "class": tok.construction().class(), "built": built})
        })
        .collect();
    out.sort_by(|a, b| a["model"].as_str().cmp(&b["model"].as_str()));
    out
}

fn load_tokenizers(cfg: &GatewayConfig) -> Result<TokenizerRegistry, GatewayError> {
    let failed = |model: &str| {
        let model = model.to_string();
        move |source| GatewayError::Tokenizer { model, source }
    };
    let mut tokenizers = TokenizerRegistry::default();
    for (model, dir) in &cfg.tokenizers {
        let mut tok = ModelTokenizer::from_dir(std::path::Path::new(dir)).map_err(failed(model))?;
        if let Some(f) = cfg.content_format.get(model) {
            tok.set_content_format(*f);
        }
        tokenizers.insert(model.clone(), Arc::new(tok));
    }
    if cfg.embedded_tokenizer_fallback {
        let tok = ModelTokenizer::embedded_default().map_err(failed("<embedded>"))?;
        tokenizers.set_fallback(Arc::new(tok));
        // A model on the fallback with its own content format gets its own copy.
        for (model, f) in &cfg.content_format {
            if !cfg.tokenizers.contains_key(model) {
                let mut tok = ModelTokenizer::embedded_default().map_err(failed(model))?;
                tok.set_content_format(*f);
                tokenizers.insert(model.clone(), Arc::new(tok));
            }
        }
    }
    Ok(tokenizers)
}
