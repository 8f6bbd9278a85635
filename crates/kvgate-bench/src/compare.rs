//! A side-by-side comparison of routers in front of one fleet: the shared-prefix
//! rate ladder, the no-reuse control and the overhead runs, checked against
//! the project's goals, with the places where a peer does better spelled out.

use serde::Serialize;

use crate::overhead::OverheadSample;
use crate::report::{Report, RunReport, StageReport};

/// The router whose goals are checked.
pub const REFERENCE: &str = "kvgate precise_prefix";
/// Its round-robin twin: same process, same proxy path, no cache awareness.
pub const REFERENCE_ROUND_ROBIN: &str = "kvgate round_robin";
/// The peer cache-aware policy the TTFT goal names.
pub const PEER_CACHE_AWARE: &str = "sglang-router cache_aware";
/// The name of the no-router runs in the overhead table.
pub const DIRECT: &str = "direct";

/// The knee: the highest offered load at which the reference router's TTFT
/// p50 is still within this factor of its value at the lowest load (queueing
/// shows in the median first; p90 of a warm fleet swings with how many cold
/// prompts a stage happens to draw).
pub const KNEE_TTFT_GROWTH: f64 = 2.0;
/// Goal: TTFT p90 at the knee at most this fraction of the peer cache-aware one.
pub const GOAL_TTFT_VS_PEER_CACHE_AWARE: f64 = 0.5;
/// Goal: TTFT p90 at the knee at most this fraction of round robin's.
pub const GOAL_TTFT_VS_ROUND_ROBIN: f64 = 1.0 / 20.0;
/// Goal: fleet hit rate at the knee at least this fraction of the oracle's.
pub const GOAL_HIT_RATE_VS_ORACLE: f64 = 0.95;
/// Goal: no-reuse TTFT p90 at most this much worse than round robin.
pub const GOAL_NO_REUSE_TOLERANCE: f64 = 0.05;
/// Goal: requests/s through the gateway at least this fraction of direct.
pub const GOAL_THROUGHPUT_VS_DIRECT: f64 = 0.8;
/// Differences smaller than this fraction are not reported as peer wins.
const WIN_MARGIN: f64 = 0.02;

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub title: String,
    pub command: String,
    /// (what, value) lines describing the fleet and workloads.
    pub setup: Vec<(String, String)>,
    pub shared_prefix: Report,
    /// Oracle hit rate per shared-prefix stage (same prompts for every router).
    pub oracle_hit_rate: Vec<f64>,
    pub no_reuse: Report,
    pub overhead: Vec<OverheadRow>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverheadRow {
    pub router: String,
    /// "plain" or "stream".
    pub mode: String,
    #[serde(flatten)]
    pub sample: OverheadSample,
}

#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// None: not measured in this run (a router or section was left out).
    pub met: Option<bool>,
}

fn run<'a>(r: &'a Report, name: &str) -> Option<&'a RunReport> {
    r.runs.iter().find(|x| x.router == name)
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

impl Comparison {
    /// Index of the knee stage in the shared-prefix ladder.
    pub fn knee(&self) -> Option<usize> {
        let stages = &run(&self.shared_prefix, REFERENCE)?.stages;
        let base = stages.first()?.summary.ttft_p50_ms;
        stages
            .iter()
            .take_while(|s| {
                s.summary.errors == 0 && s.summary.ttft_p50_ms <= base * KNEE_TTFT_GROWTH
            })
            .count()
            .checked_sub(1)
    }

    fn stage_at(&self, router: &str, i: usize) -> Option<&StageReport> {
        run(&self.shared_prefix, router)?.stages.get(i)
    }

    /// The round-robin run with the lowest TTFT p90 at stage `i` (the
    /// strictest baseline among equals).
    fn best_round_robin(&self, i: usize) -> Option<(&str, &StageReport)> {
        self.shared_prefix
            .runs
            .iter()
            .filter(|r| r.router.ends_with(" round_robin"))
            .filter_map(|r| r.stages.get(i).map(|s| (r.router.as_str(), s)))
            .min_by(|a, b| a.1.summary.ttft_p90_ms.total_cmp(&b.1.summary.ttft_p90_ms))
    }

