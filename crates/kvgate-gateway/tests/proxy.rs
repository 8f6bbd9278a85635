#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gateway's proxy behaviour against small in-test upstreams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use kvgate_gateway::{Gateway, GatewayConfig, StaticDiscovery};
use kvgate_router::Policy;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_incrementally_and_releases_load_on_disconnect() {
    let (gw_url, gw, url, _u) = gateway_over_one_upstream().await;
    let client = reqwest::Client::new();
    let t = Instant::now();
    let resp = client
        .post(format!("{gw_url}/v1/chat/completions"))
        .json(&chat_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-kvgate-endpoint"], url.as_str());
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = t.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("\"i\": 0"));
    // The first chunk arrives well before the last one is produced (400 ms later).
    assert!(
        first_at < Duration::from_millis(300),
        "first chunk after {first_at:?}"
    );
    let load = gw.fleet().snapshot()[0].load.clone();
    assert_eq!(load.snapshot().in_flight, 1);
    drop(stream); // the client goes away mid-stream
    let deadline = Instant::now() + Duration::from_secs(3);
    while load.snapshot().in_flight != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(load.snapshot().in_flight, 0, "load released on disconnect");
    assert_eq!(load.snapshot().pending_prefill_tokens, 0);

    // A full stream: all chunks, in order.
    let resp = client
        .post(format!("{gw_url}/v1/chat/completions"))
        .json(&chat_body("hi"))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert_eq!(text.matches("data:").count(), 5);
    assert_eq!(load.snapshot().in_flight, 0);

    // Both are counted, each with how it ended.
    let metrics = metrics_text(&client, &gw_url).await;
    for outcome in ["aborted", "completed"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("kvgate_requests_total")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .unwrap_or_else(|| panic!("no {outcome} request counted:\n{metrics}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let (url, _u) = spawn_upstream().await;
    let (gw_url, _gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&url)],
        max_body_bytes: 64 * 1024,
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    let cases: Vec<(&str, String, u16)> = vec![
        ("/v1/chat/completions", "{nope".into(), 400),
        ("/v1/chat/completions", "[1,2]".into(), 400),
        ("/v1/chat/completions", r#"{"messages": []}"#.into(), 400),
        (
            "/v1/chat/completions",
            r#"{"model": 5, "messages": []}"#.into(),
            400,
        ),
        ("/v1/chat/completions", r#"{"model": "m"}"#.into(), 400),
        ("/v1/completions", r#"{"model": "m"}"#.into(), 400),
        // Messages vLLM answers 400 for are answered so, not routed.
        (
            "/v1/chat/completions",
            r#"{"model": "m", "messages": [{"role": "user", "content": ["a", "b"]}]}"#.into(),
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "m", "messages": [{"role": "user", "content": null}]}"#.into(),
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "other", "messages": []}"#.into(),
            404,
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model": "m", "messages": [], "x": "{}"}}"#,
                "a".repeat(100_000)
            ),
            413,
        ),
    ];
    for (path, body, status) in cases {
        let resp = client
            .post(format!("{gw_url}{path}"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            status,
            "{}",
            &body[..body.len().min(60)]
        );
        let json: serde_json::Value = resp.json().await.unwrap();
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{json}"
        );
        assert_eq!(json["error"]["code"], status);
    }
    let models: serde_json::Value = client
        .get(format!("{gw_url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_is_retried_and_ejected_without_failed_requests() {
    let (url, u) = spawn_upstream().await;
    // Nothing listens here: connects are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (gw_url, gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&dead), endpoint(&url)],
        router: kvgate_router::RouterConfig {
            policy: Policy::RoundRobin,
            ..Default::default()
        },
        eject_after_failures: 1,
        eject_cooldown_ms: 60_000,
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    for _ in 0..6 {
        let resp = client
            .post(format!("{gw_url}/v1/chat/completions"))
            .json(&chat_body("x"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-kvgate-endpoint"], url.as_str());
        resp.text().await.unwrap();
    }
    assert_eq!(u.bodies.lock().len(), 6);
    assert!(
        !gw.fleet().snapshot()[0].is_available(),
        "the dead endpoint is ejected"
    );
    // Everything down: 503 with Retry-After.
    let (gw_url, _gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&dead)],
        eject_after_failures: 1,
        ..Default::default()
    })
    .await;
    let resp = client
        .post(format!("{gw_url}/v1/chat/completions"))
        .json(&chat_body("x"))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status() == 502 || resp.status() == 503,
        "{}",
        resp.status()
    );
    let resp = client
        .post(format!("{gw_url}/v1/chat/completions"))
        .json(&chat_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_tokens_and_which_endpoint_holds_each_block() {
    use kvgate_wire::vllm::{BlockStored, EventBatch, KvEvent};
    let (url, u) = spawn_upstream().await;
    let mut cfg = GatewayConfig {
        endpoints: vec![endpoint(&url)],
        ..Default::default()
    };
    cfg.contracts = contracts(&[("key-a", "acme"), ("key-b", "globex")]);
    let (gw_url, gw) = gateway(cfg).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({"model": "m", "prompt": (0..40).collect::<Vec<u32>>()});
    let explain = |key: &'static str| {
        let client = client.clone();
        let url = format!("{gw_url}{}", kvgate_gateway::EXPLAIN_COMPLETIONS_PATH);
        let body = body.clone();
        async move {
            let resp = client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<serde_json::Value>().await.unwrap()
        }
    };
    let v = explain("key-a").await;
    assert_eq!(v["prompt_tokens"].as_array().unwrap().len(), 40);
    assert_eq!(v["contract_isolated"], true);
    let keys = v["blocks"][0]["keys"].as_array().unwrap().clone();
    assert_eq!(v["blocks"][0]["block_size"], 16);
    assert_eq!(keys.len(), 2, "two full 16-token blocks of 40 tokens");
    assert!(keys
        .iter()
        .all(|k| k["held_by"].as_array().unwrap().is_empty()));

    // The engine reports the first block stored, under contract acme's salt.
    let salt = {
        let resp = client
            .post(format!("{gw_url}/v1/completions"))
            .bearer_auth("key-a")
            .json(&body)
            .send()
            .await
            .unwrap();
        resp.text().await.unwrap();
        u.bodies.lock()[0]["cache_salt"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let id = gw.index().add_endpoint(&url, "m", 16).unwrap();
    let stored = BlockStored {
        block_hashes: vec![1],
        parent_block_hash: None,
        token_ids: (0..16).collect(),
        block_size: 16,
        lora_id: None,
        medium: Some("GPU".into()),
        lora_name: None,
        extra_keys: Some(vec![Some(vec![kvgate_wire::vllm::ExtraKey::Str(salt)])]),
        group_idx: 0,
        kv_cache_spec_kind: None,
    };
    let batch = EventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockStored(stored)],
        data_parallel_rank: None,
    };
    gw.index().apply_batch(id, &batch).unwrap();
    let v = explain("key-a").await;
    let keys = v["blocks"][0]["keys"].as_array().unwrap();
    assert_eq!(keys[0]["held_by"][0]["endpoint"], url.as_str());
    assert_eq!(keys[0]["held_by"][0]["tier"], "GPU");
    assert!(keys[1]["held_by"].as_array().unwrap().is_empty());
    // Another contract's keys carry another salt: nothing of acme's is visible.
    let v = explain("key-b").await;
    let keys = v["blocks"][0]["keys"].as_array().unwrap();
    assert!(keys
        .iter()
        .all(|k| k["held_by"].as_array().unwrap().is_empty()));
    // Explain authenticates like a real request.
    let resp = client
        .post(format!(
            "{gw_url}{}",
            kvgate_gateway::EXPLAIN_COMPLETIONS_PATH
        ))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

/// The index's `/v1/locality` and the gateway read a chat body the same way
/// (one `ChatInput::from_openai`): the same messages with
/// `continue_final_message`, `add_generation_prompt` and
/// `chat_template_kwargs` give the same prompt on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_api_and_gateway_agree_on_chat_fields() {
    use kvgate_indexer::api::{router, ApiState, DEFAULT_TIER_WEIGHTS};
    use kvgate_tokenize::{ModelTokenizer, TokenizerRegistry};
    let (gw_url, gw, _url, _u) = gateway_over_one_upstream().await;
    let mut tokenizers = TokenizerRegistry::default();
    tokenizers.set_fallback(Arc::new(ModelTokenizer::embedded_default().unwrap()));
    let app = router(ApiState {
        index: gw.index().clone(),
        metrics: Arc::new(kvgate_indexer::metrics::IndexerMetrics::default()),
        registry: Arc::new(prometheus_client::registry::Registry::default()),
        tier_weights: DEFAULT_TIER_WEIGHTS,
        tokenizers: Arc::new(tokenizers),
    });
    let index_url = serve(app).await;
    let client = reqwest::Client::new();
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "The colour is  "}
    ]);
    let variants = [
        serde_json::json!({}),
        serde_json::json!({"continue_final_message": true, "add_generation_prompt": false}),
        serde_json::json!({"add_generation_prompt": false}),
        serde_json::json!({"chat_template_kwargs": {"enable_thinking": false}}),
    ];
    let mut lengths = Vec::new();
    for extra in &variants {
        let mut body = serde_json::json!({"model": "m", "messages": messages});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let explained: serde_json::Value = client
            .post(format!("{gw_url}{}", kvgate_gateway::EXPLAIN_CHAT_PATH))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let tokens = explained["prompt_tokens"].as_array().unwrap().len();
        assert!(tokens > 0, "{explained}");
        let resp = client
            .post(format!("{index_url}/v1/locality"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{extra}");
        let located: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            located["prompt_tokens"].as_u64(),
            Some(tokens as u64),
            "{extra}"
        );
        lengths.push(tokens);
    }
    // The fields really change the prompt, so agreeing on them means something.
    assert_ne!(lengths[0], lengths[1]);
    assert_ne!(lengths[0], lengths[2]);
}

/// A configuration built in code goes through the same validation as a file:
/// a block size of 0 used to become "route by load" without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_built_in_code_are_validated() {
    let mut bad = endpoint("http://127.0.0.1:1");
    bad.block_size = 0;
    let cfg = GatewayConfig {
        endpoints: vec![bad.clone()],
        ..Default::default()
    };
    let discovery = Arc::new(StaticDiscovery::new(Vec::new()).unwrap());
    let err = Gateway::start(cfg, discovery).await.err().unwrap();
    assert!(err.to_string().contains("block_size must be > 0"), "{err}");
    assert!(StaticDiscovery::new(vec![bad]).is_err());
    let twice = GatewayConfig {
        endpoints: vec![
            endpoint("http://127.0.0.1:1"),
            endpoint("http://127.0.0.1:1"),
        ],
        ..Default::default()
    };
    let discovery = Arc::new(StaticDiscovery::new(Vec::new()).unwrap());
    let err = Gateway::start(twice, discovery).await.err().unwrap();
    assert!(err.to_string().contains("twice"), "{err}");
}

