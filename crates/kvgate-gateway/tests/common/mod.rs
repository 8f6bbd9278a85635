//! Helpers shared by the gateway's integration tests: recording upstreams,
//! a gateway over them, request bodies.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use kvgate_gateway::{EndpointConfig, Gateway, GatewayConfig, StaticDiscovery};
use parking_lot::Mutex;

/// Records the bodies it receives; streams `n` SSE chunks 100 ms apart.
#[derive(Clone, Default)]
pub struct Upstream {
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    pub headers: Arc<Mutex<Vec<axum::http::HeaderMap>>>,
    /// Requests to any other path.
    pub other_paths: Arc<Mutex<Vec<String>>>,
}

async fn upstream_chat(
    State(u): State<Upstream>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    u.bodies.lock().push(v);
    u.headers.lock().push(headers);
    let chunks = futures_util::stream::iter(0..5).then(|i| async move {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, std::io::Error>(Bytes::from(format!("data: {{\"i\": {i}}}\n\n")))
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap()
}

async fn record_other_path(State(u): State<Upstream>, uri: axum::http::Uri) -> &'static str {
    u.other_paths.lock().push(uri.to_string());
    "reached"
}

/// Serves `app` on a loopback port; its base URL.
pub async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

/// The gateway's `/metrics` text.
pub async fn metrics_text(client: &reqwest::Client, gw_url: &str) -> String {
    client
        .get(format!("{gw_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub async fn spawn_upstream() -> (String, Upstream) {
    let (app, u) = upstream_app();
    (serve(app).await, u)
}

/// The recording upstream's routes and its record.
pub fn upstream_app() -> (Router, Upstream) {
    let u = Upstream::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(upstream_chat))
        .route("/v1/completions", post(upstream_chat))
        .route("/health", get(|| async { "" }))
        .route(
            "/metrics",
            get(|| async { "vllm:num_requests_waiting{engine=\"0\"} 0\n" }),
        )
        .fallback(record_other_path)
        .with_state(u.clone());
    (app, u)
}

pub fn endpoint(url: &str) -> EndpointConfig {
    EndpointConfig {
        url: url.to_string(),
        models: vec!["m".into()],
        adapters: vec![],
        block_size: 16,
        events: None,
        replay: None,
        topic: String::new(),
        bind: false,
    }
}

pub async fn gateway(cfg: GatewayConfig) -> (String, Arc<Gateway>) {
    let discovery = Arc::new(StaticDiscovery::new(cfg.endpoints.clone()).unwrap());
    let gw = Gateway::start(cfg, discovery).await.unwrap();
    (serve(gw.router()).await, gw)
}

/// A default gateway in front of one recording upstream: (gateway url,
/// gateway, upstream url, upstream).
pub async fn gateway_over_one_upstream() -> (String, Arc<Gateway>, String, Upstream) {
    let (url, u) = spawn_upstream().await;
    let (gw_url, gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&url)],
        ..Default::default()
    })
    .await;
    (gw_url, gw, url, u)
}

/// Contracts for `(api key, contract)` pairs, their keys derived from a
/// master key in a file of the test's own.
pub fn contracts(keys: &[(&str, &str)]) -> kvgate_auth::AuthConfig {
    let dir = std::env::temp_dir().join(format!("kvgate-gw-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("master.key");
    std::fs::write(&path, "gateway test master key material").unwrap();
    kvgate_auth::AuthConfig::for_api_keys(keys, kvgate_auth::KeyRef::File(path))
}

pub fn chat_body(content: &str) -> serde_json::Value {
    serde_json::json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": content}]})
}

/// `POST url` with a JSON body.
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    client.post(url).json(body).send().await.unwrap()
}

/// `GET url` as JSON (e.g. `/ready`).
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}
