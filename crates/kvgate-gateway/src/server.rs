//! The OpenAI-compatible front: authenticate, tokenize, route, proxy (streamed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use kvgate_index::KvIndex;
use kvgate_indexer::api::ApiError;
use kvgate_indexer::metrics::IndexerMetrics;
use kvgate_indexer::subscriber::IngestManager;
use kvgate_indexer::EventSource;
use kvgate_keys::{BlockHasher, BlockKey, RequestContext};
use kvgate_router::{Candidate, Decision, RouteRequest, Scheduler};
use kvgate_tokenize::{ChatInput, ModelTokenizer, TokenizerRegistry};
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::config::{EndpointConfig, GatewayConfig, DEFAULT_RETRY_AFTER_SECS};
use crate::fleet::{Discovery, Ejection, Endpoint, Fleet};
use crate::metrics::{GatewayMetrics, LatencyLabels, ReasonLabels, RequestLabels};
use crate::scrape::parse_engine_load;
use crate::tenancy::Tenancy;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("tokenizer for {model:?}: {source}")]
    Tokenizer {
        model: String,
        source: kvgate_tokenize::TokenizeError,
    },
    #[error("random secret: {0}")]
    Entropy(#[from] kvgate_keys::KeyError),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
}

pub struct Gateway {
    cfg: GatewayConfig,
    fleet: Fleet,
    index: Arc<KvIndex>,
    ingest: tokio::sync::Mutex<IngestManager>,
    scheduler: Scheduler,
    tokenizers: TokenizerRegistry,
    tenancy: Tenancy,
    http: reqwest::Client,
    pub metrics: GatewayMetrics,
    pub index_metrics: Arc<IndexerMetrics>,
    registry: Registry,
    ejection: Ejection,
}

/// The kind of OpenAI request being proxied.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

