#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The index against a naive reference model over random event/query sequences.

use std::collections::{BTreeMap, HashMap};

use kvgate_index::{IndexConfig, KvIndex, MAX_TIERS};
use kvgate_keys::{BlockHasher, RequestContext};
use kvgate_wire::vllm::{BlockRemoved, BlockStored, EventBatch, KvEvent};
use proptest::prelude::*;

const MODEL: &str = "m";
const BS: usize = 4;
const TIERS: [&str; 2] = ["GPU", "CPU"];

/// An engine's hash is a function of content, like vLLM's.
fn engine_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = parent ^ 0xcbf29ce484222325;
    for t in tokens {
        h = (h ^ u64::from(*t)).wrapping_mul(0x100000001b3);
    }
    h
}

#[derive(Debug, Clone)]
enum Op {
    /// Store `n` blocks on endpoint `ep`, continuing chain `chain` (index into known chains) or from root.
    Store {
        ep: usize,
        chain: Option<usize>,
        n: usize,
        seed: u32,
        tier: usize,
    },
    Remove {
        ep: usize,
        chain: usize,
        depth: usize,
        tier: usize,
    },
    Clear {
        ep: usize,
    },
    Drop {
        ep: usize,
    },
    Lookup {
        chain: usize,
        extra_blocks: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, proptest::option::of(0..64usize), 1..4usize, 0..3u32, 0..2usize)
            .prop_map(|(ep, chain, n, seed, tier)| Op::Store { ep, chain, n, seed, tier }),
        2 => (0..3usize, 0..64usize, 0..6usize, 0..2usize)
            .prop_map(|(ep, chain, depth, tier)| Op::Remove { ep, chain, depth, tier }),
        1 => (0..3usize).prop_map(|ep| Op::Clear { ep }),
        1 => (0..3usize).prop_map(|ep| Op::Drop { ep }),
        4 => (0..64usize, 0..2usize).prop_map(|(chain, extra_blocks)| Op::Lookup { chain, extra_blocks }),
    ]
}

#[derive(Debug, Clone)]
struct Entry {
    ep: usize,
    tokens: Vec<u32>, // full token prefix up to and including this block
    tier: usize,
    engine_hash: u64,
    stamp: u64,
}

/// The reference: a flat list, everything recomputed naively.
#[derive(Default)]
struct Naive {
    entries: Vec<Entry>,
    stamp: u64,
    max: usize,
}

impl Naive {
    fn held(&self, ep: usize, hash: u64) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.ep == ep && e.engine_hash == hash)
    }
    fn store(&mut self, ep: usize, prefix: Vec<u32>, hash: u64, tier: usize) {
        self.stamp += 1;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.ep == ep && e.tokens == prefix && e.tier == tier)
        {
            e.stamp = self.stamp;
        } else {
            self.entries.push(Entry {
                ep,
                tokens: prefix,
                tier,
                engine_hash: hash,
                stamp: self.stamp,
            });
        }
        while self.entries.len() > self.max {
            let oldest = (0..self.entries.len())
                .min_by_key(|i| self.entries[*i].stamp)
                .unwrap();
            self.entries.remove(oldest);
        }
    }
    fn lookup(&self, tokens: &[u32]) -> BTreeMap<usize, (u32, [u32; MAX_TIERS])> {
        let mut out = BTreeMap::new();
        for ep in 0..3 {
            let mut n = 0u32;
            let mut tiers = [0u32; MAX_TIERS];
            for b in 1..=tokens.len() / BS {
                let prefix = &tokens[..b * BS];
                let hs: Vec<&Entry> = self
                    .entries
                    .iter()
                    .filter(|e| e.ep == ep && e.tokens == prefix)
                    .collect();
                if hs.is_empty() {
                    break;
                }
                n += 1;
                for e in hs {
                    tiers[e.tier] += 1;
                }
            }
            if n > 0 {
                out.insert(ep, (n, tiers));
            }
        }
        out
    }
}

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, tier: usize) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: BS as u32,
        lora_id: None,
        medium: Some(TIERS[tier].into()),
        lora_name: None,
        extra_keys: None,
        group_idx: 0,
        kv_cache_spec_kind: Some("full_attention".into()),
    })
}

fn one(ev: KvEvent) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events: vec![ev],
        data_parallel_rank: Some(0),
    }
}

