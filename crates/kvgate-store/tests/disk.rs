#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The disk tier: what memory evicts is sealed to disk under keyed names,
//! found again after a restart, promoted on a hit; a tampered file is a miss;
//! a shred leaves no file behind. (A frame under another epoch, contract or
//! key failing its tag is `tests/crypto.rs`.)

use std::path::Path;
use std::sync::Arc;

use kvgate_auth::audit::AuditLog;
use kvgate_auth::AuthConfig;
use kvgate_store::disk::DiskTier;
use kvgate_store::{ChunkKey, Extras, Scopes, Store, Unscoped, WritePolicy};

mod common;
use common::*;
use tokio::net::TcpStream;

fn salt(cfg: &AuthConfig) -> String {
    gateway_salt(cfg, "ka")
}

fn key(hash: i64, salt: &str) -> ChunkKey {
    ChunkKey::parse(&format!(
        "/models/secret-model@1@0@{hash:x}@bfloat16@cachesalt%{salt}"
    ))
    .unwrap()
}

fn payload(h: i64) -> Vec<u8> {
    (0..1000u32)
        .map(|i| (i as u8) ^ (h as u8).wrapping_mul(31))
        .collect()
}

async fn start(cfg: &AuthConfig, cache: &Path) -> (TcpStream, Arc<Store>) {
    start_writing(cfg, cache, WritePolicy::Back).await
}

async fn start_writing(
    cfg: &AuthConfig,
    cache: &Path,
    write: WritePolicy,
) -> (TcpStream, Arc<Store>) {
    let scopes = Scopes::new(cfg, Unscoped::Refuse).unwrap();
    let disk = DiskTier::open(cache, 1 << 20, scopes.contracts().unwrap()).unwrap();
    let store = Store::with(
        2000,
        1 << 16,
        scopes,
        AuditLog::disabled(),
        Extras {
            quotas: Default::default(),
            disk: Some(disk),
            write,
            ..Default::default()
        },
    );
    let addr = serve_store(store.clone()).await;
    (TcpStream::connect(addr).await.unwrap(), store)
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(dir).unwrap().flatten() {
        if d.path().is_dir() {
            out.extend(
                std::fs::read_dir(d.path())
                    .unwrap()
                    .flatten()
                    .map(|f| f.path()),
            );
        }
    }
    out
}

#[tokio::test]
async fn evicted_chunks_are_sealed_to_disk_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = salt(&cfg);
    let (mut s, store) = start(&cfg, &cache).await;
    for h in 0..3 {
        put(&mut s, key(h, &salt), &payload(h)).await;
    }
    sync(&mut s).await;
    // Memory holds two; the oldest went to disk, sealed.
    assert_eq!(store.memory.len(), 2);
    let on_disk = files(&cache);
    assert_eq!(on_disk.len(), 1);
    let name = on_disk[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let parent = on_disk[0]
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    for n in [&name, &parent] {
        assert!(
            n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()),
            "{n}"
        );
    }
    let bytes = std::fs::read(&on_disk[0]).unwrap();
    assert_eq!(bytes.len(), 1 + 12 + 24 + 1000 + 16);
    assert!(
        !bytes
            .windows(32)
            .any(|w| payload(0).windows(32).any(|p| p == w)),
        "plaintext on disk"
    );
    for clear in ["acme", "secret-model", salt.as_str()] {
        assert!(
            !bytes.windows(clear.len()).any(|w| w == clear.as_bytes()),
            "{clear} on disk"
        );
    }
    // A hit from disk: the same bytes and meta, promoted to memory.
    assert_eq!(get(&mut s, key(0, &salt)).await, Some((META, payload(0))));
    assert_eq!(store.disk.as_ref().unwrap().stats.hits.get(), 1);

    // A restart: the index is rebuilt from the directory.
    drop(s);
    let (mut s, store2) = start(&cfg, &cache).await;
    let disk = store2.disk.as_ref().unwrap();
    assert!(!disk.is_empty());
    assert!(store2.memory.is_empty(), "memory starts empty");
    assert_eq!(
        disk.len(),
        2,
        "chunk 0 demoted, then chunk 1 when 0 came back"
    );
    let mut found = 0;
    for h in 0..3 {
        if let Some((meta, data)) = get(&mut s, key(h, &salt)).await {
            assert_eq!((meta, data), (META, payload(h)));
            found += 1;
        }
    }
    assert_eq!(found, 2, "every chunk on disk reads back");
}

