//! The request pipeline before the proxy: authenticate, validate, apply the
//! contract (its models, its cache salt, the fields only kvgate sets),
//! render and tokenize, admit under the contract's limits. Errors are typed
//! here and become HTTP responses only at the edge (`http.rs`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use kvgate_fleet::{RouteQuery, RoutingInput};
use kvgate_router::RouteError;
use kvgate_tokenize::{ChatInput, InvalidField, RejectedMessage, TokenizeError};
use parking_lot::Mutex;
use serde_json::Value;

use crate::metrics::{GatewayMetrics, RenderFailureLabels};

use crate::Gateway;
use kvgate_auth::audit::AuditRecord;
use kvgate_auth::{Admission, Denied};

/// The kind of OpenAI request being proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    pub fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

/// Why a request was refused before routing.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The contract layer's refusal (401, 403, 404, 429, 400).
    #[error("{0}")]
    Denied(#[from] Denied),
    #[error("request body is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("'{0}' is required")]
    Missing(&'static str),
    #[error("'{field}' is required and must be {must_be}")]
    Invalid {
        field: &'static str,
        must_be: &'static str,
    },
    /// Messages vLLM itself answers 400 for (kvgate_tokenize::vllm_rejection).
    #[error("{0}")]
    Rejected(RejectedMessage),
    /// The chat template raised (`raise_exception`): vLLM answers 400 too.
    #[error("{0}")]
    TemplateRefused(String),
    #[error("The model `{0}` does not exist.")]
    UnknownModel(String),
    #[error("re-encoding the request body: {0}")]
    Encode(serde_json::Error),
}

impl PrepareError {
    /// The request field at fault, for OpenAI's `param`.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            PrepareError::Missing(field) | PrepareError::Invalid { field, .. } => Some(field),
            PrepareError::UnknownModel(_) => Some("model"),
            PrepareError::Rejected(r) => Some(r.field()),
            PrepareError::TemplateRefused(_) => Some("messages"),
            _ => None,
        }
    }
}

/// Why a prompt's tokens are not known. The request is still served (routed
/// by load alone), but never silently: see [`RenderFailures`].
#[derive(Debug, thiserror::Error)]
pub enum RenderFailure {
    #[error("no tokenizer is configured for this model")]
    NoTokenizer,
    #[error("{0}")]
    Input(#[from] InvalidField),
    #[error("{0}")]
    Tokenize(#[from] TokenizeError),
    #[error("'prompt' is neither a string, a list of token ids nor a list of strings")]
    UnsupportedPrompt,
    /// vLLM builds this model's tokenizer as a class kvgate cannot reproduce:
    /// its ids would not be the engine's.
    #[error("vLLM builds this model's tokenizer as {0}, which kvgate does not reproduce")]
    UnsupportedTokenizer(String),
}

impl RenderFailure {
    /// A short, stable name (the metric's `reason` label).
    pub fn reason(&self) -> &'static str {
        match self {
            RenderFailure::NoTokenizer => "no_tokenizer",
            RenderFailure::Input(_) => "invalid_chat_input",
            RenderFailure::Tokenize(e) => e.reason(),
            RenderFailure::UnsupportedPrompt => "unsupported_prompt",
            RenderFailure::UnsupportedTokenizer(_) => "unsupported_tokenizer",
        }
    }
}

/// Render failures per model and reason: counted
/// (`kvgate_render_failures_total`), logged once each, listed on `/ready`.
#[derive(Default)]
pub struct RenderFailures {
    seen: Mutex<std::collections::BTreeMap<(String, &'static str), SeenFailure>>,
}

struct SeenFailure {
    count: u64,
    last_error: String,
}

impl RenderFailures {
    pub fn record(&self, metrics: &GatewayMetrics, model: &str, failure: &RenderFailure) {
        let reason = failure.reason();
        metrics
            .render_failures
            .get_or_create(&RenderFailureLabels {
                model: model.to_string(),
                reason,
            })
            .inc();
        let mut seen = self.seen.lock();
        let entry = seen
            .entry((model.to_string(), reason))
            .or_insert_with(|| {
                tracing::warn!(model, reason, error = %failure,
                    "prompt not rendered: routing this model's requests by load alone (logged once per model and reason)");
                SeenFailure {
                    count: 0,
                    last_error: String::new(),
                }
            });
        entry.count += 1;
        entry.last_error = failure.to_string();
    }

