#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Requests per second one simulated engine sustains with short outputs
//! (~100-token prompts sharing a 64-token prefix, `max_tokens` 4), with the
//! latency model scaled away (`time_scale` 1e6), on one core.
//!
//! - `engine/core`: the synchronous [`EngineCore`] alone (add, step until idle),
//!   the scheduler and block pool without tokio;
//! - `engine/handle`: [`EngineHandle::spawn`] on a current-thread runtime,
//!   `N` requests submitted concurrently, every token event awaited;
//! - `engine/handle_64_in_flight`: the same, 64 requests in flight at a time
//!   (a new one as soon as one finishes), as the HTTP benches load it;
//! - `http_one_core/*`: a [`RunningSim`] and a reqwest client with 64 requests
//!   in flight, all on one current-thread runtime (server, engine and client
//!   share the core), with a text prompt (tokenized by the sim) or a token-id
//!   prompt;
//! - `http_sim_thread/*`: the same load, the sim alone on a current-thread
//!   runtime in its own thread and the client on another: requests/s per sim
//!   core, when the machine has a second core for the client.
//!
//! `cargo bench -p kvgate-sim --bench sim_throughput` prints requests/s as
//! "thrpt" (criterion's `Throughput::Elements`, one element per request).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::StreamExt;
use kvgate_sim::engine::{EngineConfig, EngineCore, EngineHandle, SimRequest, TokenEvent};
use kvgate_sim::fleet::{RunningSim, SimConfig, DEFAULT_MODEL};
use serde_json::json;

const MAX_TOKENS: u32 = 4;
const PREFIX: usize = 64;
const PROMPT: usize = 100;
const ENGINE_REQUESTS: usize = 2048;
const HTTP_REQUESTS: usize = 512;
const HTTP_CONCURRENCY: usize = 64;

fn engine_config() -> EngineConfig {
    EngineConfig {
        time_scale: 1e6,
        ..EngineConfig::default()
    }
}

/// Distinct prompts across the whole run (a fresh tail per request), so each
/// request computes its tail and hits the shared prefix.
static NEXT: AtomicU64 = AtomicU64::new(0);

fn prompt_ids() -> Vec<u32> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
    (0..PREFIX as u32)
        .map(|t| 100 + t)
        .chain(
            (0..(PROMPT - PREFIX) as u32)
                .map(|t| 1000 + n.wrapping_mul(37).wrapping_add(t) % 30_000),
        )
        .collect()
}

fn prompt_text() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "You are a careful assistant for a logistics company. Answer briefly and cite the \
         manifest line you used. Never invent customs codes or weights that are not in the \
         manifest. Ticket {n:06}: shipment {n:06} from Rotterdam to Lyon was held at the \
         border on day {:02}; the declared weight was {:04} kg and the pallet count {:03}. \
         What should the customer do next?",
        n % 31,
        n % 9973,
        n % 997
    )
}

fn request() -> SimRequest {
    SimRequest {
        prompt_tokens: prompt_ids(),
        max_tokens: MAX_TOKENS,
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn bench_engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(ENGINE_REQUESTS as u64));

    // The core alone, one long-lived engine (its prefix cache stays warm).
    let mut core = EngineCore::new(engine_config());
    g.bench_function("core", |b| {
        b.iter(|| {
            for i in 0..ENGINE_REQUESTS {
                core.add_request(request(), i as u64).unwrap();
            }
            let mut done = 0;
            while let Some(step) = core.step() {
                done += step.outputs.iter().filter(|o| o.finished).count();
            }
            assert_eq!(done, ENGINE_REQUESTS);
        })
    });

    // The engine task: commands in, token events out, on one thread.
    let rt = runtime();
    let engine = rt.block_on(async { EngineHandle::spawn(engine_config(), None) });
    g.bench_function("handle", |b| {
        b.iter(|| {
            rt.block_on(async {
                let requests = (0..ENGINE_REQUESTS).map(|_| async {
                    let mut rx = engine.submit(request()).await.unwrap();
                    let mut done = false;
                    while let Some(ev) = rx.recv().await {
                        done |= matches!(ev, TokenEvent::Done { .. });
                    }
                    assert!(done);
                });
                futures_util::future::join_all(requests).await;
            })
        })
    });
    // As the HTTP benches load it: 64 requests in flight, a new one as soon
    // as one finishes.
    g.bench_function("handle_64_in_flight", |b| {
        b.iter(|| {
            rt.block_on(async {
                futures_util::stream::iter(0..ENGINE_REQUESTS)
                    .map(|_| async {
                        let mut rx = engine.submit(request()).await.unwrap();
                        let mut done = false;
                        while let Some(ev) = rx.recv().await {
                            done |= matches!(ev, TokenEvent::Done { .. });
                        }
                        assert!(done);
                    })
                    .buffer_unordered(HTTP_CONCURRENCY)
                    .for_each(|_| async {})
                    .await
            })
        })
    });
    g.finish();
}

