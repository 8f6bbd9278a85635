#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Chunks scoped by contract: the store maps a key's `cachesalt` tag to the
//! contract whose current salt it is (the salt the gateway sets), refuses
//! other tags and (by default) untagged keys, and shreds one contract's
//! chunks without touching another's.

use std::sync::Arc;

use kvgate_auth::audit::AuditLog;
use kvgate_auth::AuthConfig;
use kvgate_store::{ChunkKey, Owner, Scopes, Store, Unscoped};

mod common;
use common::*;
use tokio::net::TcpStream;

fn key(hash: i64, salt: Option<&str>) -> ChunkKey {
    let tag = salt.map(|s| format!("@cachesalt%{s}")).unwrap_or_default();
    ChunkKey::parse(&format!("/models/tiny@1@0@{hash:x}@bfloat16{tag}")).unwrap()
}

async fn start(scopes: Scopes, audit: AuditLog) -> (std::net::SocketAddr, Arc<Store>) {
    let store = Store::new(1 << 20, 1 << 16, scopes, audit);
    (serve_store(store.clone()).await, store)
}

/// Two contracts, acme (key `ka`) and globex (key `kg`).
fn two(dir: &tempfile::TempDir) -> AuthConfig {
    contracts(dir.path(), &[("ka", "acme"), ("kg", "globex")])
}

#[test]
fn a_tag_maps_to_the_contract_whose_current_salt_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = two(&dir);
    let (acme, globex) = (gateway_salt(&cfg, "ka"), gateway_salt(&cfg, "kg"));
    let scopes = Scopes::new(&cfg, Unscoped::Refuse).unwrap();
    assert_eq!(
        scopes.owner(&key(1, Some(&acme))),
        Ok(Owner::Contract("acme".into()))
    );
    assert_eq!(
        scopes.owner(&key(1, Some(&globex))),
        Ok(Owner::Contract("globex".into()))
    );
    assert!(scopes
        .owner(&key(1, Some("0123456789abcdef0123456789abcdef")))
        .is_err());
    assert!(scopes.owner(&key(1, None)).is_err());
    // A suspension moves the epoch: the old salt is no one's any more.
    scopes
        .contracts()
        .unwrap()
        .set_suspended("acme", true)
        .unwrap();
    assert!(scopes.owner(&key(1, Some(&acme))).is_err());
    let shared = Scopes::new(&cfg, Unscoped::Shared).unwrap();
    assert_eq!(shared.owner(&key(1, None)), Ok(Owner::Shared));
}