    /// `[{model, reason, count, last_error}]`, for `/ready`.
    pub fn report(&self) -> Vec<Value> {
        self.seen
            .lock()
            .iter()
            .map(|((model, reason), s)| {
                serde_json::json!({"model": model, "reason": reason, "count": s.count, "last_error": s.last_error})
            })
            .collect()
    }
}

/// A validated request: its body as it will be forwarded and everything
/// routing needs.
pub struct Prepared {
    pub model: String,
    /// The body to forward (with the contract's `cache_salt`, never the client's).
    pub body: Bytes,
    /// The prompt's tokens as the engine will see them (empty: not needed or
    /// not known, and then routing goes by load).
    pub tokens: Vec<u32>,
    /// Why `tokens` is empty although they were asked for.
    pub render_failure: Option<RenderFailure>,
    pub cache_salt: Option<String>,
    /// The request's contract and its concurrency slot (None: no contracts
    /// configured), held until the response ends.
    pub admission: Option<Admission>,
}

impl Prepared {
    /// What the request's end needs (`RequestFacts`): its admission taken
    /// from here, its contract's counters, counted as admitted.
    pub fn facts(
        &mut self,
        gw: &Gateway,
        received: std::time::Instant,
        pending: crate::proxy::PendingRequest,
    ) -> crate::proxy::RequestFacts {
        let counters = self.admission.as_ref().map(|a| {
            let c = gw.metrics.contract(a.contract.id());
            c.requests.inc();
            c.prompt_tokens.inc_by(self.tokens.len() as u64);
            c
        });
        crate::proxy::RequestFacts {
            received,
            admission: self.admission.take(),
            counters,
            pending,
        }
    }

    /// The fleet's routing input for this request (fails for a model no
    /// endpoint serves).
    pub fn routing_input<'a>(
        &'a self,
        gw: &Gateway,
        session_id: Option<&'a str>,
    ) -> Result<RoutingInput<'a>, PrepareError> {
        gw.fleet
            .routing_input(&RouteQuery {
                model: &self.model,
                tokens: &self.tokens,
                cache_salt: self.cache_salt.as_deref(),
                session_id,
            })
            // `routing_input` checks only who serves the model (health is
            // `route`'s concern), so either variant means an unknown model.
            .map_err(|e| match e {
                RouteError::UnknownModel(m) | RouteError::NoHealthyEndpoint(m) => {
                    PrepareError::UnknownModel(m)
                }
            })
    }
}

