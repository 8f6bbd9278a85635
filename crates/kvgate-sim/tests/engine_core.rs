#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The engine core against vLLM's prefix-caching semantics, and the index fed
//! only by the core's events (through the wire codec) against the core's real
//! cache, step by step.

use std::collections::HashSet;

use kvgate_index::{IndexConfig, KvIndex};
use kvgate_keys::{BlockHasher, RequestContext};
use kvgate_sim::engine::{EngineConfig, EngineCore, LatencyModel, SimRequest, TokenEvent};
use kvgate_wire::vllm::{decode_batch, encode_batch, EventBatch, EventEncoding, KvEvent};
use proptest::prelude::*;

fn cfg(block_size: usize, num_blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        num_blocks,
        ..EngineConfig::default()
    }
}

fn req(tokens: Vec<u32>, max_tokens: u32) -> SimRequest {
    SimRequest {
        prompt_tokens: tokens,
        max_tokens,
        ..Default::default()
    }
}

/// Runs the core until idle; returns every request's token events in order.
fn run(core: &mut EngineCore) -> Vec<(u64, TokenEvent)> {
    let mut out = Vec::new();
    while let Some(step) = core.step() {
        for o in step.outputs {
            out.extend(o.events.into_iter().map(|e| (o.id, e)));
        }
    }
    out
}

fn first_token(events: &[(u64, TokenEvent)], id: u64) -> (usize, f64) {
    events
        .iter()
        .find_map(|(i, e)| match e {
            TokenEvent::FirstToken {
                cached_tokens,
                ttft_secs,
            } if *i == id => Some((*cached_tokens, *ttft_secs)),
            _ => None,
        })
        .expect("first token")
}

#[test]
fn only_full_blocks_hit_and_the_last_prompt_token_is_always_computed() {
    let mut core = EngineCore::new(cfg(16, 64));
    let prompt: Vec<u32> = (0..64).collect(); // exactly 4 blocks
    let a = core.add_request(req(prompt.clone(), 1), 1).unwrap();
    let ev = run(&mut core);
    assert_eq!(first_token(&ev, a).0, 0);
    // Same 64 tokens: only 3 blocks may hit (token 64 must be computed).
    let b = core.add_request(req(prompt.clone(), 1), 2).unwrap();
    let ev = run(&mut core);
    assert_eq!(first_token(&ev, b).0, 48);
    // 70 tokens sharing the 4 blocks: all 4 hit; the partial block never does.
    let mut longer = prompt.clone();
    longer.extend(1000..1006);
    let c = core.add_request(req(longer, 1), 3).unwrap();
    let ev = run(&mut core);
    assert_eq!(first_token(&ev, c).0, 64);
    let s = core.stats();
    assert_eq!(s.prefix_cache_queries, 64 + 64 + 70);
    assert_eq!(s.prefix_cache_hits, 48 + 64);
    core.check_invariants().unwrap();
}

#[test]
fn salt_isolates_and_generated_full_blocks_are_cached() {
    let mut core = EngineCore::new(cfg(16, 64));
    let prompt: Vec<u32> = (0..40).collect();
    let mut salted = req(prompt.clone(), 1);
    salted.cache_salt = Some("tenant-a".into());
    core.add_request(salted, 1).unwrap();
    run(&mut core);
    let b = core.add_request(req(prompt.clone(), 1), 2).unwrap();
    let ev = run(&mut core);
    assert_eq!(first_token(&ev, b).0, 0, "another salt never hits");
    // 40 prompt + 30 generated = 70 tokens: 4 full blocks, 2 of them only
    // complete once decoding filled them, and they are cached and published.
    let mut core = EngineCore::new(cfg(16, 64));
    core.add_request(req(prompt, 30), 1).unwrap();
    let mut stored = 0;
    while let Some(step) = core.step() {
        for e in &step.kv_events {
            if let KvEvent::BlockStored(s) = e {
                stored += s.block_hashes.len();
            }
        }
    }
    // The last sampled token is never computed: 69 tokens in cache -> 4 blocks.
    assert_eq!(stored, 4);
}

