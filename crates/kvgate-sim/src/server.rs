//! The simulated engine's HTTP face: the OpenAI endpoints and metrics as vLLM
//! serves them, on top of [`crate::engine`].

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvgate_openai::OpenAiError;
use kvgate_tokenize::{ChatInput, ModelTokenizer};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{EngineError, EngineHandle, SimRequest, TokenEvent};

mod metrics;

/// vLLM's limit on `cache_salt`.
const MAX_SALT_LEN: usize = 128;

#[derive(Clone)]
pub struct SimState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<ModelTokenizer>,
    /// Completion prompts seen lately, tokenized: benchmarks resend the same
    /// prompts, and a real engine's tokenizer runs on its own host, not on
    /// the CPU the sim shares with the gateway under test.
    pub prompt_cache: Arc<PromptCache>,
    pub model: String,
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

/// Default number of completion prompts a sim engine keeps tokenized.
pub const DEFAULT_PROMPT_CACHE_ENTRIES: usize = 256;

/// Recently tokenized prompts, keyed by a 128-bit hash of their text.
pub struct PromptCache {
    entries: parking_lot::Mutex<lru::LruCache<u128, Arc<[u32]>>>,
}

impl PromptCache {
    pub fn new(entries: usize) -> Self {
        let cap =
            std::num::NonZeroUsize::new(entries.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        Self {
            entries: parking_lot::Mutex::new(lru::LruCache::new(cap)),
        }
    }

    /// The cached ids of `text`, or `tokenize(text)` remembered.
    pub fn get_or_insert<E>(
        &self,
        text: &str,
        tokenize: impl FnOnce(&str) -> Result<Vec<u32>, E>,
    ) -> Result<Arc<[u32]>, E> {
        use std::hash::Hasher;
        let mut h = siphasher::sip128::SipHasher13::new();
        h.write(text.as_bytes());
        let key = siphasher::sip128::Hasher128::finish128(&h).as_u128();
        if let Some(ids) = self.entries.lock().get(&key) {
            return Ok(ids.clone());
        }
        let ids: Arc<[u32]> = tokenize(text)?.into();
        self.entries.lock().put(key, ids.clone());
        Ok(ids)
    }
}

pub fn router(state: SimState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions/render", post(render_completions))
        .route("/v1/chat/completions/render", post(render_chat))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route(
            "/version",
            get(|| async { Json(json!({"version": "0.32.0+kvgate-sim"})) }),
        )
        .route("/tokenize", post(tokenize))
        .route("/metrics", get(metrics::metrics))
        .route("/reset_prefix_cache", post(reset))
        .route("/sim/faults", post(faults))
        .with_state(state)
}

fn bad_request(message: impl Into<String>) -> OpenAiError {
    OpenAiError::bad_request(message, None)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a body, checks the model and the salt; returns the body (a JSON object).
fn parse(state: &SimState, body: &[u8]) -> Result<Value, OpenAiError> {
    let obj: Value =
        serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))?;
    if !obj.is_object() {
        return Err(bad_request("request body must be a JSON object"));
    }
    match obj.get("model").and_then(Value::as_str) {
        Some(m) if m == state.model => {}
        Some(m) => {
            return Err(OpenAiError::not_found(
                format!("The model `{m}` does not exist."),
                Some("model"),
            ))
        }
        None => {
            return Err(OpenAiError::bad_request(
                "'model' is required",
                Some("model"),
            ))
        }
    }
    if let Some(salt) = obj.get("cache_salt") {
        let ok = salt.as_str().is_some_and(|s| {
            !s.is_empty() && s.len() <= MAX_SALT_LEN && !s.contains(['@', '/', '\\', '\0'])
        });
        if !ok {
            return Err(OpenAiError::bad_request(
                "cache_salt must be a non-empty string of at most 128 characters without '@', '/', '\\'",
                Some("cache_salt"),
            ));
        }
    }
    Ok(obj)
}

