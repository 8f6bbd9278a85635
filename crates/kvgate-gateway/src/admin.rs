//! The admin API (`/kvgate/admin/v1/...`), behind its own bearer token
//! (config holds only its SHA-256): list contracts, suspend and reactivate.
//! A suspension takes effect for the next request (the contract's status is
//! an atomic flag read at authorization), moves the salt epoch, drops the
//! index entries of the contract's prompts, and cuts its streams in flight at
//! their next chunk.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvgate_openai::OpenAiError;

use crate::Gateway;

pub const ADMIN_CONTRACTS_PATH: &str = "/kvgate/admin/v1/contracts";

/// Adds the admin routes when an admin token is configured.
pub(crate) fn routes(gw: &Arc<Gateway>, router: Router<Arc<Gateway>>) -> Router<Arc<Gateway>> {
    if gw.cfg.admin_token_sha256.is_none() {
        return router;
    }
    router
        .route(ADMIN_CONTRACTS_PATH, get(list))
        .route(
            &format!("{ADMIN_CONTRACTS_PATH}/{{id}}/suspend"),
            post(suspend),
        )
        .route(
            &format!("{ADMIN_CONTRACTS_PATH}/{{id}}/activate"),
            post(activate),
        )
}

/// The admin token's check, in constant time; refusals are audited.
fn admin(gw: &Gateway, headers: &HeaderMap) -> Result<(), OpenAiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let expected: Option<[u8; 32]> = gw
        .cfg
        .admin_token_sha256
        .as_deref()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| b.try_into().ok());
    let ok = expected.is_some_and(|e| kvgate_auth::principal::bearer_matches(presented, &e));
    if ok {
        return Ok(());
    }
    gw.sentinel.audit().record(
        kvgate_auth::audit::AuditRecord::new(kvgate_auth::audit::kind::AUTH_FAILURE)
            .status(401)
            .reason("admin_token"),
    );
    Err(OpenAiError::unauthorized("invalid admin token"))
}

/// An admin action that is not itself a status change (those are audited as
/// `suspension` / `reactivation` where they happen).
fn audit_admin(gw: &Gateway, status: u16, action: &'static str) {
    gw.sentinel.audit().record(
        kvgate_auth::audit::AuditRecord::new(kvgate_auth::audit::kind::ADMIN)
            .subject("admin")
            .status(status)
            .reason(action),
    );
}

async fn list(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(e) = admin(&gw, &headers) {
        return e.into_response();
    }
    audit_admin(&gw, 200, "list_contracts");
    // Status and epoch only: never key material or salts.
    let data: Vec<serde_json::Value> = gw
        .sentinel
        .contracts()
        .all()
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id(),
                "status": if c.is_suspended() { "suspended" } else { "active" },
                "salt_epoch": c.epoch(),
                "models": c.spec.models,
                "loras": c.spec.loras,
                "not_before": c.spec.not_before,
                "not_after": c.spec.not_after,
            })
        })
        .collect();
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn suspend(gw: State<Arc<Gateway>>, id: Path<String>, headers: HeaderMap) -> Response {
    set_status(gw, id, headers, true)
}

async fn activate(gw: State<Arc<Gateway>>, id: Path<String>, headers: HeaderMap) -> Response {
    set_status(gw, id, headers, false)
}

fn set_status(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    suspended: bool,
) -> Response {
    if let Err(e) = admin(&gw, &headers) {
        return e.into_response();
    }
    if gw.sentinel.contracts().get(&id).is_none() {
        audit_admin(&gw, 404, "unknown_contract");
        return OpenAiError::not_found("unknown contract", None).into_response();
    }
    match gw.set_suspended(&id, suspended, "admin") {
        Ok((change, dropped)) => Json(serde_json::json!({
            "contract": change.contract,
            "status": change.status,
            "salt_epoch": change.epoch,
            "changed": change.changed,
            "index_entries_dropped": dropped,
        }))
        .into_response(),
        Err(e) => OpenAiError::internal(e.to_string()).into_response(),
    }
}
