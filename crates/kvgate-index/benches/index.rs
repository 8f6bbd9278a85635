#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Index throughput and lookup latency.
//!
//! - ingest: BlockStored/BlockRemoved events applied per second (one core);
//! - lookup: an 8k-token prompt's precomputed keys against a full index
//!   (~1M entries), block sizes 16/32, 8 and 64 endpoints, the prompt's prefix
//!   cached on a few endpoints at different depths;
//! - memory: printed once, bytes per tracked (block, endpoint) entry.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvgate_index::{IndexConfig, KvIndex};
use kvgate_keys::{BlockHasher, RequestContext};
use kvgate_wire::vllm::{BlockRemoved, BlockStored, EventBatch, KvEvent};

const MODEL: &str = "bench-model";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> KvEvent {
    KvEvent::BlockStored(BlockStored::on_gpu(hashes, parent, tokens, bs))
}

fn batch(events: Vec<KvEvent>) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: None,
    }
}

/// Fills every endpoint with random 16-block chains up to ~`target` entries.
fn fill_background(index: &KvIndex, eps: &[u16], bs: u32, target: usize, rng: &mut Rng) {
    let per_ep = target / eps.len();
    for &ep in eps {
        let mut n = 0;
        while n < per_ep {
            let blocks = 16usize;
            let tokens: Vec<u32> = (0..blocks * bs as usize)
                .map(|_| (rng.next() % 150_000) as u32)
                .collect();
            let hashes: Vec<u64> = (0..blocks).map(|_| rng.next()).collect();
            index
                .apply_batch_at(ep, &batch(vec![stored(hashes, None, tokens, bs)]), 0)
                .unwrap();
            n += blocks;
        }
    }
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_8k_tokens");
    for &bs in &[16u32, 32] {
        for &n_eps in &[8usize, 64] {
            let index = KvIndex::new(
                IndexConfig {
                    max_tracked_blocks: 1 << 21,
                    ..Default::default()
                },
                BlockHasher::from_secret(b"bench"),
            );
            let eps: Vec<u16> = (0..n_eps)
                .map(|i| index.add_endpoint(&format!("ep{i}"), MODEL, bs).unwrap())
                .collect();
            let mut rng = Rng(0x9e3779b97f4a7c15);
            fill_background(&index, &eps, bs, 1 << 20, &mut rng);
            // The prompt: 8192 tokens; cached fully on ep0, 3/4 on ep1, 1/2 on ep2.
            let prompt: Vec<u32> = (0..8192).map(|_| (rng.next() % 150_000) as u32).collect();
            let nblocks = prompt.len() / bs as usize;
            for (ep, frac) in [(0usize, 4usize), (1, 3), (2, 2)] {
                let upto = nblocks * frac / 4;
                let hashes: Vec<u64> = (0..upto).map(|_| rng.next()).collect();
                let tokens = prompt[..upto * bs as usize].to_vec();
                index
                    .apply_batch_at(eps[ep], &batch(vec![stored(hashes, None, tokens, bs)]), 0)
                    .unwrap();
            }
            let ctx = RequestContext {
                model: MODEL,
                ..Default::default()
            };
            let keys = index
                .hasher()
                .request_keys(&prompt, bs as usize, &ctx)
                .unwrap();
            let m = index.lookup(&keys);
            assert_eq!(
                m.iter().map(|m| m.matched_blocks).max(),
                Some(nblocks as u32)
            );
            if n_eps == 8 {
                let s = index.stats();
                eprintln!(
                    "memory: block_size={bs} entries={} distinct_blocks={} approx_heap_bytes={} bytes_per_entry={:.1}",
                    s.tracked_entries,
                    s.distinct_blocks,
                    s.approx_heap_bytes,
                    s.approx_heap_bytes as f64 / s.tracked_entries as f64
                );
            }
            g.bench_with_input(
                BenchmarkId::new(format!("bs{bs}"), format!("{n_eps}eps")),
                &keys,
                |b, keys| b.iter(|| index.lookup(keys)),
            );
        }
    }
    g.finish();
}

fn bench_ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest");
    let bs = 16u32;
    let blocks_per_event = 4usize;
    let events_per_batch = 64usize;
    let index = KvIndex::new(
        IndexConfig {
            max_tracked_blocks: 1 << 20,
            ..Default::default()
        },
        BlockHasher::from_secret(b"bench"),
    );
    let ep = index.add_endpoint("ep0", MODEL, bs).unwrap();
    let mut rng = Rng(42);
    // Pre-built batches: each stores 64 events x 4 blocks, then removes them.
    let batches: Vec<(EventBatch, EventBatch)> = (0..64)
        .map(|_| {
            let mut stores = Vec::new();
            let mut removes = Vec::new();
            for _ in 0..events_per_batch {
                let hashes: Vec<u64> = (0..blocks_per_event).map(|_| rng.next()).collect();
                let tokens: Vec<u32> = (0..blocks_per_event * bs as usize)
                    .map(|_| (rng.next() % 150_000) as u32)
                    .collect();
                removes.push(KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: hashes.clone(),
                    medium: Some("GPU".into()),
                    group_idx: 0,
                }));
                stores.push(stored(hashes, None, tokens, bs));
            }
            (batch(stores), batch(removes))
        })
        .collect();
    g.throughput(Throughput::Elements((events_per_batch * 2) as u64));
    let mut i = 0;
    g.bench_function("store_then_remove_events_4_blocks_bs16", |b| {
        b.iter(|| {
            let (s, r) = &batches[i % batches.len()];
            i += 1;
            index.apply_batch_at(ep, s, 0).unwrap();
            index.apply_batch_at(ep, r, 0).unwrap();
        })
    });
    g.finish();

    // Index ops without key hashing: removals and re-stores of known blocks.
    let mut g = c.benchmark_group("index_ops");
    let (s, r) = &batches[0];
    g.throughput(Throughput::Elements(
        (events_per_batch * blocks_per_event) as u64,
    ));
    // Timed: only the removals; each is preceded by an untimed re-store so
    // every removal hits a held block.
    g.bench_function("remove_blocks", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                index.apply_batch_at(ep, s, 0).unwrap();
                let t = std::time::Instant::now();
                let st = index.apply_batch_at(ep, r, 0).unwrap();
                total += t.elapsed();
                assert_eq!(st.removed_blocks, events_per_batch * blocks_per_event);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench_lookup, bench_ingest);
criterion_main!(benches);
