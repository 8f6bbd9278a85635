#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gateway in front of fleets of simulated vLLM engines (real HTTP, real
//! ZMQ KV events): hit rate against the oracle, incremental streaming, a killed
//! engine, bad bodies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kvgate_bench::report::scrape_fleet;
use kvgate_bench::workload::{self, Body};
use kvgate_bench::{run_stage, StageOptions};
use kvgate_gateway::{EndpointConfig, Gateway, GatewayConfig, StaticDiscovery};
use kvgate_router::Policy;
use kvgate_sim::engine::EngineConfig;
use kvgate_sim::fleet::{start_fleet, RunningSim, SimConfig};
use kvgate_tokenize::ModelTokenizer;

const MODEL: &str = "sim";
const BS: usize = 16;

async fn fleet(n: usize, num_blocks: usize) -> Vec<RunningSim> {
    let tok = Arc::new(ModelTokenizer::embedded_default().unwrap());
    let base = SimConfig {
        model: MODEL.into(),
        engine: EngineConfig {
            block_size: BS,
            num_blocks,
            time_scale: 20.0,
            ..EngineConfig::default()
        },
        ..SimConfig::default()
    };
    start_fleet(n, &base, tok).await.unwrap()
}

async fn gateway(sims: &[RunningSim], policy: Policy) -> (String, Arc<Gateway>) {
    let endpoints: Vec<EndpointConfig> = sims
        .iter()
        .map(|s| EndpointConfig {
            url: s.url(),
            models: vec![MODEL.into()],
            adapters: vec![],
            block_size: BS as u32,
            events: s.events_endpoint(),
            replay: s.replay_endpoint(),
            topic: String::new(),
            bind: false,
        })
        .collect();
    let mut cfg = GatewayConfig {
        endpoints: endpoints.clone(),
        health_interval_ms: 200,
        metrics_interval_ms: 200,
        eject_cooldown_ms: 60_000,
        ..GatewayConfig::default()
    };
    cfg.router.policy = policy;
    let gw = Gateway::start(cfg, Arc::new(StaticDiscovery::new(endpoints).unwrap()))
        .await
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let app = gw.router();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    // Subscribers connect in the background.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (url, gw)
}

/// The oracle's hit rate, with prompts tokenized as the engines tokenize them.
fn oracle(tok: &ModelTokenizer, specs: &[workload::RequestSpec]) -> f64 {
    let prompts: Vec<Vec<u32>> = specs
        .iter()
        .map(|s| match &s.body {
            Body::Completion(p) => tok.completion_tokens(p).unwrap(),
            Body::Chat(_) => panic!("completions only"),
        })
        .collect();
    workload::oracle_hit_rate(&prompts, BS)
}

