//! Runs a stage of requests against a target and summarises it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{send, Outcome};
use crate::workload::RequestSpec;

#[derive(Debug, Clone)]
pub struct StageOptions {
    pub name: String,
    /// Requests in flight at most (None: unbounded, arrivals decide).
    pub concurrency: Option<usize>,
    pub timeout: Duration,
    /// Print progress to stderr.
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    pub name: String,
    pub requests: usize,
    pub errors: usize,
    pub duration_s: f64,
    pub request_rate: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
    pub e2e_p50_ms: f64,
    pub output_tok_s: f64,
    /// Cached prompt tokens over prompt tokens, from the responses' usage.
    pub usage_hit_rate: f64,
    /// Requests per endpoint (from the gateway's x-kvgate-endpoint).
    pub per_endpoint: std::collections::BTreeMap<String, usize>,
    pub first_error: Option<String>,
}

/// Sends `specs` (at their `at` offsets, or back to back under the
/// concurrency limit) and returns every outcome in spec order.
pub async fn run_stage(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    specs: &[RequestSpec],
    opts: &StageOptions,
) -> (Vec<Outcome>, f64) {
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(
        opts.concurrency.unwrap_or(usize::MAX >> 4).max(1),
    ));
    let done = Arc::new(AtomicUsize::new(0));
    let total = specs.len();
    let progress = opts.progress.then(|| {
        let done = done.clone();
        let name = opts.name.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let d = done.load(Ordering::Relaxed);
                eprint!("\r  {name}: {d}/{total} requests");
                if d >= total {
                    eprintln!();
                    break;
                }
            }
        })
    });
    let mut tasks = Vec::with_capacity(specs.len());
    for spec in specs {
        if let Some(at) = spec.at {
            let due = started + Duration::from_secs_f64(at.max(0.0));
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let client = client.clone();
        let base = base.to_string();
        let model = model.to_string();
        let spec = spec.clone();
        let done = done.clone();
        let timeout = opts.timeout;
        tasks.push(tokio::spawn(async move {
            let o = send(&client, &base, &model, &spec, timeout).await;
            drop(permit);
            done.fetch_add(1, Ordering::Relaxed);
            o
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.unwrap_or_else(|e| Outcome {
            error: Some(e.to_string()),
            ..Default::default()
        }));
    }
    if let Some(p) = progress {
        let _ = p.await;
    }
    (outcomes, started.elapsed().as_secs_f64())
}

pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let idx = ((values.len() - 1) as f64 * q).round() as usize;
    values[idx.min(values.len() - 1)]
}

pub fn summarize(name: &str, outcomes: &[Outcome], duration_s: f64) -> StageSummary {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft).map(|t| t * 1e3).collect();
    let mut itl: Vec<f64> = ok
        .iter()
        .flat_map(|o| o.itl.iter().map(|t| t * 1e3))
        .collect();
    let mut e2e: Vec<f64> = ok.iter().map(|o| o.e2e * 1e3).collect();
    let output: u64 = ok.iter().map(|o| u64::from(o.output_tokens)).sum();
    let prompt: u64 = ok.iter().map(|o| u64::from(o.prompt_tokens)).sum();
    let cached: u64 = ok.iter().map(|o| u64::from(o.cached_tokens)).sum();
    let mut per_endpoint = std::collections::BTreeMap::new();
    for o in &ok {
        if let Some(e) = &o.endpoint {
            *per_endpoint.entry(e.clone()).or_insert(0) += 1;
        }
    }
    StageSummary {
        name: name.to_string(),
        requests: outcomes.len(),
        errors: outcomes.len() - ok.len(),
        duration_s,
        request_rate: outcomes.len() as f64 / duration_s.max(1e-9),
        ttft_p50_ms: percentile(&mut ttft, 0.5),
        ttft_p90_ms: percentile(&mut ttft, 0.9),
        ttft_p99_ms: percentile(&mut ttft, 0.99),
        itl_p50_ms: percentile(&mut itl, 0.5),
        itl_p90_ms: percentile(&mut itl, 0.9),
        e2e_p50_ms: percentile(&mut e2e, 0.5),
        output_tok_s: output as f64 / duration_s.max(1e-9),
        usage_hit_rate: if prompt == 0 {
            0.0
        } else {
            cached as f64 / prompt as f64
        },
        per_endpoint,
        first_error: outcomes.iter().find_map(|o| o.error.clone()),
    }
}