#[test]
fn lru_evicts_least_recently_freed_blocks_and_publishes_removals() {
    // 8 usable blocks of 16 tokens.
    let mut core = EngineCore::new(cfg(16, 9));
    let p1: Vec<u32> = (0..65).collect(); // 4 full blocks + 1 partial
    let p2: Vec<u32> = (1000..1065).collect();
    core.add_request(req(p1.clone(), 1), 1).unwrap();
    run(&mut core);
    core.add_request(req(p2.clone(), 1), 2).unwrap();
    run(&mut core);
    // Both fit (5 blocks each, freed): p1's 4 blocks partly evicted for p2.
    let mut removed = 0;
    core.add_request(req(p1.clone(), 1), 3).unwrap();
    let mut hit = None;
    while let Some(step) = core.step() {
        removed += step
            .kv_events
            .iter()
            .filter(|e| matches!(e, KvEvent::BlockRemoved(_)))
            .count();
        for o in step.outputs {
            for e in o.events {
                if let TokenEvent::FirstToken { cached_tokens, .. } = e {
                    hit = Some(cached_tokens);
                }
            }
        }
    }
    // p1 freed its 5 blocks tail first (the partial, unhashed block before its
    // 4th full block). p2 needed 5: the 3 never-used ones, p1's partial block,
    // then p1's 4th block (evicted). p1 still hits its first 3 blocks.
    assert_eq!(hit, Some(48));
    assert!(removed > 0);
    core.check_invariants().unwrap();
}

#[test]
fn long_prompts_are_chunked_by_the_token_budget_and_preemption_recovers() {
    let mut c = cfg(16, 40);
    c.max_num_batched_tokens = 100;
    let mut core = EngineCore::new(c);
    let a = core.add_request(req((0..250).collect(), 200), 1).unwrap();
    let b = core.add_request(req((500..750).collect(), 200), 2).unwrap();
    let mut steps = 0;
    let mut prefill_steps = 0;
    let mut done = HashSet::new();
    while let Some(step) = core.step() {
        steps += 1;
        assert!(step.prefill_tokens <= 100);
        if step.prefill_tokens > 0 {
            prefill_steps += 1;
        }
        for o in step.outputs {
            if o.finished {
                done.insert(o.id);
            }
        }
        core.check_invariants().unwrap();
        assert!(steps < 10_000, "no progress");
    }
    assert_eq!(done, HashSet::from([a, b]));
    assert!(prefill_steps >= 5, "250+250 tokens at 100 per step");
    // 2 x (250 + 200) tokens need 58 blocks > 39: someone was preempted.
    assert!(core.stats().preemptions > 0);
}

#[test]
fn latency_model_gives_llmd_anchor_shape() {
    // A ~10k-token prompt cold vs fully cached (llm-d: 4.3 s vs 0.6 s, ~7x).
    let mut core = EngineCore::new(cfg(16, 4096));
    let prompt: Vec<u32> = (0..10_000).collect();
    let a = core.add_request(req(prompt.clone(), 1), 1).unwrap();
    let ev = run(&mut core);
    let cold = first_token(&ev, a).1;
    let b = core.add_request(req(prompt, 1), 2).unwrap();
    let ev = run(&mut core);
    let (cached, warm) = first_token(&ev, b);
    assert_eq!(cached, 9984);
    let ratio = cold / warm;
    assert!(
        (5.0..10.0).contains(&ratio),
        "cold {cold} warm {warm} ratio {ratio}"
    );
    // Queueing shows in TTFT: the second of two simultaneous cold prompts
    // waits for the first's prefill chunks.
    let mut core = EngineCore::new(cfg(16, 4096));
    let x = core.add_request(req((0..8000).collect(), 1), 1).unwrap();
    let y = core
        .add_request(req((10_000..18_000).collect(), 1), 2)
        .unwrap();
    let ev = run(&mut core);
    assert!(first_token(&ev, y).1 > first_token(&ev, x).1 * 1.5);
    let m = LatencyModel::default();
    assert!(m.step_secs(0, 1) < m.step_secs(1, 0));
}

#[test]
fn too_long_prompts_are_refused_not_stuck() {
    let mut core = EngineCore::new(cfg(16, 5));
    assert!(core.add_request(req((0..100).collect(), 1), 1).is_err());
    assert!(core.is_idle());
}

/// Index entries for the endpoint, as engine hashes.
fn index_hashes(index: &KvIndex) -> HashSet<u64> {
    index
        .dump()
        .endpoints
        .iter()
        .flat_map(|e| e.entries.iter().map(|(_, h, _)| *h))
        .collect()
}

#[derive(Debug, Clone)]
struct Plan {
    block_size: usize,
    num_blocks: usize,
    budget: usize,
    /// (prefix id, suffix len, max_tokens, salted, steps to run before the next)
    requests: Vec<(usize, usize, u32, bool, usize)>,
}

