//! Gateway configuration (YAML; the binary applies env and flag overrides).

use kvgate_fleet::probes::{DEFAULT_HEALTH_INTERVAL_MS, DEFAULT_METRICS_INTERVAL_MS};
use kvgate_fleet::{
    EndpointConfig, EndpointConfigError, DEFAULT_EJECT_AFTER_FAILURES, DEFAULT_EJECT_COOLDOWN_MS,
};
use kvgate_index::IndexConfig;
use kvgate_router::RouterConfig;
use serde::{Deserialize, Serialize};

pub const DEFAULT_GATEWAY_LISTEN: &str = "0.0.0.0:8080";
/// How long a SIGTERM waits for in-flight requests (streams included) before
/// exiting anyway: under Kubernetes' default 30 s grace before SIGKILL.
pub const DEFAULT_DRAIN_GRACE_MS: u64 = 25_000;
/// `kvgate epp`'s ext_proc (gRPC) listener: the Inference Extension's EPP port.
pub const DEFAULT_EPP_LISTEN: &str = "0.0.0.0:9002";
/// Largest accepted request body (a long multi-turn chat fits comfortably).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Idle upstream connections are closed after this long: under vLLM's
/// keep-alive timeout (uvicorn's 5 s), so the engine never closes one the
/// gateway is about to reuse.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS: u64 = 4_000;
/// Extra endpoints tried when connecting fails before the request was sent.
pub const DEFAULT_CONNECT_RETRIES: u32 = 2;
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 1;
/// The `service` label of the `sentinel_*` metrics, shared with the store.
pub use kvgate_auth::DEFAULT_SERVICE;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: String,
    /// TLS 1.3 on the listener (certificates reloaded on change; with a
    /// client CA, mTLS and `contracts.client_certs`). Unset: plain HTTP.
    pub tls: Option<kvgate_tls::TlsConfig>,
    pub endpoints: Vec<EndpointConfig>,
    /// Or the endpoints by DNS: a name's A/AAAA records (a headless
    /// Service), re-resolved (`kvgate_fleet::dns`). Not with `endpoints`.
    pub dns: Option<kvgate_fleet::DnsDiscoveryConfig>,
    /// Or the Ready pods a label selector or an InferencePool names
    /// (`kvgate-k8s`). Not with `endpoints` or `dns`.
    pub kubernetes: Option<kvgate_fleet::K8sDiscoveryConfig>,
    /// TLS to `https://` endpoints: the CA they chain to and, for engines
    /// that require mTLS, kvgate's client certificate.
    pub upstream_tls: Option<kvgate_tls::ClientTlsConfig>,
    pub router: RouterConfig,
    pub index: IndexConfig,
    /// Secret for block keys (shared with index replicas). Unset: random.
    pub key_secret: Option<String>,
    /// Model name -> tokenizer directory (tokenizer.json, tokenizer_config.json).
    pub tokenizers: std::collections::BTreeMap<String, String>,
    /// Use the embedded tokenizer for models without one configured.
    pub embedded_tokenizer_fallback: bool,
    /// Model name -> how message content reaches its chat template, as
    /// vLLM's `--chat-template-content-format` (`auto`: detected from the
    /// template, as vLLM detects it; `string`; `openai`). Unlisted: auto.
    pub content_format: std::collections::BTreeMap<String, kvgate_tokenize::ContentFormat>,
    /// Contracts: who may call, under which limits and cache isolation
    /// (`kvgate_auth::AuthConfig`). No credentials configured: anonymous.
    pub contracts: kvgate_auth::AuthConfig,
    /// The admin API (`/kvgate/admin/v1/...`: contracts, suspension), by the
    /// SHA-256 (hex) of its bearer token. Unset: no admin API.
    pub admin_token_sha256: Option<String>,
    pub max_body_bytes: usize,
    pub health_interval_ms: u64,
    pub metrics_interval_ms: u64,
    pub eject_after_failures: u32,
    pub eject_cooldown_ms: u64,
    pub connect_timeout_ms: u64,
    /// Idle upstream connections kept this long (below the engines' keep-alive timeout).
    pub upstream_idle_timeout_ms: u64,
    pub connect_retries: u32,
    /// Adds `x-kvgate-endpoint` and `x-kvgate-decision` to responses.
    pub debug_headers: bool,
    /// Serves the explain endpoints (`/kvgate/v1/explain/...`): a request's
    /// tokens and which endpoints hold each of its blocks.
    pub debug_api: bool,
    /// Header carrying a session id for session affinity.
    pub session_header: String,
    /// The `service` label of the `sentinel_*` metrics.
    pub service: String,
    /// The KV chunk store (`kvgate store`) whose contract scopes follow this
    /// gateway's: every suspension and reactivation is pushed to it (a
    /// suspension there shreds the contract's chunks).
    pub store_admin: Option<StoreAdminConfig>,
    /// `kvgate epp`: where Envoy's ext_proc filter reaches the endpoint
    /// picker (gRPC; `listen` then serves metrics, probes and the admin API).
    pub epp_listen: String,
    /// On SIGTERM: not-ready, no new connections, and this long for what is
    /// in flight to finish before exiting.
    pub drain_grace_ms: u64,
}

