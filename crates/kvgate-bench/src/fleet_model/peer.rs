//! Models of the peer routers' placement, so the regime sweep can set them
//! beside kvgate's scheduler on the same simulated fleet: the `cache_aware`
//! policy of sglang-router (and of vllm-router, which derives from it), their
//! `power_of_two`, and round robin.
//!
//! What the models follow (the peers' documented behaviour and defaults, not
//! their code): `cache_aware` keeps, per worker, an approximate prefix tree of
//! the prompts it routed there (no engine events, so it never learns of an
//! eviction). A request goes to the worker with the fewest requests in flight
//! when the fleet is imbalanced (`max - min > balance_abs_threshold` and `max >
//! min * balance_rel_threshold`); otherwise to the worker with the longest
//! match when the match covers more than `cache_threshold` of the prompt, else
//! to the worker whose tree is smallest. Loads are the router's own counts of
//! requests in flight. The trees match at a 16-token grain rather than per
//! character, and are not evicted: their default bound (2^26 characters per
//! worker) is far above what a sweep routes.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Tokens per node of the modelled prefix tree.
const GRAIN: usize = 16;

/// sglang-router's `cache_aware` settings (its defaults in [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CacheAwareConfig {
    pub cache_threshold: f64,
    pub balance_abs_threshold: usize,
    pub balance_rel_threshold: f64,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        Self {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
        }
    }
}

/// A peer router's placement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum PeerPolicy {
    CacheAware(CacheAwareConfig),
    /// Two workers drawn at random; the one with fewer requests in flight.
    PowerOfTwo,
    RoundRobin,
}

impl PeerPolicy {
    /// How the sweep's tables name it.
    pub fn name(&self) -> &'static str {
        match self {
            PeerPolicy::CacheAware(_) => "peer cache_aware",
            PeerPolicy::PowerOfTwo => "peer power_of_two",
            PeerPolicy::RoundRobin => "peer round_robin",
        }
    }
}

/// One peer router's state over a run.
pub(crate) struct PeerRouter {
    policy: PeerPolicy,
    /// Requests in flight per worker, as the router counts them.
    load: Vec<usize>,
    /// Prefix (hash of the first k grains) -> workers it was routed to,
    /// most recent last.
    tree: HashMap<u64, Vec<usize>>,
    /// Tokens each worker's tree holds.
    tree_tokens: Vec<usize>,
    turn: usize,
    rng: StdRng,
}

impl PeerRouter {
    pub(crate) fn new(policy: PeerPolicy, workers: usize) -> Self {
        Self {
            policy,
            load: vec![0; workers],
            tree: HashMap::new(),
            tree_tokens: vec![0; workers],
            turn: 0,
            rng: StdRng::seed_from_u64(0x9e37),
        }
    }

    /// The worker for a prompt, and why.
    pub(crate) fn place(&mut self, tokens: &[u32]) -> (usize, &'static str) {
        let n = self.load.len().max(1);
        let (chosen, reason) = match self.policy {
            PeerPolicy::RoundRobin => {
                self.turn += 1;
                ((self.turn - 1) % n, "round_robin")
            }
            PeerPolicy::PowerOfTwo => {
                let a = self.rng.random_range(0..n);
                let b = (a + self.rng.random_range(1..n.max(2))) % n;
                let pick = if self.load[b] < self.load[a] { b } else { a };
                (pick, "power_of_two")
            }
            PeerPolicy::CacheAware(cfg) => self.cache_aware(cfg, tokens),
        };
        self.load[chosen] += 1;
        chosen_insert(&mut self.tree, &mut self.tree_tokens, tokens, chosen);
        (chosen, reason)
    }

    /// A request placed on `worker` ended.
    pub(crate) fn release(&mut self, worker: usize) {
        if let Some(l) = self.load.get_mut(worker) {
            *l = l.saturating_sub(1);
        }
    }

