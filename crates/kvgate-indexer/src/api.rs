//! The index's HTTP service: locality queries, dumps, health and metrics.
//! [`query_locality`] is the one locality query, the gRPC API's too.
//!
//! Errors use OpenAI's error shape, typed as vLLM types it ([`kvgate_openai`]),
//! so clients of the gateway, the index and the engines parse one format.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kvgate_index::{KvIndex, Locality, MAX_TIERS};
use kvgate_keys::RequestContext;
pub use kvgate_openai::OpenAiError;
use kvgate_tokenize::{ChatInput, TokenizerRegistry};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::metrics::IndexerMetrics;

/// Largest accepted request body: ~1M token ids as JSON.
pub const MAX_BODY_BYTES: usize = 8 << 20;

pub use kvgate_index::DEFAULT_TIER_WEIGHTS;

#[derive(Clone)]
pub struct ApiState {
    pub index: Arc<KvIndex>,
    pub metrics: Arc<IndexerMetrics>,
    pub registry: Arc<Registry>,
    pub tier_weights: [f64; MAX_TIERS],
    /// Tokenizers for `text` / `messages` queries (by model).
    pub tokenizers: Arc<TokenizerRegistry>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/locality", get(locality_get).post(locality_post))
        .route("/v1/index/dump", get(dump))
        .route("/v1/index/endpoints", get(endpoints))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// `POST /v1/locality`'s body: exactly one of `tokens`, `text` or `messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityRequest {
    pub model: String,
    /// The prompt's token ids, after the chat template.
    #[serde(default)]
    pub tokens: Option<Vec<u32>>,
    /// A completions-style prompt, tokenized with the model's tokenizer.
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub cache_salt: Option<String>,
    #[serde(default)]
    pub lora_name: Option<String>,
    /// Chat messages, rendered with the model's chat template and tokenized;
    /// this and the four fields below are a chat completion's, kept as sent
    /// (an explicit null included) for [`ChatInput::from_openai`] to read.
    #[serde(default, deserialize_with = "as_sent")]
    pub messages: Option<Value>,
    #[serde(default, deserialize_with = "as_sent")]
    pub tools: Option<Value>,
    #[serde(default, deserialize_with = "as_sent")]
    pub add_generation_prompt: Option<Value>,
    #[serde(default, deserialize_with = "as_sent")]
    pub continue_final_message: Option<Value>,
    #[serde(default, deserialize_with = "as_sent")]
    pub chat_template_kwargs: Option<Value>,
}

/// Present fields stay `Some`, even `null`: the chat body keeps what the client sent.
fn as_sent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl LocalityRequest {
    /// The chat fields as a chat completion body (None without `messages`).
    fn take_chat_body(&mut self) -> Option<Value> {
        let messages = self.messages.take()?;
        let mut body = serde_json::Map::new();
        body.insert("messages".into(), messages);
        for (name, value) in [
            ("tools", self.tools.take()),
            ("add_generation_prompt", self.add_generation_prompt.take()),
            ("continue_final_message", self.continue_final_message.take()),
            ("chat_template_kwargs", self.chat_template_kwargs.take()),
        ] {
            if let Some(v) = value {
                body.insert(name.into(), v);
            }
        }
        Some(Value::Object(body))
    }
}

