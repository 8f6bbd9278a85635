//! The store's HTTP admin listener: probes, Prometheus metrics, a contract's
//! usage, and the contract status the gateway pushes on every suspension and
//! reactivation (`POST .../status {"suspended", "epoch"}`): the store takes
//! the gateway's epoch, so the salts it maps stay the gateway's, and a
//! suspension shreds the contract's chunks at once. Writes need the admin
//! token (the config holds its SHA-256); without one configured they are
//! not served.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvgate_openai::OpenAiError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::scope::Owner;
use crate::Store;

pub const CONTRACTS_PATH: &str = "/kvgate/store/v1/contracts";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContractLabels {
    contract: String,
}

struct Admin {
    store: Arc<Store>,
    token_sha256: Option<[u8; 32]>,
    registry: Registry,
    bytes: Family<TierLabels, Gauge>,
    chunks: Family<TierLabels, Gauge>,
    contract_bytes: Family<ContractLabels, Gauge>,
    /// `sentinel_kv_cache_size_gb{service}`: what the store holds, in GB.
    size_gb: Family<ServiceLabels, Gauge<f64, AtomicU64>>,
    service: ServiceLabels,
}

/// The admin routes over `store`. `token_sha256`: the admin token's
/// SHA-256; None serves only the read-only routes. `service`: the label of
/// `sentinel_kv_cache_size_gb`.
pub fn router(store: Arc<Store>, token_sha256: Option<[u8; 32]>, service: &str) -> Router {
    let mut registry = Registry::default();
    let size_gb = Family::<ServiceLabels, Gauge<f64, AtomicU64>>::default();
    registry.register(
        "sentinel_kv_cache_size_gb",
        "KV cache the store holds, GB (1e9 bytes)",
        size_gb.clone(),
    );
    let bytes = Family::<TierLabels, Gauge>::default();
    let chunks = Family::<TierLabels, Gauge>::default();
    let contract_bytes = Family::<ContractLabels, Gauge>::default();
    registry.register("kvgate_store_bytes", "Bytes held, by tier", bytes.clone());
    registry.register(
        "kvgate_store_chunks",
        "Chunks held, by tier",
        chunks.clone(),
    );
    registry.register(
        "kvgate_store_contract_bytes",
        "Bytes held per configured contract",
        contract_bytes.clone(),
    );
    // Each tier's own counters, incremented where they happen.
    let lower = store
        .disk
        .as_ref()
        .map(|d| ("disk", &d.stats, &d.integrity_failures))
        .into_iter()
        .chain(
            store
                .redis
                .as_ref()
                .map(|r| ("redis", &r.stats, &r.integrity_failures)),
        );
    let tiers = std::iter::once(("memory", &store.memory.stats, None))
        .chain(lower.map(|(t, s, f)| (t, s, Some(f))));
    for (tier, stats, integrity_failures) in tiers {
        let sub = registry.sub_registry_with_label(("tier".into(), tier.into()));
        sub.register("kvgate_store_hits", "GET hits", stats.hits.clone());
        sub.register("kvgate_store_misses", "GET misses", stats.misses.clone());
        sub.register(
            "kvgate_store_evictions",
            "Chunks evicted to make room",
            stats.evictions.clone(),
        );
        if let Some(f) = integrity_failures {
            sub.register(
                "kvgate_store_integrity_failures",
                "Sealed chunks that did not open (tampered, torn, or another epoch's): each a miss",
                f.clone(),
            );
        }
    }
    if let Some(r) = &store.redis {
        registry.register(
            "kvgate_store_redis_errors",
            "Redis commands that failed (server down, timeout): each a miss or a chunk not written",
            r.errors.clone(),
        );
    }
    registry.register(
        "kvgate_store_protocol_errors",
        "lm:// connections closed for a bad header or an oversized chunk",
        store.protocol_errors.clone(),
    );
    registry.register(
        "kvgate_store_scope_refusals",
        "lm:// requests refused for their key's contract scope",
        store.scope_refusals.clone(),
    );
    registry.register(
        "kvgate_store_shreds",
        "Contracts shredded",
        store.shreds.clone(),
    );
    registry.register(
        "kvgate_store_connections_refused",
        "lm:// connections closed at accept: max_connections were open",
        store.connections_refused.clone(),
    );
    registry.register(
        "kvgate_store_timeouts",
        "lm:// connections closed for a request or reply stalled past io_timeout_ms",
        store.timeouts.clone(),
    );
    let admin = Arc::new(Admin {
        store,
        token_sha256,
        registry,
        bytes,
        chunks,
        contract_bytes,
        size_gb,
        service: ServiceLabels {
            service: service.to_string(),
        },
    });
    let router = Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(&format!("{CONTRACTS_PATH}/{{id}}/usage"), get(usage));
    let router = if admin.token_sha256.is_some() {
        router
            .route(&format!("{CONTRACTS_PATH}/{{id}}/status"), post(status))
            .route(&format!("{CONTRACTS_PATH}/{{id}}/shred"), post(shred))
    } else {
        router
    };
    router.with_state(admin)
}