fn run(ops: Vec<Op>, max: usize) {
    let hasher = BlockHasher::from_secret(b"model-test");
    let index = KvIndex::new(
        IndexConfig {
            max_tracked_blocks: max,
            ..Default::default()
        },
        hasher.clone(),
    );
    let names = ["a", "b", "c"];
    for n in names {
        index.add_endpoint(n, MODEL, BS as u32).unwrap();
    }
    let mut naive = Naive {
        max,
        ..Default::default()
    };
    // Known chains: full token sequences and their engine hashes per block.
    let mut chains: Vec<(Vec<u32>, Vec<u64>)> = Vec::new();
    for op in ops {
        match op {
            Op::Store {
                ep,
                chain,
                n,
                seed,
                tier,
            } => {
                let (mut toks, mut hashes) = match chain {
                    Some(c) if !chains.is_empty() => chains[c % chains.len()].clone(),
                    _ => (Vec::new(), Vec::new()),
                };
                let parent = hashes.last().copied();
                // The engine only stores a child if it holds the parent; mimic the
                // event the engine would send, and let the naive model treat an
                // unknown parent as an orphan too.
                let parent_known = parent.is_none_or(|p| naive.held(ep, p).is_some());
                let mut new_hashes = Vec::new();
                let mut new_tokens = Vec::new();
                for b in 0..n {
                    let block: Vec<u32> = (0..BS as u32)
                        .map(|i| (seed * 7 + i + b as u32) % 5)
                        .collect();
                    let h = engine_hash(hashes.last().copied().unwrap_or(0), &block);
                    toks.extend_from_slice(&block);
                    hashes.push(h);
                    new_hashes.push(h);
                    new_tokens.extend_from_slice(&block);
                    if parent_known {
                        naive.store(ep, toks.clone(), h, tier);
                    }
                }
                chains.push((toks, hashes));
                let ep_id = index.endpoint_id(names[ep]).unwrap();
                index
                    .apply_batch_at(ep_id, &one(stored(new_hashes, parent, new_tokens, tier)), 0)
                    .unwrap();
            }
            Op::Remove {
                ep,
                chain,
                depth,
                tier,
            } => {
                if chains.is_empty() {
                    continue;
                }
                let (toks, hashes) = &chains[chain % chains.len()];
                let d = depth % hashes.len();
                let h = hashes[d];
                let prefix = toks[..(d + 1) * BS].to_vec();
                naive
                    .entries
                    .retain(|e| !(e.ep == ep && e.tokens == prefix && e.tier == tier));
                let ep_id = index.endpoint_id(names[ep]).unwrap();
                index
                    .apply_batch_at(
                        ep_id,
                        &one(KvEvent::BlockRemoved(BlockRemoved {
                            block_hashes: vec![h],
                            medium: Some(TIERS[tier].into()),
                            group_idx: 0,
                        })),
                        0,
                    )
                    .unwrap();
            }
            Op::Clear { ep } => {
                naive.entries.retain(|e| e.ep != ep);
                let ep_id = index.endpoint_id(names[ep]).unwrap();
                index
                    .apply_batch_at(ep_id, &one(KvEvent::AllBlocksCleared), 0)
                    .unwrap();
            }
            Op::Drop { ep } => {
                naive.entries.retain(|e| e.ep != ep);
                index.remove_endpoint(names[ep]).unwrap();
                index.add_endpoint(names[ep], MODEL, BS as u32).unwrap();
            }
            Op::Lookup {
                chain,
                extra_blocks,
            } => {
                if chains.is_empty() {
                    continue;
                }
                let mut toks = chains[chain % chains.len()].0.clone();
                toks.extend((0..extra_blocks * BS).map(|i| i as u32 + 100));
                let keys = hasher
                    .request_keys(
                        &toks,
                        BS,
                        &RequestContext {
                            model: MODEL,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                let got: BTreeMap<usize, (u32, [u32; MAX_TIERS])> = index
                    .lookup(&keys)
                    .into_iter()
                    .map(|m| {
                        let name = index
                            .endpoints()
                            .into_iter()
                            .find(|e| e.id == m.endpoint)
                            .unwrap()
                            .name;
                        (
                            names.iter().position(|n| *n == name).unwrap(),
                            (m.matched_blocks, m.tier_blocks),
                        )
                    })
                    .collect();
                assert_eq!(got, naive.lookup(&toks), "lookup of {toks:?}");
            }
        }
        index.check_invariants().unwrap();
        let stats = index.stats();
        assert_eq!(stats.tracked_entries, naive.entries.len());
        assert!(stats.tracked_entries <= max);
    }
    // Final state: every endpoint's entries equal the model's.
    let dump = index.dump();
    for (i, n) in names.iter().enumerate() {
        let ep = dump.endpoints.iter().find(|e| e.name == *n).unwrap();
        let mut got: Vec<(u64, String)> =
            ep.entries.iter().map(|(_, h, t)| (*h, t.clone())).collect();
        let mut want: Vec<(u64, String)> = naive
            .entries
            .iter()
            .filter(|e| e.ep == i)
            .map(|e| (e.engine_hash, TIERS[e.tier].to_string()))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "endpoint {n}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("KVGATE_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn index_agrees_with_naive_model(ops in proptest::collection::vec(op(), 1..80), max in 4usize..40) {
        run(ops, max);
    }
}

#[test]
fn unbounded_model_run_without_evictions() {
    // A fixed long sequence with a large bound: exercises chains without eviction.
    let mut ops = Vec::new();
    for i in 0..200 {
        ops.push(Op::Store {
            ep: i % 3,
            chain: Some(i / 2),
            n: 1 + i % 3,
            seed: (i % 3) as u32,
            tier: i % 2,
        });
        ops.push(Op::Lookup {
            chain: i,
            extra_blocks: 1,
        });
        if i % 17 == 0 {
            ops.push(Op::Remove {
                ep: i % 3,
                chain: i / 3,
                depth: i % 4,
                tier: 0,
            });
        }
    }
    run(ops, 1_000_000);
    let _ = HashMap::<u8, u8>::new();
}
