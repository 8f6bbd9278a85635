//! kvgate's real-vLLM tier: `kvgate gateway` in front of two vLLM-CPU
//! instances, checking token, block, routing, eviction/resync and salt parity
//! against what the engines themselves report, plus the simulator's fidelity.
//!
//! The checkers ([`checks`]) are pure and unit-tested (they fail on a wrong
//! block size, different tokens, a missing index entry); the binary
//! `kvgate-e2e-vllm` drives the real processes.

pub mod capture;
pub mod checks;
pub mod corpus;
pub mod family_corpus;
pub mod procs;
pub mod proxy;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One engine under test.
#[derive(Debug, Clone)]
pub struct EngineAddr {
    pub url: String,
    pub events: String,
    pub replay: String,
}

/// A JSON POST that must succeed; returns the body and the response headers.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    auth: Option<&str>,
) -> Result<(Value, reqwest::header::HeaderMap)> {
    let mut req = http.post(url).json(body).timeout(Duration::from_secs(120));
    if let Some(key) = auth {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("POST {url}: {status}: {text}");
    }
    let json = serde_json::from_str(&text).with_context(|| format!("POST {url}: not JSON"))?;
    Ok((json, headers))
}

/// Token ids from a vLLM render response (chat: an object; completions: a
/// list with one object per prompt).
pub fn render_tokens(v: &Value) -> Option<Vec<u32>> {
    let obj = match v {
        Value::Array(a) => a.first()?,
        other => other,
    };
    obj.get("token_ids")?
        .as_array()?
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

/// What the gateway's explain endpoint says about one request.
#[derive(Debug, Clone)]
pub struct Explained {
    pub tokens: Vec<u32>,
    /// block size -> per key, the endpoints (URLs) holding it.
    pub blocks: Vec<(u32, Vec<Vec<String>>)>,
}

impl Explained {
    pub fn parse(v: &Value) -> Option<Self> {
        let tokens = v
            .get("prompt_tokens")?
            .as_array()?
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()?;
        let mut blocks = Vec::new();
        for b in v.get("blocks")?.as_array()? {
            let bs = u32::try_from(b.get("block_size")?.as_u64()?).ok()?;
            let keys = b
                .get("keys")?
                .as_array()?
                .iter()
                .map(|k| {
                    k.get("held_by")
                        .and_then(Value::as_array)
                        .map(|h| {
                            h.iter()
                                .filter_map(|x| x.get("endpoint")?.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect();
            blocks.push((bs, keys));
        }
        Some(Self { tokens, blocks })
    }

    /// Whether the index holds block `p` (keys of `block_size`) on `endpoint`.
    pub fn held(&self, block_size: u32, endpoint: &str, p: usize) -> bool {
        self.blocks
            .iter()
            .find(|(bs, _)| *bs == block_size)
            .and_then(|(_, keys)| keys.get(p))
            .is_some_and(|h| h.iter().any(|e| e == endpoint))
    }

    /// Leading blocks the index says `endpoint` holds.
    pub fn leading_held(&self, block_size: u32, endpoint: &str) -> usize {
        let n = self
            .blocks
            .iter()
            .find(|(bs, _)| *bs == block_size)
            .map_or(0, |(_, k)| k.len());
        (0..n)
            .take_while(|p| self.held(block_size, endpoint, *p))
            .count()
    }

    /// Blocks held anywhere (by any endpoint).
    pub fn held_anywhere(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|(_, keys)| keys.iter())
            .filter(|h| !h.is_empty())
            .count()
    }
}

/// Prefix-cache hit tokens and queried tokens of one engine (vLLM's counters).
pub async fn cache_counters(http: &reqwest::Client, url: &str) -> Result<(f64, f64)> {
    let text = http
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .text()
        .await?;
    let c = kvgate_bench::report::CacheCounters::parse(&text);
    Ok((c.hits, c.queries))
}

/// Sum of a Prometheus counter's samples whose line contains every `filters` string.
pub fn metric_sum(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_and_render_parsing() {
        let v = serde_json::json!({
            "prompt_tokens": [1, 2, 3],
            "blocks": [{"block_size": 32, "keys": [
                {"key": "00", "held_by": [{"endpoint": "http://a", "tier": "GPU"}]},
                {"key": "01", "held_by": []},
                {"key": "02", "held_by": [{"endpoint": "http://a", "tier": "GPU"}]}]}]
        });
        let e = Explained::parse(&v).unwrap();
        assert_eq!(e.tokens, vec![1, 2, 3]);
        assert!(e.held(32, "http://a", 0));
        assert!(!e.held(32, "http://a", 1));
        assert!(!e.held(64, "http://a", 0));
        assert_eq!(e.leading_held(32, "http://a"), 1);
        assert_eq!(e.held_anywhere(), 2);
        let r = serde_json::json!([{"token_ids": [5, 6]}]);
        assert_eq!(render_tokens(&r), Some(vec![5, 6]));
        assert_eq!(
            render_tokens(&serde_json::json!({"token_ids": [7]})),
            Some(vec![7])
        );
        let m = "# HELP x\nkv_cache_replays_total{endpoint=\"a\",outcome=\"ok\"} 2\nkv_cache_replays_total{endpoint=\"b\",outcome=\"ok\"} 1\nkv_cache_replays_totalx 9\n";
        assert_eq!(
            metric_sum(m, "kv_cache_replays_total", &["outcome=\"ok\""]),
            3.0
        );
        assert_eq!(metric_sum(m, "kv_cache_replays_total", &["\"a\""]), 2.0);
    }
}
