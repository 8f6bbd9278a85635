//! `kvgate bench`: one workload through one target, as a rate ladder, with a report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kvgate_bench::report::{scrape_fleet, Report, RunReport, StageReport};
use kvgate_bench::workload::{self, arrivals, Arrival, MultiRoundQa, RequestSpec, LLMD_73};
use kvgate_bench::{run_stage, summarize, StageOptions};
use rand::SeedableRng;

/// `kvgate bench [ARGS]` runs one workload; `kvgate bench compare` runs the
/// router comparison.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCli {
    #[command(subcommand)]
    pub cmd: Option<BenchCommand>,
    #[command(flatten)]
    pub run: Option<BenchArgs>,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// kvgate and the peer routers in front of the same simulated fleet, and
    /// their overhead over fixed-latency backends; one report.
    Compare(Box<crate::compare_cmd::CompareArgs>),
    /// The routing regime sweep in the fleet model: kvgate against models of
    /// the peers' policies over fleet sizes, KV pressure, lengths, loads,
    /// staleness, bursts and conversations (deterministic, minutes).
    Sweep(crate::sweep_cmd::SweepArgs),
    /// `lm://` PUT and GET MiB/s: kvgate store's memory and (encrypted)
    /// disk tiers, LMCache's server and the loopback limit, in one run.
    Store(crate::store_bench_cmd::StoreBenchArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Base URL of the router or engine under test.
    #[arg(long)]
    pub target: String,
    /// Model name to request.
    #[arg(long, default_value = "demo-model")]
    pub model: String,
    /// shared-prefix (LLMD-73 shape), sgl-gsp, prefix-repetition, mrqa (MRQA-S), no-reuse, trace.
    #[arg(long, default_value = "shared-prefix")]
    pub workload: String,
    /// Mooncake-format JSONL for `--workload trace`.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Scales prompt and output lengths (1.0 = the published shape).
    #[arg(long, default_value_t = 0.1)]
    pub scale: f64,
    /// Requests per stage.
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Rate ladder, requests/s (comma-separated). Empty: one closed-loop stage.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    #[arg(long, default_value = "poisson")]
    pub arrival: String,
    /// In-flight limit (closed loop when no rates are given).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests of a warm-up stage (not reported).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Engine base URLs whose /metrics give the fleet's prefix-cache hit rate.
    #[arg(long, value_delimiter = ',')]
    pub engines: Vec<String>,
    /// Name of the router in the report.
    #[arg(long, default_value = "target")]
    pub router_name: String,
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory for report.json and report.md.
    #[arg(long)]
    pub out: PathBuf,
}

pub(crate) fn scaled(n: usize, scale: f64) -> usize {
    ((n as f64 * scale).round() as usize).max(1)
}

/// The workload's requests for one stage (`seed` varies per stage).
pub fn build(args: &BenchArgs, n: usize, seed: u64) -> Result<Vec<RequestSpec>> {
    let s = args.scale;
    let out = |o: usize| scaled(o, s) as u32;
    let specs = match args.workload.as_str() {
        // LLMD-73: groups x 5 prompts, 6000 shared + 1200 unique, 1000 out.
        "shared-prefix" | "llmd-73" => workload::shared_prefix(
            n.div_ceil(LLMD_73.prompts_per_group),
            LLMD_73.prompts_per_group,
            scaled(LLMD_73.prefix_tokens, s),
            scaled(LLMD_73.unique_tokens, s),
            out(LLMD_73.output_tokens),
            seed,
        ),
        // SGL-GSP: groups x 16, 2048 shared + 128 unique, 256 out.
        "sgl-gsp" => workload::shared_prefix(
            n.div_ceil(16),
            16,
            scaled(2048, s),
            scaled(128, s),
            out(256),
            seed,
        ),
        "prefix-repetition" => {
            workload::prefix_repetition(n, 10, scaled(256, s), scaled(256, s), out(128), seed)
        }
        "no-reuse" => workload::no_reuse(
            n,
            scaled(LLMD_73.prefix_tokens + LLMD_73.unique_tokens, s),
            out(LLMD_73.output_tokens),
            seed,
        ),
        "mrqa" => workload::multi_round_qa(
            MultiRoundQa {
                users: n.div_ceil(5),
                rounds: 5,
                system_tokens: scaled(1000, s),
                history_tokens: scaled(2000, s),
                question_tokens: scaled(100, s),
                output: out(100),
                qps: args.rates.first().copied().unwrap_or(0.5),
            },
            seed,
        ),
        "trace" => {
            let path = args
                .trace
                .as_ref()
                .context("--workload trace needs --trace FILE")?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            workload::trace(&text, seed)?
        }
        other => bail!("unknown workload {other:?}"),
    };
    Ok(specs.into_iter().take(n).collect())
}

