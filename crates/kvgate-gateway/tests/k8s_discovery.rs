#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A gateway whose endpoints are the Ready pods of Kubernetes discovery
//! (`kvgate_k8s::testing`'s fake API server), each pod's models and LoRA
//! adapters taken from its engine's `/v1/models`: a request naming an
//! adapter goes to the pod that serves it, one naming what no pod serves is
//! 404, and an adapter an engine loads later is routed to after a refresh.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate_gateway::{Gateway, GatewayConfig};
use kvgate_k8s::testing::{pod, FakeApiServer, FakeEngine};
use kvgate_k8s::{K8sDiscovery, K8sDiscoveryConfig};
use serde_json::json;

mod common;
use common::*;

/// A recording engine on `ip:port` whose `/v1/models` is `models`'s.
async fn engine_on(ip: &str, port: u16, models: &FakeEngine) -> Upstream {
    let (app, u) = upstream_app();
    let l = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    let app = app.merge(models.router());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    u
}

fn chat(model: &str) -> serde_json::Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hello"}]})
}

fn models_sent(u: &Upstream) -> Vec<String> {
    u.bodies
        .lock()
        .iter()
        .map(|b| b["model"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_adapter_is_routed_to_the_pod_that_serves_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let models_a = FakeEngine::new(&["base"], &[("sql-lora", "base")]);
    let models_b = FakeEngine::new(&["base"], &[("chat-lora", "base")]);
    let a = engine_on("127.0.0.1", port, &models_a).await;
    let b = engine_on("127.0.0.2", port, &models_b).await;
    let fake = FakeApiServer::default();
    fake.put_pod(pod("vllm-a", "127.0.0.1", true));
    fake.put_pod(pod("vllm-b", "127.0.0.2", true));
    // No models configured: what each pod serves comes from its engine.
    let k8s = K8sDiscoveryConfig {
        namespace: "inference".into(),
        selector: Some("app=vllm".into()),
        inference_pool: None,
        port: Some(port),
        models: vec![],
        models_from_engine: true,
        models_refresh_ms: 200,
        block_size: 16,
        events_port: None,
        replay_port: None,
        topic: String::new(),
    };
    let discovery = K8sDiscovery::start(k8s.clone(), fake.client().await.unwrap())
        .await
        .unwrap();
    let cfg = GatewayConfig {
        kubernetes: Some(k8s),
        health_interval_ms: 100,
        ..Default::default()
    };
    let gw = Gateway::start(cfg, Arc::new(discovery)).await.unwrap();
    let url = serve(gw.router()).await;
    let client = reqwest::Client::new();
    let chat_url = format!("{url}/v1/chat/completions");

    let t = Instant::now();
    while gw.fleet().models() != ["base", "chat-lora", "sql-lora"] {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the pods' models never arrived: {:?}",
            gw.fleet().models()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        let r = post_json(&client, &chat_url, &chat("sql-lora")).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
        let r = post_json(&client, &chat_url, &chat("chat-lora")).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    assert_eq!(models_sent(&a), ["sql-lora"; 4], "a serves sql-lora");
    assert_eq!(models_sent(&b), ["chat-lora"; 4], "b serves chat-lora");

    let r = post_json(&client, &chat_url, &chat("no-such-lora")).await;
    assert_eq!(r.status(), 404);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(err["error"]["type"], "NotFoundError", "{err}");
    assert_eq!(err["error"]["param"], "model", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-lora"),
        "{err}"
    );

    // b's engine loads sql-lora at runtime: after a refresh both serve it.
    models_b.set(&["base"], &[("chat-lora", "base"), ("sql-lora", "base")]);
    let t = Instant::now();
    loop {
        let served: Vec<bool> = gw
            .fleet()
            .snapshot()
            .iter()
            .map(|e| e.serves("sql-lora"))
            .collect();
        if served == [true, true] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the loaded adapter was not seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pod that turns Ready is routed to within 2 s; one that turns unready
/// gets no new request once discovery has seen it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_appears_is_routed_to_and_one_gone_unready_is_not() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let models = FakeEngine::new(&["base"], &[]);
    let a = engine_on("127.0.0.1", port, &models).await;
    let b = engine_on("127.0.0.2", port, &models).await;
    let fake = FakeApiServer::default();
    fake.put_pod(pod("vllm-a", "127.0.0.1", true));
    fake.put_pod(pod("vllm-b", "127.0.0.2", false));
    let k8s = K8sDiscoveryConfig {
        namespace: "inference".into(),
        selector: Some("app=vllm".into()),
        inference_pool: None,
        port: Some(port),
        models: vec!["base".into()],
        models_from_engine: false,
        models_refresh_ms: 200,
        block_size: 16,
        events_port: None,
        replay_port: None,
        topic: String::new(),
    };
    let discovery = K8sDiscovery::start(k8s.clone(), fake.client().await.unwrap())
        .await
        .unwrap();
    let mut cfg = GatewayConfig {
        kubernetes: Some(k8s),
        health_interval_ms: 100,
        ..Default::default()
    };
    cfg.router.policy = kvgate_router::Policy::RoundRobin;
    let gw = Gateway::start(cfg, Arc::new(discovery)).await.unwrap();
    let url = serve(gw.router()).await;
    let client = reqwest::Client::new();
    let chat_url = format!("{url}/v1/chat/completions");
    let send = || async {
        let r = post_json(&client, &chat_url, &chat("base")).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    };
    for _ in 0..4 {
        send().await;
    }
    assert_eq!(
        (models_sent(&a).len(), models_sent(&b).len()),
        (4, 0),
        "b is not Ready"
    );

    // b turns Ready: round robin reaches it within 2 s.
    fake.put_pod(pod("vllm-b", "127.0.0.2", true));
    let t = Instant::now();
    while models_sent(&b).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the Ready pod was never routed to"
        );
        send().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // a turns unready: once the fleet has dropped it, nothing more reaches it.
    fake.put_pod(pod("vllm-a", "127.0.0.1", false));
    let t = Instant::now();
    while gw.fleet().snapshot().len() != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the unready pod stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (before_a, before_b) = (models_sent(&a).len(), models_sent(&b).len());
    for _ in 0..6 {
        send().await;
    }
    assert_eq!(
        models_sent(&a).len(),
        before_a,
        "an unready pod got a request"
    );
    assert_eq!(models_sent(&b).len(), before_b + 6);
}