impl Gateway {
    /// Builds the gateway, joins the endpoints discovery reports, and starts
    /// health checks, metrics scraping and expiry in the background.
    pub async fn start(
        cfg: GatewayConfig,
        discovery: Arc<dyn Discovery>,
    ) -> Result<Arc<Self>, GatewayError> {
        let hasher = match &cfg.key_secret {
            Some(s) => BlockHasher::from_secret(s.as_bytes()),
            None => BlockHasher::random()?,
        };
        let index = Arc::new(KvIndex::new(cfg.index.clone(), hasher));
        let index_metrics = Arc::new(IndexerMetrics::default());
        let mut tokenizers = TokenizerRegistry::default();
        for (model, dir) in &cfg.tokenizers {
            let tok = ModelTokenizer::from_dir(std::path::Path::new(dir)).map_err(|source| {
                GatewayError::Tokenizer {
                    model: model.clone(),
                    source,
                }
            })?;
            tokenizers.insert(model.clone(), Arc::new(tok));
        }
        if cfg.embedded_tokenizer_fallback {
            let tok =
                ModelTokenizer::embedded_default().map_err(|source| GatewayError::Tokenizer {
                    model: "<embedded>".into(),
                    source,
                })?;
            tokenizers.set_fallback(Arc::new(tok));
        }
        let mut salt_secret = [0u8; 32];
        if cfg.tenancy.salt_secret.is_none() {
            let random = BlockHasher::random()?;
            salt_secret = blake3::derive_key("kvgate salt secret", random.fingerprint().as_bytes());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        let metrics = GatewayMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        index_metrics.register(&mut registry);
        let gw = Arc::new(Self {
            ejection: Ejection {
                after_failures: cfg.eject_after_failures.max(1),
                cooldown: Duration::from_millis(cfg.eject_cooldown_ms),
            },
            scheduler: Scheduler::new(cfg.router.clone()),
            tenancy: Tenancy::new(&cfg.tenancy, salt_secret),
            ingest: tokio::sync::Mutex::new(IngestManager::new(
                index.clone(),
                index_metrics.clone(),
            )),
            fleet: Fleet::default(),
            index,
            tokenizers,
            http,
            metrics,
            index_metrics,
            registry,
            cfg,
        });
        gw.reconcile(discovery.endpoints()).await;
        tokio::spawn(background(Arc::downgrade(&gw), discovery));
        Ok(gw)
    }

    pub fn index(&self) -> &Arc<KvIndex> {
        &self.index
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Brings the fleet to `desired`: new endpoints join (and their KV event
    /// streams are subscribed), missing ones leave (and their entries are purged).
    pub async fn reconcile(&self, desired: Vec<EndpointConfig>) {
        let current = self.fleet.snapshot();
        let mut next = Vec::with_capacity(desired.len());
        let mut ingest = self.ingest.lock().await;
        for cfg in desired {
            if let Some(e) = current.iter().find(|e| e.cfg == cfg) {
                next.push(e.clone());
                continue;
            }
            let index_id = match (&cfg.events, cfg.models.first()) {
                (Some(events), Some(model)) => {
                    let source = EventSource {
                        name: cfg.url.clone(),
                        model: model.clone(),
                        block_size: cfg.block_size,
                        events: events.clone(),
                        replay: cfg.replay.clone(),
                        topic: cfg.topic.clone(),
                        bind: cfg.bind,
                    };
                    match ingest.add(source) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            tracing::error!(endpoint = %cfg.url, error = %e, "cannot subscribe to KV events");
                            None
                        }
                    }
                }
                _ => None,
            };
            tracing::info!(endpoint = %cfg.url, events = index_id.is_some(), "endpoint joined");
            next.push(Arc::new(Endpoint::new(cfg, index_id)));
        }
        for gone in current
            .iter()
            .filter(|e| !next.iter().any(|n| Arc::ptr_eq(n, e)))
        {
            if gone.index_id.is_some() {
                ingest.remove(gone.name()).await;
            }
            self.scheduler.forget_endpoint(gone.name());
            tracing::info!(endpoint = %gone.name(), "endpoint left");
        }
        self.fleet.set(next);
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/health", get(|| async { StatusCode::OK }))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics));
        let router = if self.cfg.debug_api {
            router
                .route(EXPLAIN_CHAT_PATH, post(explain_chat))
                .route(EXPLAIN_COMPLETIONS_PATH, post(explain_completions))
        } else {
            router
        };
        router
            .layer(DefaultBodyLimit::max(self.cfg.max_body_bytes))
            .with_state(self.clone())
    }

    /// Tokens of the request's prompt as the engine will see them (None when
    /// they cannot be known: no tokenizer, unsupported content).
    fn prompt_tokens(&self, kind: Kind, model: &str, body: &Value) -> Option<Vec<u32>> {
        let tok = self.tokenizers.get(model)?;
        let result = match kind {
            Kind::Chat => {
                let messages = body.get("messages")?.as_array()?;
                let tools = body.get("tools").and_then(Value::as_array);
                let input = ChatInput {
                    messages,
                    tools: tools.map(Vec::as_slice),
                    add_generation_prompt: body
                        .get("add_generation_prompt")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                    continue_final_message: body
                        .get("continue_final_message")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    template_kwargs: body.get("chat_template_kwargs").and_then(Value::as_object),
                };
                tok.chat_tokens(&input)
            }
            Kind::Completion => match body.get("prompt")? {
                Value::String(s) => tok.completion_tokens(s),
                // Pre-tokenized prompts are used as they are.
                Value::Array(a) if a.iter().all(Value::is_u64) => {
                    return a
                        .iter()
                        .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
                        .collect()
                }
                // A batch of prompts is routed by its first one.
                Value::Array(a) => match a.first()? {
                    Value::String(s) => tok.completion_tokens(s),
                    _ => return None,
                },
                _ => return None,
            },
        };
        match result {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!(error = %e, "prompt not tokenized; routing by load");
                None
            }
        }
    }
}

/// Health checks and metrics scraping for every endpoint, approximate-index
/// expiry and discovery refresh, until the gateway is dropped.
async fn background(gw: std::sync::Weak<Gateway>, discovery: Arc<dyn Discovery>) {
    let Some(first) = gw.upgrade() else { return };
    let health_every = Duration::from_millis(first.cfg.health_interval_ms.max(50));
    let metrics_every = Duration::from_millis(first.cfg.metrics_interval_ms.max(50));
    drop(first);
    let mut health = tokio::time::interval(health_every);
    let mut scrape = tokio::time::interval(metrics_every);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    scrape.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = health.tick() => {
                let Some(gw) = gw.upgrade() else { return };
                gw.reconcile(discovery.endpoints()).await;
                gw.scheduler.expire();
                let checks = gw.fleet.snapshot().iter().map(|e| {
                    let e = e.clone();
                    let http = gw.http.clone();
                    let ej = gw.ejection;
                    async move {
                        let ok = http
                            .get(format!("{}/health", e.cfg.url))
                            .timeout(Duration::from_secs(2))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success());
                        if e.record_check(ok, ej) {
                            tracing::warn!(endpoint = %e.name(), checks = ej.after_failures, "health checks failed in a row; endpoint ejected");
                        }
                    }
                }).collect::<Vec<_>>();
                futures_util::future::join_all(checks).await;
            }
            _ = scrape.tick() => {
                let Some(gw) = gw.upgrade() else { return };
                let scrapes = gw.fleet.snapshot().iter().map(|e| {
                    let e = e.clone();
                    let http = gw.http.clone();
                    async move {
                        let resp = http
                            .get(format!("{}/metrics", e.cfg.url))
                            .timeout(Duration::from_secs(2))
                            .send()
                            .await;
                        if let Ok(text) = match resp { Ok(r) => r.text().await, Err(e) => Err(e) } {
                            let l = parse_engine_load(&text);
                            e.load.set_engine(l.waiting as u64, l.running as u64, l.kv_usage);
                        }
                    }
                }).collect::<Vec<_>>();
                futures_util::future::join_all(scrapes).await;
            }
        }
    }
}

