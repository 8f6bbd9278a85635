//! The sweep's committed report: `report.json` (regimes, cells, goals) and
//! `report.md` (the same as tables).

use std::fmt::Write;

use serde::Serialize;

use super::{Cell, Regime, SweepGoal, SweepOptions};

#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub command: String,
    pub options: SweepOptions,
    pub regimes: Vec<Regime>,
    pub cells: Vec<Cell>,
    pub goals: Vec<SweepGoal>,
}

fn describe(r: &Regime) -> String {
    use super::{Arrivals, Shape};
    let shape = match r.shape {
        Shape::SharedPrefix {
            prefix_tokens,
            unique_tokens,
            output_tokens,
            ..
        } => format!(
            "groups sharing {prefix_tokens} tokens, + {unique_tokens} unique, {output_tokens} out"
        ),
        Shape::NoReuse {
            prompt_tokens,
            output_tokens,
        } => format!("unique {prompt_tokens}-token prompts, {output_tokens} out"),
        Shape::MultiTurn {
            rounds,
            system_tokens,
            opening_tokens,
            question_tokens,
            output_tokens,
            ..
        } => format!(
            "{rounds}-round chats: {system_tokens} system + {opening_tokens} opening, +{output_tokens} answer +{question_tokens} question a round"
        ),
    };
    let arrivals = match r.arrivals {
        Arrivals::Poisson => "Poisson".to_string(),
        Arrivals::Bursts { size } => format!("bursts of {size}"),
    };
    let pressure = if matches!(r.shape, Shape::NoReuse { .. }) {
        "-".to_string()
    } else {
        format!("{:.1}x", r.kv_pressure)
    };
    format!(
        "| {} | {} | {} | {} | {} | {}x | {} |",
        r.name, r.engines, r.num_blocks, pressure, shape, r.time_scale, arrivals
    )
}

/// The report as markdown.
pub fn markdown(report: &SweepReport) -> String {
    let mut s = String::new();
    let met = report.goals.iter().filter(|g| g.met).count();
    let _ = writeln!(s, "# Routing regime sweep (fleet model)\n");
    let _ = writeln!(s, "Regenerate: `{}`\n", report.command);
    let _ = writeln!(
        s,
        "kvgate's scheduler and models of the peer routers' policies (sglang-router / vllm-router \
         `cache_aware` with their default thresholds, `power_of_two`, round robin), each placing the \
         same requests on the same simulated fleet of `kvgate sim` engines in simulated time \
         (`kvgate_bench::fleet_model`). Deterministic: the same build gives the same numbers. \
         Loads are multiples of each regime's knee, estimated from the fleet's capacity at the hit \
         rate of one fleet-sized LRU cache. Each stage is {} simulated seconds of arrivals (at most {} \
         requests) for each of {} seeds, pooled; the first {:.0}% of each warm the caches and are \
         not measured.\n",
        report.options.stage_secs,
        report.options.max_requests,
        report.options.seeds,
        report.options.warmup_fraction * 100.0
    );
    let _ = writeln!(s, "Goals met: {met} of {}.\n", report.goals.len());
    let _ = writeln!(s, "## Regimes\n");
    let _ = writeln!(
        s,
        "| regime | engines | KV blocks each | KV pressure | requests | time scale | arrivals |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in &report.regimes {
        let _ = writeln!(s, "{}", describe(r));
    }
    let _ = writeln!(s, "\n## kvgate against the best peer\n");
    let _ = writeln!(
        s,
        "Per cell: kvgate's TTFT p50 / the best peer's, TTFT p90 / the best peer's, fleet hit rate minus \
         the best peer's (points). Below 1 and above 0 is better.\n"
    );
    let _ = write!(s, "| regime |");
    let loads: Vec<f64> = {
        let mut l: Vec<f64> = report.cells.iter().map(|c| c.load).collect();
        l.sort_by(f64::total_cmp);
        l.dedup();
        l
    };
    for l in &loads {
        let _ = write!(s, " {l}x knee |");
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(loads.len()));
    for r in &report.regimes {
        let _ = write!(s, "| {} |", r.name);
        for l in &loads {
            let cell = report
                .cells
                .iter()
                .find(|c| c.regime == r.name && c.load == *l);
            match cell.and_then(|c| c.versus_best_peer()) {
                Some((p50, p90, hit)) => {
                    let _ = write!(s, " {p50:.2} / {p90:.2} / {:+.1} |", hit * 100.0);
                }
                None => {
                    let _ = write!(s, " - |");
                }
            }
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "\n## Results\n");
    let _ = writeln!(
        s,
        "TTFT in ms (p50 / p90), fleet hit rate; **bold**: kvgate. Best peer = the best of the peers \
         on that column.\n"
    );
    let contenders: Vec<String> = report
        .cells
        .first()
        .map(|c| c.rows.iter().map(|r| r.contender.clone()).collect())
        .unwrap_or_default();
    let _ = write!(s, "| regime | load | QPS | oracle hit |");
    for c in &contenders {
        let _ = write!(s, " {c} |");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|---|---|---|{}", "---|".repeat(contenders.len()));
    for c in &report.cells {
        let _ = write!(
            s,
            "| {} | {}x | {:.1} | {:.1}% |",
            c.regime,
            c.load,
            c.qps,
            c.oracle_hit_rate * 100.0
        );
        for name in &contenders {
            match c.row(name) {
                Some(m) if name.starts_with("kvgate") => {
                    let _ = write!(
                        s,
                        " **{:.0} / {:.0}, {:.1}%** |",
                        m.ttft_p50_ms,
                        m.ttft_p90_ms,
                        m.hit_rate * 100.0
                    );
                }
                Some(m) => {
                    let _ = write!(
                        s,
                        " {:.0} / {:.0}, {:.1}% |",
                        m.ttft_p50_ms,
                        m.ttft_p90_ms,
                        m.hit_rate * 100.0
                    );
                }
                None => {
                    let _ = write!(s, " - |");
                }
            }
        }
        let _ = writeln!(s);
    }
    let missed: Vec<&SweepGoal> = report.goals.iter().filter(|g| !g.met).collect();
    let _ = writeln!(s, "\n## Goals not met ({})\n", missed.len());
    if missed.is_empty() {
        let _ = writeln!(s, "None.");
    } else {
        let _ = writeln!(s, "| goal | target | measured |");
        let _ = writeln!(s, "|---|---|---|");
        for g in missed {
            let _ = writeln!(s, "| {} | {} | {} |", g.name, g.target, g.measured);
        }
    }
    let _ = writeln!(s, "\n## Every goal\n");
    let _ = writeln!(s, "| goal | target | measured | met |");
    let _ = writeln!(s, "|---|---|---|---|");
    for g in &report.goals {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            g.name,
            g.target,
            g.measured,
            if g.met { "yes" } else { "**no**" }
        );
    }
    s
}
