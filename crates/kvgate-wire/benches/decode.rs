//! Decode throughput, in events per second: the real vLLM 0.32 BlockStored
//! payload (one event) and a synthetic 64-event batch shaped like a busy
//! engine step (block size 16, 4 blocks per event).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kvgate_wire::vllm::{
    decode_batch, encode_batch, BlockStored, EventBatch, EventEncoding, KvEvent,
};

const REAL_032: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm/real-vllm-0.32-events.txt"
));

fn real_block_stored() -> Vec<u8> {
    let line = REAL_032
        .lines()
        .find(|l| l.starts_with("BlockStored "))
        .unwrap();
    hex::decode(line.split_whitespace().nth(2).unwrap()).unwrap()
}

fn synthetic_batch(events: usize) -> Vec<u8> {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        h ^= h << 13;
        h ^= h >> 7;
        h ^= h << 17;
        h
    };
    let events = (0..events)
        .map(|_| {
            KvEvent::BlockStored(BlockStored {
                block_hashes: (0..4).map(|_| next()).collect(),
                parent_block_hash: Some(next()),
                token_ids: (0..64).map(|_| (next() % 152_000) as u32).collect(),
                block_size: 16,
                lora_id: None,
                medium: Some("GPU".to_owned()),
                lora_name: None,
                extra_keys: Some(vec![None; 4]),
                group_idx: 0,
                kv_cache_spec_kind: Some("full_attention".to_owned()),
            })
        })
        .collect();
    let batch = EventBatch {
        ts: 1_789_095_808.837_884_7,
        events,
        data_parallel_rank: Some(0),
    };
    encode_batch(&batch, EventEncoding::Map)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    let real = real_block_stored();
    g.throughput(Throughput::Elements(1));
    g.bench_function("real_0_32_block_stored", |b| {
        b.iter(|| decode_batch(black_box(&real)).unwrap())
    });
    let synth = synthetic_batch(64);
    g.throughput(Throughput::Elements(64));
    g.bench_function("synthetic_64_block_stored", |b| {
        b.iter(|| decode_batch(black_box(&synth)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
