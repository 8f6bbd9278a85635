//! `kvgate demo`: a simulated vLLM fleet behind the gateway, on an embedded
//! default (no arguments, no GPU, no Python).
//!
//! For each workload (shared prefixes, and a no-reuse control) and each policy
//! (round_robin, least_load, approx_prefix, precise_prefix), a fresh fleet of
//! simulated engines starts behind a fresh gateway, the same requests arrive
//! at the same times, and the table compares what clients saw (TTFT, output
//! throughput) with the fleet's prefix-cache hit rate against the oracle's
//! (one infinite cache holding every earlier prompt).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvgate_bench::report::scrape_fleet;
use kvgate_bench::workload::{self, arrivals, Arrival, Body, RequestSpec};
use kvgate_bench::{run_stage, summarize, StageOptions};
use kvgate_gateway::{EndpointConfig, Gateway, GatewayConfig, StaticDiscovery};
use kvgate_router::Policy;
use kvgate_sim::engine::EngineConfig;
use kvgate_sim::fleet::{start_fleet, SimConfig, DEFAULT_MODEL};
use kvgate_tokenize::ModelTokenizer;
use rand::SeedableRng;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Simulated engines in the fleet.
    #[arg(long, default_value_t = 4)]
    engines: usize,
    /// Simulated seconds per wall-clock second.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Shared-prefix groups (distinct system prompts).
    #[arg(long, default_value_t = 16)]
    groups: usize,
    /// Requests per group.
    #[arg(long, default_value_t = 24)]
    prompts_per_group: usize,
    /// Tokens per shared prefix (about; filler words).
    #[arg(long, default_value_t = 2048)]
    prefix_tokens: usize,
    /// Unique tokens after the prefix.
    #[arg(long, default_value_t = 128)]
    unique_tokens: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    output_tokens: u32,
    /// Arrival rate, requests per simulated second (Poisson).
    #[arg(long, default_value_t = 80.0)]
    rate: f64,
    /// KV blocks per engine (block size 16).
    #[arg(long, default_value_t = 1000)]
    num_blocks: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct DemoReport {
    engines: usize,
    time_scale: f64,
    rate_per_s: f64,
    workloads: Vec<WorkloadReport>,
    checks: Vec<Check>,
}

#[derive(Serialize)]
struct WorkloadReport {
    name: &'static str,
    policies: Vec<PolicyReport>,
}

#[derive(Serialize, Clone)]
struct PolicyReport {
    name: &'static str,
    requests: usize,
    errors: usize,
    hit_rate: f64,
    oracle_hit_rate: f64,
    ttft_p50_ms: f64,
    ttft_p90_ms: f64,
    output_tok_s: f64,
}

#[derive(Serialize)]
struct Check {
    what: String,
    ok: bool,
}

const POLICIES: [Policy; 4] = [
    Policy::RoundRobin,
    Policy::LeastLoad,
    Policy::ApproxPrefix,
    Policy::PrecisePrefix,
];
const BLOCK_SIZE: usize = 16;

/// The oracle's hit rate for a workload, tokenized as the engines tokenize it.
pub(crate) fn oracle_hit_rate(
    tok: &ModelTokenizer,
    specs: &[RequestSpec],
    block_size: usize,
) -> Result<f64> {
    Ok(workload::oracle_hit_rate(
        &completion_prompts(tok, specs)?,
        block_size,
    ))
}

/// The completion prompts of `specs` as token ids (chat requests are skipped).
pub(crate) fn completion_prompts(
    tok: &ModelTokenizer,
    specs: &[RequestSpec],
) -> Result<Vec<Vec<u32>>> {
    Ok(specs
        .iter()
        .filter_map(|s| match &s.body {
            Body::Completion(p) => Some(tok.completion_tokens(p)),
            Body::Chat(_) => None,
        })
        .collect::<Result<Vec<_>, _>>()?)
}

