//! The regime sweep: kvgate's precise_prefix against models of the peer
//! routers (`fleet_model::PeerPolicy`) on the same simulated fleets, over
//! fleet sizes, KV pressure, prompt and output lengths, loads from half the
//! knee to twice it, signal staleness (time scale), bursty arrivals and
//! growing conversations. Deterministic: the same build gives the same table.
//!
//! The goals, per regime and stage: kvgate's TTFT p90 and p50 within 5% of
//! the best peer's (3% for p90 on no-reuse), its fleet hit rate no more than 2
//! points below the best peer's, and where the working set exceeds the
//! fleet's KV, at least 2x better TTFT p90 than the best peer at the knee.

mod regimes;
mod report;

use serde::Serialize;

pub use regimes::{regimes, Arrivals, Regime, Shape, BASE_SHARED};

use crate::fleet_model::{
    simulate, CacheAwareConfig, FleetModelConfig, FleetModelError, ModelRun, ModelWorkload,
    PeerPolicy,
};
use kvgate_router::RouterConfig;

/// Loads of each regime, as multiples of its knee.
pub const STAGES: [f64; 4] = [0.5, 1.0, 1.5, 2.0];
/// TTFT (p50 and p90) may be this much above the best peer's.
pub const GOAL_TTFT_VS_BEST_PEER: f64 = 1.05;
/// On no-reuse, TTFT p90 may be this much above the best peer's.
pub const GOAL_NO_REUSE_P90_VS_BEST_PEER: f64 = 1.03;
/// Fleet hit rate may be this much (absolute) below the best peer's.
pub const GOAL_HIT_RATE_BELOW_BEST_PEER: f64 = 0.02;
/// Where the working set exceeds the fleet's KV: TTFT p90 at the knee at
/// most this fraction of the best peer's.
pub const GOAL_OVER_CAPACITY_P90_VS_BEST_PEER: f64 = 0.5;
/// Where the knee sits on the fleet's estimated capacity
/// ([`knee_qps`]): the utilisation at which queueing starts to double TTFT.
pub const KNEE_UTILISATION: f64 = 0.75;
/// Sequences sharing a decode step, for the knee estimate.
pub const DECODE_BATCH: f64 = 16.0;

/// Who places requests in a run.
#[derive(Debug, Clone, Serialize)]
pub enum Contender {
    Kvgate(#[serde(skip)] RouterConfig),
    Peer(PeerPolicy),
}

impl Contender {
    pub fn name(&self) -> String {
        match self {
            Contender::Kvgate(r) => format!("kvgate {}", r.policy),
            Contender::Peer(p) => p.name().to_string(),
        }
    }

    /// kvgate's default router, and the peers' policies with their defaults.
    pub fn standard() -> Vec<Contender> {
        vec![
            Contender::Kvgate(RouterConfig::default()),
            Contender::Peer(PeerPolicy::CacheAware(CacheAwareConfig::default())),
            Contender::Peer(PeerPolicy::PowerOfTwo),
            Contender::Peer(PeerPolicy::RoundRobin),
        ]
    }
}

/// How big each run is.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SweepOptions {
    /// Simulated seconds of arrivals per stage...
    pub stage_secs: f64,
    /// ...but no more requests than this.
    pub max_requests: usize,
    /// The first requests of each run (this fraction) warm the caches and
    /// are not measured.
    pub warmup_fraction: f64,
    /// Seeds `seed`, `seed + 1`, ...: each cell pools the measured requests
    /// of this many workloads, so one draw's luck does not decide a goal.
    pub seeds: u64,
    pub seed: u64,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            stage_secs: 20.0,
            max_requests: 2000,
            warmup_fraction: 0.25,
            seeds: 3,
            seed: 1,
        }
    }
}

/// One contender's numbers in one stage (measured requests only).
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub contender: String,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub hit_rate: f64,
    pub finished: usize,
    /// The placements' reasons (the `x-kvgate-decision` reason for kvgate),
    /// with their counts.
    pub reasons: std::collections::BTreeMap<String, usize>,
}

/// One regime at one load.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub regime: String,
    /// Multiple of the knee.
    pub load: f64,
    pub qps: f64,
    pub requests: usize,
    /// A single LRU cache as big as the fleet's KV, on the same requests.
    pub oracle_hit_rate: f64,
    pub rows: Vec<Measured>,
}

impl Cell {
    pub fn row(&self, contender: &str) -> Option<&Measured> {
        self.rows.iter().find(|r| r.contender == contender)
    }

