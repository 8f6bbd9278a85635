//! The index service: index + event ingestion + HTTP API, started together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kvgate_index::KvIndex;
use kvgate_indexer::api::{router, ApiState, DEFAULT_TIER_WEIGHTS};
use kvgate_indexer::metrics::IndexerMetrics;
use kvgate_indexer::subscriber::IngestManager;
use kvgate_keys::BlockHasher;
use kvgate_tokenize::{ModelTokenizer, TokenizerRegistry};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::config::IndexServiceConfig;

pub struct IndexService {
    pub addr: SocketAddr,
    /// Holds the subscriptions: dropping it stops ingestion.
    _ingest: IngestManager,
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
        let mut ingest = IngestManager::new(index.clone(), metrics.clone());
        for source in &cfg.sources {
            ingest
                .add(source.clone())
                .with_context(|| format!("adding source {:?}", source.name))?;
        }
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
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
            _ingest: ingest,
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
