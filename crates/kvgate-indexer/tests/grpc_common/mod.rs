//! The fixture the gRPC agreement tests share: one `ApiState` served over
//! HTTP (the router, no socket) and gRPC (a loopback socket), and the HTTP
//! answers read exactly.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kvgate_index::{IndexConfig, KvIndex};
use kvgate_indexer::api::{router, ApiState, DEFAULT_TIER_WEIGHTS};
use kvgate_indexer::grpc::pb::locality_client::LocalityClient;
use kvgate_indexer::grpc::pb::locality_query::Prompt;
use kvgate_indexer::grpc::pb::scorer_client::ScorerClient;
use kvgate_indexer::grpc::pb::{LocalityQuery, LocalityResult, PodLocality, TierBlocks, TokenIds};
use kvgate_indexer::metrics::IndexerMetrics;
use kvgate_keys::BlockHasher;
use kvgate_tokenize::{ChatInput, ModelTokenizer, TokenizerRegistry};
use kvgate_wire::vllm::{BlockStored, EventBatch, ExtraKey, KvEvent};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tonic::transport::Channel;
use tower::ServiceExt;

pub const TEXT: &str = "The quick brown fox jumps over the lazy dog, twice over.";

pub static TOKENIZER: std::sync::LazyLock<Arc<ModelTokenizer>> =
    std::sync::LazyLock::new(|| Arc::new(ModelTokenizer::embedded_default().unwrap()));

pub fn messages() -> Value {
    json!([{"role": "user", "content": "Tell me about KV caches, please."}])
}

pub fn chat_tokens(add_generation_prompt: bool) -> Vec<u32> {
    let messages = messages();
    TOKENIZER
        .chat_tokens(&ChatInput {
            messages: messages.as_array().unwrap(),
            add_generation_prompt,
            ..Default::default()
        })
        .unwrap()
}

pub fn stored(
    hashes: Vec<u64>,
    parent: Option<u64>,
    tokens: Vec<u32>,
    bs: u32,
    medium: &str,
) -> BlockStored {
    BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: bs,
        lora_id: None,
        medium: Some(medium.into()),
        lora_name: None,
        extra_keys: None,
        group_idx: 0,
        kv_cache_spec_kind: None,
    }
}

/// The full blocks of `tokens`, as one chain with engine hashes from `first`.
pub fn full_blocks(tokens: &[u32], bs: u32, first: u64) -> BlockStored {
    let n = tokens.len() / bs as usize;
    stored(
        (first..first + n as u64).collect(),
        None,
        tokens[..n * bs as usize].to_vec(),
        bs,
        "GPU",
    )
}

pub fn apply(index: &KvIndex, name: &str, ev: BlockStored) {
    let id = index.endpoint_id(name).unwrap();
    let batch = EventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockStored(ev)],
        data_parallel_rank: None,
    };
    index.apply_batch(id, &batch).unwrap();
}