    /// kvgate's TTFT p50 and p90 over the best peer's, and its hit rate
    /// minus the best peer's.
    pub fn versus_best_peer(&self) -> Option<(f64, f64, f64)> {
        let k = self
            .rows
            .iter()
            .find(|r| r.contender.starts_with("kvgate"))?;
        let p50 = self.best_peer(|m| m.ttft_p50_ms, false)?.ttft_p50_ms;
        let p90 = self.best_peer(|m| m.ttft_p90_ms, false)?.ttft_p90_ms;
        let hit = self.best_peer(|m| m.hit_rate, true)?.hit_rate;
        Some((
            k.ttft_p50_ms / p50.max(1e-9),
            k.ttft_p90_ms / p90.max(1e-9),
            k.hit_rate - hit,
        ))
    }

    /// The best peer row by `key` (lowest, or highest with `max`).
    fn best_peer(&self, key: impl Fn(&Measured) -> f64, max: bool) -> Option<&Measured> {
        self.rows
            .iter()
            .filter(|r| !r.contender.starts_with("kvgate"))
            .min_by(|a, b| {
                let (a, b) = (key(a), key(b));
                if max {
                    b.total_cmp(&a)
                } else {
                    a.total_cmp(&b)
                }
            })
    }
}

/// Rate at which the fleet's engines are busy `KNEE_UTILISATION` of the time
/// with these requests, at the hit rate of one fleet-sized LRU cache:
/// prefill of the uncached tokens (with the per-step prefill overhead spread
/// over a full token budget, as batches are under load) plus decode.
pub fn knee_qps(regime: &Regime, w: &ModelWorkload) -> f64 {
    let e = regime.engine();
    let lat = e.latency;
    let hit = oracle(regime, w);
    let (prompt, output) = Regime::mean_lengths(w);
    let per_token_us =
        lat.prefill_us_per_token + lat.prefill_overhead_ms * 1e3 / e.max_num_batched_tokens as f64;
    // Decode steps carry their fixed cost over a batch of DECODE_BATCH.
    let per_output_us = lat.decode_us_per_seq + lat.step_overhead_ms * 1e3 / DECODE_BATCH;
    let secs = (prompt * (1.0 - hit) * per_token_us + output * per_output_us) / 1e6;
    KNEE_UTILISATION * regime.engines as f64 / secs.max(1e-6)
}

fn oracle(regime: &Regime, w: &ModelWorkload) -> f64 {
    regime
        .fleet_oracle()
        .hit_rate(w.requests.iter().map(|r| &r.tokens))
}

/// Runs one contender on one workload.
pub fn run(
    regime: &Regime,
    contender: &Contender,
    w: &ModelWorkload,
) -> Result<ModelRun, FleetModelError> {
    let mut cfg = FleetModelConfig {
        engines: regime.engines,
        engine: regime.engine(),
        time_scale: regime.time_scale,
        ..FleetModelConfig::default()
    };
    match contender {
        Contender::Kvgate(r) => cfg.router = r.clone(),
        Contender::Peer(p) => cfg.peer = Some(*p),
    }
    simulate(&cfg, w)
}

/// A contender's measured requests, pooled over seeds.
fn measure(name: String, measured: &ModelRun) -> Measured {
    Measured {
        contender: name,
        ttft_p50_ms: measured.ttft_p50() * 1e3,
        ttft_p90_ms: measured.ttft_p90() * 1e3,
        hit_rate: measured.hit_rate(),
        finished: measured.finished(),
        reasons: measured
            .requests
            .iter()
            .fold(Default::default(), |mut m, r| {
                *m.entry(r.reason.to_string()).or_default() += 1;
                m
            }),
    }
}

/// The stage's rate, from the knee (estimated on a calibration draw of the
/// same regime).
pub fn stage_qps(regime: &Regime, load: f64, opts: &SweepOptions) -> f64 {
    let calibration = regime.workload(1.0, opts.max_requests.min(1000), opts.seed);
    load * knee_qps(regime, &calibration)
}

/// The stage's workload for one seed.
pub fn stage_workload(regime: &Regime, qps: f64, opts: &SweepOptions, seed: u64) -> ModelWorkload {
    let n = ((qps * opts.stage_secs) as usize).clamp(50, opts.max_requests.max(50));
    regime.workload(qps, n, seed)
}

