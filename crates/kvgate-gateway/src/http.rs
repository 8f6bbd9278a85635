//! The HTTP edge: routes, handlers, and the one place domain errors become
//! OpenAI-shaped error responses.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvgate_openai::OpenAiError;
use kvgate_router::RouteError;
use kvgate_tls::ClientCert;
use serde_json::Value;

use crate::config::DEFAULT_RETRY_AFTER_SECS;
use crate::pipeline::{prepare, Kind, PrepareError};
use crate::proxy::{forward, PendingRequest, ProxyError};
use crate::Gateway;

/// What routing sees for a chat request: same body and auth as
/// `/v1/chat/completions`, nothing is sent to an engine.
pub const EXPLAIN_CHAT_PATH: &str = "/kvgate/v1/explain/chat/completions";
/// As [`EXPLAIN_CHAT_PATH`], for `/v1/completions`.
pub const EXPLAIN_COMPLETIONS_PATH: &str = "/kvgate/v1/explain/completions";

type Body = Result<Bytes, BytesRejection>;

impl Gateway {
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
        crate::admin::routes(self, router)
            .fallback(not_served)
            .layer(DefaultBodyLimit::max(self.cfg.max_body_bytes))
            .with_state(self.clone())
    }
}

async fn chat(
    State(gw): State<Arc<Gateway>>,
    cert: ClientCert,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(gw, Kind::Chat, headers, cert, body).await
}

async fn completions(
    State(gw): State<Arc<Gateway>>,
    cert: ClientCert,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(gw, Kind::Completion, headers, cert, body).await
}

async fn handle(
    gw: Arc<Gateway>,
    kind: Kind,
    headers: HeaderMap,
    ClientCert(cert): ClientCert,
    body: Body,
) -> Response {
    let received = Instant::now();
    let pending = PendingRequest::new(&gw);
    let body = match body {
        Ok(b) => b,
        Err(e) => return rejected(e),
    };
    let tokenize = gw.fleet.scheduler().config().policy.uses_prompt_tokens();
    let mut prepared = match prepare(&gw, kind, &headers, cert.as_ref(), body, tokenize) {
        Ok(p) => p,
        Err(e) => return refused(&gw, e),
    };
    let session = headers
        .get(gw.cfg.session_header.as_str())
        .and_then(|v| v.to_str().ok());
    let facts = prepared.facts(&gw, received, pending);
    let input = match prepared.routing_input(&gw, session) {
        Ok(i) => i,
        Err(e) => return prepare_error(e),
    };
    if let Some(a) = &facts.admission {
        gw.contract_keys.record(a.contract.id(), input.keys());
    }
    forward(&gw, kind, &headers, prepared.body.clone(), input, facts)
        .await
        .unwrap_or_else(proxy_error)
}

async fn explain_chat(
    State(gw): State<Arc<Gateway>>,
    cert: ClientCert,
    headers: HeaderMap,
    body: Body,
) -> Response {
    explain(&gw, Kind::Chat, &headers, cert, body)
}

async fn explain_completions(
    State(gw): State<Arc<Gateway>>,
    cert: ClientCert,
    headers: HeaderMap,
    body: Body,
) -> Response {
    explain(&gw, Kind::Completion, &headers, cert, body)
}

