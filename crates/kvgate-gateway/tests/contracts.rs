#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The contract layer at the gateway's edge: what reaches the engine, each
//! refusal's status and OpenAI-shaped error, suspension, and the audit chain.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kvgate_auth::fields::PRIVILEGED_FIELDS;
use kvgate_auth::{FieldPolicy, Limits};
use kvgate_gateway::admin::ADMIN_CONTRACTS_PATH;
use kvgate_gateway::GatewayConfig;
use serde_json::{json, Value};

mod common;
use common::*;

const ADMIN_TOKEN: &str = "admin-token-for-tests";

fn config(url: &str, audit_dir: &tempfile::TempDir) -> GatewayConfig {
    let mut cfg = GatewayConfig {
        endpoints: vec![endpoint(url)],
        admin_token_sha256: Some(kvgate_auth::principal::api_key_sha256(ADMIN_TOKEN)),
        ..Default::default()
    };
    cfg.contracts = contracts(&[("key-a", "acme"), ("key-b", "globex"), ("key-l", "limited")]);
    cfg.contracts.contracts[0].priority = Some(7);
    cfg.contracts.contracts[0].models = vec!["m".into()];
    cfg.contracts.contracts[2].limits = Limits {
        requests_per_minute: Some(1),
        ..Limits::default()
    };
    cfg.contracts.audit.path = Some(audit_dir.path().join("audit.jsonl"));
    cfg
}

fn hostile_body() -> Value {
    let mut b = chat_body("x");
    b["cache_salt"] = "stolen-salt".into();
    b["kv_transfer_params"] =
        json!({"lmcache.tag.cachesalt": "stolen", "remote_host": "10.0.0.66"});
    b["priority"] = json!(-1000);
    b["request_id"] = "chosen-id".into();
    b["vllm_xargs"] = json!({"plugin": "x"});
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_privileged_field_or_header_of_the_client_reaches_the_engine() {
    let audit = tempfile::tempdir().unwrap();
    let (url, u) = spawn_upstream().await;
    let (gw_url, gw) = gateway(config(&url, &audit)).await;
    let client = reqwest::Client::new();
    let send = |key: &'static str| {
        client
            .post(format!("{gw_url}/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-request-id", "client-id")
            .header("x-data-parallel-rank", "3")
            .json(&hostile_body())
            .send()
    };
    for key in ["key-a", "key-b"] {
        let resp = send(key).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    // Each contract's counters, one request each.
    let metrics = metrics_text(&client, &gw_url).await;
    for contract in ["acme", "globex"] {
        let line = format!("kvgate_contract_requests_total{{contract=\"{contract}\"}} 1\n");
        assert!(metrics.contains(&line), "{line} in {metrics}");
        for kind in ["prompt", "output"] {
            let series =
                format!("kvgate_contract_tokens_total{{contract=\"{contract}\",kind=\"{kind}\"}}");
            assert!(metrics.contains(&series), "{series} in {metrics}");
        }
    }
    let bodies = u.bodies.lock().clone();
    let (a, b) = (&bodies[0], &bodies[1]);
    let salt = a["cache_salt"].as_str().unwrap();
    assert_eq!(salt.len(), 32);
    assert_ne!(
        salt,
        b["cache_salt"].as_str().unwrap(),
        "contracts do not share a salt"
    );
    assert_eq!(
        a["kv_transfer_params"],
        json!({"lmcache.tag.cachesalt": salt})
    );
    assert_eq!(a["priority"], 7, "the contract's priority");
    assert!(
        b.get("priority").is_none(),
        "no priority for a contract without one"
    );
    for body in [a, b] {
        assert!(
            body.get("request_id").is_none() && body.get("vllm_xargs").is_none(),
            "{body}"
        );
        assert!(!body.to_string().contains("stolen") && !body.to_string().contains("10.0.0.66"));
    }
    for h in u.headers.lock().iter() {
        for name in ["authorization", "x-request-id", "x-data-parallel-rank"] {
            assert!(h.get(name).is_none(), "{name} forwarded");
        }
    }
    // Refusing instead of dropping.
    let (url2, u2) = spawn_upstream().await;
    let mut cfg = config(&url2, &audit);
    cfg.contracts.privileged_fields = FieldPolicy::Refuse;
    cfg.contracts.audit.path = None;
    let (gw2, _g) = gateway(cfg).await;
    for field in PRIVILEGED_FIELDS {
        let mut body = chat_body("x");
        body[field] = json!("client value");
        let resp = client
            .post(format!("{gw2}/v1/chat/completions"))
            .bearer_auth("key-a")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{field}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"]["code"], "privileged_field", "{e}");
    }
    assert!(u2.bodies.lock().is_empty());
    // The audit log names what was dropped, never the values.
    gw.sentinel().audit().flush().unwrap();
    let log = std::fs::read_to_string(audit.path().join("audit.jsonl")).unwrap();
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"field_dropped\""))
        .collect();
    assert_eq!(dropped.len(), 2, "{log}");
    assert!(dropped[0].contains("cache_salt,kv_transfer_params,priority,request_id,vllm_xargs"));
    assert!(
        !log.contains("stolen") && !log.contains(salt),
        "no values or salts in the audit log"
    );
}

