#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Redis/Valkey tier against real `redis-server` processes (one, and a
//! three-node cluster): what memory evicts is sealed there under keyed
//! names, a second store on the same server reads it, writing through shares
//! a chunk at once, a tampered value is a miss, a server that is down is a
//! miss and not an error, the bound holds, and a shred leaves nothing that
//! opens, even put back from a copy.

use kvgate_auth::audit::AuditLog;
use kvgate_store::{RedisConfig, WritePolicy};

mod common;
use common::redis_server::{RedisServer, Server};
use common::redis_store::*;
use common::*;

on_redis_and_valkey!(
    evicted_chunks_are_sealed_to_redis_and_a_second_store_reads_them,
    writing_through_shares_at_once_and_a_tampered_value_is_a_miss,
    redis_dump_holds_no_plaintext,
    the_bound_holds_oldest_first_out,
    a_shred_leaves_nothing_that_opens_even_put_back_from_a_copy,
    a_cluster_spreads_the_chunks_over_its_nodes_and_a_shred_takes_them_all,
);

async fn evicted_chunks_are_sealed_to_redis_and_a_second_store_reads_them(srv: Server) {
    let server = RedisServer::start(&srv);
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    let redis = single(&server, WritePolicy::Back, 1 << 20);
    let (mut s, store) = start(&cfg, &redis).await;
    for h in 0..3 {
        put(&mut s, key(h, &salt), &payload(h)).await;
    }
    sync(&mut s).await;
    // Memory holds two; the oldest went to Redis, sealed.
    assert_eq!(store.memory.len(), 2);
    assert_eq!(redis_of(&store).len(), 1);
    let contents = server.contents();
    // The chunk, its contract's index and its contract's salts.
    assert_eq!(
        contents.len(),
        3,
        "{:?}",
        contents.iter().map(|c| &c.0).collect::<Vec<_>>()
    );
    for (name, value) in &contents {
        let parts: Vec<&str> = name.split(':').collect();
        assert_eq!(parts[0], "kvgate", "{name}");
        assert!(parts[1].len() == 32 && parts[1].bytes().all(|b| b.is_ascii_hexdigit()));
        for clear in ["acme", "secret-model", salt.as_str()] {
            assert!(!name.contains(clear), "{clear} in a Redis key");
            assert!(
                !value.windows(clear.len()).any(|w| w == clear.as_bytes()),
                "{clear} in a Redis value"
            );
        }
        assert!(
            !value
                .windows(32)
                .any(|w| payload(0).windows(32).any(|p| p == w)),
            "plaintext in Redis"
        );
    }
    let frame = contents.iter().find(|(_, v)| v.len() > 1000).unwrap();
    assert_eq!(frame.1.len(), 1 + 12 + 24 + 1000 + 16);

    // A second store on the same server, memory empty: a hit from Redis,
    // the same bytes and meta, promoted to its memory.
    let (mut s2, store2) = start(&cfg, &redis).await;
    assert_eq!(exist(&mut s2, key(0, &salt)).await, 200);
    assert_eq!(get(&mut s2, key(0, &salt)).await, Some((META, payload(0))));
    assert_eq!(redis_of(&store2).stats.hits.get(), 1);
    assert_eq!(store2.memory.len(), 1);
    assert_eq!(
        get(&mut s2, key(1, &salt)).await,
        None,
        "chunk 1 is in the first store's memory only"
    );
    assert_eq!(exist(&mut s2, key(1, &salt)).await, 400);

    // The tier's counters and sizes are on the admin listener.
    let metrics = admin_metrics(store.clone()).await;
    for line in [
        "kvgate_store_chunks{tier=\"redis\"} 1\n".to_string(),
        format!("kvgate_store_bytes{{tier=\"redis\"}} {}\n", frame.1.len()),
        "kvgate_store_redis_errors_total 0\n".into(),
        "kvgate_store_integrity_failures_total{tier=\"redis\"} 0\n".into(),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
}

async fn writing_through_shares_at_once_and_a_tampered_value_is_a_miss(srv: Server) {
    let server = RedisServer::start(&srv);
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    let redis = single(&server, WritePolicy::Through, 1 << 20);
    let (mut a, _store_a) = start(&cfg, &redis).await;
    let (mut b, store_b) = start(&cfg, &redis).await;
    for h in 0..2 {
        put(&mut a, key(h, &salt), &payload(h)).await;
    }
    sync(&mut a).await;
    // Nothing was evicted from the first store, yet the second reads both.
    for h in 0..2 {
        assert_eq!(get(&mut b, key(h, &salt)).await, Some((META, payload(h))));
    }
    // Flip one byte of one value: a miss, counted, and the value deleted.
    let mut c = server.connection(server.ports[0]);
    let (name, mut value) = server
        .contents()
        .into_iter()
        .find(|(_, v)| v.len() > 1000)
        .unwrap();
    value[40] ^= 0x01;
    redis::cmd("SET")
        .arg(&name)
        .arg(&value)
        .query::<()>(&mut c)
        .unwrap();
    let (mut fresh, store_c) = start(&cfg, &redis).await;
    let hits = {
        let mut n = 0;
        for h in 0..2 {
            n += usize::from(get(&mut fresh, key(h, &salt)).await.is_some());
        }
        n
    };
    assert_eq!(hits, 1);
    assert_eq!(redis_of(&store_c).integrity_failures.get(), 1);
    let exists: bool = redis::cmd("EXISTS").arg(&name).query(&mut c).unwrap();
    assert!(!exists, "a value that does not open is removed");
    assert_eq!(redis_of(&store_b).integrity_failures.get(), 0);
}

async fn redis_dump_holds_no_plaintext(srv: Server) {
    let server = RedisServer::start(&srv);
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    let redis = single(&server, WritePolicy::Through, 1 << 20);
    let (mut s, store) = start(&cfg, &redis).await;
    let canary: Vec<u8> = b"KVGATE-CANARY-7f3a"
        .iter()
        .copied()
        .cycle()
        .take(1000)
        .collect();
    for h in 0..4 {
        put(&mut s, key(h, &salt), &canary).await;
    }
    sync(&mut s).await;
    assert_eq!(redis_of(&store).len(), 4);
    let dump = server.dump();
    assert!(dump.len() > 4 * 1000, "the dump holds the four frames");
    for clear in [
        b"CANARY".as_slice(),
        b"acme",
        b"secret-model",
        salt.as_bytes(),
    ] {
        assert!(
            !dump.windows(clear.len()).any(|w| w == clear),
            "{} in dump.rdb",
            String::from_utf8_lossy(clear)
        );
    }
}

async fn the_bound_holds_oldest_first_out(srv: Server) {
    let server = RedisServer::start(&srv);
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    // Room for three sealed chunks.
    let frame = FRAME;
    let redis = single(&server, WritePolicy::Through, 3 * frame + 10);
    let (mut s, store) = start(&cfg, &redis).await;
    for h in 0..5 {
        put(&mut s, key(h, &salt), &payload(h)).await;
    }
    sync(&mut s).await;
    let tier = redis_of(&store);
    assert_eq!(tier.len(), 3);
    assert_eq!(tier.bytes(), 3 * frame);
    assert_eq!(tier.stats.evictions.get(), 2);
    let (mut fresh, _) = start(&cfg, &redis).await;
    let found: Vec<bool> = {
        let mut v = Vec::new();
        for h in 0..5 {
            v.push(get(&mut fresh, key(h, &salt)).await.is_some());
        }
        v
    };
    assert_eq!(found, [false, false, true, true, true]);
}

#[tokio::test]
async fn a_server_that_is_down_is_a_miss_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = RedisConfig {
        url: Some(format!("redis://127.0.0.1:{port}")),
        cluster: Vec::new(),
        tls: None,
        max_bytes: 1 << 20,
        write: WritePolicy::Through,
    };
    let (mut s, store) = start(&cfg, &redis).await;
    for h in 0..3 {
        put(&mut s, key(h, &salt), &payload(h)).await;
    }
    sync(&mut s).await;
    // Memory still serves what it holds; the evicted one is a miss.
    assert_eq!(get(&mut s, key(2, &salt)).await, Some((META, payload(2))));
    assert_eq!(get(&mut s, key(0, &salt)).await, None);
    assert_eq!(exist(&mut s, key(0, &salt)).await, 400);
    assert!(redis_of(&store).errors.get() >= 3);
    assert!(!redis_of(&store).ping());
}