/// One regime at one load, every contender, pooled over the seeds.
pub fn cell(
    regime: &Regime,
    load: f64,
    contenders: &[Contender],
    opts: &SweepOptions,
) -> Result<Cell, FleetModelError> {
    let qps = stage_qps(regime, load, opts);
    let mut pooled = vec![ModelRun::default(); contenders.len()];
    let (mut requests, mut oracle_hits, mut oracle_tokens) = (0, 0.0, 0.0);
    for seed in opts.seed..opts.seed + opts.seeds.max(1) {
        let w = stage_workload(regime, qps, opts, seed);
        let from = (w.requests.len() as f64 * opts.warmup_fraction) as usize;
        for (c, pool) in contenders.iter().zip(&mut pooled) {
            let run = run(regime, c, &w)?;
            pool.requests
                .extend(run.requests.get(from..).unwrap_or_default().iter().cloned());
        }
        let mut oracle = regime.fleet_oracle();
        oracle.hit_rate(w.requests[..from].iter().map(|r| &r.tokens));
        let tail = &w.requests[from..];
        let tokens: usize = tail.iter().map(|r| r.tokens.len()).sum();
        oracle_hits += oracle.hit_rate(tail.iter().map(|r| &r.tokens)) * tokens as f64;
        oracle_tokens += tokens as f64;
        requests += w.requests.len();
    }
    Ok(Cell {
        regime: regime.name.to_string(),
        load,
        qps,
        requests,
        oracle_hit_rate: oracle_hits / oracle_tokens.max(1.0),
        rows: contenders
            .iter()
            .zip(&pooled)
            .map(|(c, p)| measure(c.name(), p))
            .collect(),
    })
}

/// Every regime at every stage, in parallel over the machine's cores.
pub fn sweep(
    regimes: &[Regime],
    stages: &[f64],
    contenders: &[Contender],
    opts: &SweepOptions,
) -> Result<Vec<Cell>, FleetModelError> {
    let jobs: Vec<(usize, f64)> = (0..regimes.len())
        .flat_map(|r| stages.iter().map(move |s| (r, *s)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = parking_lot::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.min(jobs.len()).max(1) {
            s.spawn(|| loop {
                let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(r, load)) = jobs.get(j) else { break };
                let out = cell(&regimes[r], load, contenders, opts);
                results.lock().push((j, out));
            });
        }
    });
    let mut results = results.into_inner();
    results.sort_by_key(|(j, _)| *j);
    results.into_iter().map(|(_, c)| c).collect()
}

/// One goal of the sweep's report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SweepGoal {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// The goals of every cell (see the module docs).
pub fn goals(regimes: &[Regime], cells: &[Cell], kvgate: &str) -> Vec<SweepGoal> {
    let mut out = Vec::new();
    for c in cells {
        let Some(k) = c.row(kvgate) else { continue };
        let regime = regimes.iter().find(|r| r.name == c.regime);
        let no_reuse = regime.is_some_and(|r| matches!(r.shape, Shape::NoReuse { .. }));
        let at = format!("{} at {}x knee ({:.0} QPS)", c.regime, c.load, c.qps);
        // A TTFT quantile's goal: kvgate's within `target` of the best peer's.
        let ttft = |what: &str, q: fn(&Measured) -> f64, target: f64| {
            c.best_peer(q, false).map(|p| {
                let r = q(k) / q(p).max(1e-9);
                let goal = SweepGoal {
                    name: format!("{at}: TTFT {what} vs the best peer"),
                    target: format!("<= {target:.2}x"),
                    measured: format!("{:.0} ms vs {} {:.0} ms: {r:.3}x", q(k), p.contender, q(p)),
                    met: r <= target,
                };
                (goal, r)
            })
        };
        let p90_target = if no_reuse {
            GOAL_NO_REUSE_P90_VS_BEST_PEER
        } else {
            GOAL_TTFT_VS_BEST_PEER
        };
        if let Some((goal, r)) = ttft("p90", |m| m.ttft_p90_ms, p90_target) {
            out.push(goal);
            let over = regime.is_some_and(|r| r.kv_pressure > 1.0 && !no_reuse);
            if over && c.load == 1.0 {
                out.push(SweepGoal {
                    name: format!(
                        "{at}: TTFT p90 vs the best peer, working set over the fleet's KV"
                    ),
                    target: format!("<= {GOAL_OVER_CAPACITY_P90_VS_BEST_PEER:.2}x"),
                    measured: format!("{r:.3}x"),
                    met: r <= GOAL_OVER_CAPACITY_P90_VS_BEST_PEER,
                });
            }
        }
        if let Some((goal, _)) = ttft("p50", |m| m.ttft_p50_ms, GOAL_TTFT_VS_BEST_PEER) {
            out.push(goal);
        }
        if let Some(p) = c.best_peer(|m| m.hit_rate, true) {
            if !no_reuse {
                out.push(SweepGoal {
                    name: format!("{at}: fleet hit rate vs the best peer"),
                    target: format!(
                        ">= best - {:.0} points",
                        GOAL_HIT_RATE_BELOW_BEST_PEER * 100.0
                    ),
                    measured: format!(
                        "{:.1}% vs {} {:.1}%",
                        k.hit_rate * 100.0,
                        p.contender,
                        p.hit_rate * 100.0
                    ),
                    met: k.hit_rate >= p.hit_rate - GOAL_HIT_RATE_BELOW_BEST_PEER,
                });
            }
        }
    }
    out
}

pub use report::{markdown, SweepReport};

#[cfg(test)]
mod tests;
