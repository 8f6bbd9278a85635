#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The series autoscalers read off the gateway: our users' KEDA triggers,
//! `sum(sentinel_pending_requests{service="trustbridge"})` and
//! `vllm_gpu_cache_usage_perc{service="trustbridge"}`, and kvgate's own
//! per-endpoint queue depth, in-flight requests and KV use.

use std::time::{Duration, Instant};

use axum::routing::get;
use kvgate_gateway::GatewayConfig;

mod common;
use common::*;

/// An engine whose scraped metrics say 3 waiting and 85% KV in use.
async fn busy_engine() -> String {
    serve(
        axum::Router::new()
            .route("/health", get(|| async { "" }))
            .route(
                "/metrics",
                get(|| async {
                    "vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3\n\
                     vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 1\n\
                     vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.85\n"
                }),
            ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_triggers_and_per_endpoint_load_are_exported_as_written() {
    let engine = busy_engine().await;
    let (gw_url, _gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&engine)],
        service: "trustbridge".into(),
        metrics_interval_ms: 100,
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    let want = [
        format!("vllm_gpu_cache_usage_perc{{service=\"trustbridge\",endpoint=\"{engine}\"}} 0.85"),
        format!("kvgate_endpoint_queue_depth{{endpoint=\"{engine}\",model=\"m\"}} 3"),
        format!("kvgate_endpoint_kv_usage{{endpoint=\"{engine}\",model=\"m\"}} 0.85"),
        format!("kvgate_endpoint_in_flight{{endpoint=\"{engine}\",model=\"m\"}} 0"),
        "sentinel_pending_requests{service=\"trustbridge\"} 0".to_string(),
    ];
    let t = Instant::now();
    loop {
        let text = metrics_text(&client, &gw_url).await;
        let missing: Vec<&String> = want
            .iter()
            .filter(|w| !text.lines().any(|l| l == w.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "missing {missing:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