fn sim_request(
    state: &SimState,
    obj: &Value,
    prompt_tokens: Vec<u32>,
) -> Result<SimRequest, OpenAiError> {
    let max_tokens = match obj
        .get("max_tokens")
        .or_else(|| obj.get("max_completion_tokens"))
    {
        None | Some(Value::Null) => 16,
        Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
            OpenAiError::bad_request("max_tokens must be a positive integer", Some("max_tokens"))
        })? as u32,
    };
    if prompt_tokens.is_empty() {
        return Err(bad_request("the prompt is empty"));
    }
    if prompt_tokens.len() + max_tokens as usize > state.max_model_len {
        return Err(bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion).",
            state.max_model_len,
            prompt_tokens.len() + max_tokens as usize,
            prompt_tokens.len(),
            max_tokens
        )));
    }
    Ok(SimRequest {
        prompt_tokens,
        max_tokens,
        cache_salt: obj
            .get("cache_salt")
            .and_then(Value::as_str)
            .map(str::to_string),
        lora_name: None,
    })
}

/// The prompt of a completion request as token ids.
fn completion_prompt(state: &SimState, obj: &Value) -> Result<Vec<u32>, OpenAiError> {
    match obj.get("prompt") {
        Some(Value::String(p)) => state
            .prompt_cache
            .get_or_insert(p, |p| state.tokenizer.completion_tokens(p))
            .map(|ids| ids.to_vec())
            .map_err(|e| bad_request(e.to_string())),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => Ok(a
            .iter()
            .filter_map(Value::as_u64)
            .map(|t| t as u32)
            .collect()),
        _ => Err(OpenAiError::bad_request(
            "'prompt' must be a string or a list of token ids",
            Some("prompt"),
        )),
    }
}

/// The prompt of a chat request, with the chat template applied, as token ids.
fn chat_prompt(state: &SimState, obj: &Value) -> Result<Vec<u32>, OpenAiError> {
    let input = ChatInput::from_openai(obj)
        .map_err(|e| OpenAiError::bad_request(e.to_string(), Some(e.field())))?;
    state
        .tokenizer
        .chat_tokens(&input)
        .map_err(|e| bad_request(e.to_string()))
}

