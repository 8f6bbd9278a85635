#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gateway and a `kvgate store` holding the same contracts: a suspension
//! at the gateway shreds the contract's chunks in the store within a second
//! (others' stay), and after reactivation the store maps the gateway's new
//! salt, not the old one.

use std::time::{Duration, Instant};

use kvgate_gateway::admin::ADMIN_CONTRACTS_PATH;
use kvgate_gateway::{GatewayConfig, StoreAdminConfig};
use kvgate_store::{ChunkKey, ChunkMeta, Command, Owner, Request, Scopes, Store, Unscoped};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::*;

const ADMIN: &str = "gateway-admin-token";
const STORE_ADMIN: &str = "store-admin-token";

async fn put_chunk(addr: std::net::SocketAddr, salt: &str, hash: i64) {
    let key = ChunkKey::parse(&format!("m@1@0@{hash:x}@bfloat16@cachesalt%{salt}")).unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let header = Request {
        command: Command::Put,
        length: 100,
        meta: ChunkMeta::EMPTY,
        location: 0,
        key,
    }
    .encode();
    s.write_all(&header).await.unwrap();
    s.write_all(&[1u8; 100]).await.unwrap();
    // PUT has no reply: a HEALTH round trip on the same connection says the
    // store has taken it.
    let health = Request {
        command: Command::Health,
        length: 0,
        meta: ChunkMeta::EMPTY,
        location: 0,
        key: ChunkKey::parse("m@1@0@0@half").unwrap(),
    }
    .encode();
    s.write_all(&health).await.unwrap();
    let mut reply = [0u8; kvgate_store::protocol::SERVER_HEADER_LEN];
    s.read_exact(&mut reply).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_at_the_gateway_shreds_the_contract_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let contracts = contracts(&[("key-a", "acme"), ("key-b", "globex")]);
    // The store: the same contracts, its lm:// and admin listeners.
    let store = Store::new(
        1 << 20,
        1 << 16,
        Scopes::new(&contracts, Unscoped::Refuse).unwrap(),
        kvgate_auth::audit::AuditLog::disabled(),
    );
    let lm = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lm_addr = lm.local_addr().unwrap();
    tokio::spawn(kvgate_store::serve(lm, store.clone()));
    let token_sha: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(STORE_ADMIN.as_bytes()).into()
    };
    let store_url = serve(kvgate_store::admin::router(
        store.clone(),
        Some(token_sha),
        "trustbridge",
    ))
    .await;
    let token_file = dir.path().join("store-token");
    std::fs::write(&token_file, format!("{STORE_ADMIN}\n")).unwrap();

    let (url, upstream) = spawn_upstream().await;
    let (gw_url, _gw) = gateway(GatewayConfig {
        endpoints: vec![endpoint(&url)],
        admin_token_sha256: Some(kvgate_auth::principal::api_key_sha256(ADMIN)),
        contracts,
        store_admin: Some(StoreAdminConfig {
            url: store_url.clone(),
            token_file,
        }),
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    let salt_of = |key: &'static str| {
        let req = client
            .post(format!("{gw_url}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("hi"));
        let upstream = upstream.clone();
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.text().await.unwrap();
            let last = upstream.bodies.lock().last().cloned().unwrap();
            last["kv_transfer_params"]["lmcache.tag.cachesalt"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let admin = |action: &'static str| {
        client
            .post(format!("{gw_url}{ADMIN_CONTRACTS_PATH}/acme/{action}"))
            .bearer_auth(ADMIN)
            .send()
    };
    let acme = Owner::Contract("acme".into());
    let globex = Owner::Contract("globex".into());

    // What LMCache would store for each contract's requests.
    let (salt_a, salt_b) = (salt_of("key-a").await, salt_of("key-b").await);
    put_chunk(lm_addr, &salt_a, 1).await;
    put_chunk(lm_addr, &salt_a, 2).await;
    put_chunk(lm_addr, &salt_b, 1).await;
    assert_eq!(store.memory.owner_bytes(&acme), 200);

    assert_eq!(admin("suspend").await.unwrap().status(), 200);
    let t = Instant::now();
    while store.memory.owner_bytes(&acme) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not shredded within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.memory.owner_bytes(&globex), 100, "globex untouched");
    let usage: Value = client
        .get(format!("{store_url}/kvgate/store/v1/contracts/acme/usage"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["bytes"], 0);

    // Reactivated: a new salt at the gateway, and the store maps it.
    assert_eq!(admin("activate").await.unwrap().status(), 200);
    let salt_a2 = salt_of("key-a").await;
    assert_ne!(salt_a2, salt_a);
    let t = Instant::now();
    loop {
        put_chunk(lm_addr, &salt_a2, 3).await;
        if store.memory.owner_bytes(&acme) == 100 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "new salt never mapped"
        );
    }
    put_chunk(lm_addr, &salt_a, 4).await;
    assert_eq!(
        store.memory.owner_bytes(&acme),
        100,
        "the old salt stays refused"
    );

    // The store's writes need its token; its metrics name the bytes.
    let denied = client
        .post(format!("{store_url}/kvgate/store/v1/contracts/acme/shred"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let metrics = metrics_text(&client, &store_url).await;
    assert!(
        metrics.contains("kvgate_store_contract_bytes{contract=\"acme\"} 100"),
        "{metrics}"
    );
    assert!(metrics.contains("kvgate_store_shreds_total 1"), "{metrics}");
    assert!(
        metrics.contains("sentinel_kv_cache_size_gb{service=\"trustbridge\"} 2e-7"),
        "{metrics}"
    );
    assert!(!metrics.contains(&salt_a) && !metrics.contains(&salt_a2));
}
