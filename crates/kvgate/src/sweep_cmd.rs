//! `kvgate bench sweep`: the routing regime sweep in the fleet model
//! (`kvgate_bench::sweep`), written as `report.md` and `report.json`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kvgate_bench::sweep::{self, Contender, SweepOptions, SweepReport, STAGES};

#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// Directory for report.md and report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Only these regimes (comma-separated names; default: all).
    #[arg(long, value_delimiter = ',')]
    pub regimes: Vec<String>,
    /// Simulated seconds of arrivals per stage.
    #[arg(long, default_value_t = SweepOptions::default().stage_secs)]
    pub stage_secs: f64,
    /// At most this many requests per stage.
    #[arg(long, default_value_t = SweepOptions::default().max_requests)]
    pub max_requests: usize,
    /// The first workload seed.
    #[arg(long, default_value_t = SweepOptions::default().seed)]
    pub seed: u64,
    /// Workloads per cell (seeds from --seed), pooled.
    #[arg(long, default_value_t = SweepOptions::default().seeds)]
    pub seeds: u64,
}

pub fn run(args: SweepArgs) -> Result<()> {
    let all = sweep::regimes();
    let regimes: Vec<_> = if args.regimes.is_empty() {
        all
    } else {
        for name in &args.regimes {
            if !all.iter().any(|r| r.name == name) {
                let known: Vec<&str> = all.iter().map(|r| r.name).collect();
                bail!("unknown regime {name:?} (known: {})", known.join(", "));
            }
        }
        all.into_iter()
            .filter(|r| args.regimes.iter().any(|n| n == r.name))
            .collect()
    };
    if !(args.stage_secs > 0.0 && args.stage_secs.is_finite())
        || args.max_requests == 0
        || args.seeds == 0
    {
        bail!("--stage-secs, --max-requests and --seeds must be positive");
    }
    let options = SweepOptions {
        stage_secs: args.stage_secs,
        max_requests: args.max_requests,
        seed: args.seed,
        seeds: args.seeds,
        ..SweepOptions::default()
    };
    let contenders = Contender::standard();
    let kvgate = contenders[0].name();
    let started = std::time::Instant::now();
    let cells = sweep::sweep(&regimes, &STAGES, &contenders, &options)?;
    let goals = sweep::goals(&regimes, &cells, &kvgate);
    let mut command = format!("kvgate bench sweep --out {}", args.out.display());
    if !args.regimes.is_empty() {
        command += &format!(" --regimes {}", args.regimes.join(","));
    }
    let report = SweepReport {
        command,
        options,
        regimes,
        cells,
        goals,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("report.md"), sweep::markdown(&report))?;
    let met = report.goals.iter().filter(|g| g.met).count();
    println!(
        "sweep: {} cells, goals met {met}/{} ({:.0?}); wrote {}",
        report.cells.len(),
        report.goals.len(),
        started.elapsed(),
        args.out.display()
    );
    Ok(())
}
