//! The routing transaction for a front that does not proxy the request
//! itself (the Envoy endpoint picker): the same pipeline as the proxy's
//! (contract, validation, tokens), the same `Fleet::route`, the same end
//! (`RequestEnd`); only the endpoints a caller allows are eligible.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::HeaderMap;
use kvgate_fleet::{Endpoint, Routed};
use kvgate_openai::OpenAiError;
use kvgate_router::Decision;

use crate::config::DEFAULT_RETRY_AFTER_SECS;
use crate::http::refusal;
use crate::pipeline::{prepare, Kind};
use crate::proxy::PendingRequest;
use crate::request_end::{record_routed, RequestEnd};
use crate::Gateway;

/// Where a request goes, the body to forward and its end.
pub struct Picked {
    pub endpoint: Arc<Endpoint>,
    pub decision: Decision,
    /// The body as the engine must get it (the contract's salt and tag in).
    pub body: Bytes,
    /// Holds the endpoint's load until the response ends or is dropped.
    pub end: RequestEnd,
}

/// Authenticates, validates, tokenizes and routes a request among the
/// endpoints `eligible` accepts; a refusal is the OpenAI error to answer.
pub fn pick(
    gw: &Arc<Gateway>,
    kind: Kind,
    headers: &HeaderMap,
    body: Bytes,
    received: Instant,
    eligible: &dyn Fn(&Endpoint) -> bool,
) -> Result<Picked, OpenAiError> {
    let pending = PendingRequest::new(gw);
    let tokenize = gw.fleet.scheduler().config().policy.uses_prompt_tokens();
    let mut prepared =
        prepare(gw, kind, headers, None, body, tokenize).map_err(|e| refusal(gw, e))?;
    let session = headers
        .get(gw.cfg.session_header.as_str())
        .and_then(|v| v.to_str().ok());
    let facts = prepared.facts(gw, received, pending);
    let mut input = prepared
        .routing_input(gw, session)
        .map_err(|e| refusal(gw, e))?;
    let barred: Vec<Arc<Endpoint>> = input
        .serving()
        .iter()
        .filter(|e| !eligible(e))
        .cloned()
        .collect();
    for e in &barred {
        input.exclude(e);
    }
    if let Some(a) = &facts.admission {
        gw.contract_keys.record(a.contract.id(), input.keys());
    }
    let Routed {
        endpoint,
        decision,
        guard,
    } = gw.fleet.route(&input).map_err(|e| {
        OpenAiError::service_unavailable(e.to_string(), Some(DEFAULT_RETRY_AFTER_SECS))
    })?;
    record_routed(gw, &input, &decision, received, true);
    let end = RequestEnd::new(
        gw,
        &endpoint,
        input.model,
        input.prompt_tokens as u64,
        &decision,
        guard,
        facts,
    );
    let body = prepared.body.clone();
    Ok(Picked {
        endpoint,
        decision,
        body,
        end,
    })
}

/// An available endpoint among those `eligible` accepts, for a request that
/// names no model (`GET /v1/models`): the least loaded.
pub fn pick_any(gw: &Gateway, eligible: &dyn Fn(&Endpoint) -> bool) -> Option<Arc<Endpoint>> {
    gw.fleet
        .snapshot()
        .iter()
        .filter(|e| e.is_available() && eligible(e))
        .min_by_key(|e| e.load.snapshot().in_flight)
        .cloned()
}
