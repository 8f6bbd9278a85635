//! One streamed OpenAI request, timed at the client.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;

use crate::workload::{Body, RequestSpec};

/// What one request measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub status: u16,
    pub error: Option<String>,
    /// Seconds from send to the first generated token (first content chunk).
    pub ttft: Option<f64>,
    pub e2e: f64,
    /// Gaps between consecutive content chunks.
    pub itl: Vec<f64>,
    pub output_tokens: u32,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    /// The gateway's `x-kvgate-endpoint`, when present.
    pub endpoint: Option<String>,
}

pub async fn send(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    spec: &RequestSpec,
    timeout: Duration,
) -> Outcome {
    let started = Instant::now();
    let (path, mut body) = match &spec.body {
        Body::Completion(p) => (
            "/v1/completions",
            serde_json::json!({"model": model, "prompt": p}),
        ),
        Body::Chat(m) => (
            "/v1/chat/completions",
            serde_json::json!({"model": model, "messages": m}),
        ),
    };
    body["max_tokens"] = spec.max_tokens.into();
    body["stream"] = true.into();
    body["stream_options"] = serde_json::json!({"include_usage": true});
    body["ignore_eos"] = true.into();
    body["temperature"] = 0.into();
    let mut req = client
        .post(format!("{base}{path}"))
        .json(&body)
        .timeout(timeout);
    if let Some(s) = &spec.session_id {
        req = req.header("x-session-id", s);
    }
    let mut out = Outcome::default();
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(e.to_string());
            out.e2e = started.elapsed().as_secs_f64();
            return out;
        }
    };
    out.status = resp.status().as_u16();
    out.endpoint = resp
        .headers()
        .get("x-kvgate-endpoint")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if !resp.status().is_success() {
        out.error = Some(format!(
            "HTTP {}: {}",
            out.status,
            resp.text().await.unwrap_or_default()
        ));
        out.e2e = started.elapsed().as_secs_f64();
        return out;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut last_token: Option<Instant> = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                out.error = Some(e.to_string());
                break;
            }
        };
        buf.extend_from_slice(&chunk);
        // SSE events end with a blank line.
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                    continue;
                };
                let has_content = v["choices"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["text"].as_str().is_some_and(|t| !t.is_empty())
                            || c["delta"]["content"]
                                .as_str()
                                .is_some_and(|t| !t.is_empty())
                    })
                });
                if has_content {
                    let now = Instant::now();
                    match last_token {
                        None => out.ttft = Some(now.duration_since(started).as_secs_f64()),
                        Some(prev) => out.itl.push(now.duration_since(prev).as_secs_f64()),
                    }
                    last_token = Some(now);
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    out.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as u32;
                    out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as u32;
                    out.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0) as u32;
                }
            }
        }
    }
    out.e2e = started.elapsed().as_secs_f64();
    out.ok = out.error.is_none() && done && out.ttft.is_some();
    if out.error.is_none() && !out.ok {
        out.error = Some("stream ended without [DONE] or without tokens".into());
    }
    out
}