fn progress(msg: &str) {
    eprintln!("[demo] {msg}");
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let scale = args.time_scale.max(0.01);
    let tokenizer = Arc::new(ModelTokenizer::embedded_default()?);
    let n = args.groups * args.prompts_per_group;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Arrival offsets in wall seconds: the fleet runs `scale` times faster
    // than real time, so requests arrive `scale` times faster too.
    let wall_rate = args.rate * scale;
    let times = arrivals(n, wall_rate, Arrival::Poisson, &mut rng);
    let with_times = |mut specs: Vec<RequestSpec>| {
        for (s, t) in specs.iter_mut().zip(&times) {
            s.at = Some(*t);
        }
        specs
    };
    let workloads: Vec<(&'static str, Vec<RequestSpec>)> = vec![
        (
            "shared-prefix",
            with_times(workload::shared_prefix(
                args.groups,
                args.prompts_per_group,
                args.prefix_tokens,
                args.unique_tokens,
                args.output_tokens,
                11,
            )),
        ),
        (
            "no-reuse",
            with_times(workload::no_reuse(
                n,
                args.prefix_tokens + args.unique_tokens,
                args.output_tokens,
                13,
            )),
        ),
    ];
    progress(&format!(
        "{} simulated engines x {} KV blocks of {BLOCK_SIZE} tokens, time scale {scale}x; {n} requests per run at {} req/s (simulated), Poisson",
        args.engines, args.num_blocks, args.rate
    ));
    let mut report = DemoReport {
        engines: args.engines,
        time_scale: scale,
        rate_per_s: args.rate,
        workloads: Vec::new(),
        checks: Vec::new(),
    };
    for (name, specs) in &workloads {
        let oracle = oracle_hit_rate(&tokenizer, specs, BLOCK_SIZE)?;
        let mut policies = Vec::new();
        for policy in POLICIES {
            progress(&format!("{name} / {}", policy.name()));
            let r = run_one(&args, scale, tokenizer.clone(), policy, name, specs, oracle)
                .await
                .with_context(|| format!("{name} / {}", policy.name()))?;
            policies.push(r);
        }
        report.workloads.push(WorkloadReport { name, policies });
    }
    report.checks = checks(&report);
    print_report(&report, started.elapsed());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        progress(&format!("wrote {}", path.display()));
    }
    Ok(())
}

async fn run_one(
    args: &DemoArgs,
    scale: f64,
    tokenizer: Arc<ModelTokenizer>,
    policy: Policy,
    name: &str,
    specs: &[RequestSpec],
    oracle: f64,
) -> Result<PolicyReport> {
    let base = SimConfig {
        model: DEFAULT_MODEL.into(),
        engine: EngineConfig {
            block_size: BLOCK_SIZE,
            num_blocks: args.num_blocks,
            time_scale: scale,
            ..EngineConfig::default()
        },
        ..SimConfig::default()
    };
    let fleet = start_fleet(args.engines, &base, tokenizer).await?;
    let endpoints: Vec<EndpointConfig> = fleet
        .iter()
        .map(|s| EndpointConfig {
            // The approximate policy is for fleets without events.
            events: (policy != Policy::ApproxPrefix)
                .then(|| s.events_endpoint())
                .flatten(),
            replay: (policy != Policy::ApproxPrefix)
                .then(|| s.replay_endpoint())
                .flatten(),
            ..EndpointConfig::new(s.url(), DEFAULT_MODEL, BLOCK_SIZE as u32)
        })
        .collect();
    let mut cfg = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        endpoints: endpoints.clone(),
        metrics_interval_ms: 200,
        ..GatewayConfig::default()
    };
    cfg.router.policy = policy;
    let gw = Gateway::start(cfg, Arc::new(StaticDiscovery::new(endpoints)?)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw_url = format!("http://{}", listener.local_addr()?);
    let router = gw.router();
    let server = tokio::spawn(async move {
        axum::serve(kvgate_openai::streaming_listener(listener), router).await
    });
    // Let the subscribers connect before the first request.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()?;
    let engines: Vec<String> = fleet.iter().map(|s| s.url()).collect();
    let before = scrape_fleet(&client, &engines).await;
    let opts = StageOptions {
        name: format!("{name}/{}", policy.name()),
        concurrency: None,
        timeout: Duration::from_secs(120),
        progress: true,
    };
    let (outcomes, duration) = run_stage(&client, &gw_url, DEFAULT_MODEL, specs, &opts).await;
    let after = scrape_fleet(&client, &engines).await;
    server.abort();
    drop(gw);
    drop(fleet);
    let s = summarize(name, &outcomes, duration);
    if let Some(e) = &s.first_error {
        progress(&format!("  first error: {e}"));
    }
    // Client timings are wall-clock; the fleet ran `scale` times faster, so
    // report simulated time (the gateway's own overhead is scaled up too).
    Ok(PolicyReport {
        name: policy.name(),
        requests: s.requests,
        errors: s.errors,
        hit_rate: after.rate_since(before).unwrap_or(0.0),
        oracle_hit_rate: oracle,
        ttft_p50_ms: s.ttft_p50_ms * scale,
        ttft_p90_ms: s.ttft_p90_ms * scale,
        output_tok_s: s.output_tok_s / scale,
    })
}