/// Authenticates (by bearer, or by the connection's verified client
/// certificate), validates and (when `tokenize`) tokenizes a request.
pub fn prepare(
    gw: &Arc<Gateway>,
    kind: Kind,
    headers: &HeaderMap,
    client_cert: Option<&[u8; 32]>,
    body: Bytes,
    tokenize: bool,
) -> Result<Prepared, PrepareError> {
    let sentinel = &gw.sentinel;
    let principal = sentinel
        .enabled()
        .then(|| {
            sentinel.authenticate_with_cert(
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
                client_cert,
            )
        })
        .transpose()?;
    let mut json: Value = serde_json::from_slice(&body).map_err(PrepareError::Json)?;
    let obj = json.as_object_mut().ok_or(PrepareError::NotAnObject)?;
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => {
            return Err(PrepareError::Invalid {
                field: "model",
                must_be: "a string",
            })
        }
    };
    match kind {
        Kind::Chat if !obj.get("messages").is_some_and(Value::is_array) => {
            return Err(PrepareError::Invalid {
                field: "messages",
                must_be: "an array",
            })
        }
        Kind::Chat => {
            if let Some(r) = obj
                .get("messages")
                .and_then(Value::as_array)
                .and_then(|m| kvgate_tokenize::vllm_rejection(m))
            {
                return Err(PrepareError::Rejected(r));
            }
        }
        Kind::Completion if !obj.contains_key("prompt") => {
            return Err(PrepareError::Missing("prompt"))
        }
        _ => {}
    }
    let authorized = principal
        .map(|p| sentinel.authorize(p, &model))
        .transpose()?;
    // Only kvgate sets what steers the engine's cache, KV transfer and
    // scheduling; the contract decides cache isolation.
    let who = |r: AuditRecord| match &authorized {
        Some(a) => r.contract(a.contract.id()).subject(&a.principal.subject),
        None => r,
    };
    let dropped = kvgate_auth::fields::strip_privileged(obj, sentinel.privileged_fields())
        .map_err(|e| {
            sentinel.audit().record(
                who(AuditRecord::new(kvgate_auth::audit::kind::FIELD_REFUSED))
                    .model(&model)
                    .status(400)
                    .reason(e.0),
            );
            Denied::from(e)
        })?;
    if !dropped.is_empty() {
        sentinel.audit().record(
            who(AuditRecord::new(kvgate_auth::audit::kind::FIELD_DROPPED))
                .model(&model)
                .reason(dropped.join(",")),
        );
    }
    if !gw.fleet.snapshot().iter().any(|e| e.serves(&model)) {
        return Err(PrepareError::UnknownModel(model));
    }
    let (tokens, render_failure) = match tokenize.then(|| prompt_tokens(gw, kind, &model, &json)) {
        None => (Vec::new(), None),
        Some(Ok(t)) => (t, None),
        Some(Err(RenderFailure::Tokenize(TokenizeError::Refused(msg)))) => {
            return Err(PrepareError::TemplateRefused(msg))
        }
        Some(Err(f)) => {
            gw.render_failures.record(&gw.metrics, &model, &f);
            (Vec::new(), Some(f))
        }
    };
    // Unrendered prompts are charged by the size the client sent (about 4
    // bytes a token), so an untokenizable prompt does not escape the limit.
    let prompt_tokens = if tokens.is_empty() {
        body.len() as u64 / 4
    } else {
        tokens.len() as u64
    };
    let admission = authorized
        .map(|a| sentinel.admit(a, prompt_tokens))
        .transpose()?;
    let fields = admission.as_ref().map(|a| {
        kvgate_auth::fields::contract_fields(
            &a.cache_salt,
            sentinel.lmcache_tag(),
            a.contract.spec.priority,
        )
    });
    let spliced = match &fields {
        // Nothing dropped: the client's bytes stay as sent, after kvgate's.
        Some(f) if dropped.is_empty() => kvgate_auth::fields::prepend_fields(&body, f),
        _ => None,
    };
    let body = match (spliced, fields) {
        (Some(b), _) => Bytes::from(b),
        (None, None) if dropped.is_empty() => body,
        (None, fields) => {
            if let Some(obj) = json.as_object_mut() {
                obj.extend(fields.unwrap_or_default());
            }
            let mut out = Vec::with_capacity(body.len() + 160);
            serde_json::to_writer(&mut out, &json).map_err(PrepareError::Encode)?;
            Bytes::from(out)
        }
    };
    let cache_salt = admission.as_ref().map(|a| a.cache_salt.clone());
    Ok(Prepared {
        model,
        body,
        tokens,
        render_failure,
        cache_salt,
        admission,
    })
}

/// Tokens of the request's prompt as the engine will see them.
fn prompt_tokens(
    gw: &Gateway,
    kind: Kind,
    model: &str,
    body: &Value,
) -> Result<Vec<u32>, RenderFailure> {
    let tok = gw.tokenizers.get(model).ok_or(RenderFailure::NoTokenizer)?;
    if let kvgate_tokenize::Construction::Unsupported { class } = tok.construction() {
        return Err(RenderFailure::UnsupportedTokenizer(class.clone()));
    }
    Ok(match kind {
        Kind::Chat => tok.chat_tokens(&ChatInput::from_openai(body)?)?,
        Kind::Completion => match body.get("prompt") {
            Some(Value::String(s)) => tok.completion_tokens(s)?,
            // Pre-tokenized prompts are used as they are.
            Some(Value::Array(a)) if a.iter().all(Value::is_u64) => a
                .iter()
                .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or(RenderFailure::UnsupportedPrompt)?,
            // A batch of prompts is routed by its first one.
            Some(Value::Array(a)) => match a.first() {
                Some(Value::String(s)) => tok.completion_tokens(s)?,
                _ => return Err(RenderFailure::UnsupportedPrompt),
            },
            _ => return Err(RenderFailure::UnsupportedPrompt),
        },
    })
}
