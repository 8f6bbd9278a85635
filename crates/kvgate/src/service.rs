//! The index service: index + event ingestion + HTTP API (+ the gRPC
//! locality API on `grpc_listen`), started together.

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
    /// The gRPC locality API's address, when `grpc_listen` is set.
    pub grpc_addr: Option<SocketAddr>,
    /// Holds the sources and their subscriptions: dropping it stops ingestion.
    _fleet: Arc<Fleet>,
    server: JoinHandle<()>,
    grpc: Option<JoinHandle<()>>,
    expiry: JoinHandle<()>,
}

impl Drop for IndexService {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(grpc) = &self.grpc {
            grpc.abort();
        }
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
        let state = ApiState {
            index: index.clone(),
            metrics: metrics.clone(),
            registry: Arc::new(registry),
            tier_weights: DEFAULT_TIER_WEIGHTS,
            tokenizers: Arc::new(load_tokenizers(cfg)?),
        };
        // The gRPC locality API: the same state, so the same answers.
        let (grpc, grpc_addr) = match &cfg.grpc_listen {
            None => (None, None),
            Some(listen) => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding grpc_listen {listen}"))?;
                let grpc_addr = listener.local_addr()?;
                tracing::info!(addr = %grpc_addr, "index gRPC locality API listening");
                let state = state.clone();
                let task = tokio::spawn(async move {
                    let forever = std::future::pending::<()>();
                    if let Err(e) = kvgate_indexer::grpc::serve(state, listener, forever).await {
                        tracing::error!(error = %e, "index gRPC server stopped");
                    }
                });
                (Some(task), Some(grpc_addr))
            }
        };
        let app = router(state);
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
            grpc_addr,
            _fleet: fleet,
            server,
            grpc,
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvgate_indexer::grpc::pb::locality_client::LocalityClient;
    use kvgate_indexer::grpc::pb::locality_query::Prompt;
    use kvgate_indexer::grpc::pb::{LocalityQuery, TokenIds};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    /// `kvgate index` serves the gRPC API on `grpc_listen`, over the same
    /// index as HTTP, with gRPC health; without `grpc_listen`, nothing.
    #[tokio::test]
    async fn grpc_listen_serves_the_locality_api_and_health() {
        let mut cfg = IndexServiceConfig {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        let off = IndexService::start(&cfg).await.unwrap();
        assert_eq!(off.grpc_addr, None);
        cfg.grpc_listen = Some("127.0.0.1:0".into());
        let svc = IndexService::start(&cfg).await.unwrap();
        let addr = svc.grpc_addr.unwrap();
        assert_ne!(addr.port(), 0);
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let reply = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: "kvgate.index.v1.Locality".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let got = LocalityClient::new(channel)
            .locality(LocalityQuery {
                model_id: "m".into(),
                prompt: Some(Prompt::Tokens(TokenIds { ids: vec![1, 2, 3] })),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((got.prompt_tokens, got.pods.len()), (3, 0));
        // HTTP answers the same query the same way.
        let http: serde_json::Value = reqwest::get(format!(
            "http://{}/v1/locality?model=m&tokens=1,2,3",
            svc.addr
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(http["prompt_tokens"], 3);
        assert_eq!(http["endpoints"], serde_json::json!([]));
        // Dropping the service stops the gRPC server.
        drop(svc);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
