#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Prints `fleet_model`'s numbers for the workloads its tests use, per policy,
//! so a refactor or a routing change can quote them before and after:
//! `cargo run --release -p kvgate-bench --example fleet_model`.

use kvgate_bench::fleet_model::{simulate, FleetModelConfig, ModelWorkload};
use kvgate_bench::workload::{no_reuse, timed, LLMD_73};
use kvgate_router::RouterConfig;
use kvgate_tokenize::ModelTokenizer;

fn main() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    let mut workloads = Vec::new();
    for seed in [1u64, 2] {
        let specs = LLMD_73.groups(20, 100, seed);
        workloads.push((
            format!("shared-prefix 48 QPS seed {seed}"),
            timed(specs, 48.0, seed),
        ));
    }
    for seed in [1u64, 2, 4] {
        workloads.push((
            format!("no-reuse 16 QPS seed {seed}"),
            timed(no_reuse(300, 7200, 100, seed + 1000), 16.0, seed + 1000),
        ));
    }
    println!(
        "{:<34} {:<15} {:>8} {:>8} {:>8} {:>8}",
        "workload", "policy", "p50 ms", "p90 ms", "hit", "oracle"
    );
    for (name, specs) in &workloads {
        let w = ModelWorkload::tokenize(specs, &tok).unwrap();
        for policy in ["precise_prefix", "round_robin"] {
            let router: RouterConfig = serde_yaml::from_str(&format!("policy: {policy}")).unwrap();
            let cfg = FleetModelConfig {
                router,
                ..FleetModelConfig::default()
            };
            let run = simulate(&cfg, &w).unwrap();
            println!(
                "{name:<34} {policy:<15} {:>8.1} {:>8.1} {:>8.4} {:>8.4}",
                run.ttft_p50() * 1e3,
                run.ttft_p90() * 1e3,
                run.hit_rate(),
                w.oracle_hit_rate(16)
            );
        }
    }
}