    fn cache_aware(&self, cfg: CacheAwareConfig, tokens: &[u32]) -> (usize, &'static str) {
        let (min_w, min_load) = argmin(&self.load);
        let max_load = self.load.iter().copied().max().unwrap_or(0);
        if max_load - min_load > cfg.balance_abs_threshold
            && max_load as f64 > min_load as f64 * cfg.balance_rel_threshold
        {
            return (min_w, "imbalanced");
        }
        let mut matched = 0usize;
        let mut holder = None;
        for (depth, h) in grain_hashes(tokens).enumerate() {
            match self.tree.get(&h).and_then(|ws| ws.last()) {
                Some(&w) => {
                    matched = (depth + 1) * GRAIN;
                    holder = Some(w);
                }
                None => break,
            }
        }
        match holder {
            Some(w) if matched as f64 / tokens.len().max(1) as f64 > cfg.cache_threshold => {
                (w, "prefix")
            }
            _ => (argmin(&self.tree_tokens).0, "smallest_tree"),
        }
    }
}

fn argmin(values: &[usize]) -> (usize, usize) {
    values
        .iter()
        .copied()
        .enumerate()
        .min_by_key(|(_, v)| *v)
        .unwrap_or((0, 0))
}

/// Hashes of the prompt's leading 1, 2, ... whole grains.
fn grain_hashes(tokens: &[u32]) -> impl Iterator<Item = u64> + '_ {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tokens.chunks_exact(GRAIN).map(move |chunk| {
        chunk.hash(&mut h);
        h.finish()
    })
}

fn chosen_insert(
    tree: &mut HashMap<u64, Vec<usize>>,
    tree_tokens: &mut [usize],
    tokens: &[u32],
    worker: usize,
) {
    for h in grain_hashes(tokens) {
        let ws = tree.entry(h).or_default();
        if let Some(p) = ws.iter().position(|w| *w == worker) {
            ws.remove(p);
        } else {
            tree_tokens[worker] += GRAIN;
        }
        ws.push(worker);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn cache_aware_follows_the_prefix_then_balances() {
        let cfg = CacheAwareConfig {
            balance_abs_threshold: 2,
            ..CacheAwareConfig::default()
        };
        let mut r = PeerRouter::new(PeerPolicy::CacheAware(cfg), 3);
        let a: Vec<u32> = (0..320).collect();
        let mut b = a.clone();
        b.extend(1000..1100);
        // Nothing cached: the smallest tree (all empty: the first).
        assert_eq!(r.place(&a), (0, "smallest_tree"));
        // Most of b is a's: it follows a.
        assert_eq!(r.place(&b), (0, "prefix"));
        // Something new goes to a worker with a smaller tree.
        let c: Vec<u32> = (5000..5320).collect();
        assert_eq!(r.place(&c), (1, "smallest_tree"));
        // Worker 0 has 2 in flight, worker 2 none: 2 - 0 is not > 2 yet.
        assert_eq!(r.place(&a), (0, "prefix"));
        // Now 3 vs 0: imbalanced, the least loaded wins whatever is cached.
        assert_eq!(r.place(&a), (2, "imbalanced"));
        for _ in 0..4 {
            r.release(0);
        }
        // Worker 2 was sent a last: the most recent holder wins.
        assert_eq!(r.place(&a), (2, "prefix"));
    }

    #[test]
    fn round_robin_and_power_of_two_spread_requests() {
        let mut rr = PeerRouter::new(PeerPolicy::RoundRobin, 3);
        let picks: Vec<usize> = (0..6).map(|_| rr.place(&[1, 2, 3]).0).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let mut p2 = PeerRouter::new(PeerPolicy::PowerOfTwo, 4);
        for _ in 0..40 {
            p2.place(&[1]);
        }
        // Never releasing: the lower of two loads keeps them within a few.
        let (lo, hi) = (
            p2.load.iter().min().copied().unwrap(),
            p2.load.iter().max().copied().unwrap(),
        );
        assert!(hi - lo <= 3, "{:?}", p2.load);
    }
}
