#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The HTTP service end to end through the router (no sockets).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kvgate_index::{IndexConfig, KvIndex};
use kvgate_indexer::api::{router, ApiState, LocalityResponse, DEFAULT_TIER_WEIGHTS};
use kvgate_indexer::metrics::IndexerMetrics;
use kvgate_keys::BlockHasher;
use kvgate_tokenize::{ChatInput, ModelTokenizer, TokenizerRegistry};
use kvgate_wire::vllm::{BlockStored, EventBatch, KvEvent};
use prometheus_client::registry::Registry;
use tower::ServiceExt;

static TOKENIZER: std::sync::LazyLock<Arc<ModelTokenizer>> =
    std::sync::LazyLock::new(|| Arc::new(ModelTokenizer::embedded_default().unwrap()));

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, medium: &str) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: 4,
        lora_id: None,
        medium: Some(medium.into()),
        lora_name: None,
        extra_keys: None,
        group_idx: 0,
        kv_cache_spec_kind: None,
    })
}

fn app() -> (axum::Router, Arc<KvIndex>) {
    let index = Arc::new(KvIndex::new(
        IndexConfig::default(),
        BlockHasher::from_secret(b"api"),
    ));
    let a = index.add_endpoint("http://a", "m", 4).unwrap();
    let b = index.add_endpoint("http://b", "m", 4).unwrap();
    index.add_endpoint("http://c", "m", 4).unwrap();
    let batch = |events| EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: None,
    };
    // a: 3 blocks in GPU; b: 2 blocks in GPU + block 3 only in CPU.
    index
        .apply_batch(
            a,
            &batch(vec![stored(vec![1, 2, 3], None, (0..12).collect(), "GPU")]),
        )
        .unwrap();
    index
        .apply_batch(
            b,
            &batch(vec![stored(vec![1, 2], None, (0..8).collect(), "GPU")]),
        )
        .unwrap();
    index
        .apply_batch(
            b,
            &batch(vec![stored(vec![3, 4], Some(2), (8..16).collect(), "CPU")]),
        )
        .unwrap();
    let mut tokenizers = TokenizerRegistry::default();
    tokenizers.insert("m", TOKENIZER.clone());
    let metrics = Arc::new(IndexerMetrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let state = ApiState {
        index: index.clone(),
        metrics,
        registry: Arc::new(registry),
        tier_weights: DEFAULT_TIER_WEIGHTS,
        tokenizers: Arc::new(tokenizers),
    };
    (router(state), index)
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        text,
    )
}

