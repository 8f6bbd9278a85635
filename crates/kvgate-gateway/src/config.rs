//! Gateway configuration (YAML; the binary applies env and flag overrides).

use kvgate_index::IndexConfig;
use kvgate_router::RouterConfig;
use serde::{Deserialize, Serialize};

pub const DEFAULT_GATEWAY_LISTEN: &str = "0.0.0.0:8080";
/// Largest accepted request body (a long multi-turn chat fits comfortably).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 2_000;
pub const DEFAULT_METRICS_INTERVAL_MS: u64 = 1_000;
/// Consecutive failed requests, or failed health checks, that open an
/// endpoint's circuit (one slow health answer from a busy engine is no outage).
pub const DEFAULT_EJECT_AFTER_FAILURES: u32 = 3;
/// How long an open circuit waits before letting one probe through.
pub const DEFAULT_EJECT_COOLDOWN_MS: u64 = 5_000;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Extra endpoints tried when connecting fails before the request was sent.
pub const DEFAULT_CONNECT_RETRIES: u32 = 2;
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: String,
    pub endpoints: Vec<EndpointConfig>,
    pub router: RouterConfig,
    pub index: IndexConfig,
    /// Secret for block keys (shared with index replicas). Unset: random.
    pub key_secret: Option<String>,
    /// Model name -> tokenizer directory (tokenizer.json, tokenizer_config.json).
    pub tokenizers: std::collections::BTreeMap<String, String>,
    /// Use the embedded tokenizer for models without one configured.
    pub embedded_tokenizer_fallback: bool,
    pub tenancy: TenancyConfig,
    pub max_body_bytes: usize,
    pub health_interval_ms: u64,
    pub metrics_interval_ms: u64,
    pub eject_after_failures: u32,
    pub eject_cooldown_ms: u64,
    pub connect_timeout_ms: u64,
    pub connect_retries: u32,
    /// Adds `x-kvgate-endpoint` and `x-kvgate-decision` to responses.
    pub debug_headers: bool,
    /// Serves the explain endpoints (`/kvgate/v1/explain/...`): a request's
    /// tokens and which endpoints hold each of its blocks.
    pub debug_api: bool,
    /// Header carrying a session id for session affinity.
    pub session_header: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_GATEWAY_LISTEN.to_string(),
            endpoints: Vec::new(),
            router: RouterConfig::default(),
            index: IndexConfig::default(),
            key_secret: None,
            tokenizers: Default::default(),
            embedded_tokenizer_fallback: true,
            tenancy: TenancyConfig::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            metrics_interval_ms: DEFAULT_METRICS_INTERVAL_MS,
            eject_after_failures: DEFAULT_EJECT_AFTER_FAILURES,
            eject_cooldown_ms: DEFAULT_EJECT_COOLDOWN_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            connect_retries: DEFAULT_CONNECT_RETRIES,
            debug_headers: true,
            debug_api: true,
            session_header: "x-session-id".to_string(),
        }
    }
}

/// One engine (vLLM replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Base URL, e.g. `http://10.0.0.5:8000`; also its name.
    pub url: String,
    /// Served model names (the `--served-model-name`s).
    pub models: Vec<String>,
    /// LoRA adapters it serves (requests may name one as the model).
    #[serde(default)]
    pub adapters: Vec<String>,
    pub block_size: u32,
    /// KV events PUB endpoint; without it the approximate prefix scorer is used.
    #[serde(default)]
    pub events: Option<String>,
    #[serde(default)]
    pub replay: Option<String>,
    #[serde(default)]
    pub topic: String,
    #[serde(default)]
    pub bind: bool,
}

impl EndpointConfig {
    /// An endpoint serving `model` without KV events (set `events` and
    /// `replay` for precise routing).
    pub fn new(url: impl Into<String>, model: impl Into<String>, block_size: u32) -> Self {
        Self {
            url: url.into(),
            models: vec![model.into()],
            adapters: Vec::new(),
            block_size,
            events: None,
            replay: None,
            topic: String::new(),
            bind: false,
        }
    }
}

/// Who a request is, and so which cache it may share.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancyConfig {
    /// API key -> tenant. Empty: no authentication, one shared tenant.
    pub api_keys: std::collections::BTreeMap<String, String>,
    /// Secret from which each tenant's `cache_salt` is derived. Unset with
    /// tenants configured: a random per-process secret.
    pub salt_secret: Option<String>,
}
