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

    // The same chain under keyed BLAKE3, the alternative weighed in lib.rs.
    let mut g = c.benchmark_group("blake3_keyed_chain_8k_tokens");
    g.throughput(Throughput::Elements(tokens.len() as u64));
    let key = [7u8; 32];
    for bs in [16usize, 32, 64] {
        g.bench_with_input(BenchmarkId::from_parameter(bs), &bs, |b, &bs| {
            b.iter(|| {
                let mut parent = 0u64;
                let mut keys = Vec::with_capacity(tokens.len() / bs);
                let mut buf = vec![0u8; bs * 4];
                for block in tokens.chunks_exact(bs) {
                    let mut h = blake3::Hasher::new_keyed(&key);
                    h.update(&parent.to_le_bytes());
                    for (d, t) in buf.chunks_exact_mut(4).zip(block) {
                        d.copy_from_slice(&t.to_le_bytes());
                    }
                    h.update(&buf);
                    let mut out = [0u8; 8];
                    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
                    parent = u64::from_le_bytes(out);
                    keys.push(parent);
                }
                keys
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_keys);
criterion_main!(benches);
