#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Routing decision time for an ~8k-token multi-turn chat: chat template +
//! tokenize + block keys + index lookup + scoring, as the gateway does per request.
//!
//! cold: every request is a new conversation (nothing cached by the tokenizer);
//! warm: the same conversation grows by one turn per request (multi-turn chats
//! resend their history, so only the new turn is new).
//!
//! `cargo bench -p kvgate-gateway --bench routing` prints p50/p90/p99.

use std::time::Instant;

use kvgate_index::{IndexConfig, KvIndex};
use kvgate_keys::{BlockHasher, RequestContext};
use kvgate_router::{Candidate, LoadSnapshot, Policy, RouteRequest, RouterConfig, Scheduler};
use kvgate_tokenize::{ChatInput, ModelTokenizer};
use kvgate_wire::vllm::{BlockStored, EventBatch, KvEvent};
use serde_json::{json, Value};

const BS: u32 = 16;
const ENDPOINTS: usize = 8;

fn conversation(seed: usize, turns: usize) -> Vec<Value> {
    let mut m = vec![
        json!({"role": "system", "content": format!("Session {seed}. You are a meticulous assistant for a logistics company. ").repeat(30)}),
    ];
    for t in 0..turns {
        m.push(json!({"role": "user", "content": format!("Turn {t} of {seed}: please review shipment manifest {t} and list anomalies in the weights, routes and customs codes. ").repeat(8)}));
        m.push(json!({"role": "assistant", "content": format!("Reviewed manifest {t}: three anomalies found in the customs codes and one in the declared weight. ").repeat(6)}));
    }
    m
}

struct Setup {
    tok: ModelTokenizer,
    index: KvIndex,
    sched: Scheduler,
    ids: Vec<u16>,
}

fn route(s: &Setup, messages: &[Value]) -> usize {
    let tokens = s
        .tok
        .chat_tokens(&ChatInput {
            messages,
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap();
    let ctx = RequestContext {
        model: "m",
        ..Default::default()
    };
    let keys = vec![(
        BS,
        s.index
            .hasher()
            .request_keys(&tokens, BS as usize, &ctx)
            .unwrap(),
    )];
    let names: Vec<String> = (0..ENDPOINTS).map(|i| format!("e{i}")).collect();
    let cands: Vec<Candidate<'_>> = names
        .iter()
        .zip(&s.ids)
        .map(|(n, id)| Candidate {
            name: n,
            healthy: true,
            serves: true,
            block_size: BS,
            index_id: Some(*id),
            load: LoadSnapshot::default(),
        })
        .collect();
    let req = RouteRequest {
        model: "m",
        prompt_tokens: tokens.len(),
        keys: &keys,
        session_id: None,
    };
    s.sched
        .schedule(&req, &cands, Some(&s.index))
        .unwrap()
        .chosen
        + tokens.len()
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
    (p(0.5), p(0.9), p(0.99))
}

fn main() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    let index = KvIndex::new(IndexConfig::default(), BlockHasher::from_secret(b"bench"));
    let ids: Vec<u16> = (0..ENDPOINTS)
        .map(|i| index.add_endpoint(&format!("e{i}"), "m", BS).unwrap())
        .collect();
    let sched = Scheduler::new(RouterConfig {
        policy: Policy::PrecisePrefix,
        ..Default::default()
    });
    let setup = Setup {
        tok,
        index,
        sched,
        ids,
    };
    let turns = 23;
    let sample = conversation(0, turns);
    let n_tokens = setup
        .tok
        .chat_tokens(&ChatInput {
            messages: &sample,
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap()
        .len();
    // Cache the warm conversation's prefix on one endpoint, as an engine would.
    let sample_tokens = setup
        .tok
        .chat_tokens(&ChatInput {
            messages: &sample,
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap();
    let full = sample_tokens.len() / BS as usize * BS as usize;
    let ev = KvEvent::BlockStored(BlockStored {
        block_hashes: (0..(full / BS as usize) as u64).collect(),
        parent_block_hash: None,
        token_ids: sample_tokens[..full].to_vec(),
        block_size: BS,
        lora_id: None,
        medium: None,
        lora_name: None,
        extra_keys: None,
        group_idx: 0,
        kv_cache_spec_kind: None,
    });
    setup
        .index
        .apply_batch(
            setup.ids[3],
            &EventBatch {
                ts: 0.0,
                events: vec![ev],
                data_parallel_rank: None,
            },
        )
        .unwrap();

    let iters = 300;
    let mut cold = Vec::with_capacity(iters);
    for i in 0..iters {
        let conv = conversation(10_000 + i, turns);
        let t = Instant::now();
        std::hint::black_box(route(&setup, &conv));
        cold.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut warm = Vec::with_capacity(iters);
    let mut conv = conversation(0, turns);
    route(&setup, &conv);
    for i in 0..iters {
        conv.push(json!({"role": "user", "content": format!("Follow-up {i}: and the next one?")}));
        let t = Instant::now();
        std::hint::black_box(route(&setup, &conv));
        warm.push(t.elapsed().as_secs_f64() * 1e6);
        conv.pop();
    }
    let (c50, c90, c99) = percentiles(cold);
    let (w50, w90, w99) = percentiles(warm);
    println!(
        "routing decision, {n_tokens}-token {}-message chat, block {BS}, {ENDPOINTS} endpoints:",
        sample.len()
    );
    println!("  cold (new conversation): p50 {c50:.0} us  p90 {c90:.0} us  p99 {c99:.0} us");
    println!("  warm (history cached):   p50 {w50:.0} us  p90 {w90:.0} us  p99 {w99:.0} us");
}
