//! The sweep's regimes: a fleet, a workload shape, and how stale the
//! gateway's signals are next to the engines' work. Workloads are built as
//! token ids (exact lengths, no tokenizer), deterministic per seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::fleet_model::{ModelRequest, ModelWorkload};
use crate::workload::Oracle;
use kvgate_sim::engine::EngineConfig;

/// What the requests of a regime look like.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shape {
    /// Groups sharing a prefix (a document, a system prompt); each request
    /// picks a group at random and adds its own question. `groups: 0` sizes
    /// the prefixes to the regime's KV pressure.
    SharedPrefix {
        groups: usize,
        prefix_tokens: usize,
        unique_tokens: usize,
        output_tokens: u32,
    },
    /// Every prompt unique from its first token.
    NoReuse {
        prompt_tokens: usize,
        output_tokens: u32,
    },
    /// Conversations whose history grows: a shared system prompt, each
    /// user's own opening, then per round an answer and a question appended.
    /// Users' rounds come `users / rate` seconds apart. `users: 0` sizes
    /// them to the regime's KV pressure.
    MultiTurn {
        users: usize,
        rounds: usize,
        system_tokens: usize,
        opening_tokens: usize,
        question_tokens: usize,
        output_tokens: u32,
    },
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Arrivals {
    Poisson,
    /// `size` requests at once, bursts Poisson at `rate / size`.
    Bursts {
        size: usize,
    },
}

/// One regime of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Regime {
    pub name: &'static str,
    pub engines: usize,
    /// KV blocks per engine.
    pub num_blocks: usize,
    pub shape: Shape,
    /// Distinct prompt tokens over the fleet's KV tokens, for shapes sized
    /// by it (`groups: 0`, `users: 0`).
    pub kv_pressure: f64,
    /// Engine seconds per gateway second (the sim's `--time-scale`).
    pub time_scale: f64,
    pub arrivals: Arrivals,
}

impl Regime {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            num_blocks: self.num_blocks,
            ..EngineConfig::default()
        }
    }

    /// The fleet's KV capacity in tokens (block 0 of each engine is reserved).
    pub fn fleet_kv_tokens(&self) -> usize {
        let e = self.engine();
        self.engines * e.num_blocks.saturating_sub(1) * e.block_size
    }

    /// One LRU cache as big as the whole fleet's KV: the best any routing
    /// could do.
    pub fn fleet_oracle(&self) -> Oracle {
        let e = self.engine();
        Oracle::bounded(
            e.block_size,
            Some(self.engines * e.num_blocks.saturating_sub(1)),
        )
    }

    /// `n` requests at `rate` per second.
    pub fn workload(&self, rate: f64, n: usize, seed: u64) -> ModelWorkload {
        let mut rng = StdRng::seed_from_u64(seed);
        let kv = self.fleet_kv_tokens() as f64 * self.kv_pressure;
        let requests = match self.shape {
            Shape::SharedPrefix {
                groups,
                prefix_tokens,
                unique_tokens,
                output_tokens,
            } => {
                let groups = if groups > 0 {
                    groups
                } else {
                    ((kv / prefix_tokens.max(1) as f64).round() as usize).max(1)
                };
                let prefixes: Vec<Vec<u32>> = (0..groups)
                    .map(|_| tokens(&mut rng, prefix_tokens))
                    .collect();
                let times = self.arrival_times(rate, n, &mut rng);
                times
                    .into_iter()
                    .map(|at| {
                        let group = rng.random_range(0..groups);
                        let mut t = prefixes[group].clone();
                        t.extend(tokens(&mut rng, unique_tokens));
                        ModelRequest {
                            at,
                            tokens: t,
                            max_tokens: output_tokens,
                            group,
                        }
                    })
                    .collect()
            }
            Shape::NoReuse {
                prompt_tokens,
                output_tokens,
            } => {
                let times = self.arrival_times(rate, n, &mut rng);
                times
                    .into_iter()
                    .enumerate()
                    .map(|(group, at)| ModelRequest {
                        at,
                        tokens: tokens(&mut rng, prompt_tokens),
                        max_tokens: output_tokens,
                        group,
                    })
                    .collect()
            }
            Shape::MultiTurn {
                users,
                rounds,
                system_tokens,
                opening_tokens,
                question_tokens,
                output_tokens,
            } => {
                let rounds = rounds.max(1);
                let per_user = opening_tokens + rounds * (question_tokens + output_tokens as usize);
                let users = if users > 0 {
                    users
                } else {
                    ((kv / per_user.max(1) as f64).round() as usize).max(1)
                };
                let system = tokens(&mut rng, system_tokens);
                let gap = users as f64 / rate.max(1e-9);
                let mut out = Vec::new();
                for u in 0..users {
                    let mut history = system.clone();
                    history.extend(tokens(&mut rng, opening_tokens));
                    let start = u as f64 / rate.max(1e-9);
                    for r in 0..rounds {
                        if r > 0 {
                            history.extend(tokens(&mut rng, output_tokens as usize));
                            history.extend(tokens(&mut rng, question_tokens));
                        }
                        // A little jitter so users do not keep step.
                        let jitter = rng.random::<f64>() * gap * 0.1;
                        out.push(ModelRequest {
                            at: start + r as f64 * gap + jitter,
                            tokens: history.clone(),
                            max_tokens: output_tokens,
                            group: u,
                        });
                    }
                }
                out.sort_by(|a, b| a.at.total_cmp(&b.at));
                out.truncate(n.max(1));
                out
            }
        };
        ModelWorkload { requests }
    }

    fn arrival_times(&self, rate: f64, n: usize, rng: &mut StdRng) -> Vec<f64> {
        let burst = match self.arrivals {
            Arrivals::Poisson => 1,
            Arrivals::Bursts { size } => size.max(1),
        };
        let burst_rate = rate / burst as f64;
        let mut t = 0.0;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            for _ in 0..burst.min(n - out.len()) {
                out.push(t);
            }
            t += -(1.0 - rng.random::<f64>()).ln() / burst_rate.max(1e-9);
        }
        out
    }

    /// Mean prompt and output tokens of a workload, for the knee estimate.
    pub fn mean_lengths(w: &ModelWorkload) -> (f64, f64) {
        let n = w.requests.len().max(1) as f64;
        let prompt: usize = w.requests.iter().map(|r| r.tokens.len()).sum();
        let output: u64 = w.requests.iter().map(|r| u64::from(r.max_tokens)).sum();
        (prompt as f64 / n, output as f64 / n)
    }
}

