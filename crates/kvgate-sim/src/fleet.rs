//! Starting simulated engines: one (`kvgate sim`) or a fleet in one process
//! (the demo, the bench, tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kvgate_tokenize::ModelTokenizer;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::engine::{EngineConfig, EngineHandle};
use crate::publisher::{EventPublisher, PublishError, DEFAULT_REPLAY_BUFFER};
use crate::server::{router, SimState};

/// The model name a sim serves when none is given.
pub const DEFAULT_MODEL: &str = "kvgate-sim";
/// vLLM's default `--max-model-len` for small models we mimic.
pub const DEFAULT_MAX_MODEL_LEN: usize = 32_768;

/// One simulated engine, as `kvgate sim` flags or YAML set it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// HTTP listen address (port 0: any free port).
    pub listen: String,
    pub model: String,
    /// A directory with `tokenizer.json` (+ `tokenizer_config.json`); unset:
    /// the embedded Qwen2.5 tokenizer.
    pub tokenizer: Option<PathBuf>,
    pub max_model_len: usize,
    /// ZMQ PUB endpoint for KV events (`tcp://*:5557`); unset: no events.
    pub events: Option<String>,
    /// ZMQ ROUTER endpoint for replay (`tcp://*:5558`).
    pub replay: Option<String>,
    pub topic: String,
    pub replay_buffer: usize,
    pub engine: EngineConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8000".into(),
            model: DEFAULT_MODEL.into(),
            tokenizer: None,
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            events: None,
            replay: None,
            topic: "kv".into(),
            replay_buffer: DEFAULT_REPLAY_BUFFER,
            engine: EngineConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] kvgate_tokenize::TokenizeError),
    #[error("events: {0}")]
    Publish(#[from] PublishError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
}

impl SimConfig {
    /// Checks what serde cannot; every sim, configured by file or in code, starts through it.
    pub fn validate(&self) -> Result<(), SimError> {
        let e = &self.engine;
        let bad = |m: &str| Err(SimError::Config(m.to_string()));
        if e.block_size == 0 || e.num_blocks < 2 {
            return bad("block_size must be > 0 and num_blocks >= 2");
        }
        if e.max_num_seqs == 0 || e.max_num_batched_tokens == 0 {
            return bad("max_num_seqs and max_num_batched_tokens must be > 0");
        }
        if !(e.time_scale > 0.0 && e.time_scale.is_finite()) {
            return bad("time scale must be a positive number");
        }
        if self.max_model_len == 0 {
            return bad("max_model_len must be > 0");
        }
        Ok(())
    }
}

/// A sim serving HTTP (and events) in this process. Dropping it stops it.
pub struct RunningSim {
    pub addr: SocketAddr,
    pub engine: EngineHandle,
    pub config: SimConfig,
    state: SimState,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        if let Some(t) = self.server.lock().take() {
            t.abort();
        }
    }
}

impl RunningSim {
    pub async fn start(cfg: SimConfig) -> Result<Self, SimError> {
        let tokenizer = match &cfg.tokenizer {
            Some(dir) => ModelTokenizer::from_dir(dir)?,
            None => ModelTokenizer::embedded_default()?,
        };
        Self::start_with_tokenizer(cfg, Arc::new(tokenizer)).await
    }

    /// As [`Self::start`], sharing an already loaded tokenizer (a fleet loads it once).
    pub async fn start_with_tokenizer(
        mut cfg: SimConfig,
        tokenizer: Arc<ModelTokenizer>,
    ) -> Result<Self, SimError> {
        cfg.validate()?;
        let publisher = match &cfg.events {
            Some(ep) => {
                let p =
                    EventPublisher::bind(ep, cfg.replay.as_deref(), &cfg.topic, cfg.replay_buffer)
                        .await?;
                // Report the endpoints actually bound (port 0 resolved).
                cfg.events = Some(p.pub_endpoint.clone());
                cfg.replay = p.replay_endpoint.clone();
                Some(Arc::new(p))
            }
            None => None,
        };
        // A sequence longer than the whole cache could never run; vLLM refuses
        // such a max_model_len, the sim caps it.
        cfg.max_model_len = cfg
            .max_model_len
            .min((cfg.engine.num_blocks - 1) * cfg.engine.block_size);
        // Sampled output tokens stay in the regular vocabulary.
        cfg.engine.output_vocab = cfg
            .engine
            .output_vocab
            .min(tokenizer.vocab_size() as u32)
            .max(1);
        let engine = EngineHandle::spawn(cfg.engine.clone(), publisher);
        let state = SimState {
            engine: engine.clone(),
            tokenizer,
            prompt_cache: Arc::new(crate::server::PromptCache::new(
                crate::server::DEFAULT_PROMPT_CACHE_ENTRIES,
            )),
            model: cfg.model.clone(),
            max_model_len: cfg.max_model_len,
            block_size: cfg.engine.block_size,
            num_blocks: cfg.engine.num_blocks,
        };
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|source| SimError::Listen {
                addr: cfg.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
        cfg.listen = addr.to_string();
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(Self {
            addr,
            engine,
            config: cfg,
            state,
            server: Mutex::new(Some(task)),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound KV events endpoint, with a connectable host.
    pub fn events_endpoint(&self) -> Option<String> {
        self.config.events.as_deref().map(connectable)
    }

    pub fn replay_endpoint(&self) -> Option<String> {
        self.config.replay.as_deref().map(connectable)
    }

    /// Fault: stop accepting connections (clients get "connection refused").
    /// In-flight requests are cut.
    pub fn stop_http(&self) {
        if let Some(t) = self.server.lock().take() {
            t.abort();
        }
    }

    /// Undoes [`Self::stop_http`] on the same address.
    pub async fn start_http(&self) -> Result<(), SimError> {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(|source| SimError::Listen {
                addr: self.addr.to_string(),
                source,
            })?;
        let task = tokio::spawn(serve(listener, self.state.clone()));
        if let Some(old) = self.server.lock().replace(task) {
            old.abort();
        }
        Ok(())
    }
}

async fn serve(listener: tokio::net::TcpListener, state: SimState) {
    if let Err(e) = axum::serve(kvgate_openai::streaming_listener(listener), router(state)).await {
        tracing::warn!(error = %e, "sim HTTP server stopped");
    }
}

/// `tcp://0.0.0.0:P` / `tcp://*:P` as a subscriber can dial it.
fn connectable(ep: &str) -> String {
    ep.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        .replace("tcp://*:", "tcp://127.0.0.1:")
}

/// Starts `n` sims on loopback with free ports, each publishing events with
/// replay, sharing one tokenizer.
pub async fn start_fleet(
    n: usize,
    base: &SimConfig,
    tokenizer: Arc<ModelTokenizer>,
) -> Result<Vec<RunningSim>, SimError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let cfg = SimConfig {
            listen: "127.0.0.1:0".into(),
            events: Some("tcp://127.0.0.1:0".into()),
            replay: Some("tcp://127.0.0.1:0".into()),
            ..base.clone()
        };
        out.push(RunningSim::start_with_tokenizer(cfg, tokenizer.clone()).await?);
    }
    Ok(out)
}
