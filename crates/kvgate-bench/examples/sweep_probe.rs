#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The sweep's cells for chosen regimes (all by default), one line each, for
//! routing work: `cargo run --release -p kvgate-bench --example sweep_probe --
//! [regime ...]`. `ROUTER='weights: {...}'` adds a second kvgate row with that
//! router config, to judge a change on the whole sweep before making it the
//! default; `REASONS=1` prints each row's placement reasons.
use kvgate_bench::sweep::{cell, regimes, Contender, SweepOptions, STAGES};

fn main() {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let opts = SweepOptions::default();
    let t0 = std::time::Instant::now();
    let mut contenders = Contender::standard();
    if let Ok(y) = std::env::var("ROUTER") {
        contenders.insert(1, Contender::Kvgate(serde_yaml::from_str(&y).unwrap()));
    }
    let reasons = std::env::var("REASONS").is_ok();
    for r in regimes() {
        if !only.is_empty() && !only.iter().any(|o| o == r.name) {
            continue;
        }
        for load in STAGES {
            let c = cell(&r, load, &contenders, &opts).unwrap();
            print!(
                "{:<15} {:>3}x {:>6.1}qps n={:<5} oracle {:.3} |",
                c.regime, c.load, c.qps, c.requests, c.oracle_hit_rate
            );
            for m in &c.rows {
                let name = m.contender.replace("kvgate ", "K:").replace("peer ", "");
                let why = if reasons {
                    format!("{:?}", m.reasons)
                } else {
                    String::new()
                };
                print!(
                    " {name}{why} {:.0}/{:.0} {:.3} |",
                    m.ttft_p50_ms, m.ttft_p90_ms, m.hit_rate
                );
            }
            println!(" ({:.0?})", t0.elapsed());
        }
    }
}
