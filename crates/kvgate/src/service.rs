//! The index service: index + event ingestion + HTTP API, started together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kvgate_fleet::{Ejection, Fleet, StaticDiscovery};
use kvgate_index::KvIndex;
use kvgate_indexer::api::{router, ApiState, DEFAULT_TIER_WEIGHTS};
use kvgate_indexer::metrics::IndexerMetrics;
use kvgate_indexer::subscriber::IngestManager;
use kvgate_keys::BlockHasher;
use kvgate_router::RouterConfig;
use kvgate_tokenize::{ModelTokenizer, TokenizerRegistry};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::config::IndexServiceConfig;

pub struct IndexService {
    pub addr: SocketAddr,
    /// Holds the sources and their subscriptions: dropping it stops ingestion.
    _fleet: Arc<Fleet>,
    server: JoinHandle<()>,
    expiry: JoinHandle<()>,
}

impl Drop for IndexService {
    fn drop(&mut self) {
        self.server.abort();
        self.expiry.abort();
    }
}

impl IndexService {
    pub async fn start(cfg: &IndexServiceConfig) -> Result<Self> {
        let hasher = match &cfg.key_secret {
            Some(s) => BlockHasher::from_secret(s.as_bytes()),
            None => BlockHasher::random().context("generating a block-key secret")?,
        };
        let index = Arc::new(KvIndex::new(cfg.index.clone(), hasher));
        let metrics = Arc::new(IndexerMetrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        // The same registry and reconcile as the gateway's: sources come from
        // a discovery (static here), their event feeds from the indexer.
        let feeds = IngestManager::new(index.clone(), metrics.clone());
        let fleet = Arc::new(Fleet::new(
            RouterConfig::default(),
            Ejection::default(),
            index.clone(),
            Box::new(feeds),
        ));
        let discovery = StaticDiscovery::new(cfg.sources.clone())?;
        fleet.follow(&discovery).await;
        if let Some(missing) = fleet.snapshot().iter().find(|e| e.index_id.is_none()) {
            anyhow::bail!("cannot subscribe to source {:?}", missing.name());
        }
        let listener = kvgate_tls::bind(&cfg.listen, cfg.tls.as_ref()).await?;
        let addr = listener.local_addr();
        let app = router(ApiState {
            index: index.clone(),
            metrics: metrics.clone(),
            registry: Arc::new(registry),
            tier_weights: DEFAULT_TIER_WEIGHTS,
            tokenizers: Arc::new(load_tokenizers(cfg)?),
        });
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "index API server stopped");
            }
        });
        let expiry = {
            let index = index.clone();
            let every = Duration::from_secs(cfg.expire_interval_secs.max(1));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let dropped = index.expire();
                    if dropped > 0 {
                        tracing::debug!(dropped, "expired index entries");
                    }
                }
            })
        };
        tracing::info!(%addr, key_fingerprint = %index.hasher().fingerprint(), sources = cfg.sources.len(), "index service listening");
        Ok(Self {
            addr,
            _fleet: fleet,
            server,
            expiry,
        })
    }
}

/// Tokenizers for text/messages locality queries: one per configured model
/// directory, and the embedded default for everything else unless disabled.
fn load_tokenizers(cfg: &IndexServiceConfig) -> Result<TokenizerRegistry> {
    let mut reg = TokenizerRegistry::default();
    for (model, dir) in &cfg.tokenizers {
        let tok = ModelTokenizer::from_dir(std::path::Path::new(dir))
            .with_context(|| format!("loading the tokenizer of {model:?} from {dir}"))?;
        reg.insert(model.clone(), Arc::new(tok));
    }
    if cfg.embedded_tokenizer_fallback {
        reg.set_fallback(Arc::new(
            ModelTokenizer::embedded_default().context("loading the embedded tokenizer")?,
        ));
    }
    Ok(reg)
}
