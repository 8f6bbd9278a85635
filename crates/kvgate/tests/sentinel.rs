#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `kvgate sentinel` as our users' pod runs it: configured by the TB_* env
//! names alone, in front of a local runtime, its contract's status from the
//! control plane.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tb_env_names_configure_the_sidecar() {
    let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
    let runtime = Router::new()
        .route(
            "/v1/chat/completions",
            post(
                |State(b): State<Arc<Mutex<Vec<Value>>>>, Json(v): Json<Value>| async move {
                    b.lock().unwrap().push(v);
                    Json(json!({"choices": [{"message": {"content": "ok"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1}}))
                },
            ),
        )
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|| async { "" }))
        .with_state(bodies.clone());
    let runtime_url = serve(runtime).await;
    let status = Arc::new(Mutex::new("active"));
    let cp = Router::new()
        .route(
            "/api/contracts/{id}",
            get(
                |State(s): State<Arc<Mutex<&'static str>>>, Path(id): Path<String>| async move {
                    Json(json!({"id": id, "status": *s.lock().unwrap()}))
                },
            ),
        )
        .with_state(status.clone());
    let cp_url = serve(cp).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _proc = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("sentinel")
            .env("TB_CONTRACT_ID", "contract-42")
            .env("TB_ASSET_ID", "licensed-model")
            .env("TB_EDC_ENDPOINT", format!("{cp_url}/api"))
            .env("TB_RUNTIME_URL", &runtime_url)
            .env(
                "TB_CONTRACT_KEY",
                "key material of contract 42 from a Secret",
            )
            .env("KVGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("KVGATE_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    // A fresh connection per request: no keep-alive race with the server.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let t = Instant::now();
    while !client
        .get(format!("{url}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "sentinel did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let chat = || {
        client
            .post(format!("{url}/v1/chat/completions"))
            .json(&json!({"model": "licensed-model", "cache_salt": "mine",
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let resp = chat().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    let seen = bodies.lock().unwrap()[0].clone();
    let salt = seen["cache_salt"].as_str().unwrap();
    assert_eq!(salt.len(), 32, "{seen}");
    assert_eq!(seen["kv_transfer_params"]["lmcache.tag.cachesalt"], salt);
    // The control plane suspends the contract: refused within a second.
    *status.lock().unwrap() = "suspended";
    let t = Instant::now();
    loop {
        let resp = chat().await.unwrap_or_else(|e| panic!("{e:?}"));
        if resp.status() == 403 {
            let e: Value = resp.json().await.unwrap();
            assert_eq!(e["error"]["code"], "contract_suspended");
            break;
        }
        resp.text().await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not suspended within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
