#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Index behaviour beyond the reference model: TTL, staleness, dumps, salts,
//! block sizes, and the real events' extra keys.

use kvgate_index::{IndexConfig, KvIndex, RestoreError};
use kvgate_keys::{BlockHasher, RequestContext};
use kvgate_wire::vllm::{BlockStored, EventBatch, ExtraKey, KvEvent};

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> BlockStored {
    BlockStored::on_gpu(hashes, parent, tokens, bs)
}

fn batch(events: Vec<KvEvent>) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: None,
    }
}

fn ctx(model: &str) -> RequestContext<'_> {
    RequestContext {
        model,
        ..Default::default()
    }
}

fn new_index(cfg: IndexConfig) -> KvIndex {
    KvIndex::new(cfg, BlockHasher::from_secret(b"t"))
}

#[test]
fn block_sizes_16_32_64_match_requests_split_across_events() {
    for bs in [16u32, 32, 64] {
        let index = new_index(IndexConfig::default());
        let ep = index.add_endpoint("e", "m", bs).unwrap();
        let tokens: Vec<u32> = (0..bs * 5 + 7).collect();
        let b = bs as usize;
        // Two events: blocks 0..3, then 3..5 chained by the parent's engine hash.
        let first = stored(vec![10, 11, 12], None, tokens[..3 * b].to_vec(), bs);
        let second = stored(vec![13, 14], Some(12), tokens[3 * b..5 * b].to_vec(), bs);
        let s = index
            .apply_batch(
                ep,
                &batch(vec![
                    KvEvent::BlockStored(first),
                    KvEvent::BlockStored(second),
                ]),
            )
            .unwrap();
        assert_eq!(s.stored_blocks, 5);
        let loc = index.locality(&tokens, &ctx("m")).unwrap();
        assert_eq!(loc.endpoints.len(), 1);
        assert_eq!(loc.endpoints[0].matched_blocks, 5);
        assert_eq!(loc.endpoints[0].matched_tokens, 5 * b);
        // Another model with the same tokens matches nothing.
        assert!(index
            .locality(&tokens, &ctx("other"))
            .unwrap()
            .endpoints
            .is_empty());
    }
}

#[test]
fn endpoints_with_different_block_sizes_are_each_matched_with_their_own_keys() {
    let index = new_index(IndexConfig::default());
    let a = index.add_endpoint("a16", "m", 16).unwrap();
    let b = index.add_endpoint("b32", "m", 32).unwrap();
    let tokens: Vec<u32> = (0..64).collect();
    index
        .apply_batch(
            a,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![1, 2, 3, 4],
                None,
                tokens.clone(),
                16,
            ))]),
        )
        .unwrap();
    index
        .apply_batch(
            b,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![1],
                None,
                tokens[..32].to_vec(),
                32,
            ))]),
        )
        .unwrap();
    let loc = index.locality(&tokens, &ctx("m")).unwrap();
    let get = |n: &str| {
        loc.endpoints
            .iter()
            .find(|e| e.endpoint == n)
            .unwrap()
            .matched_tokens
    };
    assert_eq!(get("a16"), 64);
    assert_eq!(get("b32"), 32);
}

#[test]
fn salt_separates_prefixes() {
    let index = new_index(IndexConfig::default());
    let ep = index.add_endpoint("e", "m", 4).unwrap();
    let tokens: Vec<u32> = (0..8).collect();
    let mut ev = stored(vec![1, 2], None, tokens.clone(), 4);
    ev.extra_keys = Some(vec![Some(vec![ExtraKey::Str("tenant-a".into())]), None]);
    index
        .apply_batch(ep, &batch(vec![KvEvent::BlockStored(ev)]))
        .unwrap();
    let same = RequestContext {
        model: "m",
        cache_salt: Some("tenant-a"),
        ..Default::default()
    };
    let other = RequestContext {
        model: "m",
        cache_salt: Some("tenant-b"),
        ..Default::default()
    };
    assert_eq!(
        index.locality(&tokens, &same).unwrap().endpoints[0].matched_blocks,
        2
    );
    assert_eq!(
        index.locality(&tokens, &other).unwrap().endpoints[0].matched_blocks,
        0
    );
    assert_eq!(
        index.locality(&tokens, &ctx("m")).unwrap().endpoints[0].matched_blocks,
        0
    );
}

