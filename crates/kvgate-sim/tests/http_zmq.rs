#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A real `RunningSim` on loopback: the OpenAI endpoints (plain and streamed),
//! `/metrics`, error bodies, and the KV event stream end to end into a
//! kvgate-indexer subscriber, whose index must hold exactly the blocks the
//! engine has cached, through evictions, dropped batches and a restart.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kvgate_index::{IndexConfig, KvIndex};
use kvgate_indexer::metrics::{EndpointLabels, IndexerMetrics, OutcomeLabels};
use kvgate_indexer::subscriber::{run_with_options, SubscriberOptions};
use kvgate_indexer::EndpointConfig;
use kvgate_keys::BlockHasher;
use kvgate_sim::engine::EngineConfig;
use kvgate_sim::fleet::{RunningSim, SimConfig, DEFAULT_MODEL};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::watch;

/// Bound on a whole test: generous, the machine may be loaded.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// Bound on one wait for an eventually true condition.
const WAIT: Duration = Duration::from_secs(30);
const BS: usize = 16;

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test did not finish in time");
}

fn config(engine: EngineConfig) -> SimConfig {
    SimConfig {
        listen: "127.0.0.1:0".into(),
        engine,
        ..SimConfig::default()
    }
}

/// A sim running `time_scale` times faster than real time.
async fn start(time_scale: f64) -> RunningSim {
    RunningSim::start(config(EngineConfig {
        block_size: BS,
        time_scale,
        ..EngineConfig::default()
    }))
    .await
    .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> (StatusCode, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text:?}"));
    (status, v)
}

