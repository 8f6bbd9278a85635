//! A fixed-latency OpenAI-ish backend for overhead benchmarks: every
//! completion answers after the same delay, so whatever a router adds on top
//! shows as added latency and lost requests/s.
//!
//! It serves what the routers we compare call on a worker: the OpenAI
//! completion endpoints (plain and SSE), `/health`, `/v1/models`, `/metrics`,
//! `/tokenize` and vLLM's render endpoints (one token per word).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvgate_openai::OpenAiError;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct FakeBackendConfig {
    pub model: String,
    /// Time from request to the (first) answer.
    pub delay: Duration,
    /// Content chunks of a streamed answer, and the gap between them.
    pub stream_chunks: u32,
    pub chunk_interval: Duration,
}

impl Default for FakeBackendConfig {
    fn default() -> Self {
        Self {
            model: "fake-model".into(),
            delay: Duration::from_millis(20),
            stream_chunks: 8,
            chunk_interval: Duration::from_millis(1),
        }
    }
}

pub fn router(cfg: FakeBackendConfig) -> Router {
    Router::new()
        .route("/v1/completions", post(completion))
        .route("/v1/chat/completions", post(completion))
        .route("/v1/completions/render", post(render_list))
        .route("/v1/chat/completions/render", post(render_one))
        .route("/tokenize", post(tokenize))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .with_state(cfg)
}

/// Serves `cfg` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, cfg: FakeBackendConfig) {
    if let Err(e) = axum::serve(kvgate_openai::streaming_listener(listener), router(cfg)).await {
        tracing::warn!(error = %e, "fake backend stopped");
    }
}

/// One id per whitespace-separated word of every string in the request.
fn word_tokens(body: &Value) -> Vec<u32> {
    let mut words = 0u32;
    let mut count = |s: &str| words += s.split_whitespace().count() as u32;
    match body.get("prompt") {
        Some(Value::String(p)) => count(p),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).for_each(&mut count),
        _ => {}
    }
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(c) = m.get("content").and_then(Value::as_str) {
            count(c);
        }
    }
    (1..=words.max(1)).collect()
}

/// A body that is not JSON is a 400 in the shape vLLM answers with.
fn parse(body: &[u8]) -> Result<Value, OpenAiError> {
    serde_json::from_slice(body).map_err(|e| OpenAiError::bad_request(e.to_string(), None))
}

async fn completion(State(cfg): State<FakeBackendConfig>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let chat = req.get("messages").is_some();
    let prompt_tokens = word_tokens(&req).len();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": cfg.stream_chunks,
        "total_tokens": prompt_tokens + cfg.stream_chunks as usize,
        "prompt_tokens_details": {"cached_tokens": 0},
    });
    tokio::time::sleep(cfg.delay).await;
    if !req.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": "ok", "finish_reason": "length"})
        };
        return Json(json!({"id": "fake", "object": if chat { "chat.completion" } else { "text_completion" }, "model": cfg.model, "choices": [choice], "usage": usage})).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let event = |v: Value| Ok(Bytes::from(format!("data: {v}\n\n")));
        for i in 0..cfg.stream_chunks {
            if i > 0 {
                tokio::time::sleep(cfg.chunk_interval).await;
            }
            let choice = if chat {
                json!({"index": 0, "delta": {"content": " ok"}, "finish_reason": null})
            } else {
                json!({"index": 0, "text": " ok", "finish_reason": null})
            };
            if tx
                .send(event(
                    json!({"id": "fake", "model": cfg.model, "choices": [choice]}),
                ))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx
            .send(event(
                json!({"id": "fake", "model": cfg.model, "choices": [], "usage": usage}),
            ))
            .await;
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn rendered(cfg: &FakeBackendConfig, req: &Value) -> Value {
    json!({"request_id": "fake", "token_ids": word_tokens(req), "sampling_params": {}, "model": cfg.model})
}

async fn render_list(State(cfg): State<FakeBackendConfig>, body: Bytes) -> Response {
    match parse(&body) {
        Ok(req) => Json(json!([rendered(&cfg, &req)])).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn render_one(State(cfg): State<FakeBackendConfig>, body: Bytes) -> Response {
    match parse(&body) {
        Ok(req) => Json(rendered(&cfg, &req)).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn tokenize(body: Bytes) -> Response {
    match parse(&body) {
        Ok(req) => {
            let t = word_tokens(&req);
            Json(json!({"count": t.len(), "max_model_len": 32768, "tokens": t})).into_response()
        }
        Err(r) => r.into_response(),
    }
}

async fn models(State(cfg): State<FakeBackendConfig>) -> Response {
    Json(json!({"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "fake"}]}))
        .into_response()
}

/// An idle engine's load gauges, so metric scrapers see a valid target.
async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn answers_after_the_delay_plain_and_streamed() {
        #![allow(clippy::unwrap_used)]
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let cfg = FakeBackendConfig {
            delay: Duration::from_millis(50),
            stream_chunks: 3,
            ..Default::default()
        };
        let server = tokio::spawn(serve(listener, cfg.clone()));
        let c = reqwest::Client::new();
        let started = Instant::now();
        let plain: Value = c
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": cfg.model, "prompt": "a b c"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(plain["usage"]["prompt_tokens"], 3);
        assert_eq!(plain["choices"][0]["text"], "ok");

        let spec = crate::workload::RequestSpec {
            at: None,
            body: crate::workload::Body::Chat(vec![json!({"role": "user", "content": "hi there"})]),
            max_tokens: 3,
            group: 0,
            session_id: None,
        };
        let o = crate::client::send(&c, &base, &cfg.model, &spec, Duration::from_secs(10)).await;
        assert!(o.ok, "{:?}", o.error);
        assert_eq!(o.itl.len(), 2, "three content chunks");
        assert!(o.ttft.unwrap_or(0.0) >= 0.05);

        let render: Value = c
            .post(format!("{base}/v1/completions/render"))
            .json(&json!({"model": cfg.model, "prompt": "one two"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(render[0]["token_ids"], json!([1, 2]));
        let health = c.get(format!("{base}/health")).send().await.unwrap();
        assert!(health.status().is_success());
        server.abort();
    }
}