#[test]
fn orphans_mismatched_sizes_and_other_groups_are_counted_not_indexed() {
    let index = new_index(IndexConfig::default());
    let ep = index.add_endpoint("e", "m", 4).unwrap();
    let orphan = stored(vec![5], Some(999), vec![1, 2, 3, 4], 4);
    let wrong_size = stored(vec![6], None, vec![1, 2, 3, 4, 5, 6, 7, 8], 8);
    let mut swa = stored(vec![7], None, vec![1, 2, 3, 4], 4);
    swa.kv_cache_spec_kind = Some("sliding_window".into());
    let bad_len = stored(vec![8, 9], None, vec![1, 2, 3], 4);
    let s = index
        .apply_batch(
            ep,
            &batch(vec![
                KvEvent::BlockStored(orphan),
                KvEvent::BlockStored(wrong_size),
                KvEvent::BlockStored(swa),
                KvEvent::BlockStored(bad_len),
            ]),
        )
        .unwrap();
    assert_eq!(s.orphan_blocks, 1);
    assert_eq!(s.ignored_events, 1);
    assert_eq!(s.rejected_events, 2);
    assert_eq!(index.stats().tracked_entries, 0);
    assert!(index
        .apply_batch(77, &batch(vec![KvEvent::AllBlocksCleared]))
        .is_err());
}

#[test]
fn ttl_expires_old_entries_only() {
    let index = new_index(IndexConfig {
        ttl_secs: Some(10),
        ..Default::default()
    });
    let ep = index.add_endpoint("e", "m", 4).unwrap();
    index
        .apply_batch_at(
            ep,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![1],
                None,
                vec![1, 1, 1, 1],
                4,
            ))]),
            0,
        )
        .unwrap();
    index
        .apply_batch_at(
            ep,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![2],
                None,
                vec![2, 2, 2, 2],
                4,
            ))]),
            8,
        )
        .unwrap();
    assert_eq!(index.expire_at(9), 0);
    assert_eq!(index.expire_at(10), 1);
    assert_eq!(index.stats().tracked_entries, 1);
    assert_eq!(
        index.locality(&[2, 2, 2, 2], &ctx("m")).unwrap().endpoints[0].matched_blocks,
        1
    );
    assert_eq!(index.expire_at(18), 1);
    assert_eq!(index.stats().tracked_entries, 0);
}

#[test]
fn stale_endpoint_keeps_chaining_then_drops_pre_gap_entries() {
    let index = new_index(IndexConfig {
        stale_grace_secs: 0,
        ..Default::default()
    });
    let ep = index.add_endpoint("e", "m", 4).unwrap();
    let other = index.add_endpoint("o", "m", 4).unwrap();
    let tokens: Vec<u32> = (0..8).collect();
    index
        .apply_batch(
            ep,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![1],
                None,
                tokens[..4].to_vec(),
                4,
            ))]),
        )
        .unwrap();
    index
        .apply_batch(
            other,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![1],
                None,
                tokens[..4].to_vec(),
                4,
            ))]),
        )
        .unwrap();
    index.mark_stale(ep);
    assert!(index.endpoints().iter().any(|e| e.name == "e" && e.stale));
    // A post-gap child still resolves its pre-gap parent.
    let s = index
        .apply_batch(
            ep,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![2],
                Some(1),
                tokens[4..].to_vec(),
                4,
            ))]),
        )
        .unwrap();
    assert_eq!(s.stored_blocks, 1);
    assert_eq!(
        index.expire(),
        1,
        "only the pre-gap entry of the stale endpoint goes"
    );
    assert!(!index.endpoints().iter().any(|e| e.stale));
    let loc = index.locality(&tokens, &ctx("m")).unwrap();
    assert_eq!(
        loc.endpoints
            .iter()
            .find(|e| e.endpoint == "o")
            .unwrap()
            .matched_blocks,
        1
    );
    assert_eq!(index.stats().tracked_entries, 2);
}