    fn overhead(&self, router: &str, mode: &str) -> Option<&OverheadSample> {
        self.overhead
            .iter()
            .find(|r| r.router == router && r.mode == mode)
            .map(|r| &r.sample)
    }

    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        let knee = self.knee();
        let at = |router: &str| knee.and_then(|k| self.stage_at(router, k));
        let rate = knee
            .and_then(|k| self.stage_at(REFERENCE, k))
            .and_then(|s| s.offered_rate)
            .map_or("?".into(), |r| format!("{r}"));
        let reference = at(REFERENCE);
        let ttft_goal = |what: String, target: f64, other: Option<(&str, &StageReport)>| {
            let (measured, met) = match (reference, other) {
                (Some(p), Some((name, o))) => {
                    let r = ratio(p.summary.ttft_p90_ms, o.summary.ttft_p90_ms);
                    (
                        format!(
                            "{:.0} ms vs {name} {:.0} ms: {}",
                            p.summary.ttft_p90_ms,
                            o.summary.ttft_p90_ms,
                            r.map_or("-".into(), |r| format!("{r:.3}x"))
                        ),
                        r.map(|r| r <= target),
                    )
                }
                _ => ("not measured".into(), None),
            };
            Goal {
                what,
                target: format!("<= {target:.3}x"),
                measured,
                met,
            }
        };
        goals.push(ttft_goal(
            format!("shared-prefix TTFT p90 at the knee ({rate} QPS) vs {PEER_CACHE_AWARE}"),
            GOAL_TTFT_VS_PEER_CACHE_AWARE,
            at(PEER_CACHE_AWARE).map(|s| (PEER_CACHE_AWARE, s)),
        ));
        goals.push(ttft_goal(
            format!("shared-prefix TTFT p90 at the knee ({rate} QPS) vs the best round robin"),
            GOAL_TTFT_VS_ROUND_ROBIN,
            knee.and_then(|k| self.best_round_robin(k)),
        ));
        let oracle = knee.and_then(|k| self.oracle_hit_rate.get(k)).copied();
        let hit = reference.and_then(|s| s.fleet_hit_rate);
        goals.push(Goal {
            what: format!("fleet hit rate at the knee ({rate} QPS) vs the oracle"),
            target: format!(">= {GOAL_HIT_RATE_VS_ORACLE:.2}x"),
            measured: match (hit, oracle) {
                (Some(h), Some(o)) => format!(
                    "{:.1}% vs oracle {:.1}%: {}",
                    h * 100.0,
                    o * 100.0,
                    ratio(h, o).map_or("-".into(), |r| format!("{r:.3}x"))
                ),
                _ => "not measured".into(),
            },
            met: hit
                .zip(oracle)
                .and_then(|(h, o)| ratio(h, o))
                .map(|r| r >= GOAL_HIT_RATE_VS_ORACLE),
        });
        let nr = |router: &str| run(&self.no_reuse, router);
        let worst = nr(REFERENCE)
            .zip(nr(REFERENCE_ROUND_ROBIN))
            .and_then(|(p, rr)| {
                p.stages
                    .iter()
                    .zip(&rr.stages)
                    .filter_map(|(a, b)| {
                        ratio(a.summary.ttft_p90_ms, b.summary.ttft_p90_ms)
                            .map(|r| (r, a.summary.ttft_p90_ms, b.summary.ttft_p90_ms))
                    })
                    .max_by(|a, b| a.0.total_cmp(&b.0))
            });
        goals.push(Goal {
            what: format!("no-reuse control: TTFT p90 vs {REFERENCE_ROUND_ROBIN} (worst stage)"),
            target: format!("<= {:.2}x", 1.0 + GOAL_NO_REUSE_TOLERANCE),
            measured: worst.map_or("not measured".into(), |(r, a, b)| {
                format!("{a:.0} ms vs {b:.0} ms: {r:.3}x")
            }),
            met: worst.map(|(r, ..)| r <= 1.0 + GOAL_NO_REUSE_TOLERANCE),
        });
        let direct = self.overhead(DIRECT, "plain");
        let gateway = self.overhead(REFERENCE, "plain");
        let tput = direct
            .zip(gateway)
            .and_then(|(d, g)| ratio(g.req_per_s, d.req_per_s));
        goals.push(Goal {
            what:
                "gateway throughput (fixed-latency backends, plain) vs direct, precise routing on"
                    .into(),
            target: format!(">= {GOAL_THROUGHPUT_VS_DIRECT:.2}x"),
            measured: match (gateway, direct, tput) {
                (Some(g), Some(d), Some(r)) => {
                    format!("{:.0} vs {:.0} req/s: {r:.3}x", g.req_per_s, d.req_per_s)
                }
                _ => "not measured".into(),
            },
            met: tput.map(|r| r >= GOAL_THROUGHPUT_VS_DIRECT),
        });
        goals
    }

    /// Where another router did better than the reference, in words.
    pub fn peer_wins(&self) -> Vec<String> {
        let mut wins = Vec::new();
        let beats = |peer: f64, ours: f64, lower_is_better: bool| {
            if lower_is_better {
                peer < ours * (1.0 - WIN_MARGIN)
            } else {
                peer > ours * (1.0 + WIN_MARGIN)
            }
        };
        for (section, report) in [
            ("shared-prefix", &self.shared_prefix),
            ("no-reuse", &self.no_reuse),
        ] {
            let Some(ours) = run(report, REFERENCE) else {
                continue;
            };
            for peer in report.runs.iter().filter(|r| r.router != REFERENCE) {
                for (p, o) in peer.stages.iter().zip(&ours.stages) {
                    let qps = p
                        .offered_rate
                        .map_or("closed loop".into(), |r| format!("{r} QPS"));
                    let (ps, os) = (&p.summary, &o.summary);
                    if ps.errors <= os.errors && beats(ps.ttft_p90_ms, os.ttft_p90_ms, true) {
                        wins.push(format!(
                            "{section} @ {qps}: {} TTFT p90 {:.0} ms < {REFERENCE} {:.0} ms",
                            peer.router, ps.ttft_p90_ms, os.ttft_p90_ms
                        ));
                    }
                    if beats(ps.output_tok_s, os.output_tok_s, false) {
                        wins.push(format!(
                            "{section} @ {qps}: {} output {:.0} tok/s > {REFERENCE} {:.0} tok/s",
                            peer.router, ps.output_tok_s, os.output_tok_s
                        ));
                    }
                    if let (Some(ph), Some(oh)) = (p.fleet_hit_rate, o.fleet_hit_rate) {
                        if ph > oh + WIN_MARGIN {
                            wins.push(format!(
                                "{section} @ {qps}: {} hit rate {:.1}% > {REFERENCE} {:.1}%",
                                peer.router,
                                ph * 100.0,
                                oh * 100.0
                            ));
                        }
                    }
                }
            }
        }
        for mode in ["plain", "stream"] {
            let Some(ours) = self.overhead(REFERENCE, mode) else {
                continue;
            };
            for row in self
                .overhead
                .iter()
                .filter(|r| r.mode == mode && r.router != REFERENCE && r.router != DIRECT)
            {
                if beats(row.sample.req_per_s, ours.req_per_s, false) {
                    wins.push(format!(
                        "overhead ({mode}): {} {:.0} req/s > {REFERENCE} {:.0} req/s",
                        row.router, row.sample.req_per_s, ours.req_per_s
                    ));
                }
                if beats(row.sample.p99_ms, ours.p99_ms, true) {
                    wins.push(format!(
                        "overhead ({mode}): {} p99 {:.2} ms < {REFERENCE} {:.2} ms",
                        row.router, row.sample.p99_ms, ours.p99_ms
                    ));
                }
            }
        }
        wins
    }

    pub fn markdown(&self, plots: &[String]) -> String {
        let mut s = format!("# {}\n\nRegenerate: `{}`\n\n", self.title, self.command);
        s.push_str("## Setup\n\n");
        for (k, v) in &self.setup {
            s.push_str(&format!("- **{k}**: {v}\n"));
        }
        for n in &self.notes {
            s.push_str(&format!("- {n}\n"));
        }
        s.push_str("\n## Goals\n\n");
        s.push_str(&format!(
            "The knee is the highest offered load at which {REFERENCE}'s TTFT p50 stays within {KNEE_TTFT_GROWTH}x of its value at the lowest load; the goals compare TTFT p90 there.\n\n"
        ));
        s.push_str("| goal | target | measured | met |\n|---|---|---|---|\n");
        for g in self.goals() {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                g.what,
                g.target,
                g.measured,
                match g.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "-",
                }
            ));
        }
        if let Some(k) = self.knee() {
            s.push_str(&format!(
                "\n## At the knee ({} QPS)\n\n",
                self.stage_at(REFERENCE, k)
                    .and_then(|st| st.offered_rate)
                    .unwrap_or(0.0)
            ));
            s.push_str("| router | TTFT p50 ms | TTFT p90 ms | fleet hit rate | oracle | output tok/s | best output tok/s on the ladder |\n|---|---|---|---|---|---|---|\n");
            let oracle = self.oracle_hit_rate.get(k).copied();
            for r in &self.shared_prefix.runs {
                let Some(st) = r.stages.get(k) else { continue };
                let best = r
                    .stages
                    .iter()
                    .map(|s| s.summary.output_tok_s)
                    .fold(0.0, f64::max);
                s.push_str(&format!(
                    "| {} | {:.0} | {:.0} | {} | {} | {:.0} | {best:.0} |\n",
                    r.router,
                    st.summary.ttft_p50_ms,
                    st.summary.ttft_p90_ms,
                    st.fleet_hit_rate
                        .map_or("-".into(), |h| format!("{:.1}%", h * 100.0)),
                    oracle.map_or("-".into(), |o| format!("{:.1}%", o * 100.0)),
                    st.summary.output_tok_s,
                ));
            }
        }
        s.push_str("\n## Where another router does better\n\n");
        let wins = self.peer_wins();
        if wins.is_empty() {
            s.push_str(&format!(
                "Nowhere in this run by more than {:.0}%.\n",
                WIN_MARGIN * 100.0
            ));
        }
        for w in wins {
            s.push_str(&format!("- {w}\n"));
        }
        s.push_str("\n## Shared-prefix ladder\n\n");
        if !self.oracle_hit_rate.is_empty() {
            let o: Vec<String> = self
                .oracle_hit_rate
                .iter()
                .map(|o| format!("{:.1}%", o * 100.0))
                .collect();
            s.push_str(&format!(
                "Oracle hit rate per stage (one LRU cache as big as the whole fleet's KV, warm from the warm-up and the stages before): {}.\n\n",
                o.join(", ")
            ));
        }
        s.push_str(&self.shared_prefix.table());
        for p in plots {
            s.push_str(&format!("\n![{p}]({p})\n"));
        }
        s.push_str("\n## No-reuse control\n\n");
        s.push_str(&self.no_reuse.table());
        if !self.overhead.is_empty() {
            s.push_str("\n## Overhead (fixed-latency backends)\n\n");
            s.push_str("| router | mode | requests | errors | req/s | vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms |\n|---|---|---|---|---|---|---|---|---|---|\n");
            for r in &self.overhead {
                let d = self.overhead(DIRECT, &r.mode);
                let m = &r.sample;
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {} | {} |\n",
                    r.router,
                    r.mode,
                    m.requests,
                    m.errors,
                    m.req_per_s,
                    d.and_then(|d| ratio(m.req_per_s, d.req_per_s))
                        .map_or("-".into(), |x| format!("{x:.2}x")),
                    m.p50_ms,
                    m.p99_ms,
                    d.map_or("-".into(), |d| format!("{:+.2}", m.p50_ms - d.p50_ms)),
                    d.map_or("-".into(), |d| format!("{:+.2}", m.p99_ms - d.p99_ms)),
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::runner::summarize;

    fn stage(rate: f64, ttft_p90: f64, hit: f64, tok_s: f64) -> StageReport {
        let mut summary = summarize("s", &[], 1.0);
        summary.ttft_p90_ms = ttft_p90;
        summary.ttft_p50_ms = ttft_p90 / 2.0;
        summary.output_tok_s = tok_s;
        StageReport {
            offered_rate: Some(rate),
            summary,
            fleet_hit_rate: Some(hit),
        }
    }

    fn report(runs: Vec<(&str, Vec<StageReport>)>) -> Report {
        Report {
            title: "t".into(),
            target: "fleet".into(),
            workload: "w".into(),
            command: "c".into(),
            runs: runs
                .into_iter()
                .map(|(router, stages)| RunReport {
                    router: router.into(),
                    stages,
                })
                .collect(),
        }
    }

    fn sample(req_per_s: f64, p50: f64, p99: f64) -> OverheadSample {
        OverheadSample {
            requests: 100,
            errors: 0,
            req_per_s,
            p50_ms: p50,
            p99_ms: p99,
            first_error: None,
        }
    }

    fn comparison() -> Comparison {
        Comparison {
            title: "cmp".into(),
            command: "scripts/bench/compare.sh".into(),
            setup: vec![("fleet".into(), "8 sims".into())],
            shared_prefix: report(vec![
                (
                    REFERENCE,
                    vec![
                        stage(2.0, 100.0, 0.60, 100.0),
                        stage(4.0, 150.0, 0.62, 200.0),
                        stage(8.0, 900.0, 0.50, 250.0),
                    ],
                ),
                (
                    PEER_CACHE_AWARE,
                    vec![
                        stage(2.0, 90.0, 0.58, 100.0),
                        stage(4.0, 400.0, 0.55, 190.0),
                        stage(8.0, 5000.0, 0.40, 150.0),
                    ],
                ),
                (
                    REFERENCE_ROUND_ROBIN,
                    vec![
                        stage(2.0, 300.0, 0.1, 100.0),
                        stage(4.0, 2000.0, 0.1, 150.0),
                        stage(8.0, 9000.0, 0.1, 150.0),
                    ],
                ),
                (
                    "envoy round_robin",
                    vec![
                        stage(2.0, 280.0, 0.1, 100.0),
                        stage(4.0, 1900.0, 0.1, 150.0),
                        stage(8.0, 9500.0, 0.1, 150.0),
                    ],
                ),
            ]),
            oracle_hit_rate: vec![0.64, 0.64, 0.64],
            no_reuse: report(vec![
                (REFERENCE, vec![stage(4.0, 1020.0, 0.0, 100.0)]),
                (REFERENCE_ROUND_ROBIN, vec![stage(4.0, 1000.0, 0.0, 100.0)]),
            ]),
            overhead: vec![
                OverheadRow {
                    router: DIRECT.into(),
                    mode: "plain".into(),
                    sample: sample(1000.0, 20.0, 25.0),
                },
                OverheadRow {
                    router: REFERENCE.into(),
                    mode: "plain".into(),
                    sample: sample(700.0, 21.0, 30.0),
                },
                OverheadRow {
                    router: "envoy round_robin".into(),
                    mode: "plain".into(),
                    sample: sample(900.0, 20.5, 26.0),
                },
            ],
            notes: vec!["noise".into()],
        }
    }

    #[test]
    fn knee_is_the_last_stage_within_the_growth_bound() {
        let mut c = comparison();
        assert_eq!(c.knee(), Some(1));
        c.shared_prefix.runs[0].stages[1].summary.errors = 1;
        assert_eq!(c.knee(), Some(0), "a stage with errors is past the knee");
        c.shared_prefix.runs.remove(0);
        assert_eq!(c.knee(), None);
    }

    #[test]
    fn goals_report_ratios_and_distance() {
        let g = comparison().goals();
        assert_eq!(g.len(), 5);
        // 150 / 400 = 0.375 <= 0.5.
        assert_eq!(g[0].met, Some(true), "{g:?}");
        assert!(g[0].measured.contains("0.375x"), "{}", g[0].measured);
        // The best round robin at 4 QPS is envoy's 1900 ms: 150/1900 = 0.079 > 1/20.
        assert_eq!(g[1].met, Some(false));
        assert!(
            g[1].measured.contains("envoy round_robin"),
            "{}",
            g[1].measured
        );
        // 0.62 / 0.64 = 0.969 >= 0.95.
        assert_eq!(g[2].met, Some(true));
        // 1020 / 1000 = 1.02 <= 1.05.
        assert_eq!(g[3].met, Some(true));
        // 700 / 1000 = 0.7 < 0.8.
        assert_eq!(g[4].met, Some(false));
        assert!(g[4].measured.contains("0.700x"));
    }

    #[test]
    fn unmeasured_goals_are_neither_met_nor_missed() {
        let mut c = comparison();
        c.overhead.clear();
        c.no_reuse.runs.clear();
        c.shared_prefix.runs.retain(|r| r.router == REFERENCE);
        let g = c.goals();
        assert_eq!(g[0].met, None);
        assert_eq!(g[1].met, None);
        assert_eq!(g[3].met, None);
        assert_eq!(g[4].met, None);
        assert_eq!(g[2].met, Some(true), "the oracle needs no peer");
    }

    #[test]
    fn peer_wins_are_listed_and_rendered() {
        let c = comparison();
        let wins = c.peer_wins();
        assert!(
            wins.iter()
                .any(|w| w.contains("@ 2 QPS: sglang-router cache_aware TTFT p90 90 ms")),
            "{wins:?}"
        );
        assert!(wins
            .iter()
            .any(|w| w.contains("overhead (plain): envoy round_robin 900 req/s")));
        assert!(
            !wins.iter().any(|w| w.contains("@ 4 QPS: sglang")),
            "{wins:?}"
        );
        let md = c.markdown(&["ttft_p90.svg".into()]);
        assert!(md.contains("## Where another router does better"));
        assert!(md.contains("![ttft_p90.svg](ttft_p90.svg)"));
        assert!(md.contains("| **no** |"));
        assert!(md.contains("## At the knee (4 QPS)"));
        assert!(md.contains("| envoy round_robin | plain |"));
        assert!(md.contains("+1.00"), "added p50 of the gateway: {md}");
    }
}