async fn hit_rate(policy: Policy) -> (f64, f64, usize) {
    let sims = fleet(4, 600).await;
    let (url, _gw) = gateway(&sims, policy).await;
    // 12 groups x 128-block prefixes = 1536 blocks: more than one engine
    // holds (599), about what the fleet holds when groups stay apart.
    let specs = workload::shared_prefix(12, 16, 2000, 64, 4, 5);
    let tok = ModelTokenizer::embedded_default().unwrap();
    let oracle = oracle(&tok, &specs);
    let client = reqwest::Client::new();
    let engines: Vec<String> = sims.iter().map(|s| s.url()).collect();
    let before = scrape_fleet(&client, &engines).await;
    let opts = StageOptions {
        name: policy.name().into(),
        concurrency: Some(4),
        timeout: Duration::from_secs(60),
        progress: false,
    };
    let (outcomes, _) = run_stage(&client, &url, MODEL, &specs, &opts).await;
    let errors = outcomes.iter().filter(|o| !o.ok).count();
    let after = scrape_fleet(&client, &engines).await;
    (after.rate_since(before).unwrap(), oracle, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_reaches_the_oracle_hit_rate_and_round_robin_does_not() {
    let (precise, oracle, errors) = hit_rate(Policy::PrecisePrefix).await;
    assert_eq!(errors, 0);
    assert!(
        precise >= 0.95 * oracle,
        "precise {precise:.3} vs oracle {oracle:.3}"
    );
    let (rr, _, errors) = hit_rate(Policy::RoundRobin).await;
    assert_eq!(errors, 0);
    assert!(
        rr < 0.8 * oracle,
        "round robin {rr:.3} vs oracle {oracle:.3}"
    );
    eprintln!("hit rate: precise {precise:.3}, round_robin {rr:.3}, oracle {oracle:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_arrive_incrementally_through_the_gateway() {
    // Real time: 16 decode steps of ~5 ms after a ~60 ms prefill.
    let tok = Arc::new(ModelTokenizer::embedded_default().unwrap());
    let base = SimConfig {
        model: MODEL.into(),
        engine: EngineConfig {
            block_size: BS,
            latency: kvgate_sim::LatencyModel {
                step_overhead_ms: 20.0,
                ..Default::default()
            },
            ..EngineConfig::default()
        },
        ..SimConfig::default()
    };
    let sims = start_fleet(2, &base, tok).await.unwrap();
    let (url, _gw) = gateway(&sims, Policy::PrecisePrefix).await;
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(
            &serde_json::json!({"model": MODEL, "stream": true, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Tell me a story."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let mut stream = resp.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        arrivals.push(started.elapsed());
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let content_chunks = text.matches("\"content\"").count();
    assert!(content_chunks >= 16, "{content_chunks} content chunks");
    // 16 steps of >= 20 ms: the first chunk must come long before the last.
    let (first, last) = (arrivals[0], *arrivals.last().unwrap());
    assert!(
        arrivals.len() > 4,
        "chunks were buffered: {}",
        arrivals.len()
    );
    assert!(
        last - first >= Duration::from_millis(200),
        "first {first:?}, last {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_is_ejected_and_traffic_moves_without_failures() {
    let sims = fleet(3, 2000).await;
    let (url, gw) = gateway(&sims, Policy::PrecisePrefix).await;
    let client = reqwest::Client::new();
    let send = |i: usize| {
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .post(format!("{url}/v1/completions"))
                .json(&serde_json::json!({"model": MODEL, "max_tokens": 2,
                    "prompt": format!("request {i}: a prompt about a great many things")}))
                .send()
                .await
                .unwrap()
        }
    };
    for i in 0..6 {
        assert_eq!(send(i).await.status(), 200);
    }
    let dead = sims[1].url();
    sims[1].stop_http();
    // Every request after the kill succeeds: connect failures are retried on
    // the next endpoint, and the dead one is ejected.
    let mut served_by = Vec::new();
    for i in 6..40 {
        let r = send(i).await;
        assert_eq!(r.status(), 200, "request {i}");
        served_by.push(
            r.headers()
                .get("x-kvgate-endpoint")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
        );
    }
    assert!(served_by.iter().all(|e| *e != dead), "{served_by:?}");
    let ep = gw
        .fleet()
        .snapshot()
        .iter()
        .find(|e| e.name() == dead)
        .cloned()
        .unwrap();
    assert!(!ep.is_available(), "the dead endpoint is still in rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_openai_shaped_4xx() {
    let sims = fleet(2, 256).await;
    let (url, _gw) = gateway(&sims, Policy::PrecisePrefix).await;
    let client = reqwest::Client::new();
    let cases: Vec<(&str, String, u16)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400),
        ("/v1/chat/completions", r#"{"messages": []}"#.into(), 400),
        (
            "/v1/chat/completions",
            r#"{"model": "nope", "messages": [{"role": "user", "content": "x"}]}"#.into(),
            404,
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model": "{MODEL}", "messages": "not a list"}}"#),
            400,
        ),
        (
            "/v1/completions",
            format!(r#"{{"model": "{MODEL}", "prompt": 7}}"#),
            400,
        ),
        (
            "/v1/completions",
            format!(r#"{{"model": "{MODEL}", "prompt": "x", "max_tokens": -1}}"#),
            400,
        ),
    ];
    for (path, body, want) in cases {
        let r = client
            .post(format!("{url}{path}"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{path} {body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{body}: {v}");
        assert!(v["error"]["type"].is_string(), "{body}: {v}");
    }
    // Still serving.
    let r = client
        .post(format!("{url}/v1/completions"))
        .json(&serde_json::json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
