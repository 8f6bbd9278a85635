#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A gateway whose endpoints come from DNS: a pod whose record appears is
//! routed to within 2 s, one whose record goes gets no new request.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate_fleet::dns::Resolve;
use kvgate_fleet::{DnsDiscovery, DnsDiscoveryConfig};
use kvgate_gateway::{Gateway, GatewayConfig};
use kvgate_router::Policy;
use parking_lot::Mutex;

mod common;
use common::*;

/// A recording engine on `ip:port`.
async fn engine_on(ip: &str, port: u16) -> Upstream {
    let (app, u) = upstream_app();
    let l = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    u
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_appear_are_routed_to_and_pods_that_go_are_not() {
    // Two pods on one port, as a headless Service's records give them.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a = engine_on("127.0.0.1", port).await;
    let b = engine_on("127.0.0.2", port).await;
    let records: Arc<Mutex<Vec<IpAddr>>> = Arc::new(Mutex::new(vec!["127.0.0.1".parse().unwrap()]));
    let r = records.clone();
    let resolve: Resolve = Arc::new(move |_| {
        let ips = r.lock().clone();
        Box::pin(async move { Ok(ips) })
    });
    let dns = DnsDiscoveryConfig {
        name: "vllm.inference.svc".into(),
        port,
        models: vec!["m".into()],
        models_from_engine: false,
        models_refresh_ms: 5_000,
        block_size: 16,
        events_port: None,
        replay_port: None,
        topic: String::new(),
        refresh_ms: 200,
    };
    let mut cfg = GatewayConfig {
        dns: Some(dns.clone()),
        health_interval_ms: 100,
        ..Default::default()
    };
    cfg.router.policy = Policy::RoundRobin;
    let discovery = Arc::new(DnsDiscovery::start(dns, resolve).await.unwrap());
    let gw = Gateway::start(cfg, discovery).await.unwrap();
    let url = serve(gw.router()).await;
    let client = reqwest::Client::new();
    let send = || async {
        client
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat_body("hello"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let t = Instant::now();
    while a.bodies.lock().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the first pod is never routed to"
        );
        send().await;
    }

    *records.lock() = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
    let appeared = Instant::now();
    while b.bodies.lock().is_empty() {
        assert!(
            appeared.elapsed() < Duration::from_secs(2),
            "a pod that appeared was not routed to within 2 s"
        );
        send().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    *records.lock() = vec!["127.0.0.2".parse().unwrap()];
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = a.bodies.lock().len();
    for _ in 0..10 {
        send().await;
    }
    assert_eq!(
        a.bodies.lock().len(),
        before,
        "a pod whose record went got a request"
    );
}

#[test]
fn endpoints_and_dns_together_are_refused() {
    let cfg = GatewayConfig {
        endpoints: vec![endpoint("http://127.0.0.1:1")],
        dns: Some(DnsDiscoveryConfig {
            name: "x".into(),
            port: 8000,
            models: vec!["m".into()],
            models_from_engine: false,
            models_refresh_ms: 5_000,
            block_size: 16,
            events_port: None,
            replay_port: None,
            topic: String::new(),
            refresh_ms: 1000,
        }),
        ..Default::default()
    };
    assert!(cfg.validate().is_err());
}