async fn error_of(resp: reqwest::Response) -> (u16, Value, Option<String>) {
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, resp.json().await.unwrap(), retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_openai_errors_audited_in_a_chain_that_verifies() {
    let audit = tempfile::tempdir().unwrap();
    let (url, u) = spawn_upstream().await;
    let (gw_url, gw) = gateway(config(&url, &audit)).await;
    let client = reqwest::Client::new();
    let chat = |key: Option<String>, body: Value| {
        let mut r = client
            .post(format!("{gw_url}/v1/chat/completions"))
            .json(&body);
        if let Some(k) = key {
            r = r.header("authorization", k);
        }
        r.send()
    };
    let cases: Vec<(Option<String>, Value, u16, &str)> = vec![
        (None, chat_body("x"), 401, "invalid_api_key"),
        (
            Some("Bearer wrong".into()),
            chat_body("x"),
            401,
            "invalid_api_key",
        ),
        (
            Some("Basic a2V5LWE=".into()),
            chat_body("x"),
            401,
            "invalid_api_key",
        ),
        (
            Some(format!("Bearer {}", "k".repeat(9000))),
            chat_body("x"),
            401,
            "invalid_api_key",
        ),
        (
            Some("Bearer eyJhbGciOiJub25lIn0.eyJjb250cmFjdCI6ImFjbWUifQ.".into()),
            chat_body("x"),
            401,
            "invalid_api_key",
        ),
        (
            Some("Bearer key-a".into()),
            json!({"model": "other", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "model_not_allowed",
        ),
    ];
    for (key, body, status, code) in &cases {
        let (s, e, _) = error_of(chat(key.clone(), body.clone()).await.unwrap()).await;
        assert_eq!(
            (s, e["error"]["code"].as_str().unwrap()),
            (*status, *code),
            "{key:?}: {e}"
        );
        assert!(e["error"]["message"].is_string() && e["error"]["type"].is_string());
        if let Some(k) = key {
            assert!(
                !e.to_string().contains(&k[7.min(k.len())..]) || k.len() < 12,
                "credential echoed"
            );
        }
    }
    // Rate limit: one request a minute.
    let ok = chat(Some("Bearer key-l".into()), chat_body("x"))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    ok.text().await.unwrap();
    let (s, e, retry) = error_of(
        chat(Some("Bearer key-l".into()), chat_body("x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str().unwrap()),
        (429, "rate_limit_requests")
    );
    assert_eq!(e["error"]["type"], "RateLimitError");
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    // Path tricks never reach an engine.
    for path in [
        "/reset_prefix_cache",
        "//v1/chat/completions",
        "/v1/chat/completions/../../reset_prefix_cache",
        "/v1%2Fchat%2Fcompletions",
        "/collective_rpc",
        "/pause",
        "/sleep",
    ] {
        let resp = client
            .post(format!("{gw_url}{path}"))
            .bearer_auth("key-a")
            .json(&chat_body("x"))
            .send()
            .await
            .unwrap();
        let (s, e, _) = error_of(resp).await;
        assert_eq!(s, 404, "{path}");
        assert_eq!(e["error"]["type"], "NotFoundError");
    }
    assert!(
        u.other_paths.lock().is_empty(),
        "{:?}",
        u.other_paths.lock()
    );
    assert_eq!(
        u.bodies.lock().len(),
        1,
        "only the admitted request was forwarded"
    );

    let log = gw.sentinel().audit();
    let cp = log.flush().unwrap().unwrap();
    let path = audit.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
    assert_eq!(count("auth_failure"), 5, "{kinds:?}");
    assert_eq!(count("contract_refused"), 1);
    assert_eq!(count("rate_limited"), 1);
    assert_eq!(count("request"), 1);
    assert!(count("path_refused") >= 6, "{kinds:?}");
    assert!(
        !text.contains("key-a") && !text.contains("kkkkkkkk"),
        "no credentials in the log"
    );
    let summary = kvgate_auth::audit::verify(std::slice::from_ref(&path), Some(&cp), None).unwrap();
    assert_eq!(summary.records, kinds.len() as u64);
    // An edited record is caught.
    let edited = text.replacen("\"status\":401", "\"status\":200", 1);
    std::fs::write(&path, edited).unwrap();
    assert!(kvgate_auth::audit::verify(&[path], Some(&cp), None).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_refuses_at_once_cuts_streams_and_starts_a_new_epoch() {
    let audit = tempfile::tempdir().unwrap();
    let (url, u) = spawn_upstream().await;
    let (gw_url, _gw) = gateway(config(&url, &audit)).await;
    let client = reqwest::Client::new();
    let long = "a prompt long enough to fill a few blocks ".repeat(8);
    let chat = |key: &'static str| {
        client
            .post(format!("{gw_url}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body(&long))
            .send()
    };
    let admin = |action: &str, token: &str| {
        client
            .post(format!("{gw_url}{ADMIN_CONTRACTS_PATH}/acme/{action}"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(admin("suspend", "wrong").await.unwrap().status(), 401);
    // A stream in flight (5 chunks, 100 ms apart).
    let resp = chat("key-a").await.unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let t = Instant::now();
    let change: Value = admin("suspend", ADMIN_TOKEN)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(change["status"], "suspended");
    let (s, e, _) = error_of(chat("key-a").await.unwrap()).await;
    let suspend_ms = t.elapsed().as_millis();
    assert_eq!(
        (s, e["error"]["code"].as_str().unwrap()),
        (403, "contract_suspended")
    );
    assert!(
        suspend_ms < 1000,
        "refused {suspend_ms} ms after suspension"
    );
    let mut rest = 0;
    let mut broke = false;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
    {
        match chunk {
            Ok(_) => rest += 1,
            Err(_) => {
                broke = true;
                break;
            }
        }
    }
    assert!(broke && rest < 4, "the stream was cut ({rest} more chunks)");
    // Other contracts go on.
    let other = chat("key-b").await.unwrap();
    assert_eq!(other.status(), 200);
    other.text().await.unwrap();
    // Reactivation: a fresh epoch, so a fresh salt.
    let back: Value = admin("activate", ADMIN_TOKEN)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(back["status"], "active");
    let again = chat("key-a").await.unwrap();
    assert_eq!(again.status(), 200);
    again.text().await.unwrap();
    let bodies = u.bodies.lock().clone();
    let first = bodies[0]["cache_salt"].as_str().unwrap();
    let last = bodies.last().unwrap()["cache_salt"].as_str().unwrap();
    assert_ne!(
        first, last,
        "blocks cached before the suspension can never be hit"
    );
    let list: Value = client
        .get(format!("{gw_url}{ADMIN_CONTRACTS_PATH}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["salt_epoch"], 2);
    assert!(
        !list.to_string().contains(last),
        "no salts in the admin API"
    );
    // Admin reads are audited too, as is an action on an unknown contract.
    let missing = client
        .post(format!("{gw_url}{ADMIN_CONTRACTS_PATH}/no-such/suspend"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    _gw.sentinel().audit().flush().unwrap();
    let log = std::fs::read_to_string(audit.path().join("audit.jsonl")).unwrap();
    let admin_reasons: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "admin")
        .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        admin_reasons,
        ["list_contracts", "unknown_contract"],
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_suspends_within_a_second_and_reactivates() {
    use axum::extract::{Path, State};
    use std::sync::Arc;
    // acme's status at the control plane; every other contract is active.
    type Acme = Arc<parking_lot::Mutex<String>>;
    let status: Acme = Arc::new(parking_lot::Mutex::new("active".to_string()));
    let cp = axum::Router::new()
        .route(
            "/edc/contracts/{id}",
            axum::routing::get(|State(s): State<Acme>, Path(id): Path<String>| async move {
                let st = if id == "acme" {
                    s.lock().clone()
                } else {
                    "active".into()
                };
                axum::Json(json!({"id": id, "status": st, "asset": "model-x"}))
            }),
        )
        .with_state(status.clone());
    let cp_url = serve(cp).await;
    let audit = tempfile::tempdir().unwrap();
    let (url, u) = spawn_upstream().await;
    let mut cfg = config(&url, &audit);
    cfg.contracts.control_plane = Some(kvgate_auth::ControlPlaneConfig {
        url: format!("{cp_url}/edc"),
        poll_ms: 100,
        token_file: None,
    });
    let (gw_url, _gw) = gateway(cfg).await;
    let client = reqwest::Client::new();
    let status_of = |key: &'static str| {
        let client = client.clone();
        let url = format!("{gw_url}/v1/chat/completions");
        async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&chat_body("x"))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            // A stream in flight when the contract is suspended is cut.
            let _ = r.text().await;
            s
        }
    };
    assert_eq!(status_of("key-a").await, 200);
    *status.lock() = "suspended".into();
    let t = Instant::now();
    while status_of("key-a").await != 403 {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not suspended within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status_of("key-b").await, 200, "only that contract");
    *status.lock() = "active".into();
    let t = Instant::now();
    while status_of("key-a").await != 200 {
        assert!(t.elapsed() < Duration::from_secs(2), "not reactivated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bodies = u.bodies.lock().clone();
    let acme: Vec<&str> = bodies
        .iter()
        .filter(|b| b["priority"] == 7)
        .map(|b| b["cache_salt"].as_str().unwrap())
        .collect();
    assert_ne!(
        acme.first(),
        acme.last(),
        "a fresh epoch after reactivation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_contract_covers_every_request_and_no_other() {
    let audit = tempfile::tempdir().unwrap();
    let (url, u) = spawn_upstream().await;
    // Without credentials: every request is the pod's contract.
    let mut cfg = config(&url, &audit);
    cfg.contracts.api_keys.clear();
    cfg.contracts.pod_contract = Some("globex".into());
    let (gw_url, _gw) = gateway(cfg).await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{gw_url}/v1/chat/completions"))
        .json(&hostile_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    let salt = u.bodies.lock()[0]["cache_salt"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(salt.len(), 32);
    assert_ne!(salt, "stolen-salt");
    // With credentials: a key of another contract is refused.
    let (url2, _u2) = spawn_upstream().await;
    let mut cfg = config(&url2, &audit);
    cfg.contracts.pod_contract = Some("globex".into());
    cfg.contracts.audit.path = None;
    let (gw2, _g) = gateway(cfg).await;
    let send = |key: &'static str| {
        client
            .post(format!("{gw2}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("x"))
            .send()
    };
    let (s, e, _) = error_of(send("key-a").await.unwrap()).await;
    assert_eq!(
        (s, e["error"]["code"].as_str().unwrap()),
        (403, "contract_unknown")
    );
    assert_eq!(send("key-b").await.unwrap().status(), 200);
}
