#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The endpoints peer routers call besides the OpenAI ones: vLLM's render
//! endpoints (vllm-router's cache_aware policy tokenizes through them) and the
//! `process_start_time_seconds` gauge that restart detection reads.

use std::time::Duration;

use kvgate_sim::fleet::{RunningSim, SimConfig, DEFAULT_MODEL};
use serde_json::{json, Value};

async fn start() -> RunningSim {
    RunningSim::start(SimConfig {
        listen: "127.0.0.1:0".into(),
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn render_returns_the_token_ids_the_engine_runs() {
    let sim = start().await;
    let c = client();
    let prompt = "The quick brown fox jumps over the lazy dog";
    let (status, tokenized) = post(
        &c,
        format!("{}/tokenize", sim.url()),
        json!({"model": DEFAULT_MODEL, "prompt": prompt}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, list) = post(
        &c,
        format!("{}/v1/completions/render", sim.url()),
        json!({"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 7, "cache_salt": "s1"}),
    )
    .await;
    assert_eq!(status, 200, "{list}");
    let items = list.as_array().expect("completions render answers a list");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["token_ids"], tokenized["tokens"]);
    assert_eq!(items[0]["sampling_params"]["max_tokens"], 7);
    assert_eq!(items[0]["cache_salt"], "s1");
    assert_eq!(items[0]["model"], DEFAULT_MODEL);

    let messages = json!([{"role": "user", "content": prompt}]);
    let (_, chat_tokens) = post(
        &c,
        format!("{}/tokenize", sim.url()),
        json!({"model": DEFAULT_MODEL, "messages": messages}),
    )
    .await;
    let (status, chat) = post(
        &c,
        format!("{}/v1/chat/completions/render", sim.url()),
        json!({"model": DEFAULT_MODEL, "messages": messages, "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    assert!(chat.is_object(), "chat render answers one object");
    assert_eq!(chat["token_ids"], chat_tokens["tokens"]);
    assert_eq!(chat["stream"], true);
    assert!(
        chat["token_ids"].as_array().unwrap().len() > tokenized["tokens"].as_array().unwrap().len(),
        "the chat template adds tokens"
    );

    let (status, err) = post(
        &c,
        format!("{}/v1/chat/completions/render", sim.url()),
        json!({"model": "other", "messages": messages}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["type"], "NotFoundError");
    let (status, _) = post(
        &c,
        format!("{}/v1/completions/render", sim.url()),
        json!({"model": DEFAULT_MODEL}),
    )
    .await;
    assert_eq!(status, 400);
}

/// `/tokenize` and the chat render read a chat completion's template fields alike.
#[tokio::test]
async fn tokenize_takes_the_chat_template_fields() {
    let sim = start().await;
    let c = client();
    let messages = json!([
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue"},
    ]);
    let mut counts = Vec::new();
    for extra in [
        json!({}),
        json!({"continue_final_message": true, "add_generation_prompt": false}),
        json!({"chat_template_kwargs": {"enable_thinking": false}}),
    ] {
        let mut body = json!({"model": DEFAULT_MODEL, "messages": messages});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, tokenized) = post(&c, format!("{}/tokenize", sim.url()), body.clone()).await;
        assert_eq!(status, 200, "{tokenized}");
        let (status, chat) = post(
            &c,
            format!("{}/v1/chat/completions/render", sim.url()),
            body,
        )
        .await;
        assert_eq!(status, 200, "{chat}");
        assert_eq!(chat["token_ids"], tokenized["tokens"], "{extra}");
        counts.push(tokenized["count"].as_u64().unwrap());
    }
    assert!(
        counts[1] != counts[0] && counts[2] != counts[0],
        "the fields change the prompt: {counts:?}"
    );
}

fn start_time(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("process_start_time_seconds "))
        .expect("process_start_time_seconds in /metrics")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn process_start_time_moves_on_restart_only() {
    let sim = start().await;
    let c = client();
    let scrape = || async {
        let text = c
            .get(format!("{}/metrics", sim.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        start_time(&text)
    };
    let first = scrape().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - first).abs() < 60.0, "Unix seconds: {first} vs {now}");
    assert_eq!(scrape().await, first, "stable between scrapes");
    let r = c
        .post(format!("{}/reset_prefix_cache", sim.url()))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(scrape().await, first, "a cache reset is not a restart");
    let (status, _) = post(
        &c,
        format!("{}/sim/faults", sim.url()),
        json!({"restart": true}),
    )
    .await;
    assert_eq!(status, 200);
    let after = scrape().await;
    assert!(
        after > first,
        "restart moves the start time: {first} -> {after}"
    );
}
