#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Drain: `kvgate gateway` gets SIGTERM while 50 streaming requests are in
//! flight. None is cut (each gets every event and `[DONE]`), a new request
//! is refused, and the process exits 0 within the drain grace.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::routing::{get, post};
use futures_util::StreamExt;

mod common;
use common::{free_port, fresh_client, serve, wait_ready, Kill};

const STREAMS: usize = 50;
const EVENTS: usize = 10;

/// Streams EVENTS events 200 ms apart (2 s a request), counting arrivals.
async fn slow_stream(State(started): State<Arc<AtomicUsize>>) -> axum::response::Response {
    started.fetch_add(1, Ordering::SeqCst);
    let events = futures_util::stream::iter(0..=EVENTS).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, std::io::Error>(Bytes::from(if i == EVENTS {
            "data: [DONE]\n\n".to_string()
        } else {
            format!("data: {{\"i\": {i}}}\n\n")
        }))
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(events))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_every_stream_refuses_new_ones_and_exits_zero() {
    let started = Arc::new(AtomicUsize::new(0));
    let engine = serve(
        axum::Router::new()
            .route("/v1/chat/completions", post(slow_stream))
            .route("/health", get(|| async { "" }))
            .route(
                "/metrics",
                get(|| async { "vllm:num_requests_waiting{engine=\"0\"} 0\n" }),
            )
            .with_state(started.clone()),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = serde_json::json!({
        "listen": format!("127.0.0.1:{port}"),
        "drain_grace_ms": 10000,
        "endpoints": [{"url": engine, "models": ["m"], "block_size": 16}],
    });
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let mut gw = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["gateway", "--config", path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&fresh_client(), &url).await;

    let client = reqwest::Client::new();
    let body = serde_json::json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": "drain me"}]});
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let r = client
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.text().await.unwrap()
            })
        })
        .collect();
    let t = Instant::now();
    while started.load(Ordering::SeqCst) < STREAMS {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the streams did not all start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let signalled = Instant::now();
    let pid = gw.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = fresh_client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        late.as_ref().map_or(true, |r| r.status() != 200),
        "a request after SIGTERM was served: {late:?}"
    );

    for s in streams {
        let text = s.await.unwrap();
        assert_eq!(
            text.matches("data: {").count(),
            EVENTS,
            "a stream was cut: {text}"
        );
        assert!(text.contains("data: [DONE]"), "a stream was cut: {text}");
    }
    let status = loop {
        if let Some(status) = gw.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "still running past the drain grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        started.load(Ordering::SeqCst),
        STREAMS,
        "the late request reached the engine"
    );
}