/// `store_admin:`: the store's admin listener and its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreAdminConfig {
    /// e.g. `http://kvgate-store:8091`.
    pub url: String,
    /// A file holding the store's admin token (a Kubernetes Secret).
    pub token_file: std::path::PathBuf,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_GATEWAY_LISTEN.to_string(),
            tls: None,
            endpoints: Vec::new(),
            dns: None,
            kubernetes: None,
            upstream_tls: None,
            router: RouterConfig::default(),
            index: IndexConfig::default(),
            key_secret: None,
            tokenizers: Default::default(),
            embedded_tokenizer_fallback: true,
            content_format: Default::default(),
            contracts: kvgate_auth::AuthConfig::default(),
            admin_token_sha256: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            metrics_interval_ms: DEFAULT_METRICS_INTERVAL_MS,
            eject_after_failures: DEFAULT_EJECT_AFTER_FAILURES,
            eject_cooldown_ms: DEFAULT_EJECT_COOLDOWN_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            upstream_idle_timeout_ms: DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS,
            connect_retries: DEFAULT_CONNECT_RETRIES,
            debug_headers: true,
            debug_api: true,
            session_header: "x-session-id".to_string(),
            service: DEFAULT_SERVICE.to_string(),
            store_admin: None,
            epp_listen: DEFAULT_EPP_LISTEN.to_string(),
            drain_grace_ms: DEFAULT_DRAIN_GRACE_MS,
        }
    }
}

/// Why a gateway configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Endpoint(#[from] EndpointConfigError),
    #[error("{0} must be > 0")]
    Zero(&'static str),
    #[error("session_header {0:?} is not a valid header name")]
    SessionHeader(String),
    #[error("content_format for {0:?}: the model has no tokenizer (configure one, or the embedded fallback)")]
    ContentFormatWithoutTokenizer(String),
    #[error("admin_token_sha256 must be 64 hex characters")]
    AdminTokenHash,
    #[error("{0}")]
    Tls(String),
    #[error(
        "endpoint {0:?} is https: set upstream_tls.ca_file (the CA its certificate chains to)"
    )]
    HttpsWithoutUpstreamTls(String),
    #[error("endpoints, dns and kubernetes are exclusive: one source of endpoints")]
    EndpointsAndDns,
}

impl GatewayConfig {
    /// Checks what serde cannot: every config, from a file or built in code,
    /// passes here before a gateway starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        kvgate_fleet::validate_all(&self.endpoints)?;
        let sources = usize::from(!self.endpoints.is_empty())
            + usize::from(self.dns.is_some())
            + usize::from(self.kubernetes.is_some());
        if sources > 1 {
            return Err(ConfigError::EndpointsAndDns);
        }
        if let Some(dns) = &self.dns {
            dns.validate()?;
        }
        for (what, v) in [
            ("max_body_bytes", self.max_body_bytes as u64),
            ("health_interval_ms", self.health_interval_ms),
            ("metrics_interval_ms", self.metrics_interval_ms),
            ("eject_after_failures", u64::from(self.eject_after_failures)),
            (
                "index.max_tracked_blocks",
                self.index.max_tracked_blocks as u64,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(what));
            }
        }
        if let Some(m) = self
            .content_format
            .keys()
            .find(|m| !self.tokenizers.contains_key(*m) && !self.embedded_tokenizer_fallback)
        {
            return Err(ConfigError::ContentFormatWithoutTokenizer(m.clone()));
        }
        if axum::http::HeaderName::from_bytes(self.session_header.as_bytes()).is_err() {
            return Err(ConfigError::SessionHeader(self.session_header.clone()));
        }
        if self
            .admin_token_sha256
            .as_ref()
            .is_some_and(|h| h.len() != 64 || hex::decode(h).is_err())
        {
            return Err(ConfigError::AdminTokenHash);
        }
        if let Some(t) = &self.tls {
            t.validate().map_err(|e| ConfigError::Tls(e.to_string()))?;
        }
        if let (None, Some(e)) = (
            &self.upstream_tls,
            self.endpoints
                .iter()
                .find(|e| e.url.starts_with("https://")),
        ) {
            return Err(ConfigError::HttpsWithoutUpstreamTls(e.url.clone()));
        }
        Ok(())
    }

    /// The fleet's probe settings.
    pub fn probes(&self) -> kvgate_fleet::ProbeConfig {
        kvgate_fleet::ProbeConfig {
            health_interval_ms: self.health_interval_ms,
            metrics_interval_ms: self.metrics_interval_ms,
        }
    }

    /// The fleet's circuit breaker settings.
    pub fn ejection(&self) -> kvgate_fleet::Ejection {
        kvgate_fleet::Ejection {
            after_failures: self.eject_after_failures,
            cooldown: std::time::Duration::from_millis(self.eject_cooldown_ms),
        }
    }
}