#[test]
fn dump_restores_into_a_replica_with_the_same_secret_only() {
    let index = new_index(IndexConfig::default());
    let ep = index.add_endpoint("e", "m", 4).unwrap();
    index
        .apply_batch(
            ep,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![1, 2],
                None,
                (0..8).collect(),
                4,
            ))]),
        )
        .unwrap();
    index.set_last_seq(ep, 41);
    let dump = index.dump();
    let json = serde_json_roundtrip(&dump);
    let replica = new_index(IndexConfig::default());
    assert_eq!(replica.restore(&json).unwrap(), 2);
    assert_eq!(replica.dump(), dump);
    assert_eq!(replica.endpoints()[0].last_seq, Some(41));
    let stranger = KvIndex::new(IndexConfig::default(), BlockHasher::from_secret(b"other"));
    assert!(matches!(
        stranger.restore(&dump),
        Err(RestoreError::KeyMismatch)
    ));
}

fn serde_json_roundtrip(d: &kvgate_index::IndexDump) -> kvgate_index::IndexDump {
    // Through the same JSON the HTTP dump endpoint serves.
    let s = serde_json::to_string(d).unwrap();
    serde_json::from_str(&s).unwrap()
}

#[test]
fn remove_endpoint_purges_and_frees_its_id() {
    let index = new_index(IndexConfig::default());
    let a = index.add_endpoint("a", "m", 4).unwrap();
    index
        .apply_batch(
            a,
            &batch(vec![KvEvent::BlockStored(stored(
                vec![1],
                None,
                vec![0; 4],
                4,
            ))]),
        )
        .unwrap();
    assert_eq!(index.remove_endpoint("a"), Some(1));
    assert_eq!(index.stats().tracked_entries, 0);
    assert_eq!(index.remove_endpoint("a"), None);
    assert_eq!(index.add_endpoint("b", "m", 4).unwrap(), a);
    assert!(index.add_endpoint("b", "m", 8).is_err());
    assert!(index.add_endpoint("z", "m", 0).is_err());
}

#[test]
fn dropped_keys_leave_every_endpoint_and_later_removals_are_no_ops() {
    use kvgate_wire::vllm::BlockRemoved;
    let index = new_index(IndexConfig::default());
    let tokens: Vec<u32> = (0..8).collect();
    let salted = RequestContext {
        model: "m",
        cache_salt: Some("contract-a"),
        ..Default::default()
    };
    let mut ids = Vec::new();
    for (name, base) in [("e1", 10u64), ("e2", 20)] {
        let ep = index.add_endpoint(name, "m", 4).unwrap();
        let mut ev = stored(vec![base + 1, base + 2], None, tokens.clone(), 4);
        ev.extra_keys = Some(vec![Some(vec![ExtraKey::Str("contract-a".into())]), None]);
        let plain = stored(vec![base + 3, base + 4], None, tokens.clone(), 4);
        index
            .apply_batch(
                ep,
                &batch(vec![KvEvent::BlockStored(ev), KvEvent::BlockStored(plain)]),
            )
            .unwrap();
        ids.push(ep);
    }
    let keys = index.hasher().request_keys(&tokens, 4, &salted).unwrap();
    assert_eq!(index.drop_keys(&keys), 4, "2 blocks on 2 endpoints");
    let loc = index.locality(&tokens, &salted).unwrap();
    assert!(loc.endpoints.iter().all(|e| e.matched_blocks == 0));
    let plain = index.locality(&tokens, &ctx("m")).unwrap();
    assert!(
        plain.endpoints.iter().all(|e| e.matched_blocks == 2),
        "unsalted entries stay"
    );
    // The engine later evicts a dropped block: nothing left to remove.
    let removed = KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![11],
        medium: Some("GPU".into()),
        group_idx: 0,
    });
    index.apply_batch(ids[0], &batch(vec![removed])).unwrap();
    index.check_invariants().unwrap();
    assert_eq!(index.stats().tracked_entries, 4);
}