#[tokio::test]
async fn refused_keys_are_not_stored_and_shredding_takes_one_contract() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = two(&dir);
    let (acme, globex) = (gateway_salt(&cfg, "ka"), gateway_salt(&cfg, "kg"));
    let mut audit_cfg = cfg.audit.clone();
    audit_cfg.path = Some(dir.path().join("store-audit.jsonl"));
    let (addr, store) = start(
        Scopes::new(&cfg, Unscoped::Refuse).unwrap(),
        AuditLog::start(&audit_cfg).unwrap(),
    )
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    put(&mut s, key(1, Some(&acme)), &[7u8; 1000]).await;
    put(&mut s, key(2, Some(&acme)), &[7u8; 1000]).await;
    put(&mut s, key(1, Some(&globex)), &[7u8; 500]).await;
    // Refused PUTs: their payloads are read off, the connection goes on.
    put(
        &mut s,
        key(3, Some("ffffffffffffffffffffffffffffffff")),
        &[7u8; 700],
    )
    .await;
    put(&mut s, key(4, None), &[7u8; 700]).await;
    assert_eq!(exist(&mut s, key(1, Some(&acme))).await, 200);
    assert_eq!(exist(&mut s, key(1, Some(&globex))).await, 200);
    assert_eq!(
        exist(&mut s, key(3, Some("ffffffffffffffffffffffffffffffff"))).await,
        400
    );
    assert_eq!(exist(&mut s, key(4, None)).await, 400);
    assert_eq!(store.memory.len(), 3);
    let acme_owner = Owner::Contract("acme".into());
    assert_eq!(store.memory.owner_bytes(&acme_owner), 2000);
    assert_eq!(store.scope_refusals.get(), 4);

    assert_eq!(store.shred("acme"), (2, 2000));
    assert_eq!(store.memory.owner_bytes(&acme_owner), 0);
    assert_eq!(exist(&mut s, key(1, Some(&acme))).await, 400);
    assert_eq!(
        exist(&mut s, key(1, Some(&globex))).await,
        200,
        "globex untouched"
    );
    assert_eq!(store.memory.bytes(), 500);

    // Every access is audited by contract and keyed chunk id: no salt, no
    // key, no model name; the chain verifies.
    store.audit.flush().unwrap();
    let log = std::fs::read_to_string(dir.path().join("store-audit.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["kind"] == "cache")
        .collect();
    let reasons = |c: Option<&str>| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["contract"].as_str() == c)
            .map(|r| r["reason"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        reasons(Some("acme")),
        ["put", "put", "exist_hit", "shred", "exist_miss"]
    );
    assert_eq!(reasons(Some("globex")), ["put", "exist_hit", "exist_hit"]);
    assert_eq!(reasons(None).iter().filter(|r| *r == "refused").count(), 4);
    let acme_puts: Vec<&str> = records
        .iter()
        .filter(|r| r["contract"] == "acme" && r["reason"] == "put")
        .map(|r| r["detail"]["chunk"].as_str().unwrap())
        .collect();
    assert_eq!(acme_puts[0].len(), 32);
    assert_ne!(acme_puts[0], acme_puts[1], "one id per chunk");
    for secret in [acme.as_str(), globex.as_str(), "/models/tiny", "ffffffff"] {
        assert!(!log.contains(secret), "{secret} in the audit log");
    }
    let dir_path = dir.path().join("store-audit.jsonl");
    let report = kvgate_auth::audit::verify(&[dir_path], None, None).unwrap();
    assert_eq!(
        report.records as usize,
        records.len() + 1,
        "audit_open + the cache records"
    );
}

#[tokio::test]
async fn a_contract_over_its_quota_makes_room_from_its_own_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = two(&dir);
    let (acme, globex) = (gateway_salt(&cfg, "ka"), gateway_salt(&cfg, "kg"));
    let quotas = kvgate_store::Quotas {
        default: Some(2000),
        overrides: [("acme".to_string(), 1000)].into(),
    };
    let store = Store::with(
        1 << 20,
        1 << 16,
        Scopes::new(&cfg, Unscoped::Refuse).unwrap(),
        AuditLog::disabled(),
        kvgate_store::Extras {
            quotas,
            ..Default::default()
        },
    );
    let addr = serve_store(store.clone()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    for h in 0..3 {
        put(&mut s, key(h, Some(&globex)), &[7u8; 600]).await;
        put(&mut s, key(h, Some(&acme)), &[7u8; 600]).await;
    }
    // acme keeps only its newest chunk (1000 B), globex all three (1800 B).
    assert_eq!(exist(&mut s, key(2, Some(&acme))).await, 200);
    assert_eq!(exist(&mut s, key(0, Some(&acme))).await, 400);
    assert_eq!(exist(&mut s, key(1, Some(&acme))).await, 400);
    for h in 0..3 {
        assert_eq!(
            exist(&mut s, key(h, Some(&globex))).await,
            200,
            "globex {h}"
        );
    }
    assert_eq!(
        store.memory.owner_bytes(&Owner::Contract("acme".into())),
        600
    );
    assert_eq!(
        store.memory.owner_bytes(&Owner::Contract("globex".into())),
        1800
    );
    // A chunk over the quota itself is not kept, and costs acme nothing.
    put(&mut s, key(9, Some(&acme)), &[7u8; 1200]).await;
    assert_eq!(exist(&mut s, key(9, Some(&acme))).await, 400);
    assert_eq!(exist(&mut s, key(2, Some(&acme))).await, 200);
}

#[tokio::test]
async fn a_listener_bound_to_a_contract_scopes_untagged_keys_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = two(&dir);
    let (acme, globex) = (gateway_salt(&cfg, "ka"), gateway_salt(&cfg, "kg"));
    let store = Store::new(
        1 << 20,
        1 << 16,
        Scopes::new(&cfg, Unscoped::Refuse).unwrap(),
        AuditLog::disabled(),
    );
    let bind = || async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    };
    let ((la, acme_addr), (lg, globex_addr)) = (bind().await, bind().await);
    tokio::spawn(kvgate_store::serve_scoped(
        la,
        store.clone(),
        Some("acme".into()),
    ));
    tokio::spawn(kvgate_store::serve_scoped(
        lg,
        store.clone(),
        Some("globex".into()),
    ));
    let mut a = TcpStream::connect(acme_addr).await.unwrap();
    let mut g = TcpStream::connect(globex_addr).await.unwrap();
    // The same untagged key on both pods' listeners: two entries, one each.
    put(&mut a, key(1, None), &[7u8; 300]).await;
    assert_eq!(exist(&mut a, key(1, None)).await, 200);
    assert_eq!(
        exist(&mut g, key(1, None)).await,
        400,
        "globex does not see acme's"
    );
    put(&mut g, key(1, None), &[7u8; 500]).await;
    assert_eq!(exist(&mut g, key(1, None)).await, 200);
    assert_eq!(
        store.memory.owner_bytes(&Owner::Contract("acme".into())),
        300
    );
    assert_eq!(
        store.memory.owner_bytes(&Owner::Contract("globex".into())),
        500
    );
    // A tag naming the listener's own contract is fine; another's is not.
    put(&mut a, key(2, Some(&acme)), &[7u8; 100]).await;
    put(&mut a, key(3, Some(&globex)), &[7u8; 100]).await;
    assert_eq!(exist(&mut a, key(2, Some(&acme))).await, 200);
    assert_eq!(exist(&mut a, key(3, Some(&globex))).await, 400);
    // Suspended: the pod's listener serves nothing of its contract.
    store
        .scopes
        .contracts()
        .unwrap()
        .set_suspended("acme", true)
        .unwrap();
    assert_eq!(exist(&mut a, key(1, None)).await, 400);
}
