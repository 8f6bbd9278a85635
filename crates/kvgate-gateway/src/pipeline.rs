//! The request pipeline before the proxy: authenticate, validate, apply the
//! tenant's cache salt, render and tokenize, key. Errors are typed here and
//! become HTTP responses only at the edge (`http.rs`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use kvgate_fleet::{RouteQuery, RoutingInput};
use kvgate_router::RouteError;
use kvgate_tokenize::ChatInput;
use serde_json::Value;

use crate::tenancy::AuthError;
use crate::Gateway;

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
    #[error("{0}")]
    Auth(#[from] AuthError),
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
            _ => None,
        }
    }
}

/// A validated request: its body as it will be forwarded and everything
/// routing needs.
pub struct Prepared {
    pub model: String,
    /// The body to forward (with the tenant's `cache_salt`, never the client's).
    pub body: Bytes,
    /// The prompt's tokens as the engine will see them (empty: not needed or
    /// not known, and then routing goes by load).
    pub tokens: Vec<u32>,
    pub cache_salt: Option<String>,
    pub tenant: Option<String>,
}

impl Prepared {
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
            .map_err(|e| match e {
                RouteError::UnknownModel(m) | RouteError::NoHealthyEndpoint(m) => {
                    PrepareError::UnknownModel(m)
                }
            })
    }
}

/// Authenticates, validates and (when `tokenize`) tokenizes a request.
pub fn prepare(
    gw: &Arc<Gateway>,
    kind: Kind,
    headers: &HeaderMap,
    body: Bytes,
    tokenize: bool,
) -> Result<Prepared, PrepareError> {
    let tenant = gw.tenancy.authenticate(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )?;
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
        Kind::Completion if !obj.contains_key("prompt") => {
            return Err(PrepareError::Missing("prompt"))
        }
        _ => {}
    }
    // The tenant, not the client, decides cache isolation.
    let client_salt = obj.remove("cache_salt").is_some();
    let cache_salt = tenant.as_deref().map(|t| gw.tenancy.cache_salt(t));
    if let Some(s) = &cache_salt {
        obj.insert("cache_salt".into(), Value::String(s.clone()));
    }
    if !gw.fleet.snapshot().iter().any(|e| e.serves(&model)) {
        return Err(PrepareError::UnknownModel(model));
    }
    let body = if client_salt || cache_salt.is_some() {
        Bytes::from(serde_json::to_vec(&json).map_err(PrepareError::Encode)?)
    } else {
        body
    };
    let tokens = if tokenize {
        prompt_tokens(gw, kind, &model, &json).unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(Prepared {
        model,
        body,
        tokens,
        cache_salt,
        tenant,
    })
}

/// Tokens of the request's prompt as the engine will see them (None when
/// they cannot be known: no tokenizer, unsupported content).
fn prompt_tokens(gw: &Gateway, kind: Kind, model: &str, body: &Value) -> Option<Vec<u32>> {
    let tok = gw.tokenizers.get(model)?;
    let result = match kind {
        Kind::Chat => tok.chat_tokens(&ChatInput::from_openai(body).ok()?),
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
