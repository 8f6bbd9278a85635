#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A first look at routing across load regimes in `fleet_model` (issue 13's
//! starting point, not its sweep): the shared-prefix workload from half the
//! knee to twice it and the no-reuse control at two rates, for precise_prefix,
//! approx_prefix and least_load. Deterministic; about 2 s:
//! `cargo run --release -p kvgate-bench --example regime_probe`.
use kvgate_bench::fleet_model::{simulate, FleetModelConfig, ModelWorkload};
use kvgate_bench::workload::{no_reuse, timed, LLMD_73};
use kvgate_router::RouterConfig;
use kvgate_tokenize::ModelTokenizer;
fn main() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    let t0 = std::time::Instant::now();
    for (name, specs) in [
        ("shared 24qps", timed(LLMD_73.groups(20, 100, 1), 24.0, 1)),
        ("shared 48qps", timed(LLMD_73.groups(20, 100, 1), 48.0, 1)),
        ("shared 72qps", timed(LLMD_73.groups(20, 100, 1), 72.0, 1)),
        ("shared 96qps", timed(LLMD_73.groups(20, 100, 1), 96.0, 1)),
        (
            "noreuse 16qps",
            timed(no_reuse(300, 7200, 100, 1001), 16.0, 1001),
        ),
        (
            "noreuse 24qps",
            timed(no_reuse(300, 7200, 100, 1001), 24.0, 1001),
        ),
    ] {
        let w = ModelWorkload::tokenize(&specs, &tok).unwrap();
        for policy in ["precise_prefix", "approx_prefix", "least_load"] {
            let router: RouterConfig = serde_yaml::from_str(&format!("policy: {policy}")).unwrap();
            let run = simulate(
                &FleetModelConfig {
                    router,
                    ..Default::default()
                },
                &w,
            )
            .unwrap();
            println!(
                "{name:<14} {policy:<15} p50 {:>8.1} p90 {:>8.1} hit {:.3}  ({:.0?})",
                run.ttft_p50() * 1e3,
                run.ttft_p90() * 1e3,
                run.hit_rate(),
                t0.elapsed()
            );
        }
    }
}
