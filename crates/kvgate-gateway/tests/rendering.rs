#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! How the gateway renders prompts, and how it fails loudly when it cannot:
//! render failures, template refusals, tokenizer classes it cannot reproduce,
//! content formats.

mod common;
use common::*;

use kvgate_gateway::GatewayConfig;

/// A prompt the gateway cannot render is still served (by load), but loudly:
/// counted per model and reason, listed on `/ready`, and the explain API
/// answers it as an error naming the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_failures_are_counted_shown_and_explained() {
    let (url, _u) = spawn_upstream().await;
    let client = reqwest::Client::new();
    let metric = |gw_url: String, reason: &'static str| {
        let client = client.clone();
        async move {
            let m = metrics_text(&client, &gw_url).await;
            m.lines()
                .find(|l| {
                    l.starts_with("kvgate_render_failures_total")
                        && l.contains(&format!("reason=\"{reason}\""))
                        && l.contains("model=\"m\"")
                })
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        }
    };

    let (gw_url, _gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&url)],
        ..Default::default()
    })
    .await;
    let mut bad = chat_body("hi");
    bad["tools"] = serde_json::json!("not a list");
    for _ in 0..2 {
        let resp = post_json(&client, &format!("{gw_url}/v1/chat/completions"), &bad).await;
        assert_eq!(resp.status(), 200, "still served, by load");
        resp.text().await.unwrap();
    }
    assert_eq!(metric(gw_url.clone(), "invalid_chat_input").await, Some(2));
    let resp = post_json(
        &client,
        &format!("{gw_url}{}", kvgate_gateway::EXPLAIN_CHAT_PATH),
        &bad,
    )
    .await;
    assert_eq!(resp.status(), 422);
    let err: serde_json::Value = resp.json().await.unwrap();
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("invalid_chat_input") && msg.contains("tools"),
        "{err}"
    );
    let ready: serde_json::Value = get_json(&client, &format!("{gw_url}/ready")).await;
    let listed = &ready["render_failures"][0];
    assert_eq!(listed["model"], "m", "{ready}");
    assert_eq!(listed["reason"], "invalid_chat_input", "{ready}");
    assert_eq!(listed["count"], 3, "{ready}");

    // No tokenizer for the model at all.
    let (gw_url, _gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&url)],
        embedded_tokenizer_fallback: false,
        ..Default::default()
    })
    .await;
    let resp = client
        .post(format!("{gw_url}/v1/completions"))
        .json(&serde_json::json!({"model": "m", "prompt": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    assert_eq!(metric(gw_url.clone(), "no_tokenizer").await, Some(1));
    assert_eq!(metric(gw_url, "invalid_chat_input").await, None);
}

/// A model's content format can be set in config, as vLLM's
/// `--chat-template-content-format`: the same content parts then reach the
/// template as a list instead of a joined string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_format_is_configurable_per_model() {
    let (url, _u) = spawn_upstream().await;
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]}]});
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for format in [None, Some("string"), Some("openai")] {
        let mut cfg = GatewayConfig {
            endpoints: vec![endpoint(&url)],
            ..Default::default()
        };
        if let Some(f) = format {
            cfg.content_format = serde_yaml::from_str(&format!("m: {f}")).unwrap();
        }
        let (gw_url, _gw) = gateway(cfg).await;
        let resp = post_json(
            &client,
            &format!("{gw_url}{}", kvgate_gateway::EXPLAIN_CHAT_PATH),
            &body,
        )
        .await;
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap();
        answers.push((status, v["prompt_tokens"].clone()));
    }
    assert_eq!(answers[0].0, 200);
    assert_eq!(
        answers[0], answers[1],
        "the embedded template is detected as string"
    );
    assert_ne!(answers[0], answers[2], "openai hands the template a list");
    let bad = GatewayConfig {
        endpoints: vec![endpoint(&url)],
        embedded_tokenizer_fallback: false,
        content_format: serde_yaml::from_str("m: openai").unwrap(),
        ..Default::default()
    };
    assert!(
        bad.validate().is_err(),
        "a content format for a model without a tokenizer"
    );
}

