//! An InputSnatch-style timing probe. A victim contract caches some of a set
//! of candidate prefixes (8 to 64 tokens); a prober sends each candidate
//! with a fresh suffix and reads its time to first token: a hit skips the
//! prefix's prefill. Probing from the victim's own contract must tell cached
//! from uncached (the probe works); from another contract it must be at
//! chance (the salts isolate the caches, and the router's view of them).
//!
//! The engines charge 1 ms per uncached prompt token, so an 8-token hit is
//! 8 ms, well above loopback jitter. Candidates of each length are half
//! cached, half not, so length tells the prober nothing.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use kvgate_sim::engine::{EngineConfig, LatencyModel};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use kvgate_e2e::checks::roc_auc;

use crate::fleet;

const LENGTHS: [usize; 4] = [8, 16, 32, 64];
const SUFFIX_TOKENS: usize = 4;

pub struct Probe {
    pub auc_same: f64,
    pub auc_cross: f64,
}

pub async fn run(work: &Path, candidates: usize) -> Result<Probe> {
    let engine = EngineConfig {
        block_size: 4,
        latency: LatencyModel {
            step_overhead_ms: 1.0,
            prefill_overhead_ms: 2.0,
            prefill_us_per_token: 1000.0,
            decode_us_per_seq: 10.0,
        },
        ..EngineConfig::default()
    };
    let keys = [
        ("victim-key", "victim"),
        ("victim-colleague-key", "victim"),
        ("attacker-key", "attacker"),
    ];
    let f = fleet::start(2, engine, &keys, work, "probe-audit.jsonl", |_| {}).await?;
    let mut rng = StdRng::seed_from_u64(7);
    // (prefix, cached by the victim)
    let set: Vec<(Vec<u32>, bool)> = (0..candidates)
        .map(|i| {
            (
                tokens(LENGTHS[(i / 2) % LENGTHS.len()], &mut rng),
                i % 2 == 0,
            )
        })
        .collect();
    for (prefix, cached) in &set {
        if *cached {
            let mut p = prefix.clone();
            p.extend(tokens(SUFFIX_TOKENS, &mut rng));
            ensure!(f.complete("victim-key", &p, 1).await?.status == 200);
        }
    }
    // KV events reach the index within milliseconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.shuffle(&mut rng);
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for i in order {
        let (prefix, cached) = &set[i];
        for (key, out) in [
            ("attacker-key", &mut cross),
            ("victim-colleague-key", &mut same),
        ] {
            let mut p = prefix.clone();
            p.extend(tokens(SUFFIX_TOKENS, &mut rng));
            let sent = f.complete(key, &p, 1).await?;
            ensure!(sent.status == 200, "probe answered {}", sent.status);
            out.push((sent.ttft.as_secs_f64(), *cached));
        }
    }
    Ok(Probe {
        auc_same: roc_auc(&same),
        auc_cross: roc_auc(&cross),
    })
}

fn tokens(n: usize, rng: &mut StdRng) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(1000..20000)).collect()
}
