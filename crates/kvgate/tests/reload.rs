#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `kvgate gateway --config FILE` applies a changed `contracts:` section
//! while serving: a key added works, a contract removed is refused, and a
//! broken file leaves the running config in place.

use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

mod common;
use common::*;

fn sha(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

fn config(port: u16, upstream: &str, master: &std::path::Path, keys: &[(&str, &str)]) -> String {
    let mut ids: Vec<&str> = keys.iter().map(|(_, c)| *c).collect();
    ids.dedup();
    let api_keys: Vec<String> = keys
        .iter()
        .map(|(k, c)| format!("    - {{sha256: \"{}\", contract: {c}}}\n", sha(k)))
        .collect();
    let contracts: Vec<String> = ids.iter().map(|c| format!("    - {{id: {c}}}\n")).collect();
    format!(
        "listen: 127.0.0.1:{port}\nendpoints:\n  - {{url: \"{upstream}\", models: [m], block_size: 16}}\n\
         contracts:\n  master_key: {{file: \"{}\"}}\n  api_keys:\n{}  contracts:\n{}",
        master.display(),
        api_keys.concat(),
        contracts.concat()
    )
}

/// Writes `text` so the change is seen even within one mtime tick.
fn rewrite(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_contracts_section_applies_while_serving() {
    let upstream = serve(
        Router::new()
            .route(
                "/v1/chat/completions",
                post(|| async {
                    Json(json!({"choices": [{"message": {"content": "ok"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}))
                }),
            )
            .route("/health", get(|| async { "" }))
            .route("/metrics", get(|| async { "" })),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master.key");
    std::fs::write(&master, "reload test master key material").unwrap();
    let path = dir.path().join("kvgate.yaml");
    let port = free_port();
    std::fs::write(&path, config(port, &upstream, &master, &[("ka", "acme")])).unwrap();
    let _proc = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["gateway", "--config"])
            .arg(&path)
            .env("KVGATE_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let client = fresh_client();
    wait_ready(&client, &url).await;
    let status = |key: &'static str| {
        let req = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        async move {
            let resp = req.send().await.unwrap();
            let s = resp.status().as_u16();
            let _: Value = resp.json().await.unwrap();
            s
        }
    };
    let until = |key: &'static str, want: u16| async move {
        let t = Instant::now();
        while status(key).await != want {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{key} never answered {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(status("ka").await, 200);
    assert_eq!(status("kb").await, 401);

    // A second contract and its key: served once the file is seen.
    let both = config(
        port,
        &upstream,
        &master,
        &[("ka", "acme"), ("kb", "globex")],
    );
    rewrite(&path, &both);
    until("kb", 200).await;

    // A broken file: refused, the running contracts stay.
    rewrite(&path, "contracts: [this is not a contracts section\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(status("ka").await, 200);
    assert_eq!(status("kb").await, 200);

    // acme removed: its key is refused, globex still served.
    let globex_only = config(port, &upstream, &master, &[("kb", "globex")]);
    rewrite(&path, &globex_only);
    until("ka", 401).await;
    assert_eq!(status("kb").await, 200);
}

/// The router's policy in the file changes while serving: the requests that
/// follow are routed by the new one (the decision header names it); a change
/// to a restart-only router setting is refused and the policy stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_router_policy_applies_while_serving() {
    let upstream = serve(
        Router::new()
            .route(
                "/v1/completions",
                post(|| async {
                    Json(json!({"choices": [{"text": "ok"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}))
                }),
            )
            .route("/health", get(|| async { "" }))
            .route("/metrics", get(|| async { "" })),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvgate.yaml");
    let port = free_port();
    let config = |router: &str| {
        format!(
            "listen: 127.0.0.1:{port}\ndebug_headers: true\nendpoints:\n  - {{url: \"{upstream}\", models: [m], block_size: 16}}\n\
             router:\n{router}"
        )
    };
    std::fs::write(&path, config("  policy: precise_prefix\n")).unwrap();
    let _proc = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["gateway", "--config"])
            .arg(&path)
            .env("KVGATE_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let client = fresh_client();
    wait_ready(&client, &url).await;
    let reason = || {
        let req = client
            .post(format!("{url}/v1/completions"))
            .json(&json!({"model": "m", "prompt": "hello there"}));
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            let decision = resp.headers()["x-kvgate-decision"]
                .to_str()
                .unwrap()
                .to_string();
            let _: Value = resp.json().await.unwrap();
            decision.split(' ').next().unwrap_or_default().to_string()
        }
    };
    let until = |want: &'static str| async move {
        let t = Instant::now();
        loop {
            let got = reason().await;
            if got == want {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "still {got}, never {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(reason().await, "load_no_prefix");

    rewrite(&path, &config("  policy: round_robin\n"));
    until("round_robin").await;

    // A restart-only router setting with a new policy: refused whole.
    rewrite(&path, &config("  policy: random\n  approx_ttl_secs: 7\n"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(reason().await, "round_robin");

    rewrite(&path, &config("  policy: precise_prefix\n"));
    until("load_no_prefix").await;
}