async fn ready(State(a): State<Arc<Admin>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "chunks": a.store.memory.len(),
        "bytes": a.store.memory.bytes(),
    }))
}

async fn metrics(State(a): State<Arc<Admin>>) -> Response {
    let memory = TierLabels { tier: "memory" };
    a.size_gb
        .get_or_create(&a.service)
        .set(a.store.memory.bytes() as f64 / 1e9);
    a.bytes
        .get_or_create(&memory)
        .set(i64::try_from(a.store.memory.bytes()).unwrap_or(i64::MAX));
    a.chunks
        .get_or_create(&memory)
        .set(i64::try_from(a.store.memory.len()).unwrap_or(i64::MAX));
    if let Some(d) = &a.store.disk {
        let disk = TierLabels { tier: "disk" };
        a.bytes
            .get_or_create(&disk)
            .set(i64::try_from(d.bytes()).unwrap_or(i64::MAX));
        a.chunks
            .get_or_create(&disk)
            .set(i64::try_from(d.len()).unwrap_or(i64::MAX));
    }
    if let Some(r) = &a.store.redis {
        let redis = TierLabels { tier: "redis" };
        a.bytes
            .get_or_create(&redis)
            .set(i64::try_from(r.bytes()).unwrap_or(i64::MAX));
        a.chunks
            .get_or_create(&redis)
            .set(i64::try_from(r.len()).unwrap_or(i64::MAX));
    }
    if let Some(reg) = a.store.scopes.contracts() {
        // One series per configured contract: bounded by the config.
        for c in reg.all() {
            let b = a
                .store
                .memory
                .owner_bytes(&Owner::Contract(c.id().to_string()));
            a.contract_bytes
                .get_or_create(&ContractLabels {
                    contract: c.id().to_string(),
                })
                .set(i64::try_from(b).unwrap_or(i64::MAX));
        }
    }
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &a.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response(),
        Err(e) => OpenAiError::internal(e.to_string()).into_response(),
    }
}

fn authorized(a: &Admin, headers: &HeaderMap) -> Result<(), OpenAiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match &a.token_sha256 {
        Some(e) if kvgate_auth::principal::bearer_matches(presented, e) => Ok(()),
        _ => Err(OpenAiError::unauthorized("invalid admin token")),
    }
}

fn known(a: &Admin, id: &str) -> Result<(), OpenAiError> {
    match a.store.scopes.contracts().and_then(|r| r.get(id)) {
        Some(_) => Ok(()),
        None => Err(OpenAiError::not_found("unknown contract", None)),
    }
}

async fn usage(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    if let Err(e) = known(&a, &id) {
        return e.into_response();
    }
    let bytes = a.store.memory.owner_bytes(&Owner::Contract(id.clone()));
    Json(serde_json::json!({"contract": id, "bytes": bytes})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    suspended: bool,
    epoch: u64,
}

async fn status(
    State(a): State<Arc<Admin>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<StatusBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(e) = authorized(&a, &headers).and_then(|()| known(&a, &id)) {
        return e.into_response();
    }
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return OpenAiError::from(e).into_response(),
    };
    let Some(reg) = a.store.scopes.contracts() else {
        return OpenAiError::not_found("unknown contract", None).into_response();
    };
    let change = match reg.sync(&id, body.suspended, body.epoch) {
        Ok(c) => c,
        Err(e) => return OpenAiError::internal(e.to_string()).into_response(),
    };
    let (chunks, bytes) = if body.suspended {
        a.store.shred(&id)
    } else {
        (0, 0)
    };
    Json(serde_json::json!({
        "contract": id,
        "suspended": body.suspended,
        "salt_epoch": change.epoch,
        "shredded_chunks": chunks,
        "shredded_bytes": bytes,
    }))
    .into_response()
}

async fn shred(
    State(a): State<Arc<Admin>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authorized(&a, &headers).and_then(|()| known(&a, &id)) {
        return e.into_response();
    }
    let (chunks, bytes) = a.store.shred(&id);
    Json(serde_json::json!({"contract": id, "shredded_chunks": chunks, "shredded_bytes": bytes}))
        .into_response()
}