async fn completions(State(state): State<SimState>, body: Bytes) -> Response {
    let req = parse(&state, &body).and_then(|obj| {
        let tokens = completion_prompt(&state, &obj)?;
        let req = sim_request(&state, &obj, tokens)?;
        Ok((obj, req))
    });
    match req {
        Ok((obj, req)) => run(state, obj, req, false).await.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn chat(State(state): State<SimState>, body: Bytes) -> Response {
    let req = parse(&state, &body).and_then(|obj| {
        let tokens = chat_prompt(&state, &obj)?;
        let req = sim_request(&state, &obj, tokens)?;
        Ok((obj, req))
    });
    match req {
        Ok((obj, req)) => run(state, obj, req, true).await.into_response(),
        Err(e) => e.into_response(),
    }
}

/// What vLLM's render endpoints return per prompt (its `GenerateRequest`):
/// the token ids the engine would run, and the request's sampling settings,
/// so a router can tokenize with the engine's own tokenizer and template.
fn rendered(obj: &Value, req: &SimRequest) -> Value {
    let field = |k: &str| obj.get(k).cloned().unwrap_or(Value::Null);
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    json!({
        "request_id": format!("render-{:016x}", rand_id()),
        "token_ids": req.prompt_tokens,
        "token_offsets": null,
        "features": null,
        "sampling_params": {
            "max_tokens": req.max_tokens,
            "temperature": field("temperature"),
            "ignore_eos": obj.get("ignore_eos").and_then(Value::as_bool).unwrap_or(false),
        },
        "model": field("model"),
        "stream": stream,
        "stream_options": if stream { field("stream_options") } else { Value::Null },
        "cache_salt": req.cache_salt,
        "priority": obj.get("priority").and_then(Value::as_i64).unwrap_or(0),
    })
}

/// `POST /v1/completions/render`: one rendered request per prompt (a list).
async fn render_completions(State(state): State<SimState>, body: Bytes) -> Response {
    let rendered = parse(&state, &body).and_then(|obj| {
        let tokens = completion_prompt(&state, &obj)?;
        Ok(rendered(&obj, &sim_request(&state, &obj, tokens)?))
    });
    match rendered {
        Ok(r) => Json(json!([r])).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/chat/completions/render`: the one rendered request.
async fn render_chat(State(state): State<SimState>, body: Bytes) -> Response {
    let rendered = parse(&state, &body).and_then(|obj| {
        let tokens = chat_prompt(&state, &obj)?;
        Ok(rendered(&obj, &sim_request(&state, &obj, tokens)?))
    });
    match rendered {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

struct Usage {
    prompt: usize,
    completion: usize,
    cached: usize,
    /// The engine finished the request (not cut by a restart).
    done: bool,
}

impl Usage {
    fn new(prompt: usize) -> Self {
        Self {
            prompt,
            completion: 0,
            cached: 0,
            done: false,
        }
    }

    /// Takes one engine event; returns the token it carries, if any.
    fn observe(&mut self, ev: TokenEvent) -> Option<u32> {
        match ev {
            TokenEvent::FirstToken { cached_tokens, .. } => self.cached = cached_tokens,
            TokenEvent::Token(t) => return Some(t),
            TokenEvent::Done {
                completion_tokens,
                cached_tokens,
                ..
            } => {
                self.completion = completion_tokens;
                self.cached = cached_tokens;
                self.done = true;
            }
        }
        None
    }

    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "total_tokens": self.prompt + self.completion,
            "completion_tokens": self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

async fn run(
    state: SimState,
    obj: Value,
    req: SimRequest,
    chat: bool,
) -> Result<Response, OpenAiError> {
    let prompt_len = req.prompt_tokens.len();
    let mut events = match state.engine.submit(req).await {
        Ok(rx) => rx,
        Err(e @ EngineError::TooLong { .. }) => return Err(bad_request(e.to_string())),
        Err(e) => return Err(OpenAiError::service_unavailable(e.to_string(), None)),
    };
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let id = format!(
        "{}-{:016x}",
        if chat { "chatcmpl" } else { "cmpl" },
        rand_id()
    );
    let created = now_secs();
    let model = state.model.clone();
    if !stream {
        let mut ids = Vec::new();
        let mut usage = Usage::new(prompt_len);
        while let Some(ev) = events.recv().await {
            ids.extend(usage.observe(ev));
        }
        if !usage.done {
            return Err(OpenAiError::internal(
                "the engine stopped before the request finished",
            ));
        }
        let text = state.tokenizer.decode(&ids, true).unwrap_or_default();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []}, "logprobs": null, "finish_reason": "length", "stop_reason": null})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "length", "stop_reason": null})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        return Ok(Json(json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage.json()})).into_response());
    }
    // Streamed: one SSE event per token, as vLLM sends them.
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let tokenizer = state.tokenizer.clone();
    tokio::spawn(async move {
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let sse = |v: Value| Ok(Bytes::from(format!("data: {v}\n\n")));
        let chunk = |choice: Value| json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
        if chat {
            let first = chunk(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
            );
            if tx.send(sse(first)).await.is_err() {
                return;
            }
        }
        let mut usage = Usage::new(prompt_len);
        while let Some(ev) = events.recv().await {
            if let Some(t) = usage.observe(ev) {
                let text = tokenizer.decode(&[t], true).unwrap_or_default();
                let text = if text.is_empty() {
                    " ".to_string()
                } else {
                    text
                };
                let c = if chat {
                    chunk(
                        json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}),
                    )
                } else {
                    chunk(
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null, "stop_reason": null}),
                    )
                };
                // The client went away: dropping `events` aborts the request.
                if tx.send(sse(c)).await.is_err() {
                    return;
                }
            }
        }
        if !usage.done {
            // The engine restarted under us: end the stream without [DONE], as a
            // dying vLLM would.
            return;
        }
        let last = if chat {
            chunk(
                json!({"index": 0, "delta": {"content": ""}, "logprobs": null, "finish_reason": "length", "stop_reason": null}),
            )
        } else {
            chunk(
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": "length", "stop_reason": null}),
            )
        };
        let _ = tx.send(sse(last)).await;
        if include_usage {
            let mut u = chunk(Value::Null);
            u["choices"] = json!([]);
            u["usage"] = usage.json();
            let _ = tx.send(sse(u)).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(tokio_stream_from(rx)))
        .map_err(|e| OpenAiError::internal(e.to_string()))
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Bytes, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0x5151_0000);
    NEXT.fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

async fn models(State(state): State<SimState>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": state.model, "object": "model", "created": now_secs(), "owned_by": "vllm",
        "root": state.model, "parent": null, "max_model_len": state.max_model_len,
    }]}))
    .into_response()
}

async fn tokenize(State(state): State<SimState>, body: Bytes) -> Result<Response, OpenAiError> {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return Err(bad_request(format!("invalid JSON body: {e}"))),
    };
    let tokens = if let Some(p) = v.get("prompt").and_then(Value::as_str) {
        let add_special = v
            .get("add_special_tokens")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        state.tokenizer.encode(p, add_special)
    } else if v.get("messages").is_some() {
        // vLLM's chat /tokenize takes a chat completion's template fields.
        let input = ChatInput::from_openai(&v)
            .map_err(|e| OpenAiError::bad_request(e.to_string(), Some(e.field())))?;
        state.tokenizer.chat_tokens(&input)
    } else {
        return Err(bad_request("'prompt' or 'messages' is required"));
    };
    let t = tokens.map_err(|e| bad_request(e.to_string()))?;
    Ok(
        Json(json!({"count": t.len(), "max_model_len": state.max_model_len, "tokens": t}))
            .into_response(),
    )
}

async fn reset(State(state): State<SimState>) -> Response {
    state.engine.reset_prefix_cache().await;
    StatusCode::OK.into_response()
}

/// Fault injection for tests and demos:
/// `{"restart": true, "drop_event_batches": N, "slowdown": F, "refuse": B}`.
async fn faults(State(state): State<SimState>, body: Bytes) -> Result<Response, OpenAiError> {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(o)) => Value::Object(o),
        Ok(_) => return Err(bad_request("body must be a JSON object")),
        Err(e) => return Err(bad_request(format!("invalid JSON body: {e}"))),
    };
    if let Some(f) = v.get("slowdown") {
        match f.as_f64().filter(|f| *f > 0.0 && f.is_finite()) {
            Some(f) => state
                .engine
                .faults
                .slowdown_permille
                .store((f * 1000.0) as u64, Ordering::Relaxed),
            None => return Err(bad_request("slowdown must be a positive number")),
        }
    }
    if let Some(r) = v.get("refuse") {
        match r.as_bool() {
            Some(r) => state.engine.faults.refuse.store(r, Ordering::Relaxed),
            None => return Err(bad_request("refuse must be a boolean")),
        }
    }
    if let Some(n) = v.get("drop_event_batches") {
        match (n.as_u64(), &state.engine.publisher) {
            (Some(n), Some(p)) => p.drop_next(n),
            (None, _) => {
                return Err(bad_request(
                    "drop_event_batches must be a non-negative integer",
                ))
            }
            (Some(_), None) => return Err(bad_request("this engine publishes no events")),
        }
    }
    if v.get("restart").and_then(Value::as_bool) == Some(true) {
        state.engine.restart().await;
    }
    Ok(Json(json!({"ok": true})).into_response())
}

#[cfg(test)]
mod prompt_cache_tests {
    use super::PromptCache;
    use std::cell::Cell;

    #[test]
    fn tokenizes_each_text_once_and_keeps_errors_out() {
        let cache = PromptCache::new(2);
        let calls = Cell::new(0);
        let tok = |t: &str| -> Result<Vec<u32>, String> {
            calls.set(calls.get() + 1);
            if t == "bad" {
                Err("no".into())
            } else {
                Ok(t.bytes().map(u32::from).collect())
            }
        };
        assert_eq!(&*cache.get_or_insert("ab", tok).unwrap(), &[97, 98]);
        assert_eq!(&*cache.get_or_insert("ab", tok).unwrap(), &[97, 98]);
        assert_eq!(calls.get(), 1);
        assert!(cache.get_or_insert("bad", tok).is_err());
        assert!(cache.get_or_insert("bad", tok).is_err());
        assert_eq!(calls.get(), 3, "errors are not cached");
        cache.get_or_insert("c", tok).unwrap();
        cache.get_or_insert("d", tok).unwrap();
        cache.get_or_insert("ab", tok).unwrap();
        assert_eq!(calls.get(), 6, "evicted past capacity");
    }
}