/// Random token ids below the sim's output vocabulary.
fn tokens(rng: &mut StdRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(100..30_000)).collect()
}

/// The shared-prefix shape the sweep varies (LLMD-73's, with 100 output tokens).
pub const BASE_SHARED: Shape = Shape::SharedPrefix {
    groups: 0,
    prefix_tokens: 6000,
    unique_tokens: 1200,
    output_tokens: 100,
};

/// The committed sweep's regimes.
pub fn regimes() -> Vec<Regime> {
    let base = Regime {
        name: "base",
        engines: 8,
        num_blocks: 4096,
        shape: BASE_SHARED,
        kv_pressure: 0.5,
        time_scale: 1.0,
        arrivals: Arrivals::Poisson,
    };
    let with = |name, f: &dyn Fn(&mut Regime)| {
        let mut r = base.clone();
        r.name = name;
        f(&mut r);
        r
    };
    vec![
        base.clone(),
        with("kv-pressure-1x", &|r| r.kv_pressure = 1.0),
        with("kv-pressure-2x", &|r| r.kv_pressure = 2.0),
        with("fleet-2", &|r| r.engines = 2),
        with("fleet-16", &|r| r.engines = 16),
        with("short-prompts", &|r| {
            r.shape = Shape::SharedPrefix {
                groups: 0,
                prefix_tokens: 600,
                unique_tokens: 120,
                output_tokens: 100,
            }
        }),
        with("long-output", &|r| {
            r.shape = Shape::SharedPrefix {
                groups: 0,
                prefix_tokens: 6000,
                unique_tokens: 1200,
                output_tokens: 1000,
            }
        }),
        with("time-scale-2", &|r| r.time_scale = 2.0),
        with("time-scale-4", &|r| r.time_scale = 4.0),
        with("bursty", &|r| r.arrivals = Arrivals::Bursts { size: 8 }),
        with("multi-turn", &|r| {
            r.kv_pressure = 1.0;
            r.shape = Shape::MultiTurn {
                users: 0,
                rounds: 8,
                system_tokens: 1000,
                opening_tokens: 2000,
                question_tokens: 100,
                output_tokens: 100,
            }
        }),
        with("no-reuse", &|r| {
            r.shape = Shape::NoReuse {
                prompt_tokens: 7200,
                output_tokens: 100,
            }
        }),
        with("no-reuse-short", &|r| {
            r.shape = Shape::NoReuse {
                prompt_tokens: 720,
                output_tokens: 100,
            }
        }),
    ]
}