#[derive(Debug, Deserialize)]
pub struct LocalityQuery {
    pub model: Option<String>,
    /// Comma-separated token ids.
    pub tokens: Option<String>,
    pub cache_salt: Option<String>,
    pub lora_name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalityResponse {
    pub model: String,
    pub prompt_tokens: usize,
    /// Share of the prompt's tokens cached on the best endpoint.
    pub coverage: f64,
    pub endpoints: Vec<EndpointScore>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct EndpointScore {
    pub endpoint: String,
    pub matched_blocks: u32,
    pub matched_tokens: usize,
    /// The tier holding most of the matched prefix (None when nothing matched).
    pub tier: Option<String>,
    pub tiers: Vec<(String, u32)>,
    /// Tier-weighted share of the prompt's blocks that is cached, in [0, 1].
    pub score: f64,
    pub block_size: u32,
    pub stale: bool,
}

async fn locality_get(
    State(st): State<ApiState>,
    query: Result<Query<LocalityQuery>, QueryRejection>,
) -> Result<Json<LocalityResponse>, OpenAiError> {
    let Query(q) = query?;
    let model = q.model.ok_or_else(|| {
        OpenAiError::bad_request("missing query parameter 'model'", Some("model"))
    })?;
    let raw = q.tokens.ok_or_else(|| {
        OpenAiError::bad_request("missing query parameter 'tokens'", Some("tokens"))
    })?;
    let tokens = parse_token_list(&raw)?;
    query_locality(
        &st,
        &model,
        Prompt::Tokens(tokens),
        q.cache_salt.as_deref(),
        q.lora_name.as_deref(),
    )
    .map(Json)
}

async fn locality_post(
    State(st): State<ApiState>,
    body: Result<Json<LocalityRequest>, JsonRejection>,
) -> Result<Json<LocalityResponse>, OpenAiError> {
    let Json(mut req) = body?;
    let chat = req.take_chat_body();
    let prompt = Prompt::one_of(req.tokens.take(), req.text.take(), chat)?;
    query_locality(
        &st,
        &req.model,
        prompt,
        req.cache_salt.as_deref(),
        req.lora_name.as_deref(),
    )
    .map(Json)
}

/// A locality query's prompt, as both fronts (this HTTP API and
/// [`crate::grpc`]) hand it to [`query_locality`].
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Token ids, after the chat template; matched as sent.
    Tokens(Vec<u32>),
    /// A completions-style prompt, tokenized with the model's tokenizer.
    Text(String),
    /// A chat completion body (`messages` and the template fields), read by
    /// [`ChatInput::from_openai`], rendered and tokenized.
    Chat(Value),
}

impl Prompt {
    /// Exactly one of the three, or the 400 that names them.
    pub fn one_of(
        tokens: Option<Vec<u32>>,
        text: Option<String>,
        chat: Option<Value>,
    ) -> Result<Self, OpenAiError> {
        match (tokens, text, chat) {
            (Some(t), None, None) => Ok(Self::Tokens(t)),
            (None, Some(text), None) => Ok(Self::Text(text)),
            (None, None, Some(chat)) => Ok(Self::Chat(chat)),
            _ => Err(OpenAiError::bad_request(
                "exactly one of 'tokens', 'text' or 'messages' is required",
                Some("tokens"),
            )),
        }
    }

    /// The prompt's token ids, as the engine serving `model` computes them.
    fn into_tokens(self, st: &ApiState, model: &str) -> Result<Vec<u32>, OpenAiError> {
        match self {
            Self::Tokens(t) => Ok(t),
            Self::Text(text) => tokenizer(st, model)?
                .completion_tokens(&text)
                .map_err(|e| OpenAiError::bad_request(e.to_string(), Some("text"))),
            Self::Chat(chat) => {
                // The same reading of the chat fields as the gateway's and the engine's.
                let input = ChatInput::from_openai(&chat)
                    .map_err(|e| OpenAiError::bad_request(e.to_string(), Some(e.field())))?;
                tokenizer(st, model)?
                    .chat_tokens(&input)
                    .map_err(|e| OpenAiError::bad_request(e.to_string(), Some("messages")))
            }
        }
    }
}

/// The one locality query both fronts run: tokenizes `prompt` for `model`,
/// looks it up, scores every endpoint serving the model and records the
/// query metrics. Errors are the HTTP API's (400s, with the field at fault).
pub fn query_locality(
    st: &ApiState,
    model: &str,
    prompt: Prompt,
    cache_salt: Option<&str>,
    lora_name: Option<&str>,
) -> Result<LocalityResponse, OpenAiError> {
    let tokens = prompt.into_tokens(st, model)?;
    run_locality(st, model, &tokens, cache_salt, lora_name)
}

fn tokenizer<'a>(
    st: &'a ApiState,
    model: &str,
) -> Result<&'a Arc<kvgate_tokenize::ModelTokenizer>, OpenAiError> {
    st.tokenizers.get(model).ok_or_else(|| {
        OpenAiError::bad_request(
            format!("no tokenizer is configured for model {model:?}; send 'tokens'"),
            Some("model"),
        )
    })
}