async fn chat(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle(gw, Kind::Chat, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle(gw, Kind::Completion, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// What routing sees for a chat request: same body and auth as
/// `/v1/chat/completions`, nothing is sent to an engine.
pub const EXPLAIN_CHAT_PATH: &str = "/kvgate/v1/explain/chat/completions";
/// As [`EXPLAIN_CHAT_PATH`], for `/v1/completions`.
pub const EXPLAIN_COMPLETIONS_PATH: &str = "/kvgate/v1/explain/completions";

async fn explain_chat(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    explain(&gw, Kind::Chat, &headers, body)
}

async fn explain_completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    explain(&gw, Kind::Completion, &headers, body)
}

/// The prompt's token ids as the gateway computed them, and for every block
/// key (per block size) which endpoints the index says hold it. Scoped to the
/// caller's tenant like a real request: keys carry the tenant's salt.
fn explain(
    gw: &Gateway,
    kind: Kind,
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let p = match prepare(gw, kind, headers, body, true) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let blocks: Vec<Value> = p
        .keys
        .iter()
        .map(|(bs, keys)| {
            let holders = gw.index.block_holders(keys);
            let keys: Vec<Value> = keys
                .iter()
                .zip(holders)
                .map(|(k, h)| serde_json::json!({"key": format!("{k:016x}"), "held_by": h}))
                .collect();
            serde_json::json!({"block_size": bs, "keys": keys})
        })
        .collect();
    let endpoints: Vec<&str> = p.serving.iter().map(|e| e.name()).collect();
    Json(serde_json::json!({
        "model": p.model,
        "tenant_isolated": p.tenant.is_some(),
        "prompt_tokens": p.tokens,
        "endpoints": endpoints,
        "blocks": blocks,
    }))
    .into_response()
}

async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    let data: Vec<Value> = gw
        .fleet
        .models()
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "kvgate"}))
        .collect();
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.fleet.snapshot().iter().any(|e| e.is_available()) {
        StatusCode::OK.into_response()
    } else {
        no_endpoint("no healthy endpoint").into_response()
    }
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.index_metrics.refresh_gauges(&gw.index);
    kvgate_indexer::metrics::render(&gw.registry)
}

fn no_endpoint(msg: impl Into<String>) -> Response {
    let mut r = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailableError",
        msg,
        None,
    )
    .into_response();
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(DEFAULT_RETRY_AFTER_SECS),
    );
    r
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// A validated request, ready to route: its tenant's salt applied, its prompt
/// tokenized and keyed once per block size among the endpoints serving it.
struct Prepared {
    model: String,
    /// The body to forward (with the tenant's `cache_salt`, never the client's).
    body: Bytes,
    serving: Vec<Arc<Endpoint>>,
    tokens: Vec<u32>,
    keys: Vec<(u32, Vec<BlockKey>)>,
    tenant: Option<String>,
}