pub fn parse_arrival(s: &str) -> Result<Arrival> {
    match s {
        "poisson" => Ok(Arrival::Poisson),
        "constant" => Ok(Arrival::Constant),
        other => bail!("unknown arrival {other:?} (poisson, constant)"),
    }
}

/// Runs the ladder against the target and returns the router's results.
pub async fn run_ladder(
    args: &BenchArgs,
    client: &reqwest::Client,
    progress: bool,
) -> Result<RunReport> {
    let arrival = parse_arrival(&args.arrival)?;
    let opts = |name: String| StageOptions {
        name,
        concurrency: args.concurrency,
        timeout: Duration::from_secs(args.timeout_s),
        progress,
    };
    if args.warmup > 0 {
        let specs = build(args, args.warmup, args.seed ^ 0xabcd)?;
        run_stage(
            client,
            &args.target,
            &args.model,
            &specs,
            &opts(format!("{} warm-up", args.router_name)),
        )
        .await;
    }
    let mut stages = Vec::new();
    let ladder: Vec<Option<f64>> = if args.rates.is_empty() {
        vec![None]
    } else {
        args.rates.iter().copied().map(Some).collect()
    };
    for (i, rate) in ladder.into_iter().enumerate() {
        let mut specs = build(args, args.requests, args.seed.wrapping_add(i as u64 * 7919))?;
        if let Some(r) = rate {
            if args.workload != "mrqa" && args.workload != "trace" {
                let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ i as u64);
                for (spec, at) in
                    specs
                        .iter_mut()
                        .zip(arrivals(args.requests, r, arrival, &mut rng))
                {
                    spec.at = Some(at);
                }
            }
        }
        let before = scrape_fleet(client, &args.engines).await;
        let name = format!(
            "{} @ {}",
            args.router_name,
            rate.map_or("closed loop".to_string(), |r| format!("{r} QPS"))
        );
        let (outcomes, secs) = run_stage(
            client,
            &args.target,
            &args.model,
            &specs,
            &opts(name.clone()),
        )
        .await;
        let after = scrape_fleet(client, &args.engines).await;
        stages.push(StageReport {
            offered_rate: rate,
            summary: summarize(&name, &outcomes, secs),
            fleet_hit_rate: after.rate_since(before),
        });
    }
    Ok(RunReport {
        router: args.router_name.clone(),
        stages,
    })
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let run = run_ladder(&args, &client, true).await?;
    let report = Report {
        title: format!("kvgate bench: {}", args.workload),
        target: args.target.clone(),
        workload: args.workload.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        runs: vec![run],
    };
    write_report(&report, &args.out)?;
    print!("{}", report.markdown());
    Ok(())
}

pub fn write_report(report: &Report, out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    let plots = kvgate_bench::plot::report_plots(report, out)?;
    let mut md = report.markdown();
    for p in plots {
        md.push_str(&format!("\n![{p}]({p})\n"));
    }
    std::fs::write(out.join("report.md"), md)?;
    Ok(())
}