fn parse_token_list(raw: &str) -> Result<Vec<u32>, OpenAiError> {
    if raw.trim().is_empty() {
        return Ok(Vec::new());
    }
    raw.split(',')
        .map(|t| {
            t.trim().parse::<u32>().map_err(|_| {
                OpenAiError::bad_request(format!("token id {t:?} is not a u32"), Some("tokens"))
            })
        })
        .collect()
}

fn run_locality(
    st: &ApiState,
    model: &str,
    tokens: &[u32],
    cache_salt: Option<&str>,
    lora_name: Option<&str>,
) -> Result<LocalityResponse, OpenAiError> {
    let ctx = RequestContext {
        model,
        lora_name,
        cache_salt,
        mm_items: &[],
    };
    let started = Instant::now();
    let loc = st
        .index
        .locality(tokens, &ctx)
        .map_err(|e| OpenAiError::bad_request(e.to_string(), None))?;
    let resp = score_locality(model, &loc, &st.tier_weights);
    let queried = loc
        .endpoints
        .iter()
        .map(|e| e.total_blocks)
        .max()
        .unwrap_or(0);
    let best = loc
        .endpoints
        .iter()
        .map(|e| e.matched_blocks)
        .max()
        .unwrap_or(0);
    st.metrics.record_query(
        started.elapsed().as_secs_f64(),
        u64::from(queried),
        u64::from(best),
    );
    Ok(resp)
}

/// Turns raw matches into scores: the matched blocks are credited fastest tier
/// first (a block held in GPU and CPU is served from GPU), each at its tier's weight.
pub fn score_locality(model: &str, loc: &Locality, weights: &[f64; MAX_TIERS]) -> LocalityResponse {
    let mut endpoints: Vec<EndpointScore> = loc
        .endpoints
        .iter()
        .map(|e| {
            let credit = kvgate_index::weighted_blocks(e.matched_blocks, &e.tier_blocks, weights);
            let score = if e.total_blocks == 0 {
                0.0
            } else {
                credit / f64::from(e.total_blocks)
            };
            EndpointScore {
                endpoint: e.endpoint.clone(),
                matched_blocks: e.matched_blocks,
                matched_tokens: e.matched_tokens,
                tier: e
                    .tiers
                    .iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(t, _)| t.clone()),
                tiers: e.tiers.clone(),
                score,
                block_size: e.block_size,
                stale: e.stale,
            }
        })
        .collect();
    endpoints.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.endpoint.cmp(&b.endpoint))
    });
    let coverage = if loc.prompt_tokens == 0 {
        0.0
    } else {
        endpoints
            .iter()
            .map(|e| e.matched_tokens)
            .max()
            .unwrap_or(0) as f64
            / loc.prompt_tokens as f64
    };
    LocalityResponse {
        model: model.to_string(),
        prompt_tokens: loc.prompt_tokens,
        coverage,
        endpoints,
    }
}

async fn dump(State(st): State<ApiState>) -> impl IntoResponse {
    Json(st.index.dump())
}

async fn endpoints(State(st): State<ApiState>) -> impl IntoResponse {
    Json(st.index.endpoints())
}

async fn metrics(State(st): State<ApiState>) -> Response {
    st.metrics.refresh_gauges(&st.index);
    crate::metrics::render(&st.registry)
}