/// Authenticates, validates and tokenizes a request (no routing yet).
// The error is the finished error response, built at most once per request.
#[allow(clippy::result_large_err)]
fn prepare(
    gw: &Gateway,
    kind: Kind,
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    tokenize: bool,
) -> Result<Prepared, Response> {
    let body = body.map_err(|e| {
        ApiError::new(e.status(), "BadRequestError", e.body_text(), None).into_response()
    })?;
    let tenant = gw
        .tenancy
        .authenticate(
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        )
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "AuthenticationError",
                e.to_string(),
                None,
            )
            .into_response()
        })?;
    let mut json: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("request body is not valid JSON: {e}"), None).into_response()
    })?;
    let obj = json.as_object_mut().ok_or_else(|| {
        ApiError::bad_request("request body must be a JSON object", None).into_response()
    })?;
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "'model' is required and must be a string",
                Some("model"),
            )
            .into_response())
        }
    };
    match kind {
        Kind::Chat if !obj.get("messages").is_some_and(Value::is_array) => {
            return Err(ApiError::bad_request(
                "'messages' is required and must be an array",
                Some("messages"),
            )
            .into_response())
        }
        Kind::Completion if !obj.contains_key("prompt") => {
            return Err(
                ApiError::bad_request("'prompt' is required", Some("prompt")).into_response(),
            )
        }
        _ => {}
    }
    // The tenant, not the client, decides cache isolation.
    let client_salt = obj.remove("cache_salt").is_some();
    let salt = tenant.as_deref().map(|t| gw.tenancy.cache_salt(t));
    if let Some(s) = &salt {
        obj.insert("cache_salt".into(), Value::String(s.clone()));
    }
    let serving: Vec<Arc<Endpoint>> = gw
        .fleet
        .snapshot()
        .iter()
        .filter(|e| e.serves(&model))
        .cloned()
        .collect();
    if serving.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The model `{model}` does not exist."),
            Some("model"),
        )
        .into_response());
    }
    let body = if client_salt || salt.is_some() {
        Bytes::from(
            serde_json::to_vec(&json)
                .map_err(|e| ApiError::bad_request(e.to_string(), None).into_response())?,
        )
    } else {
        body
    };

    // Template + tokenize + keys, once per distinct block size.
    let tokens = if tokenize {
        gw.prompt_tokens(kind, &model, &json).unwrap_or_default()
    } else {
        Vec::new()
    };
    let lora = serving
        .iter()
        .find(|e| e.cfg.adapters.contains(&model))
        .map(|_| model.as_str());
    let mut keys: Vec<(u32, Vec<BlockKey>)> = Vec::new();
    for e in &serving {
        if keys.iter().any(|(bs, _)| *bs == e.cfg.block_size) {
            continue;
        }
        // Keys are rooted at the endpoint's primary model name, the name its
        // KV events are indexed under.
        let root_model = e.cfg.models.first().map_or(model.as_str(), String::as_str);
        let ctx = RequestContext {
            model: root_model,
            lora_name: lora,
            cache_salt: salt.as_deref(),
            mm_items: &[],
        };
        if let Ok(k) = gw
            .index
            .hasher()
            .request_keys(&tokens, e.cfg.block_size as usize, &ctx)
        {
            keys.push((e.cfg.block_size, k));
        }
    }
    Ok(Prepared {
        model,
        body,
        serving,
        tokens,
        keys,
        tenant,
    })
}