/// `HTTP_REQUESTS` completions, `HTTP_CONCURRENCY` at a time.
async fn http_load(client: &reqwest::Client, url: &str, text: bool) {
    futures_util::stream::iter(0..HTTP_REQUESTS)
        .map(|_| {
            let prompt = if text {
                json!(prompt_text())
            } else {
                json!(prompt_ids())
            };
            let body = json!({"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS});
            let req = client.post(url).json(&body).send();
            async move {
                let r = req.await.unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                r.bytes().await.unwrap().len()
            }
        })
        .buffer_unordered(HTTP_CONCURRENCY)
        .for_each(|_| async {})
        .await
}

fn sim_config() -> SimConfig {
    SimConfig {
        listen: "127.0.0.1:0".into(),
        engine: engine_config(),
        ..SimConfig::default()
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(HTTP_CONCURRENCY)
        .build()
        .unwrap()
}

/// The sim's `/tokenize` count for one text prompt.
async fn text_prompt_tokens(client: &reqwest::Client, base: &str) -> u64 {
    let v: serde_json::Value = client
        .post(format!("{base}/tokenize"))
        .json(&json!({"prompt": prompt_text()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["count"].as_u64().unwrap()
}

/// Sim and client on one current-thread runtime: the whole exchange, both
/// ends of it, on one core.
fn bench_http_one_core(c: &mut Criterion) {
    let rt = runtime();
    let sim = rt.block_on(RunningSim::start(sim_config())).unwrap();
    let url = format!("{}/v1/completions", sim.url());
    let client = http_client();
    let n = rt.block_on(text_prompt_tokens(&client, &sim.url()));
    assert!((80..=130).contains(&n), "text prompt of {n} tokens");

    let mut g = c.benchmark_group("http_one_core");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(HTTP_REQUESTS as u64));
    g.bench_function("completions_text", |b| {
        b.iter(|| rt.block_on(http_load(&client, &url, true)))
    });
    g.bench_function("completions_ids", |b| {
        b.iter(|| rt.block_on(http_load(&client, &url, false)))
    });
    g.finish();
}

/// The sim alone on a current-thread runtime in its own thread; the client
/// on another: requests/s per sim core (with 2+ cores).
fn bench_http_sim_thread(c: &mut Criterion) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sim_thread = std::thread::spawn(move || {
        runtime().block_on(async move {
            let sim = RunningSim::start(sim_config()).await.unwrap();
            addr_tx.send(sim.url()).unwrap();
            let _ = stop_rx.await;
        })
    });
    let base = addr_rx.recv().unwrap();
    let url = format!("{base}/v1/completions");
    let rt = runtime();
    let client = http_client();

    let mut g = c.benchmark_group("http_sim_thread");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(HTTP_REQUESTS as u64));
    g.bench_function("completions_text", |b| {
        b.iter(|| rt.block_on(http_load(&client, &url, true)))
    });
    g.bench_function("completions_ids", |b| {
        b.iter(|| rt.block_on(http_load(&client, &url, false)))
    });
    g.finish();
    let _ = stop_tx.send(());
    sim_thread.join().unwrap();
}

criterion_group!(
    benches,
    bench_engine,
    bench_http_one_core,
    bench_http_sim_thread
);
criterion_main!(benches);
