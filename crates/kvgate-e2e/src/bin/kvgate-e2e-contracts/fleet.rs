//! A sim fleet behind an in-process gateway with contracts, as the checks
//! need it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use kvgate_auth::{AuthConfig, KeyRef};
use kvgate_gateway::{EndpointConfig, Gateway, GatewayConfig, StaticDiscovery};
use kvgate_sim::engine::EngineConfig;
use kvgate_sim::fleet::{start_fleet, RunningSim, SimConfig, DEFAULT_MODEL};
use kvgate_tokenize::ModelTokenizer;

pub const ADMIN_TOKEN: &str = "e2e-contracts admin token";

pub struct Running {
    pub sims: Vec<RunningSim>,
    pub gw: Arc<Gateway>,
    pub url: String,
    pub http: reqwest::Client,
}

/// `n` sims (engine shape `engine`) behind a gateway whose contracts are
/// `keys` (api key, contract) with `edit` applied, auditing to `audit`.
pub async fn start(
    n: usize,
    engine: EngineConfig,
    keys: &[(&str, &str)],
    work: &Path,
    audit: &str,
    edit: impl FnOnce(&mut AuthConfig),
) -> Result<Running> {
    let tokenizer = Arc::new(ModelTokenizer::embedded_default()?);
    let block_size = engine.block_size as u32;
    let base = SimConfig {
        model: DEFAULT_MODEL.into(),
        engine,
        ..SimConfig::default()
    };
    let sims = start_fleet(n, &base, tokenizer).await?;
    let endpoints: Vec<EndpointConfig> = sims
        .iter()
        .map(|s| EndpointConfig {
            events: s.events_endpoint(),
            replay: s.replay_endpoint(),
            ..EndpointConfig::new(s.url(), DEFAULT_MODEL, block_size)
        })
        .collect();
    let master = work.join("master.key");
    std::fs::write(&master, "e2e-contracts master key material")?;
    let mut contracts = AuthConfig::for_api_keys(keys, KeyRef::File(master));
    let log = work.join(audit);
    // A fresh chain per run.
    for p in [log.clone(), log.with_extension("jsonl.checkpoint")] {
        let _ = std::fs::remove_file(p);
    }
    contracts.audit.path = Some(log);
    edit(&mut contracts);
    let cfg = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        endpoints: endpoints.clone(),
        metrics_interval_ms: 200,
        contracts,
        admin_token_sha256: Some(kvgate_auth::principal::api_key_sha256(ADMIN_TOKEN)),
        ..GatewayConfig::default()
    };
    let gw = Gateway::start(cfg, Arc::new(StaticDiscovery::new(endpoints)?)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = gw.router();
    tokio::spawn(
        async move { axum::serve(kvgate_openai::streaming_listener(listener), router).await },
    );
    // Let the subscribers connect before the first request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Running {
        sims,
        gw,
        url,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()?,
    })
}

/// What one streamed completion measured.
pub struct Sent {
    pub status: u16,
    pub ttft: Duration,
}

impl Running {
    /// A streamed completion of token ids `prompt` as `key`: its status and
    /// time to the first chunk (to the error for a refusal).
    pub async fn complete(&self, key: &str, prompt: &[u32], max_tokens: u32) -> Result<Sent> {
        let t = Instant::now();
        let resp = self.post_completion(key, prompt, max_tokens, true).await?;
        let status = resp.status().as_u16();
        let mut stream = resp.bytes_stream();
        let mut ttft = None;
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                break;
            }
            ttft.get_or_insert_with(|| t.elapsed());
        }
        Ok(Sent {
            status,
            ttft: ttft.unwrap_or_else(|| t.elapsed()),
        })
    }

    /// Sends a completion of token ids `prompt` as `key`; the response as it
    /// starts.
    pub async fn post_completion(
        &self,
        key: &str,
        prompt: &[u32],
        max_tokens: u32,
        stream: bool,
    ) -> Result<reqwest::Response> {
        self.http
            .post(format!("{}/v1/completions", self.url))
            .bearer_auth(key)
            .json(
                &serde_json::json!({"model": DEFAULT_MODEL, "prompt": prompt,
                "max_tokens": max_tokens, "stream": stream, "ignore_eos": true}),
            )
            .send()
            .await
            .context("sending a completion")
    }

    /// Prompt tokens found cached across the fleet so far.
    pub fn engine_hits(&self) -> u64 {
        self.sims
            .iter()
            .map(|s| s.engine.metrics_snapshot().prefix_cache_hits)
            .sum()
    }

    pub async fn admin(&self, contract: &str, action: &str) -> Result<serde_json::Value> {
        Ok(self
            .http
            .post(format!(
                "{}{}/{contract}/{action}",
                self.url,
                kvgate_gateway::admin::ADMIN_CONTRACTS_PATH
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}