#[tokio::test]
async fn a_tampered_file_is_a_miss_and_a_shred_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = salt(&cfg);
    let (mut s, store) = start(&cfg, &cache).await;
    for h in 0..4 {
        put(&mut s, key(h, &salt), &payload(h)).await;
    }
    sync(&mut s).await;
    let on_disk = files(&cache);
    assert_eq!(on_disk.len(), 2);
    // Flip one byte of one file: its chunk is a miss, counted, and gone.
    let mut b = std::fs::read(&on_disk[0]).unwrap();
    b[30] ^= 0x40;
    std::fs::write(&on_disk[0], b).unwrap();
    let hits: Vec<bool> = {
        let mut v = Vec::new();
        for h in 0..2 {
            v.push(get(&mut s, key(h, &salt)).await.is_some());
        }
        v
    };
    assert_eq!(hits.iter().filter(|h| **h).count(), 1, "{hits:?}");
    let disk = store.disk.as_ref().unwrap();
    assert_eq!(disk.integrity_failures.get(), 1);
    // The disk tier's counters and sizes are on the admin listener.
    let metrics = admin_metrics(store.clone()).await;
    for line in [
        "kvgate_store_integrity_failures_total{tier=\"disk\"} 1\n".to_string(),
        "kvgate_store_misses_total{tier=\"disk\"} 1\n".into(),
        "kvgate_store_hits_total{tier=\"disk\"} 1\n".into(),
        format!("kvgate_store_chunks{{tier=\"disk\"}} {}\n", disk.len()),
        format!("kvgate_store_bytes{{tier=\"disk\"}} {}\n", disk.bytes()),
    ] {
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }

    // A shred: nothing of the contract left in either tier, nor on disk.
    let (chunks, _) = store.shred("acme");
    assert!(chunks >= 3, "{chunks}");
    assert!(store.memory.is_empty() && disk.is_empty());
    assert!(files(&cache).is_empty());
}

#[tokio::test]
async fn a_shred_destroys_the_key_so_a_copy_taken_before_never_opens() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = contracts(dir.path(), &[("ka", "acme"), ("kb", "globex")]);
    let (salt_a, salt_b) = (salt(&cfg), gateway_salt(&cfg, "kb"));
    let (mut s, store) = start(&cfg, &cache).await;
    for h in 0..3 {
        put(&mut s, key(h, &salt_a), &payload(h)).await;
        put(&mut s, key(100 + h, &salt_b), &payload(h)).await;
    }
    sync(&mut s).await;
    let state = cache.join(kvgate_store::shred_keys::STATE_FILE);
    let before: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let contract_salts: Vec<String> = before["salts"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|e| {
            e.as_object()
                .unwrap()
                .values()
                .map(|v| v.as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(contract_salts.len(), 2, "one salt per contract: {before}");
    // Take a copy of everything on disk, then shred acme.
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    let taken: Vec<(std::path::PathBuf, Vec<u8>)> = files(&cache)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    assert!(taken.len() >= 2, "both contracts have files on disk");
    store.shred("acme");
    drop(s);
    drop(store);
    let after = std::fs::read_to_string(&state).unwrap();
    let gone: Vec<&String> = contract_salts
        .iter()
        .filter(|s| !after.contains(s.as_str()))
        .collect();
    assert_eq!(
        gone.len(),
        1,
        "acme's salt is gone, globex's stays: {after}"
    );
    // Put every file back as it was and start again: acme's copies are
    // misses (no key opens them), globex's still read.
    for (p, b) in &taken {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b).unwrap();
    }
    let (mut s, store) = start(&cfg, &cache).await;
    for h in 0..3 {
        assert_eq!(get(&mut s, key(h, &salt_a)).await, None, "acme chunk {h}");
    }
    let mut globex = 0;
    for h in 0..3 {
        if let Some((_, data)) = get(&mut s, key(100 + h, &salt_b)).await {
            assert_eq!(data, payload(h));
            globex += 1;
        }
    }
    assert!(globex >= 1, "globex's chunks on disk still read");
    assert!(store.disk.as_ref().unwrap().stats.hits.get() >= 1);
}

#[tokio::test]
async fn writing_through_puts_every_chunk_on_disk_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = salt(&cfg);
    for (write, want) in [(WritePolicy::Back, 0), (WritePolicy::Through, 2)] {
        let cache = dir.path().join(format!("cache-{write:?}"));
        let (mut s, store) = start_writing(&cfg, &cache, write).await;
        // Two chunks: both fit in memory, so nothing is evicted.
        for h in 0..2 {
            put(&mut s, key(h, &salt), &payload(h)).await;
        }
        sync(&mut s).await;
        assert_eq!(store.memory.len(), 2, "{write:?}");
        assert_eq!(files(&cache).len(), want, "{write:?}: files on disk");
        // A third evicts the oldest from memory: written back now, or
        // already on disk (not written twice).
        put(&mut s, key(2, &salt), &payload(2)).await;
        sync(&mut s).await;
        let disk = store.disk.as_ref().unwrap();
        assert_eq!(
            disk.len(),
            if write == WritePolicy::Through { 3 } else { 1 }
        );
        // After a restart every chunk on disk reads back.
        drop(s);
        drop(store);
        let (mut s, _store) = start_writing(&cfg, &cache, write).await;
        let back = read_back(&mut s, &salt).await;
        assert_eq!(
            back,
            if write == WritePolicy::Through { 3 } else { 1 },
            "{write:?}"
        );
    }
}

