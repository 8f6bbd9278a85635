#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The memory tier's admission: a scan of chunks stored once cannot flush
//! the chunks that are read, chunks never read still go oldest first, the
//! protected segment stays within its share, and the byte accounting holds
//! under any mix of operations.

use std::collections::HashMap;
use std::sync::Arc;

use kvgate_store::memory::{Chunk, MemoryTier, PROTECTED_SHARE};
use kvgate_store::{ChunkMeta, Owner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zeroize::Zeroizing;

const CHUNK: u64 = 1000;

fn chunk(owner: &Owner, size: usize, fill: u8) -> Arc<Chunk> {
    Arc::new(Chunk {
        owner: owner.clone(),
        meta: ChunkMeta::EMPTY,
        data: Zeroizing::new(vec![fill; size]),
    })
}

fn put(tier: &MemoryTier, key: &str) {
    assert!(tier
        .put(key.into(), chunk(&Owner::Shared, CHUNK as usize, 1), None)
        .is_ok());
}

#[test]
fn a_scan_does_not_flush_the_chunks_that_are_read() {
    let tier = MemoryTier::new(100 * CHUNK);
    let hot: Vec<String> = (0..40).map(|i| format!("hot-{i}")).collect();
    for k in &hot {
        put(&tier, k);
        assert!(tier.get(k).is_some());
    }
    // Ten times the tier of chunks stored once and never read.
    for i in 0..1000 {
        put(&tier, &format!("scan-{i}"));
    }
    for k in &hot {
        assert!(tier.contains(k), "{k} was flushed by the scan");
    }
    assert_eq!(tier.bytes(), 100 * CHUNK);
    // The newest of the scan are still there: probation keeps recency.
    assert!(tier.contains("scan-999") && !tier.contains("scan-0"));
}

#[test]
fn chunks_never_read_go_oldest_first() {
    let tier = MemoryTier::new(3 * CHUNK);
    for i in 0..6 {
        put(&tier, &format!("c{i}"));
    }
    let held: Vec<bool> = (0..6).map(|i| tier.contains(&format!("c{i}"))).collect();
    assert_eq!(held, [false, false, false, true, true, true]);
    assert_eq!(tier.stats.evictions.get(), 3);
}

#[test]
fn the_protected_segment_keeps_to_its_share() {
    let tier = MemoryTier::new(10 * CHUNK);
    for i in 0..10 {
        let k = format!("c{i}");
        put(&tier, &k);
        tier.get(&k).unwrap();
    }
    // Every chunk was read, but only 80% fit in protected: the two read
    // longest ago went back to probation and are the first to make room.
    assert_eq!((10.0 * PROTECTED_SHARE) as usize, 8);
    put(&tier, "new-0");
    put(&tier, "new-1");
    assert!(!tier.contains("c0") && !tier.contains("c1"));
    for i in 2..10 {
        assert!(tier.contains(&format!("c{i}")), "c{i}");
    }
    // Rewriting a protected chunk keeps it protected.
    assert!(tier
        .put("c5".into(), chunk(&Owner::Shared, CHUNK as usize, 9), None)
        .is_ok());
    for i in 0..3 {
        put(&tier, &format!("more-{i}"));
    }
    assert_eq!(tier.get("c5").unwrap().data[0], 9);
}

#[test]
fn bytes_and_owners_add_up_under_any_mix_of_operations() {
    let owners = [
        Owner::Shared,
        Owner::Contract("acme".into()),
        Owner::Contract("globex".into()),
    ];
    let max = 20 * CHUNK;
    let tier = MemoryTier::new(max);
    let mut rng = StdRng::seed_from_u64(11);
    for step in 0..20_000 {
        let key = format!("k{}", rng.random_range(0..60));
        match rng.random_range(0..10) {
            0..=4 => {
                let owner = &owners[rng.random_range(0..owners.len())];
                let size = rng.random_range(1..3 * CHUNK as usize);
                let quota = (rng.random_range(0..4) == 0).then_some(6 * CHUNK);
                let _ = tier.put(key, chunk(owner, size, 0), quota);
            }
            5..=7 => {
                tier.get(&key);
            }
            8 => {
                tier.contains(&key);
            }
            _ => {
                tier.shred(&owners[rng.random_range(0..owners.len())]);
            }
        }
        // The reference: what is held, read back through the tier.
        let mut bytes = 0;
        let mut by_owner: HashMap<&Owner, u64> = HashMap::new();
        let mut held = 0;
        for i in 0..60 {
            let k = format!("k{i}");
            if tier.contains(&k) {
                held += 1;
                let c = tier.get(&k).unwrap();
                bytes += c.data.len() as u64;
                *by_owner
                    .entry(&owners[owners.iter().position(|o| *o == c.owner).unwrap()])
                    .or_default() += c.data.len() as u64;
            }
        }
        assert_eq!(tier.len(), held, "step {step}");
        assert_eq!(tier.bytes(), bytes, "step {step}");
        assert!(bytes <= max, "step {step}: {bytes} over {max}");
        for o in &owners {
            assert_eq!(
                tier.owner_bytes(o),
                by_owner.get(o).copied().unwrap_or(0),
                "step {step}: {o:?}"
            );
        }
    }
}