/// The sim's own `/tokenize` count.
async fn token_count(c: &reqwest::Client, sim: &RunningSim, body: Value) -> usize {
    let (status, v) = post(c, format!("{}/tokenize", sim.url()), body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let n = v["count"].as_u64().unwrap() as usize;
    assert_eq!(v["tokens"].as_array().unwrap().len(), n);
    n
}

/// A prose prompt of a few hundred tokens, distinct per `tag`.
fn long_text(tag: &str) -> String {
    (0..40)
        .map(|i| format!("Section {i} of the {tag} manual says the valve must stay closed."))
        .collect::<Vec<_>>()
        .join(" ")
}

fn usage(v: &Value) -> (usize, usize, usize, usize) {
    let u = &v["usage"];
    let n = |x: &Value| x.as_u64().unwrap_or_else(|| panic!("not a count: {v}")) as usize;
    (
        n(&u["prompt_tokens"]),
        n(&u["completion_tokens"]),
        n(&u["total_tokens"]),
        n(&u["prompt_tokens_details"]["cached_tokens"]),
    )
}

/// What vLLM reports cached for a repeated prompt of `n` tokens: every full
/// block but never the last prompt token.
fn full_hit(n: usize) -> usize {
    (n - 1) / BS * BS
}

fn check_common(v: &Value, object: &str, id_prefix: &str) {
    assert_eq!(v["object"], object, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with(id_prefix), "{v}");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000, "{v}");
    assert_eq!(v["model"], DEFAULT_MODEL, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["choices"][0]["index"], 0, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_report_openai_usage_and_prefix_hits() {
    bounded(async {
        let sim = start(100.0).await;
        let c = client();
        let url = format!("{}/v1/completions", sim.url());
        let prompt = long_text("completions");
        let n = token_count(&c, &sim, json!({"model": DEFAULT_MODEL, "prompt": prompt})).await;
        assert!(n >= 300, "prompt of only {n} tokens");
        let body = json!({"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 5});

        let (status, first) = post(&c, url.clone(), body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{first}");
        check_common(&first, "text_completion", "cmpl-");
        assert!(first["choices"][0]["text"].is_string(), "{first}");
        assert_eq!(usage(&first), (n, 5, n + 5, 0), "{first}");

        let (status, second) = post(&c, url.clone(), body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{second}");
        let (p, _, _, cached) = usage(&second);
        assert_eq!(p, n);
        assert!(cached > 0, "repeat got no cache hit: {second}");
        assert_eq!(cached, full_hit(n), "{second}");

        // Another tenant's salt shares nothing; its own repeat hits.
        let mut salted = body.clone();
        salted["cache_salt"] = json!("tenant-b");
        let (status, v) = post(&c, url.clone(), salted.clone()).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(usage(&v).3, 0, "a different salt hit the cache: {v}");
        let (_, v) = post(&c, url.clone(), salted).await;
        assert_eq!(usage(&v).3, full_hit(n), "{v}");

        // Token-id prompts are accepted as is.
        let (status, v) = post(
            &c,
            url,
            json!({"model": DEFAULT_MODEL, "prompt": [1, 2, 3, 4, 5], "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(usage(&v), (5, 3, 8, 0), "{v}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_reports_openai_usage_and_prefix_hits() {
    bounded(async {
        let sim = start(100.0).await;
        let c = client();
        let url = format!("{}/v1/chat/completions", sim.url());
        let messages = json!([
            {"role": "system", "content": long_text("chat")},
            {"role": "user", "content": "Is the valve closed?"},
        ]);
        let n = token_count(
            &c,
            &sim,
            json!({"model": DEFAULT_MODEL, "messages": messages}),
        )
        .await;
        assert!(n >= 300, "prompt of only {n} tokens");
        let body = json!({"model": DEFAULT_MODEL, "messages": messages, "max_tokens": 7});

        let (status, first) = post(&c, url.clone(), body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{first}");
        check_common(&first, "chat.completion", "chatcmpl-");
        let msg = &first["choices"][0]["message"];
        assert_eq!(msg["role"], "assistant", "{first}");
        assert!(msg["content"].is_string(), "{first}");
        assert_eq!(usage(&first), (n, 7, n + 7, 0), "{first}");

        let (status, second) = post(&c, url.clone(), body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{second}");
        let cached = usage(&second).3;
        assert!(cached > 0, "repeat got no cache hit: {second}");
        assert_eq!(cached, full_hit(n), "{second}");

        let mut salted = body;
        salted["cache_salt"] = json!("another-tenant");
        let (status, v) = post(&c, url, salted).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(usage(&v).3, 0, "a different salt hit the cache: {v}");

        // /v1/models and /version answer as vLLM's do.
        let models: Value = c
            .get(format!("{}/v1/models", sim.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], DEFAULT_MODEL);
        let version: Value = c
            .get(format!("{}/version", sim.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(version["version"].is_string(), "{version}");
    })
    .await;
}

/// One SSE body, read chunk by chunk: each `data:` payload with the time
/// it was received, relative to the request being sent.
async fn read_sse(resp: reqwest::Response, sent: Instant) -> Vec<(Duration, String)> {
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut events = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let at = sent.elapsed();
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .trim_end()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"));
            events.push((at, data.to_string()));
        }
    }
    assert!(buf.is_empty(), "trailing bytes {buf:?}");
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_is_incremental_and_ends_with_done() {
    bounded(async {
        // Real time: 32 decode steps of ~5 ms each after the first token.
        let sim = start(1.0).await;
        let c = client();
        const MAX: usize = 32;

        // Completions, no usage requested.
        let prompt = "Tell me about valves.";
        let sent = Instant::now();
        let resp = c
            .post(format!("{}/v1/completions", sim.url()))
            .json(&json!({"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": MAX, "stream": true}))
            .send()
            .await
            .unwrap();
        let events = read_sse(resp, sent).await;
        let (last_at, last) = events.last().unwrap();
        assert_eq!(last, "[DONE]");
        let chunks: Vec<(Duration, Value)> = events[..events.len() - 1]
            .iter()
            .map(|(at, d)| (*at, serde_json::from_str(d).unwrap()))
            .collect();
        let tokens = chunks
            .iter()
            .filter(|(_, v)| v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()))
            .count();
        assert_eq!(tokens, MAX, "one chunk per token: {chunks:?}");
        for (_, v) in &chunks {
            assert_eq!(v["object"], "text_completion", "{v}");
            assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
            assert!(v.get("usage").is_none_or(Value::is_null), "usage not asked for: {v}");
        }
        assert_eq!(chunks.last().unwrap().1["choices"][0]["finish_reason"], "length");
        // ~31 decode steps (~155 ms modelled) separate the first token from
        // the last: the first chunk must have arrived well before [DONE].
        let first_at = chunks[0].0;
        eprintln!("stream: first chunk at {first_at:?}, [DONE] at {last_at:?}");
        assert!(
            *last_at >= first_at + Duration::from_millis(50),
            "not incremental: first chunk at {first_at:?}, [DONE] at {last_at:?}"
        );

        // Chat with usage.
        let messages = json!([{"role": "user", "content": "Tell me about valves."}]);
        let n = token_count(&c, &sim, json!({"model": DEFAULT_MODEL, "messages": messages})).await;
        let sent = Instant::now();
        let resp = c
            .post(format!("{}/v1/chat/completions", sim.url()))
            .json(&json!({
                "model": DEFAULT_MODEL, "messages": messages, "max_tokens": MAX, "stream": true,
                "stream_options": {"include_usage": true},
            }))
            .send()
            .await
            .unwrap();
        let events = read_sse(resp, sent).await;
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|(_, d)| serde_json::from_str(d).unwrap())
            .collect();
        for v in &chunks {
            assert_eq!(v["object"], "chat.completion.chunk", "{v}");
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let content = chunks
            .iter()
            .filter(|v| v["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()))
            .count();
        assert_eq!(content, MAX, "{chunks:?}");
        assert!(
            chunks.iter().any(|v| v["choices"][0]["finish_reason"] == "length"),
            "{chunks:?}"
        );
        let with_usage: Vec<&Value> = chunks
            .iter()
            .filter(|v| v.get("usage").is_some_and(|u| !u.is_null()))
            .collect();
        assert_eq!(with_usage.len(), 1, "{chunks:?}");
        let u = with_usage[0];
        assert_eq!(u["choices"], json!([]), "{u}");
        assert_eq!(usage(u), (n, MAX, n + MAX, 0), "{u}");
        assert!(std::ptr::eq(u, chunks.last().unwrap()), "usage comes last");
    })
    .await;
}

async fn metrics_text(c: &reqwest::Client, sim: &RunningSim) -> String {
    let r = c
        .get(format!("{}/metrics", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    r.text().await.unwrap()
}

/// The value of the first sample of `name` (any labels).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_use_vllm_names_and_count_hits() {
    bounded(async {
        let sim = start(100.0).await;
        let c = client();
        let text = metrics_text(&c, &sim).await;
        for name in [
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:time_to_first_token_seconds_bucket",
            "vllm:cache_config_info",
        ] {
            assert!(sample(&text, name).is_some(), "{name} missing:\n{text}");
        }
        assert!(
            text.contains(&format!("block_size=\"{BS}\"")) && text.contains("num_gpu_blocks=\"4096\""),
            "{text}"
        );
        assert_eq!(sample(&text, "vllm:prefix_cache_hits_total"), Some(0.0));

        let prompt = long_text("metrics");
        let n = token_count(&c, &sim, json!({"model": DEFAULT_MODEL, "prompt": prompt})).await;
        let url = format!("{}/v1/completions", sim.url());
        let body = json!({"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 2});
        let (status, v) = post(&c, url.clone(), body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        // Metrics are published after each step: wait for the one that
        // finished the request.
        let mut text = String::new();
        for _ in 0..500 {
            text = metrics_text(&c, &sim).await;
            if sample(&text, "vllm:generation_tokens_total") == Some(2.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sample(&text, "vllm:prefix_cache_hits_total"), Some(0.0), "{text}");
        assert_eq!(sample(&text, "vllm:prefix_cache_queries_total"), Some(n as f64));
        assert_eq!(sample(&text, "vllm:prompt_tokens_total"), Some(n as f64));
        let hits_before = sample(&text, "vllm:prefix_cache_hits_total").unwrap();

        let (_, v) = post(&c, url, body).await;
        let cached = usage(&v).3;
        assert_eq!(cached, full_hit(n), "{v}");
        for _ in 0..500 {
            text = metrics_text(&c, &sim).await;
            if sample(&text, "vllm:generation_tokens_total") == Some(4.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let hits = sample(&text, "vllm:prefix_cache_hits_total").unwrap();
        assert!(hits > hits_before, "hits did not grow:\n{text}");
        assert_eq!(hits, cached as f64);
        assert_eq!(sample(&text, "vllm:prefix_cache_queries_total"), Some(2.0 * n as f64));
        assert_eq!(sample(&text, "vllm:prompt_tokens_total"), Some(2.0 * n as f64));
        assert_eq!(sample(&text, "vllm:time_to_first_token_seconds_count"), Some(2.0));
        assert_eq!(sample(&text, "vllm:num_requests_running"), Some(0.0));
        assert_eq!(sample(&text, "vllm:num_requests_waiting"), Some(0.0));
        assert_eq!(
            sample(
                &text,
                "vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"kvgate-sim\",le=\"+Inf\"}"
            ),
            Some(2.0),
            "{text}"
        );
    })
    .await;
}

/// vLLM's error body, `{"error": {"message": str, "type": str, "param": .., "code": int}}`,
/// typed by status as vLLM types it.
fn check_error(status: StatusCode, v: &Value, want: StatusCode, what: &str) -> Value {
    assert_eq!(status, want, "{what}: {v}");
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {v}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{what}: {v}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{what}: {v}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    let kind = match want.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        500 => "InternalServerError",
        503 => "ServiceUnavailableError",
        other => panic!("no expected type for {other}"),
    };
    assert_eq!(e["type"], kind, "{what}: {v}");
    assert!(
        e["param"].is_null() || e["param"].is_string(),
        "{what}: {v}"
    );
    assert_eq!(
        e["code"].as_u64(),
        Some(u64::from(want.as_u16())),
        "{what}: {v}"
    );
    e["param"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    bounded(async {
        let sim = RunningSim::start(SimConfig {
            max_model_len: 256,
            ..config(EngineConfig {
                block_size: BS,
                num_blocks: 16,
                time_scale: 100.0,
                ..EngineConfig::default()
            })
        })
        .await
        .unwrap();
        let c = client();
        let comp = format!("{}/v1/completions", sim.url());
        let chat = format!("{}/v1/chat/completions", sim.url());
        let long = long_text("errors");

        // Not JSON at all.
        for url in [&comp, &chat] {
            let r = c
                .post(url.clone())
                .header("content-type", "application/json")
                .body("{\"model\": ")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: Value = r.json().await.unwrap();
            check_error(status, &v, StatusCode::BAD_REQUEST, "invalid JSON");
        }
        let cases: Vec<(&str, &String, Value, StatusCode)> = vec![
            ("missing model", &comp, json!({"prompt": "hi"}), StatusCode::BAD_REQUEST),
            ("missing model (chat)", &chat, json!({"messages": [{"role": "user", "content": "hi"}]}), StatusCode::BAD_REQUEST),
            ("unknown model", &comp, json!({"model": "gpt-9", "prompt": "hi"}), StatusCode::NOT_FOUND),
            ("unknown model (chat)", &chat, json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), StatusCode::NOT_FOUND),
            ("negative max_tokens", &comp, json!({"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": -1}), StatusCode::BAD_REQUEST),
            ("zero max_tokens", &chat, json!({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), StatusCode::BAD_REQUEST),
            ("string max_tokens", &comp, json!({"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": "5"}), StatusCode::BAD_REQUEST),
            ("prompt over max_model_len", &comp, json!({"model": DEFAULT_MODEL, "prompt": long}), StatusCode::BAD_REQUEST),
            ("chat over max_model_len", &chat, json!({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": long}]}), StatusCode::BAD_REQUEST),
            ("prompt + max_tokens over max_model_len", &comp, json!({"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 300}), StatusCode::BAD_REQUEST),
            // 200 tokens fit max_model_len but not the 15 usable KV blocks.
            ("prompt over the KV cache", &comp, json!({"model": DEFAULT_MODEL, "prompt": (0..240).collect::<Vec<u32>>(), "max_tokens": 1}), StatusCode::BAD_REQUEST),
            ("missing prompt", &comp, json!({"model": DEFAULT_MODEL}), StatusCode::BAD_REQUEST),
            ("empty prompt ids", &comp, json!({"model": DEFAULT_MODEL, "prompt": []}), StatusCode::BAD_REQUEST),
            ("missing messages", &chat, json!({"model": DEFAULT_MODEL}), StatusCode::BAD_REQUEST),
            ("bad cache_salt", &comp, json!({"model": DEFAULT_MODEL, "prompt": "hi", "cache_salt": ""}), StatusCode::BAD_REQUEST),
            ("body not an object", &comp, json!([1, 2]), StatusCode::BAD_REQUEST),
        ];
        for (what, url, body, want) in cases {
            let (status, v) = post(&c, url.clone(), body).await;
            check_error(status, &v, want, what);
        }
        // Chat fields of the wrong type are named in `param`.
        let hi = json!([{"role": "user", "content": "hi"}]);
        for (field, value) in [
            ("messages", json!("hi")),
            ("tools", json!({})),
            ("add_generation_prompt", json!("yes")),
            ("continue_final_message", json!(1)),
            ("chat_template_kwargs", json!([])),
        ] {
            let mut body = json!({"model": DEFAULT_MODEL, "messages": hi});
            body[field] = value;
            let (status, v) = post(&c, chat.clone(), body).await;
            let param = check_error(status, &v, StatusCode::BAD_REQUEST, field);
            assert_eq!(param, field, "{v}");
        }
        let (status, v) = post(&c, chat.clone(), json!({"model": "gpt-9", "messages": hi})).await;
        assert_eq!(check_error(status, &v, StatusCode::NOT_FOUND, "model"), "model");
        let (status, v) = post(&c, format!("{}/tokenize", sim.url()), json!({})).await;
        check_error(status, &v, StatusCode::BAD_REQUEST, "tokenize without input");

        // A refusing engine answers 503 in the same shape, then recovers.
        let faults = format!("{}/sim/faults", sim.url());
        let ok = json!({"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 2});
        let (status, _) = post(&c, faults.clone(), json!({"refuse": true})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, v) = post(&c, comp.clone(), ok.clone()).await;
        check_error(status, &v, StatusCode::SERVICE_UNAVAILABLE, "refusing");
        let (status, _) = post(&c, faults.clone(), json!({"refuse": false})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, v) = post(&c, faults, json!({"slowdown": -1})).await;
        check_error(status, &v, StatusCode::BAD_REQUEST, "bad fault");

        // Still serving.
        let (status, v) = post(&c, comp, ok).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(usage(&v).1, 2);
        let (status, v) = post(
            &c,
            chat,
            json!({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let health = c.get(format!("{}/health", sim.url())).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
    })
    .await;
}

/// Polls the engine's stats until `cond` holds; false after `WAIT`.
async fn wait_stats(
    sim: &RunningSim,
    cond: impl Fn(&kvgate_sim::engine::EngineStats) -> bool,
) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond(&sim.engine.metrics_snapshot()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_abort_and_restarts_cut_requests() {
    bounded(async {
        let sim = start(1.0).await;
        let c = client();
        let url = format!("{}/v1/completions", sim.url());
        // ~10 s of decoding in real time: only an abort or a restart ends it.
        let long =
            json!({"model": DEFAULT_MODEL, "prompt": "hello", "max_tokens": 2000, "stream": true});

        // A client that goes away: the engine drops its request and blocks.
        let resp = c.post(url.clone()).json(&long).send().await.unwrap();
        let mut body = resp.bytes_stream();
        assert!(body.next().await.unwrap().is_ok());
        assert!(wait_stats(&sim, |s| s.running == 1).await);
        drop(body);
        assert!(
            wait_stats(&sim, |s| s.running == 0 && s.kv_usage == 0.0).await,
            "the request outlived its client"
        );

        // A restart cuts a stream (no [DONE]) and fails a plain request.
        let resp = c.post(url.clone()).json(&long).send().await.unwrap();
        let streamed = tokio::spawn(read_sse(resp, Instant::now()));
        let mut plain = long.clone();
        plain["stream"] = json!(false);
        let plain = tokio::spawn({
            let (c, url) = (c.clone(), url.clone());
            async move { post(&c, url, plain).await }
        });
        assert!(wait_stats(&sim, |s| s.running == 2).await);
        let (status, _) = post(
            &c,
            format!("{}/sim/faults", sim.url()),
            json!({"restart": true}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let events = streamed.await.unwrap();
        assert!(!events.is_empty());
        assert!(
            events.iter().all(|(_, d)| d != "[DONE]"),
            "a cut stream ended with [DONE]"
        );
        let (status, v) = plain.await.unwrap();
        check_error(
            status,
            &v,
            StatusCode::INTERNAL_SERVER_ERROR,
            "restarted under a request",
        );
        assert!(wait_stats(&sim, |s| s.running == 0 && s.waiting == 0).await);

        // Still serving.
        let (status, v) = post(
            &c,
            url,
            json!({"model": DEFAULT_MODEL, "prompt": "hello", "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    })
    .await;
}

// ---------------------------------------------------------------------------
// KV events end to end.

fn held(index: &KvIndex, name: &str) -> BTreeSet<u64> {
    index
        .dump()
        .endpoints
        .into_iter()
        .filter(|e| e.name == name)
        .flat_map(|e| e.entries)
        .map(|(_, hash, tier)| {
            assert_eq!(tier, "GPU");
            hash
        })
        .collect()
}

fn last_seq(index: &KvIndex, name: &str) -> Option<i64> {
    index
        .endpoints()
        .into_iter()
        .find(|e| e.name == name)
        .and_then(|e| e.last_seq)
}

fn gaps(m: &IndexerMetrics, name: &str) -> u64 {
    m.seq_gaps
        .get_or_create(&EndpointLabels {
            endpoint: name.to_string(),
        })
        .get()
}

fn replays(m: &IndexerMetrics, name: &str, outcome: &str) -> u64 {
    m.replays
        .get_or_create(&OutcomeLabels {
            endpoint: name.to_string(),
            outcome: outcome.to_string(),
        })
        .get()
}

/// A prompt of token ids: one of a few shared prefixes, then its own tail.
fn workload_prompt(i: usize, prefixes: usize, prefix_len: usize) -> Vec<u32> {
    let p = i % prefixes;
    let tail = 5 + (i * 7) % 40;
    (0..prefix_len)
        .map(|t| 1000 + (p * 997 + t) as u32)
        .chain((0..tail).map(|t| 50_000 + (i * 131 + t) as u32))
        .collect()
}

/// Sends `range` requests, 12 at a time; all must succeed.
async fn run_workload(
    c: &reqwest::Client,
    sim: &RunningSim,
    range: std::ops::Range<usize>,
    prefixes: usize,
) {
    let url = format!("{}/v1/completions", sim.url());
    let results: Vec<(StatusCode, Value)> = futures_util::stream::iter(range)
        .map(|i| {
            let mut body = json!({
                "model": DEFAULT_MODEL,
                "prompt": workload_prompt(i, prefixes, 100 + 16 * (i % 3)),
                "max_tokens": 1 + (i * 5) % 40,
            });
            if i % 10 == 3 {
                body["cache_salt"] = json!(format!("salt-{}", i % 2));
            }
            post(c, url.clone(), body)
        })
        .buffer_unordered(12)
        .collect()
        .await;
    for (status, v) in results {
        assert_eq!(status, StatusCode::OK, "{v}");
    }
}

/// Waits until the engine is idle, the subscriber has applied every batch
/// published and the index holds exactly the engine's cached blocks.
async fn converge(sim: &RunningSim, index: &KvIndex, name: &str, what: &str) -> BTreeSet<u64> {
    let publisher = sim.engine.publisher.clone().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = sim.engine.metrics_snapshot();
        let idle = stats.running == 0 && stats.waiting == 0;
        let engine: BTreeSet<u64> = sim.engine.cached_hashes().await.into_iter().collect();
        let published = publisher.next_seq() - 1;
        let caught_up = published < 0 || last_seq(index, name) == Some(published);
        let got = held(index, name);
        if idle && caught_up && got == engine {
            return engine;
        }
        if Instant::now() >= deadline {
            let missing: Vec<_> = engine.difference(&got).collect();
            let extra: Vec<_> = got.difference(&engine).collect();
            panic!(
                "{what}: index did not converge (idle {idle}, applied {:?} of {published}): \
                 engine has {} blocks, index {}; missing from index {missing:x?}, extra {extra:x?}",
                last_seq(index, name),
                engine.len(),
                got.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_events_keep_an_index_equal_to_the_engine_cache() {
    bounded(async {
        let sim = RunningSim::start(SimConfig {
            events: Some("tcp://127.0.0.1:0".into()),
            replay: Some("tcp://127.0.0.1:0".into()),
            ..config(EngineConfig {
                block_size: BS,
                num_blocks: 64,
                max_num_seqs: 12,
                time_scale: 200.0,
                ..EngineConfig::default()
            })
        })
        .await
        .unwrap();
        let name = sim.url();
        let index = Arc::new(KvIndex::new(
            IndexConfig::default(),
            BlockHasher::from_secret(b"sim-http-zmq"),
        ));
        let metrics = Arc::new(IndexerMetrics::default());
        let source = EndpointConfig {
            url: name.clone(),
            models: vec![DEFAULT_MODEL.into()],
            adapters: Vec::new(),
            block_size: BS as u32,
            events: Some(sim.events_endpoint().unwrap()),
            replay: sim.replay_endpoint(),
            topic: String::new(),
            bind: false,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let subscriber = tokio::spawn(run_with_options(
            source,
            index.clone(),
            metrics.clone(),
            stop_rx,
            SubscriberOptions {
                replay_timeout: Duration::from_secs(3),
                ..SubscriberOptions::default()
            },
        ));
        let c = client();

        // ZMQ's slow joiner: a few requests until the subscriber hears one
        // batch live (it replays from seq 0 on joining, so nothing is lost).
        let mut warm = 0;
        while last_seq(&index, &name).is_none() {
            assert!(warm < 200, "the subscriber never received a batch");
            run_workload(&c, &sim, 1000 + warm..1001 + warm, 1).await;
            warm += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // 60 requests over 4 shared prefixes, in a 63-block cache.
        run_workload(&c, &sim, 0..60, 4).await;
        let cached = converge(&sim, &index, &name, "workload").await;
        assert!(!cached.is_empty());
        let stats = sim.engine.metrics_snapshot();
        assert!(stats.blocks_removed > 0, "the workload evicted nothing");
        assert!(stats.prefix_cache_hits > 0, "the workload hit nothing");
        assert_eq!(gaps(&metrics, &name), 0);
        eprintln!(
            "workload: {} blocks cached, {} stored, {} evicted, {} preemptions, {} hit tokens",
            cached.len(),
            stats.blocks_stored,
            stats.blocks_removed,
            stats.preemptions,
            stats.prefix_cache_hits
        );

        // Batches lost on the live stream come back by replay.
        let (status, v) = post(
            &c,
            format!("{}/sim/faults", sim.url()),
            json!({"drop_event_batches": 3}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        run_workload(&c, &sim, 60..90, 5).await;
        converge(&sim, &index, &name, "after dropped batches").await;
        eprintln!(
            "after drops: {} gaps, {} replays ok",
            gaps(&metrics, &name),
            replays(&metrics, &name, "ok")
        );
        assert!(gaps(&metrics, &name) >= 1, "no gap seen");
        assert!(replays(&metrics, &name, "ok") >= 1, "no replay");
        assert_eq!(replays(&metrics, &name, "unavailable"), 0);
        let info = index
            .endpoints()
            .into_iter()
            .find(|e| e.name == name)
            .unwrap();
        assert!(!info.stale, "endpoint marked stale");

        // vLLM's /reset_prefix_cache on an idle engine: AllBlocksCleared.
        let r = c
            .post(format!("{}/reset_prefix_cache", sim.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let after = converge(&sim, &index, &name, "after reset_prefix_cache").await;
        assert!(
            after.is_empty(),
            "engine still caches {} blocks",
            after.len()
        );
        run_workload(&c, &sim, 90..100, 3).await;
        assert!(
            !converge(&sim, &index, &name, "after reset and more requests")
                .await
                .is_empty()
        );

        // A restart clears the engine, and the index with it.
        let (status, v) = post(
            &c,
            format!("{}/sim/faults", sim.url()),
            json!({"restart": true}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let after = converge(&sim, &index, &name, "after restart").await;
        assert!(
            after.is_empty(),
            "engine still caches {} blocks",
            after.len()
        );
        assert!(held(&index, &name).is_empty());

        // And the stream goes on after it.
        run_workload(&c, &sim, 100..110, 2).await;
        let cached = converge(&sim, &index, &name, "after restart and more requests").await;
        assert!(!cached.is_empty());

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), subscriber)
            .await
            .expect("subscriber did not stop")
            .unwrap()
            .unwrap();
    })
    .await;
}

/// A request whose prompt fits the KV cache but whose prompt + output does
/// not (here 200 + 100 tokens in 15 usable blocks of 16, under the default
/// `max_model_len`) must be refused up front, as vLLM guarantees that one
/// `max_model_len` sequence fits its cache, or complete. (It once was
/// preempted when it outgrew the cache and could never be re-admitted,
/// wedging every later request behind it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outgrowing_the_cache_does_not_wedge_the_engine() {
    bounded(async {
        let sim = RunningSim::start(config(EngineConfig {
            block_size: BS,
            num_blocks: 16,
            time_scale: 1000.0,
            ..EngineConfig::default()
        }))
        .await
        .unwrap();
        let c = client();
        let url = format!("{}/v1/completions", sim.url());
        let big = json!({"model": DEFAULT_MODEL, "prompt": (0..200).collect::<Vec<u32>>(), "max_tokens": 100});
        let (status, v) = tokio::time::timeout(Duration::from_secs(20), post(&c, url.clone(), big))
            .await
            .expect("the request outgrowing the cache hangs");
        if status.is_success() {
            assert_eq!(usage(&v).1, 100, "{v}");
        } else {
            check_error(status, &v, StatusCode::BAD_REQUEST, "outgrows the cache");
        }
        let small = json!({"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 2});
        let (status, v) = tokio::time::timeout(Duration::from_secs(20), post(&c, url, small))
            .await
            .expect("the engine is wedged");
        assert_eq!(status, StatusCode::OK, "{v}");
    })
    .await;
}