async fn a_shred_leaves_nothing_that_opens_even_put_back_from_a_copy(srv: Server) {
    let server = RedisServer::start(&srv);
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme"), ("kb", "globex")]);
    let (salt_a, salt_b) = (gateway_salt(&cfg, "ka"), gateway_salt(&cfg, "kb"));
    let redis = single(&server, WritePolicy::Through, 1 << 20);
    let mut audit_cfg = cfg.audit.clone();
    let audit_path = dir.path().join("store-audit.jsonl");
    audit_cfg.path = Some(audit_path.clone());
    let (mut s, store) = start_audited(&cfg, &redis, AuditLog::start(&audit_cfg).unwrap()).await;
    for h in 0..3 {
        put(&mut s, key(h, &salt_a), &payload(h)).await;
        put(&mut s, key(100 + h, &salt_b), &payload(h)).await;
    }
    sync(&mut s).await;
    // A copy of everything in Redis (a replica, an RDB file), then a shred.
    let copy = server.contents();
    assert_eq!(
        copy.len(),
        6 + 2 * 2,
        "six chunks, an index and salts per contract"
    );
    let acme = kvgate_store::Owner::Contract("acme".into());
    let in_memory = (store.memory.owner_bytes(&acme) / 1000) as usize;
    let (chunks, _) = store.shred("acme");
    assert_eq!(
        chunks,
        in_memory + 3,
        "what memory held, and three in Redis"
    );
    let after = server.contents();
    assert_eq!(
        after.len(),
        3 + 2,
        "globex's chunks, index and salts remain"
    );
    let mut c = server.connection(server.ports[0]);
    // Put acme's values back as they were: no store can open them, since
    // their salt went first (the salts themselves are not put back: a copy
    // of those is useless without the key material, but shredding them is
    // what makes the copy unreadable to whoever holds it).
    for (name, value) in &copy {
        if !after.iter().any(|(n, _)| n == name) && value.len() > 1000 {
            redis::cmd("SET")
                .arg(name)
                .arg(value)
                .query::<()>(&mut c)
                .unwrap();
        }
    }
    let (mut fresh, fresh_store) = start(&cfg, &redis).await;
    for h in 0..3 {
        assert_eq!(
            get(&mut fresh, key(h, &salt_a)).await,
            None,
            "acme chunk {h}"
        );
        assert_eq!(
            get(&mut fresh, key(100 + h, &salt_b)).await,
            Some((META, payload(h)))
        );
    }
    assert_eq!(redis_of(&fresh_store).stats.hits.get(), 3);
    // Each write to Redis and the shred are in the store's audit chain, by
    // keyed chunk id: no salt in it; the chain verifies.
    store.audit.flush().unwrap();
    let log = std::fs::read_to_string(&audit_path).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["kind"] == "cache")
        .collect();
    let redis_writes = |c: &str| {
        records
            .iter()
            .filter(|r| {
                r["contract"] == c
                    && r["reason"] == "written_through"
                    && r["detail"]["tier"] == "redis"
            })
            .count()
    };
    assert_eq!((redis_writes("acme"), redis_writes("globex")), (3, 3));
    assert!(records
        .iter()
        .any(|r| r["contract"] == "acme" && r["reason"] == "shred"));
    for secret in [salt_a.as_str(), salt_b.as_str(), "secret-model"] {
        assert!(!log.contains(secret), "{secret} in the audit log");
    }
    kvgate_auth::audit::verify(&[audit_path], None, None).unwrap();
}

