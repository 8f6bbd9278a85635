//! The overhead runs: every router, and direct, in front of fixed-latency
//! fake backends, plain and streamed.

use std::time::Duration;

use anyhow::Result;
use kvgate_bench::compare::{OverheadRow, DIRECT};
use kvgate_bench::fake_backend::{self, FakeBackendConfig};
use kvgate_bench::overhead::{measure, OverheadOptions};
use kvgate_bench::peers::{RouterKind, RouterSpec};
use kvgate_bench::workload;
use kvgate_gateway::EndpointConfig;
use rand::SeedableRng;

use super::busy::BusyWatch;
use super::routers::start_router;
use super::{progress, CompareArgs, BLOCK_SIZE, FAKE_BACKENDS, FAKE_MODEL, MAX_REDOS, SETTLE};

fn filler_prompt(words: usize, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    workload::filler(&mut rng, words)
}

pub(super) async fn overhead_runs(
    args: &CompareArgs,
    specs: &[RouterSpec],
    scratch: &std::path::Path,
    watch: &BusyWatch,
) -> Result<Vec<OverheadRow>> {
    let cfg = FakeBackendConfig {
        model: FAKE_MODEL.into(),
        delay: Duration::from_millis(args.overhead_delay_ms),
        ..FakeBackendConfig::default()
    };
    let mut backends = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..FAKE_BACKENDS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        backends.push(format!("http://{}", listener.local_addr()?));
        tasks.push(tokio::spawn(fake_backend::serve(listener, cfg.clone())));
    }
    let endpoints: Vec<EndpointConfig> = backends
        .iter()
        .map(|url| EndpointConfig::new(url.clone(), FAKE_MODEL, BLOCK_SIZE as u32))
        .collect();
    // A fresh pool per target, sized for the load.
    let client = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(args.overhead_concurrency * 2)
            .build()
    };
    let mut opts = OverheadOptions {
        model: FAKE_MODEL.into(),
        prompt: filler_prompt(args.overhead_prompt_words, args.seed ^ 0x0e),
        max_tokens: cfg.stream_chunks,
        stream: false,
        concurrency: args.overhead_concurrency,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs_f64(args.overhead_seconds),
        timeout: Duration::from_secs(30),
    };
    let mut rows = Vec::new();
    let long_prompt = opts.prompt.clone();
    let short_prompt = filler_prompt(args.overhead_short_prompt_words, args.seed ^ 0x0f);
    let short_mode = format!("plain, {}-word prompt", args.overhead_short_prompt_words);
    // (mode, streamed, short prompt); the short one only for kvgate and direct.
    let mut modes = vec![
        ("plain".to_string(), false, false),
        ("stream".into(), true, false),
    ];
    if args.overhead_short_prompt_words > 0 {
        modes.push((short_mode, false, true));
    }
    let set = |opts: &mut OverheadOptions, stream: bool, short: bool| {
        opts.stream = stream;
        opts.prompt = if short {
            short_prompt.clone()
        } else {
            long_prompt.clone()
        };
    };
    for attempt in 0..=MAX_REDOS {
        watch.wait_quiet().await;
        let mut direct = Vec::new();
        for (mode, stream, short) in &modes {
            set(&mut opts, *stream, *short);
            progress(&format!("overhead: direct ({mode})"));
            let sample = measure(&client()?, &backends[0], &opts).await;
            direct.push(OverheadRow {
                router: DIRECT.into(),
                mode: mode.clone(),
                sample,
            });
        }
        if !watch.disturbed() || attempt == MAX_REDOS {
            rows.extend(direct);
            break;
        }
    }
    for spec in specs {
        for attempt in 0..=MAX_REDOS {
            watch.wait_quiet().await;
            let mut measured = Vec::new();
            let c = client()?;
            let p = match start_router(
                args,
                spec,
                &backends,
                endpoints.clone(),
                FAKE_MODEL,
                scratch,
                &c,
            )
            .await
            {
                Ok(p) => p,
                Err(e) => {
                    progress(&format!("overhead: {} skipped: {e:#}", spec.name()));
                    break;
                }
            };
            for (mode, stream, short) in &modes {
                if *short && spec.kind != RouterKind::Kvgate {
                    continue;
                }
                set(&mut opts, *stream, *short);
                progress(&format!("overhead: {} ({mode})", spec.name()));
                let sample = measure(&c, &p.url, &opts).await;
                measured.push(OverheadRow {
                    router: spec.name(),
                    mode: mode.clone(),
                    sample,
                });
            }
            drop(p);
            tokio::time::sleep(SETTLE).await;
            if !watch.disturbed() || attempt == MAX_REDOS {
                rows.extend(measured);
                break;
            }
            progress(&format!(
                "overhead: {}: the machine got busy; running it again",
                spec.name()
            ));
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(rows)
}
