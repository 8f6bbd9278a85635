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

use std::sync::Arc;

use kvgate_fleet::{Ejection, EndpointConfig, Fleet, IndexOnly, RouteQuery};
use kvgate_index::{IndexConfig, KvIndex};
use kvgate_keys::BlockHasher;
use kvgate_router::{Policy, RouterConfig};
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
    fleet: Fleet,
}

/// Tokenizes as the gateway does, then the fleet's routing transaction (the
/// load guard drops at once: the request is not sent).
fn route(s: &Setup, messages: &[Value]) -> usize {
    let tokens = s
        .tok
        .chat_tokens(&ChatInput {
            messages,
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap();
    let input = s
        .fleet
        .routing_input(&RouteQuery {
            model: "m",
            tokens: &tokens,
            ..Default::default()
        })
        .unwrap();
    s.fleet.route(&input).unwrap().decision.chosen + tokens.len()
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
    (p(0.5), p(0.9), p(0.99))
}

fn main() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    let index = Arc::new(KvIndex::new(
        IndexConfig::default(),
        BlockHasher::from_secret(b"bench"),
    ));
    let fleet = Fleet::new(
        RouterConfig {
            policy: Policy::PrecisePrefix,
            ..Default::default()
        },
        Ejection::default(),
        index.clone(),
        Box::new(IndexOnly(index)),
    );
    let ids: Vec<u16> = (0..ENDPOINTS)
        .map(|i| {
            fleet
                .join(EndpointConfig::new(format!("http://e{i}"), "m", BS))
                .index_id
                .unwrap()
        })
        .collect();
    let setup = Setup { tok, fleet };
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
    let ev = KvEvent::BlockStored(BlockStored::on_gpu(
        (0..(full / BS as usize) as u64).collect(),
        None,
        sample_tokens[..full].to_vec(),
        BS,
    ));
    setup
        .fleet
        .index()
        .apply_batch(
            ids[3],
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