async fn a_cluster_spreads_the_chunks_over_its_nodes_and_a_shred_takes_them_all(srv: Server) {
    let server = RedisServer::cluster(&srv);
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    let redis = RedisConfig {
        url: None,
        cluster: server.urls()[..1].to_vec(),
        tls: None,
        max_bytes: 1 << 20,
        write: WritePolicy::Through,
    };
    let (mut s, store) = start(&cfg, &redis).await;
    for h in 0..30 {
        put(&mut s, key(h, &salt), &payload(h)).await;
    }
    sync(&mut s).await;
    assert_eq!(redis_of(&store).len(), 30);
    assert_eq!(redis_of(&store).errors.get(), 0);
    let per_node: Vec<usize> = server.ports.iter().map(|p| server.dbsize(*p)).collect();
    assert_eq!(per_node.iter().sum::<usize>(), 30 + 2, "{per_node:?}");
    assert!(
        per_node.iter().all(|n| *n >= 3),
        "spread over the nodes: {per_node:?}"
    );
    // A second store, memory empty, found every chunk on every master at
    // start, and reads each from the cluster.
    let (mut s2, store2) = start(&cfg, &redis).await;
    assert_eq!(redis_of(&store2).len(), 30);
    assert_eq!(redis_of(&store2).bytes(), 30 * FRAME);
    for h in 0..30 {
        assert_eq!(
            get(&mut s2, key(h, &salt)).await,
            Some((META, payload(h))),
            "chunk {h}"
        );
    }
    store.shred("acme");
    let left: Vec<usize> = server.ports.iter().map(|p| server.dbsize(*p)).collect();
    assert_eq!(left, [0, 0, 0]);
}