/// An upstream that breaks off mid-stream is counted as `failed`, and its
/// load is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_upstream_is_counted_failed() {
    async fn broken(_body: Bytes) -> axum::response::Response {
        let chunks = futures_util::stream::iter(0..2).then(|i| async move {
            if i == 0 {
                Ok(Bytes::from("data: {\"i\": 0}\n\n"))
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::other("engine died"))
            }
        });
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(chunks))
            .unwrap()
    }
    let app = Router::new()
        .route("/v1/chat/completions", post(broken))
        .route("/health", get(|| async { "" }));
    let url = serve(app).await;
    let (gw_url, gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&url)],
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{gw_url}/v1/chat/completions"))
        .json(&chat_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.is_err(), "the break reaches the client");
    let load = gw.fleet().snapshot()[0].load.clone();
    let deadline = Instant::now() + Duration::from_secs(3);
    while load.snapshot().in_flight != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(load.snapshot().in_flight, 0);
    let metrics = metrics_text(&client, &gw_url).await;
    let failed = metrics
        .lines()
        .find(|l| l.starts_with("kvgate_requests_total") && l.contains("outcome=\"failed\""));
    assert!(
        failed.is_some_and(|l| l.ends_with(" 1")),
        "not counted as failed:\n{metrics}"
    );
    assert!(!metrics.contains("outcome=\"completed\""), "{metrics}");
}
