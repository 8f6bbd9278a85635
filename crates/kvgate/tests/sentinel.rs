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

mod common;
use common::*;

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
    let port = free_port();
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
    let client = fresh_client();
    wait_ready(&client, &url).await;
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
        match chat().await {
            Ok(resp) if resp.status() == 403 => {
                let e: Value = resp.json().await.unwrap();
                assert_eq!(e["error"]["code"], "contract_suspended");
                break;
            }
            // Admitted just before the suspension, then cut by it (the
            // sidecar cuts responses in flight): not refused yet.
            Err(e) => assert!(e.is_request(), "{e:?}"),
            Ok(resp) => {
                let _ = resp.text().await;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not suspended within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