/// The prompt's token ids as the gateway computed them, and for every block
/// key (per block size) which endpoints the index says hold it. Scoped to the
/// caller's contract like a real request: keys carry the contract's salt.
fn explain(
    gw: &Arc<Gateway>,
    kind: Kind,
    headers: &HeaderMap,
    ClientCert(cert): ClientCert,
    body: Body,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return rejected(e),
    };
    let p = match prepare(gw, kind, headers, cert.as_ref(), body, true) {
        Ok(p) => p,
        Err(e) => return prepare_error(e),
    };
    if let Some(f) = &p.render_failure {
        let param = match kind {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        };
        return OpenAiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "prompt not rendered ({}): {f}; requests route by load alone",
                f.reason()
            ),
        )
        .with_param(Some(param))
        .into_response();
    }
    let input = match p.routing_input(gw, None) {
        Ok(i) => i,
        Err(e) => return prepare_error(e),
    };
    let blocks: Vec<Value> = input
        .keys()
        .iter()
        .map(|(bs, keys)| {
            let holders = gw.index().block_holders(keys);
            let keys: Vec<Value> = keys
                .iter()
                .zip(holders)
                .map(|(k, h)| serde_json::json!({"key": format!("{k:016x}"), "held_by": h}))
                .collect();
            serde_json::json!({"block_size": bs, "keys": keys})
        })
        .collect();
    let endpoints: Vec<&str> = input.serving().iter().map(|e| e.name()).collect();
    Json(serde_json::json!({
        "model": p.model,
        "contract_isolated": p.admission.is_some(),
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

/// 200 with details while some endpoint is available (render failures are
/// listed: they degrade routing, not readiness), else 503.
async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.is_draining() {
        return no_endpoint("draining: shutting down");
    }
    let endpoints = gw.fleet.snapshot();
    let available = endpoints.iter().filter(|e| e.is_available()).count();
    if available == 0 {
        return no_endpoint("no healthy endpoint");
    }
    Json(serde_json::json!({
        "status": "ready",
        "endpoints": {"available": available, "total": endpoints.len()},
        "render_failures": gw.render_failures.report(),
        "tokenizers": crate::gateway::tokenizer_report(&gw.tokenizers),
    }))
    .into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.index_metrics.refresh_gauges(gw.index());
    gw.metrics
        .refresh_endpoints(&gw.fleet.snapshot(), &gw.cfg.service);
    let routed = gw.metrics.prompt_tokens.get();
    if routed > 0 {
        gw.metrics
            .kv_cache_hit_rate
            .get_or_create(&crate::metrics::ServiceLabels {
                service: gw.cfg.service.clone(),
            })
            .set(gw.metrics.predicted_hit_tokens.get() as f64 / routed as f64);
    }
    kvgate_indexer::metrics::render(&gw.registry)
}

fn rejected(e: BytesRejection) -> Response {
    OpenAiError::from(e).into_response()
}

/// A refused request: counted by code when the contract layer refused it.
fn refused(gw: &Gateway, e: PrepareError) -> Response {
    refusal(gw, e).into_response()
}

/// A refused request as the OpenAI error every front answers it with
/// (counted by code when the contract layer refused it).
pub fn refusal(gw: &Gateway, e: PrepareError) -> OpenAiError {
    if let PrepareError::Denied(d) = &e {
        gw.metrics
            .denied
            .get_or_create(&crate::metrics::DenyLabels { code: d.code() })
            .inc();
    }
    prepare_error_body(e)
}

fn prepare_error(e: PrepareError) -> Response {
    prepare_error_body(e).into_response()
}

fn prepare_error_body(e: PrepareError) -> OpenAiError {
    let msg = e.to_string();
    match e {
        PrepareError::Denied(d) => denied(&d),
        PrepareError::UnknownModel(_) => OpenAiError::not_found(msg, e.param()),
        _ => OpenAiError::bad_request(msg, e.param()),
    }
}

/// A contract-layer refusal: its status, a string `code`, and `Retry-After`
/// for rate limits.
pub(crate) fn denied(d: &kvgate_auth::Denied) -> OpenAiError {
    let status = StatusCode::from_u16(d.status()).unwrap_or(StatusCode::FORBIDDEN);
    let e = OpenAiError::new(status, d.to_string()).with_code(d.code());
    match d.retry_after_secs() {
        Some(secs) => e.with_retry_after(u32::try_from(secs).unwrap_or(u32::MAX)),
        None => e,
    }
}

/// Any path not served here: never forwarded (only the inference endpoints
/// ever reach an engine), answered 404 and audited.
async fn not_served(State(gw): State<Arc<Gateway>>, uri: axum::http::Uri) -> Response {
    let reason = match kvgate_auth::paths::allowed_path(uri.path()) {
        Err(kvgate_auth::paths::PathRefused::NotCanonical) => "not_canonical",
        _ => "not_allowed",
    };
    gw.sentinel.audit().record(
        kvgate_auth::audit::AuditRecord::new(kvgate_auth::audit::kind::PATH_REFUSED)
            .status(404)
            .reason(reason)
            .detail(serde_json::json!({"path": uri.path().chars().take(256).collect::<String>()})),
    );
    OpenAiError::not_found(format!("no such endpoint ({reason})"), None).into_response()
}

fn proxy_error(e: ProxyError) -> Response {
    match e {
        ProxyError::NoEndpoint(RouteError::UnknownModel(_) | RouteError::NoHealthyEndpoint(_)) => {
            no_endpoint(e.to_string())
        }
        ProxyError::Upstream { .. } | ProxyError::Response(_) => {
            OpenAiError::bad_gateway(e.to_string()).into_response()
        }
    }
}

fn no_endpoint(msg: impl Into<String>) -> Response {
    OpenAiError::service_unavailable(msg, Some(DEFAULT_RETRY_AFTER_SECS)).into_response()
}