/// A tokenizer directory for model "m": the small byte-level BPE fixture with
/// the given class and chat template.
fn tokenizer_dir(name: &str, class: &str, template: &str) -> String {
    let dir = std::env::temp_dir().join(format!("kvgate-rendering-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenize/byte_bpe"
    );
    std::fs::copy(
        format!("{fixture}/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{fixture}/tokenizer_config.json")).unwrap())
            .unwrap();
    config["tokenizer_class"] = serde_json::json!(class);
    config["chat_template"] = serde_json::json!(template);
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir.display().to_string()
}

async fn gateway_with_tokenizer(
    dir: String,
) -> (String, std::sync::Arc<kvgate_gateway::Gateway>, Upstream) {
    let (url, u) = spawn_upstream().await;
    let (gw_url, gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&url)],
        tokenizers: [("m".to_string(), dir)].into_iter().collect(),
        ..Default::default()
    })
    .await;
    (gw_url, gw, u)
}

/// A template that calls `raise_exception` refuses the request: the gateway
/// answers 400 with the template's message, as vLLM does, and sends nothing
/// upstream. Requests the template accepts are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_raises_is_answered_400_like_vllm() {
    let dir = tokenizer_dir(
        "raises",
        "Qwen2Tokenizer",
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\
         {% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    );
    let (gw_url, _gw, upstream) = gateway_with_tokenizer(dir).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
    for path in ["/v1/chat/completions", kvgate_gateway::EXPLAIN_CHAT_PATH] {
        let resp = post_json(&client, &format!("{gw_url}{path}"), &body).await;
        assert_eq!(resp.status(), 400, "{path}");
        let err: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            err["error"]["message"], "System role not supported",
            "{err}"
        );
        assert_eq!(err["error"]["type"], "BadRequestError", "{err}");
        assert_eq!(err["error"]["param"], "messages", "{err}");
    }
    assert!(
        upstream.bodies.lock().is_empty(),
        "a refused request reached the engine"
    );
    let resp = post_json(
        &client,
        &format!("{gw_url}/v1/chat/completions"),
        &chat_body("hi"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    assert_eq!(upstream.bodies.lock().len(), 1);
}

/// A tokenizer vLLM would build by the rules of a class kvgate does not
/// reproduce is announced at start-up (a metric, `/ready`), and its requests
/// are served by load, counted as render failures, never keyed on wrong ids.
/// A class kvgate does reproduce is listed as rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizer_class_kvgate_cannot_reproduce_is_announced_and_routed_by_load() {
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let (gw_url, _gw, upstream) =
        gateway_with_tokenizer(tokenizer_dir("t5", "T5TokenizerFast", template)).await;
    let client = reqwest::Client::new();
    let metrics = metrics_text(&client, &gw_url).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kvgate_tokenizer_unsupported{")
                && l.contains("model=\"m\"")
                && l.contains("class=\"T5Tokenizer\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    let ready: serde_json::Value = get_json(&client, &format!("{gw_url}/ready")).await;
    assert_eq!(
        ready["tokenizers"],
        serde_json::json!([{"model": "m", "class": "T5Tokenizer", "built": "unsupported"}]),
        "{ready}"
    );
    let resp = post_json(
        &client,
        &format!("{gw_url}/v1/chat/completions"),
        &chat_body("hi"),
    )
    .await;
    assert_eq!(resp.status(), 200, "served, by load");
    resp.text().await.unwrap();
    assert_eq!(upstream.bodies.lock().len(), 1);
    let metrics = metrics_text(&client, &gw_url).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kvgate_render_failures_total")
                && l.contains("reason=\"unsupported_tokenizer\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    let resp = post_json(
        &client,
        &format!("{gw_url}{}", kvgate_gateway::EXPLAIN_CHAT_PATH),
        &chat_body("hi"),
    )
    .await;
    assert_eq!(resp.status(), 422);
    assert!(resp.text().await.unwrap().contains("T5Tokenizer"));

    let (gw_url, _gw, _u) =
        gateway_with_tokenizer(tokenizer_dir("llama", "LlamaTokenizerFast", template)).await;
    let ready: serde_json::Value = get_json(&client, &format!("{gw_url}/ready")).await;
    assert_eq!(ready["tokenizers"][0]["built"], "rebuilt", "{ready}");
    assert_eq!(ready["tokenizers"][0]["class"], "LlamaTokenizer", "{ready}");
    assert!(!metrics_text(&client, &gw_url)
        .await
        .contains("kvgate_tokenizer_unsupported{"));
}