async fn handle(
    gw: Arc<Gateway>,
    kind: Kind,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, Response> {
    let received = Instant::now();
    let routing_started = Instant::now();
    let Prepared {
        model,
        body,
        serving,
        tokens,
        keys,
        ..
    } = prepare(
        &gw,
        kind,
        &headers,
        body,
        gw.scheduler.config().policy.uses_prompt_tokens(),
    )?;
    let session = headers
        .get(gw.cfg.session_header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut excluded: Vec<usize> = Vec::new();
    let mut attempt = 0;
    loop {
        let candidates: Vec<Candidate<'_>> = serving
            .iter()
            .enumerate()
            .map(|(i, e)| Candidate {
                name: e.name(),
                healthy: !excluded.contains(&i) && e.is_available(),
                serves: true,
                block_size: e.cfg.block_size,
                index_id: e.index_id,
                load: e.load.snapshot(),
            })
            .collect();
        let req = RouteRequest {
            model: &model,
            prompt_tokens: tokens.len(),
            keys: &keys,
            session_id: session.as_deref(),
        };
        let decision = match gw.scheduler.schedule(&req, &candidates, Some(&gw.index)) {
            Ok(d) => d,
            Err(e) => return Err(no_endpoint(e.to_string())),
        };
        let chosen = &serving[decision.chosen];
        if !chosen.admit() {
            // Lost a half-open probe race: try the others.
            excluded.push(decision.chosen);
            continue;
        }
        // Learned at decision time: requests that arrive before this one's
        // KV events do should still find its prefix here.
        if let Some(bs) = keys.iter().find(|(bs, _)| *bs == chosen.cfg.block_size) {
            let root_model = chosen
                .cfg
                .models
                .first()
                .map_or(model.as_str(), String::as_str);
            gw.scheduler
                .observe_routed(chosen.name(), root_model, bs.0, &bs.1);
        }
        if attempt == 0 {
            gw.metrics
                .routing_duration
                .observe(routing_started.elapsed().as_secs_f64());
            gw.metrics.prompt_tokens.inc_by(tokens.len() as u64);
            gw.metrics
                .predicted_hit_tokens
                .inc_by(decision.expected_cached_tokens);
        }
        gw.metrics
            .decisions
            .get_or_create(&ReasonLabels {
                policy: gw.scheduler.config().policy.name().into(),
                reason: decision.reason.into(),
            })
            .inc();
        let guard = chosen.load.start(decision.expected_uncached_tokens);
        let mut upstream = gw
            .http
            .post(format!("{}{}", chosen.cfg.url, kind.path()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        for (name, value) in &headers {
            let skip = is_hop_by_hop(name)
                || *name == header::CONTENT_TYPE
                || (*name == header::AUTHORIZATION && gw.tenancy.enabled());
            if !skip {
                upstream = upstream.header(name, value);
            }
        }
        match upstream.send().await {
            Ok(resp) => {
                let status = resp.status();
                if status.is_server_error() {
                    chosen.record_failure(gw.ejection);
                } else {
                    chosen.record_success();
                }
                return Ok(stream_back(
                    &gw, chosen, &model, resp, guard, &decision, received,
                ));
            }
            Err(e) if e.is_connect() && attempt < gw.cfg.connect_retries => {
                tracing::warn!(endpoint = %chosen.name(), error = %e, "connect failed; trying the next endpoint");
                chosen.record_failure(gw.ejection);
                gw.metrics.connect_retries.inc();
                excluded.push(decision.chosen);
                attempt += 1;
            }
            Err(e) => {
                chosen.record_failure(gw.ejection);
                gw.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        endpoint: chosen.name().into(),
                        model: model.clone(),
                        status: 502,
                    })
                    .inc();
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "BadGatewayError",
                    format!("upstream {}: {e}", chosen.name()),
                    None,
                )
                .into_response());
            }
        }
    }
}

/// Streams the upstream response through chunk by chunk. The load guard lives
/// in the body: it is released when the body ends or the client goes away.
fn stream_back(
    gw: &Arc<Gateway>,
    endpoint: &Endpoint,
    model: &str,
    resp: reqwest::Response,
    guard: kvgate_router::RequestGuard,
    decision: &Decision,
    received: Instant,
) -> Response {
    let status = resp.status();
    let mut builder = Response::builder().status(status.as_u16());
    for (name, value) in resp.headers() {
        if !is_hop_by_hop(name) {
            builder = builder.header(name, value);
        }
    }
    if gw.cfg.debug_headers {
        builder = builder.header("x-kvgate-endpoint", endpoint.name());
        builder = builder.header(
            "x-kvgate-decision",
            format!("{} {}", decision.reason, decision.explain()),
        );
    }
    let labels = LatencyLabels {
        endpoint: endpoint.name().to_string(),
        model: model.to_string(),
    };
    let req_labels = RequestLabels {
        endpoint: labels.endpoint.clone(),
        model: labels.model.clone(),
        status: status.as_u16(),
    };
    struct Tracked {
        inner: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        guard: kvgate_router::RequestGuard,
        first: bool,
        gw: Arc<Gateway>,
        labels: LatencyLabels,
        req_labels: RequestLabels,
        received: Instant,
    }
    let tracked = Tracked {
        inner: resp.bytes_stream().boxed(),
        guard,
        first: true,
        gw: gw.clone(),
        labels,
        req_labels,
        received,
    };
    let stream = futures_util::stream::unfold(tracked, |mut t| async move {
        match t.inner.next().await {
            Some(Ok(chunk)) => {
                if t.first {
                    t.first = false;
                    t.guard.first_token();
                    t.gw.metrics
                        .ttft
                        .get_or_create(&t.labels)
                        .observe(t.received.elapsed().as_secs_f64());
                }
                Some((Ok::<Bytes, std::io::Error>(chunk), t))
            }
            Some(Err(e)) => Some((Err(std::io::Error::other(e)), t)),
            None => {
                t.gw.metrics.requests.get_or_create(&t.req_labels).inc();
                t.gw.metrics
                    .request_duration
                    .get_or_create(&t.labels)
                    .observe(t.received.elapsed().as_secs_f64());
                None
            }
        }
    });
    builder.body(Body::from_stream(stream)).unwrap_or_else(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "BadGatewayError",
            e.to_string(),
            None,
        )
        .into_response()
    })
}