fn post(body: &str) -> Request<Body> {
    Request::post("/v1/locality")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn locality_scores_endpoints_by_tier_weighted_prefix() {
    let (app, _) = app();
    let body =
        serde_json::json!({"model": "m", "tokens": (0..16).collect::<Vec<u32>>()}).to_string();
    let (status, json, _) = call(&app, post(&body)).await;
    assert_eq!(status, StatusCode::OK);
    let resp: LocalityResponse = serde_json::from_value(json).unwrap();
    assert_eq!(resp.prompt_tokens, 16);
    assert_eq!(resp.coverage, 1.0);
    let by = |n: &str| resp.endpoints.iter().find(|e| e.endpoint == n).unwrap();
    assert_eq!(by("http://b").matched_blocks, 4);
    assert_eq!(
        by("http://b").tiers,
        vec![("GPU".into(), 2), ("CPU".into(), 2)]
    );
    assert!((by("http://b").score - (2.0 + 2.0 * 0.8) / 4.0).abs() < 1e-9);
    assert_eq!(by("http://a").matched_tokens, 12);
    assert!((by("http://a").score - 0.75).abs() < 1e-9);
    assert_eq!(by("http://c").matched_blocks, 0);
    assert_eq!(by("http://c").tier, None);
    // Sorted best first.
    assert_eq!(resp.endpoints[0].endpoint, "http://b");

    // The GET form gives the same answer.
    let toks: Vec<String> = (0..16).map(|t| t.to_string()).collect();
    let uri = format!("/v1/locality?model=m&tokens={}", toks.join(","));
    let (status, json, _) = call(&app, Request::get(uri).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_value::<LocalityResponse>(json).unwrap(),
        resp
    );
}

#[tokio::test]
async fn bad_requests_get_openai_shaped_400s() {
    let (app, _) = app();
    for (req, param) in [
        (post("{not json"), serde_json::Value::Null),
        (post(r#"{"model":"m"}"#), "tokens".into()),
        (
            post(r#"{"model":"m","tokens":[-1]}"#),
            serde_json::Value::Null,
        ),
        (post(r#"{"model":"nope","text":"hi"}"#), "model".into()),
        (
            post(r#"{"model":"m","text":"hi","tokens":[1]}"#),
            "tokens".into(),
        ),
        (
            post(r#"{"model":"m","messages":[{"content":"no role"}]}"#),
            "messages".into(),
        ),
        // Chat fields of the wrong type are named as the gateway names them.
        (post(r#"{"model":"m","messages":null}"#), "messages".into()),
        (
            post(r#"{"model":"m","messages":[],"tools":{}}"#),
            "tools".into(),
        ),
        (
            post(r#"{"model":"m","messages":[],"continue_final_message":"yes"}"#),
            "continue_final_message".into(),
        ),
        (
            post(r#"{"model":"m","messages":[],"add_generation_prompt":null}"#),
            "add_generation_prompt".into(),
        ),
        (
            post(r#"{"model":"m","messages":[],"chat_template_kwargs":[1]}"#),
            "chat_template_kwargs".into(),
        ),
        (
            post(r#"{"model":"m","tokens":[1],"bogus":1}"#),
            serde_json::Value::Null,
        ),
        (
            Request::get("/v1/locality?model=m&tokens=1,x")
                .body(Body::empty())
                .unwrap(),
            "tokens".into(),
        ),
        (
            Request::get("/v1/locality?tokens=1")
                .body(Body::empty())
                .unwrap(),
            "model".into(),
        ),
    ] {
        let (status, json, text) = call(&app, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_openai_error(&json, 400, "BadRequestError", &text);
        assert_eq!(json["error"]["param"], param, "{text}");
    }
    // Oversized bodies are refused before parsing.
    let huge = format!(
        r#"{{"model":"m","tokens":[{}]}}"#,
        vec!["1"; 5_000_000].join(",")
    );
    let (status, json, text) = call(&app, post(&huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_openai_error(&json, 413, "PayloadTooLargeError", &text);
}

/// `{"error": {"message": str, "type": str, "param": .., "code": int}}` and nothing else.
fn assert_openai_error(json: &serde_json::Value, code: u16, kind: &str, text: &str) {
    let error = json["error"].as_object().expect(text);
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{text}");
    assert_eq!(json.as_object().unwrap().len(), 1, "{text}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{text}"
    );
    assert_eq!(error["type"], kind, "{text}");
    assert!(
        error["param"].is_null() || error["param"].is_string(),
        "{text}"
    );
    assert_eq!(error["code"].as_u64(), Some(u64::from(code)), "{text}");
}

#[tokio::test]
async fn dump_endpoints_and_metrics_are_served() {
    let (app, index) = app();
    let (status, json, _) = call(
        &app,
        Request::get("/v1/index/dump").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let dump: kvgate_index::IndexDump = serde_json::from_value(json).unwrap();
    assert_eq!(dump, index.dump());
    assert_eq!(
        dump.endpoints
            .iter()
            .map(|e| e.entries.len())
            .sum::<usize>(),
        7
    );

    let (status, json, _) = call(
        &app,
        Request::get("/v1/index/endpoints")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json.as_array().unwrap().len(), 3);

    // One query so the histogram and hit ratio have data.
    let body =
        serde_json::json!({"model": "m", "tokens": (0..8).collect::<Vec<u32>>()}).to_string();
    call(&app, post(&body)).await;
    let (status, _, text) = call(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("kv_cache_blocks_total 7"), "{text}");
    assert!(text.contains("kv_cache_pods_tracked 3"), "{text}");
    assert!(
        text.contains("kv_cache_query_duration_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains("kv_cache_hit_ratio 1.0"), "{text}");
}

#[tokio::test]
async fn text_and_messages_are_tokenized_like_the_engine() {
    let (app, index) = app();
    // Store the blocks of a chat prompt's tokens (block size 4) on endpoint a.
    let messages =
        serde_json::json!([{"role": "user", "content": "Tell me about KV caches, please."}]);
    let chat = TOKENIZER
        .chat_tokens(&ChatInput {
            messages: messages.as_array().unwrap(),
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap();
    let full = chat.len() / 4 * 4;
    let a = index.endpoint_id("http://a").unwrap();
    index.clear_endpoint(a);
    let hashes: Vec<u64> = (100..100 + full as u64 / 4).collect();
    let batch = EventBatch {
        ts: 0.0,
        events: vec![stored(hashes, None, chat[..full].to_vec(), "GPU")],
        data_parallel_rank: None,
    };
    index.apply_batch(a, &batch).unwrap();
    let body = serde_json::json!({"model": "m", "messages": messages}).to_string();
    let (status, json, text) = call(&app, post(&body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let resp: LocalityResponse = serde_json::from_value(json).unwrap();
    assert_eq!(resp.prompt_tokens, chat.len());
    let got = resp
        .endpoints
        .iter()
        .find(|e| e.endpoint == "http://a")
        .unwrap();
    assert_eq!(got.matched_tokens, full);

    // Text prompts use completion tokenization.
    let prompt = "The quick brown fox jumps over the lazy dog";
    let ids = TOKENIZER.completion_tokens(prompt).unwrap();
    let body = serde_json::json!({"model": "m", "text": prompt}).to_string();
    let (status, json, _) = call(&app, post(&body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["prompt_tokens"], ids.len());
}

/// `/v1/locality` reads a chat body's template fields as a chat completion does:
/// its tokens are `chat_tokens` of the same input.
#[tokio::test]
async fn chat_template_fields_are_honoured() {
    let (app, index) = app();
    let messages = serde_json::json!([
        {"role": "user", "content": "Write a haiku about caches."},
        {"role": "assistant", "content": "Blocks of warm prefix"},
    ]);
    let msgs = messages.as_array().unwrap();
    let kwargs = serde_json::json!({"enable_thinking": false});
    let default_input = ChatInput {
        messages: &msgs[..1],
        add_generation_prompt: true,
        ..Default::default()
    };
    let default = TOKENIZER.chat_tokens(&default_input).unwrap();
    let cases = [
        (
            serde_json::json!({"model": "m", "messages": messages, "continue_final_message": true, "add_generation_prompt": false}),
            ChatInput {
                messages: msgs,
                continue_final_message: true,
                ..Default::default()
            },
        ),
        (
            serde_json::json!({"model": "m", "messages": &msgs[..1], "chat_template_kwargs": kwargs}),
            ChatInput {
                template_kwargs: kwargs.as_object(),
                ..default_input.clone()
            },
        ),
        (
            serde_json::json!({"model": "m", "messages": &msgs[..1], "add_generation_prompt": false}),
            ChatInput {
                add_generation_prompt: false,
                ..default_input.clone()
            },
        ),
    ];
    let a = index.endpoint_id("http://a").unwrap();
    for (body, input) in cases {
        let want = TOKENIZER.chat_tokens(&input).unwrap();
        assert_ne!(want, default, "the field changes the prompt: {body}");
        // Endpoint a holds exactly the full blocks of the expected tokens.
        index.clear_endpoint(a);
        let full = want.len() / 4 * 4;
        let batch = EventBatch {
            ts: 0.0,
            events: vec![stored(
                (1000..1000 + full as u64 / 4).collect(),
                None,
                want[..full].to_vec(),
                "GPU",
            )],
            data_parallel_rank: None,
        };
        index.apply_batch(a, &batch).unwrap();
        let (status, json, text) = call(&app, post(&body.to_string())).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let resp: LocalityResponse = serde_json::from_value(json).unwrap();
        assert_eq!(resp.prompt_tokens, want.len(), "{body}");
        let got = resp.endpoints.iter().find(|e| e.endpoint == "http://a");
        assert_eq!(got.unwrap().matched_tokens, full, "{body}");
    }
}