fn plans() -> impl Strategy<Value = Plan> {
    (
        prop_oneof![Just(16usize), Just(32), Just(64)],
        12usize..80,
        prop_oneof![Just(64usize), Just(256), Just(8192)],
        prop::collection::vec(
            (0usize..5, 0usize..90, 1u32..40, any::<bool>(), 0usize..4),
            1..40,
        ),
    )
        .prop_map(|(block_size, num_blocks, budget, requests)| Plan {
            block_size,
            num_blocks,
            budget,
            requests,
        })
}

const MODEL: &str = "sim-model";

fn check_plan(plan: &Plan) -> Result<(), TestCaseError> {
    let bs = plan.block_size;
    let mut core = EngineCore::new(EngineConfig {
        block_size: bs,
        num_blocks: plan.num_blocks,
        max_num_batched_tokens: plan.budget,
        ..EngineConfig::default()
    });
    let hasher = BlockHasher::from_secret(b"sim-vs-index");
    let index = KvIndex::new(IndexConfig::default(), hasher.clone());
    let ep = index.add_endpoint("sim-0", MODEL, bs as u32).unwrap();
    let prefixes: Vec<Vec<u32>> = (0..5u32)
        .map(|p| {
            (0..(bs as u32 * (1 + p % 3)))
                .map(|t| p * 10_000 + t)
                .collect()
        })
        .collect();
    let apply = |index: &KvIndex, events: Vec<KvEvent>| -> Result<(), TestCaseError> {
        if events.is_empty() {
            return Ok(());
        }
        // Through the wire, as a subscriber would see them.
        let bytes = encode_batch(
            &EventBatch {
                ts: 0.0,
                events,
                data_parallel_rank: None,
            },
            EventEncoding::Map,
        );
        let batch = decode_batch(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let stats = index.apply_batch_at(ep, &batch, 0).unwrap();
        prop_assert_eq!(stats.rejected_events, 0);
        prop_assert_eq!(stats.orphan_blocks, 0);
        Ok(())
    };
    for (i, &(prefix, suffix, max_tokens, salted, steps)) in plan.requests.iter().enumerate() {
        let seq = i as u32 + 1;
        let mut tokens = prefixes[prefix].clone();
        tokens.extend((0..suffix as u32).map(|t| 50_000 + seq * 100 + t));
        let salt = salted.then(|| format!("salt-{}", prefix % 2));
        // Before admission, the index predicts exactly the blocks the engine
        // would find cached for this prompt.
        let keys = hasher
            .request_keys(
                &tokens,
                bs,
                &RequestContext {
                    model: MODEL,
                    lora_name: None,
                    cache_salt: salt.as_deref(),
                    mm_items: &[],
                },
            )
            .unwrap();
        let predicted = index
            .lookup(&keys)
            .iter()
            .find(|m| m.endpoint == ep)
            .map_or(0, |m| m.matched_blocks as usize);
        let mut parent = None;
        let engine_hashes: Vec<u64> = tokens
            .chunks_exact(bs)
            .enumerate()
            .map(|(j, c)| {
                let h = kvgate_sim::cache::block_hash(
                    parent,
                    c,
                    if j == 0 { salt.as_deref() } else { None },
                );
                parent = Some(h);
                h
            })
            .collect();
        let actual = core.pool().longest_hit(&engine_hashes).len();
        prop_assert_eq!(predicted, actual, "request {}: index vs engine prefix", i);

        let r = SimRequest {
            prompt_tokens: tokens,
            max_tokens,
            cache_salt: salt,
            lora_name: None,
        };
        if core.add_request(r, i as u64).is_err() {
            continue; // longer than the whole cache: refused up front
        }
        for _ in 0..steps {
            let Some(step) = core.step() else { break };
            apply(&index, step.kv_events)?;
            core.check_invariants().map_err(TestCaseError::fail)?;
            let sim: HashSet<u64> = core.pool().cached_hashes().collect();
            prop_assert_eq!(&index_hashes(&index), &sim);
        }
    }
    let mut guard = 0;
    while let Some(step) = core.step() {
        apply(&index, step.kv_events)?;
        let sim: HashSet<u64> = core.pool().cached_hashes().collect();
        prop_assert_eq!(&index_hashes(&index), &sim);
        guard += 1;
        prop_assert!(guard < 100_000, "engine made no progress");
    }
    // A reset clears both.
    prop_assert!(core.reset_prefix_cache());
    apply(&index, core.take_events())?;
    prop_assert!(index_hashes(&index).is_empty());
    Ok(())
}

fn cases() -> u32 {
    std::env::var("KVGATE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]
    #[test]
    fn index_fed_by_sim_events_equals_sim_cache_at_every_step(plan in plans()) {
        check_plan(&plan)?;
    }
}