pub struct Fixture {
    pub http: axum::Router,
    pub locality: LocalityClient<Channel>,
    pub scorer: ScorerClient<Channel>,
    pub channel: Channel,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Model `m`: a (3 GPU blocks of 0..16), b (2 GPU + 2 CPU), c (the text and
/// chat prompts' blocks), d (block size 8: 1 block), e (0..8 salted
/// "tenant-a"); model `other`: x (0..8).
pub async fn fixture() -> Fixture {
    let index = Arc::new(KvIndex::new(
        IndexConfig::default(),
        BlockHasher::from_secret(b"grpc"),
    ));
    for (name, model, bs) in [
        ("http://a", "m", 4),
        ("http://b", "m", 4),
        ("http://c", "m", 4),
        ("http://d", "m", 8),
        ("http://e", "m", 4),
        ("http://x", "other", 4),
    ] {
        index.add_endpoint(name, model, bs).unwrap();
    }
    apply(
        &index,
        "http://a",
        stored(vec![1, 2, 3], None, (0..12).collect(), 4, "GPU"),
    );
    apply(
        &index,
        "http://b",
        stored(vec![1, 2], None, (0..8).collect(), 4, "GPU"),
    );
    apply(
        &index,
        "http://b",
        stored(vec![3, 4], Some(2), (8..16).collect(), 4, "CPU"),
    );
    let text = TOKENIZER.completion_tokens(TEXT).unwrap();
    apply(&index, "http://c", full_blocks(&text, 4, 100));
    apply(&index, "http://c", full_blocks(&chat_tokens(true), 4, 200));
    apply(
        &index,
        "http://d",
        stored(vec![1], None, (0..8).collect(), 8, "GPU"),
    );
    let mut salted = stored(vec![1, 2], None, (0..8).collect(), 4, "GPU");
    salted.extra_keys = Some(vec![Some(vec![ExtraKey::Str("tenant-a".into())]), None]);
    apply(&index, "http://e", salted);
    apply(
        &index,
        "http://x",
        stored(vec![1, 2], None, (0..8).collect(), 4, "GPU"),
    );

    let mut tokenizers = TokenizerRegistry::default();
    tokenizers.insert("m", TOKENIZER.clone());
    let metrics = Arc::new(IndexerMetrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let state = ApiState {
        index,
        metrics,
        registry: Arc::new(registry),
        tier_weights: DEFAULT_TIER_WEIGHTS,
        tokenizers: Arc::new(tokenizers),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kvgate_indexer::grpc::serve(
        state.clone(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Fixture {
        http: router(state),
        locality: LocalityClient::new(channel.clone()),
        scorer: ScorerClient::new(channel.clone()),
        channel,
        _stop: stop,
    }
}

pub async fn http(app: &axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    match serde_json::from_str(&text) {
        Ok(mut json) => {
            exact_floats(&mut json, &text);
            (status, json)
        }
        Err(_) => (status, Value::String(text)),
    }
}

/// serde_json's parser (without `float_roundtrip`) may read a float a ULP
/// off: the scores and the coverage are read again from the body's text with
/// std's exact parser, so "agree" means bit for bit.
pub fn exact_floats(json: &mut Value, text: &str) {
    let read = |key: &str| -> Vec<f64> {
        let key = format!("\"{key}\":");
        text.match_indices(&key)
            .map(|(i, _)| {
                let rest = &text[i + key.len()..];
                rest[..rest.find([',', '}']).unwrap()].parse().unwrap()
            })
            .collect()
    };
    if let Some(&coverage) = read("coverage").first() {
        json["coverage"] = json!(coverage);
    }
    if let Some(endpoints) = json["endpoints"].as_array_mut() {
        let scores = read("score");
        assert_eq!(scores.len(), endpoints.len(), "{text}");
        for (e, score) in endpoints.iter_mut().zip(scores) {
            e["score"] = json!(score);
        }
    }
}

pub async fn post(app: &axum::Router, body: &Value) -> (StatusCode, Value) {
    let req = Request::post("/v1/locality")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    http(app, req).await
}

/// What the gRPC answer must be, read straight from HTTP's JSON.
pub fn expected(json: &Value) -> LocalityResult {
    let pods: Vec<PodLocality> = json["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| PodLocality {
            pod_id: e["endpoint"].as_str().unwrap().into(),
            block_count: e["matched_blocks"].as_u64().unwrap() as u32,
            match_length: e["matched_tokens"].as_u64().unwrap(),
            score: e["score"].as_f64().unwrap(),
            tier: e["tier"].as_str().unwrap_or("").into(),
            block_size: e["block_size"].as_u64().unwrap() as u32,
            stale: e["stale"].as_bool().unwrap(),
            tiers: e["tiers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| TierBlocks {
                    tier: t[0].as_str().unwrap().into(),
                    blocks: t[1].as_u64().unwrap() as u32,
                })
                .collect(),
        })
        .collect();
    LocalityResult {
        cache_hits: pods.first().map_or(0, |p| p.block_count),
        coverage: json["coverage"].as_f64().unwrap(),
        prompt_tokens: json["prompt_tokens"].as_u64().unwrap(),
        pods,
    }
}

pub fn query(model: &str, prompt: Prompt) -> LocalityQuery {
    LocalityQuery {
        model_id: model.into(),
        prompt: Some(prompt),
        ..Default::default()
    }
}

pub fn tokens(t: impl IntoIterator<Item = u32>) -> Prompt {
    Prompt::Tokens(TokenIds {
        ids: t.into_iter().collect(),
    })
}