async fn read_back(s: &mut TcpStream, salt: &str) -> usize {
    let mut n = 0;
    for h in 0..3 {
        if let Some((_, data)) = get(s, key(h, salt)).await {
            assert_eq!(data, payload(h));
            n += 1;
        }
    }
    n
}

/// A store over `cache` writing through, audited to `audit` (a restart is
/// another call).
async fn start_audited(cfg: &AuthConfig, cache: &Path, audit: &Path) -> (TcpStream, Arc<Store>) {
    let scopes = Scopes::new(cfg, Unscoped::Refuse).unwrap();
    let disk = DiskTier::open(cache, 1 << 20, scopes.contracts().unwrap()).unwrap();
    let mut audit_cfg = cfg.audit.clone();
    audit_cfg.path = Some(audit.to_path_buf());
    let store = Store::with(
        2000,
        1 << 16,
        scopes,
        AuditLog::start(&audit_cfg).unwrap(),
        Extras {
            disk: Some(disk),
            write: WritePolicy::Through,
            ..Default::default()
        },
    );
    let addr = serve_store(store.clone()).await;
    (TcpStream::connect(addr).await.unwrap(), store)
}

#[tokio::test]
async fn a_flipped_bit_a_swap_and_a_move_between_contracts_are_each_a_counted_audited_miss() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = contracts(dir.path(), &[("ka", "acme"), ("kb", "globex")]);
    let (salt_a, salt_b) = (salt(&cfg), gateway_salt(&cfg, "kb"));
    let (mut s, store) = start_audited(&cfg, &cache, &dir.path().join("audit-1.jsonl")).await;
    // Each PUT writes one new file: which is which, in order.
    let mut file_of = Vec::new();
    for (h, salt) in [
        (0, &salt_a),
        (1, &salt_a),
        (2, &salt_a),
        (0, &salt_b),
        (1, &salt_b),
    ] {
        let before = files(&cache);
        put(&mut s, key(h, salt), &payload(h)).await;
        sync(&mut s).await;
        let new: Vec<_> = files(&cache)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        assert_eq!(new.len(), 1);
        file_of.push(new[0].clone());
    }
    drop(s);
    drop(store);
    let read = |i: usize| std::fs::read(&file_of[i]).unwrap();
    let (a0, a1, b0) = (read(0), read(1), read(3));
    // acme's chunks 0 and 1 swapped; globex's chunk 0 moved into acme's
    // chunk 2; one bit of globex's chunk 1 flipped. globex's chunk 0 stays.
    std::fs::write(&file_of[0], &a1).unwrap();
    std::fs::write(&file_of[1], &a0).unwrap();
    std::fs::write(&file_of[2], &b0).unwrap();
    let mut b1 = read(4);
    b1[20] ^= 0x01;
    std::fs::write(&file_of[4], &b1).unwrap();

    // A restart: memory is empty, every read comes from disk.
    let audit = dir.path().join("audit-2.jsonl");
    let (mut s, store) = start_audited(&cfg, &cache, &audit).await;
    for (h, salt) in [(0, &salt_a), (1, &salt_a), (2, &salt_a), (1, &salt_b)] {
        assert_eq!(get(&mut s, key(h, salt)).await, None, "chunk {h}");
    }
    assert_eq!(get(&mut s, key(0, &salt_b)).await, Some((META, payload(0))));
    assert_eq!(store.disk.as_ref().unwrap().integrity_failures.get(), 4);
    store.audit.flush().unwrap();
    let log = std::fs::read_to_string(&audit).unwrap();
    let failures: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["reason"] == "integrity_failure")
        .map(|r| {
            format!(
                "{}/{}",
                r["contract"].as_str().unwrap(),
                r["detail"]["tier"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        failures,
        ["acme/disk", "acme/disk", "acme/disk", "globex/disk"]
    );
}