fn find<'a>(r: &'a DemoReport, workload: &str, policy: Policy) -> Option<&'a PolicyReport> {
    r.workloads
        .iter()
        .find(|w| w.name == workload)?
        .policies
        .iter()
        .find(|p| p.name == policy.name())
}

/// What the demo is meant to show (issue targets), checked on this run.
fn checks(r: &DemoReport) -> Vec<Check> {
    let mut out = Vec::new();
    let errors: usize = r
        .workloads
        .iter()
        .flat_map(|w| &w.policies)
        .map(|p| p.errors)
        .sum();
    out.push(Check {
        what: format!("no failed requests ({errors})"),
        ok: errors == 0,
    });
    if let (Some(p), Some(rr)) = (
        find(r, "shared-prefix", Policy::PrecisePrefix),
        find(r, "shared-prefix", Policy::RoundRobin),
    ) {
        out.push(Check {
            what: format!(
                "shared-prefix: precise TTFT p90 {:.0} ms <= 1/5 of round_robin's {:.0} ms",
                p.ttft_p90_ms, rr.ttft_p90_ms
            ),
            ok: p.ttft_p90_ms * 5.0 <= rr.ttft_p90_ms,
        });
        out.push(Check {
            what: format!(
                "shared-prefix: precise hit rate {:.3} vs round_robin {:.3} (oracle {:.3}: one infinite cache)",
                p.hit_rate, rr.hit_rate, p.oracle_hit_rate
            ),
            ok: p.hit_rate > rr.hit_rate,
        });
    }
    if let (Some(p), Some(rr)) = (
        find(r, "no-reuse", Policy::PrecisePrefix),
        find(r, "no-reuse", Policy::RoundRobin),
    ) {
        out.push(Check {
            what: format!(
                "no-reuse: precise TTFT p90 {:.0} ms within 5% of round_robin's {:.0} ms (or better)",
                p.ttft_p90_ms, rr.ttft_p90_ms
            ),
            ok: p.ttft_p90_ms <= rr.ttft_p90_ms * 1.05,
        });
    }
    out
}

fn print_report(r: &DemoReport, took: Duration) {
    println!();
    println!(
        "kvgate demo: {} simulated vLLM engines behind the gateway, {} req/s (simulated time, {}x faster than real)",
        r.engines, r.rate_per_s, r.time_scale
    );
    for w in &r.workloads {
        println!();
        println!("{}", w.name);
        println!(
            "  {:<16} {:>8} {:>6} {:>9} {:>9} {:>12} {:>12} {:>12}",
            "policy",
            "requests",
            "errors",
            "hit rate",
            "oracle",
            "TTFT p50 ms",
            "TTFT p90 ms",
            "output tok/s"
        );
        for p in &w.policies {
            println!(
                "  {:<16} {:>8} {:>6} {:>9.3} {:>9.3} {:>12.0} {:>12.0} {:>12.0}",
                p.name,
                p.requests,
                p.errors,
                p.hit_rate,
                p.oracle_hit_rate,
                p.ttft_p50_ms,
                p.ttft_p90_ms,
                p.output_tok_s
            );
        }
    }
    println!();
    for c in &r.checks {
        println!("  [{}] {}", if c.ok { "ok" } else { "MISS" }, c.what);
    }
    println!();
    println!("took {:.1} s", took.as_secs_f64());
}
