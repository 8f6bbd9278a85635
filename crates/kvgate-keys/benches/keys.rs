#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Cost of computing block keys for an 8k-token prompt.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvgate_keys::{BlockHasher, RequestContext};

fn bench_keys(c: &mut Criterion) {
    let hasher = BlockHasher::from_secret(b"bench");
    let tokens: Vec<u32> = (0..8192u32)
        .map(|i| i.wrapping_mul(2654435761) % 151_000)
        .collect();
    let ctx = RequestContext {
        model: "bench-model",
        ..Default::default()
    };
    let mut g = c.benchmark_group("request_keys_8k_tokens");
    g.throughput(Throughput::Elements(tokens.len() as u64));
    for bs in [16usize, 32, 64] {
        g.bench_with_input(BenchmarkId::from_parameter(bs), &bs, |b, &bs| {
            b.iter(|| hasher.request_keys(&tokens, bs, &ctx).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_keys);
criterion_main!(benches);
