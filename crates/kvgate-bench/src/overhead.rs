//! Router overhead: closed-loop load against fixed-latency backends, directly
//! and through a router; the difference is what the router costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::client::send;
use crate::runner::percentile;
use crate::workload::{Body, RequestSpec};

#[derive(Debug, Clone)]
pub struct OverheadOptions {
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub stream: bool,
    /// Requests in flight (closed loop).
    pub concurrency: usize,
    /// Load before measuring (connection pools, caches, JITs).
    pub warmup: Duration,
    pub duration: Duration,
    pub timeout: Duration,
}

/// One target under one mode.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadSample {
    pub requests: usize,
    pub errors: usize,
    pub req_per_s: f64,
    /// Request latency (to the end of the answer), milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub first_error: Option<String>,
}

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    errors: usize,
    first_error: Option<String>,
}

async fn one(client: &reqwest::Client, base: &str, opts: &OverheadOptions) -> Result<f64, String> {
    let started = Instant::now();
    if opts.stream {
        let spec = RequestSpec {
            at: None,
            body: Body::Completion(opts.prompt.clone()),
            max_tokens: opts.max_tokens,
            group: 0,
            session_id: None,
        };
        let o = send(client, base, &opts.model, &spec, opts.timeout).await;
        return if o.ok {
            Ok(o.e2e * 1e3)
        } else {
            Err(o.error.unwrap_or_else(|| "failed".into()))
        };
    }
    let body = serde_json::json!({"model": opts.model, "prompt": opts.prompt, "max_tokens": opts.max_tokens});
    let resp = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .timeout(opts.timeout)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// Runs `opts.concurrency` loops of back-to-back requests for the warm-up and
/// then the measured duration.
pub async fn measure(
    client: &reqwest::Client,
    base: &str,
    opts: &OverheadOptions,
) -> OverheadSample {
    let start = Instant::now();
    let measure_from = start + opts.warmup;
    let end = measure_from + opts.duration;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.max(1) {
        let (client, base, opts, tally) = (
            client.clone(),
            base.to_string(),
            opts.clone(),
            tally.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let r = one(&client, &base, &opts).await;
                // Count requests sent inside the window that also ended in it.
                if sent < measure_from || Instant::now() > end {
                    continue;
                }
                let mut t = tally.lock();
                match r {
                    Ok(ms) => t.latencies_ms.push(ms),
                    Err(e) => {
                        t.errors += 1;
                        t.first_error.get_or_insert(e);
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut t = std::mem::take(&mut *tally.lock());
    let ok = t.latencies_ms.len();
    OverheadSample {
        requests: ok + t.errors,
        errors: t.errors,
        req_per_s: ok as f64 / opts.duration.as_secs_f64().max(1e-9),
        p50_ms: percentile(&mut t.latencies_ms, 0.5),
        p99_ms: percentile(&mut t.latencies_ms, 0.99),
        first_error: t.first_error,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::fake_backend::{serve, FakeBackendConfig};

    #[tokio::test]
    async fn measures_the_backend_delay_and_counts_errors() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let cfg = FakeBackendConfig {
            delay: Duration::from_millis(20),
            ..Default::default()
        };
        let server = tokio::spawn(serve(listener, cfg.clone()));
        let client = reqwest::Client::new();
        let mut opts = OverheadOptions {
            model: cfg.model.clone(),
            prompt: "a b c d".into(),
            max_tokens: 8,
            stream: false,
            concurrency: 4,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(600),
            timeout: Duration::from_secs(5),
        };
        for stream in [false, true] {
            opts.stream = stream;
            let s = measure(&client, &base, &opts).await;
            assert_eq!(s.errors, 0, "{:?}", s.first_error);
            assert!(s.requests >= 20, "{s:?}");
            assert!(s.p50_ms >= 20.0 && s.p50_ms < 500.0, "{s:?}");
            // 4 loops of >= 20 ms requests: at most ~200 req/s.
            assert!(s.req_per_s <= 4.0 * 1000.0 / 20.0 + 1.0, "{s:?}");
        }
        server.abort();
        // A fresh pool: kept-alive connections outlive the listener.
        let s = measure(&reqwest::Client::new(), &base, &opts).await;
        assert!(s.errors > 0 && s.first_error.is_some(), "{s:?}");
    }
}
