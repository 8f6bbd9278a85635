#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Redis tier across a store restart, against real `redis-server`s (and
//! Valkey where installed): what is there at start is accounted for (the
//! bytes gauge is what the server holds of this store's contracts, another
//! contract's chunks are left alone), a previous run's chunk is served, and
//! writing more evicts the chunks found first, least recently used first,
//! so the bound holds; a server that is not up at start is accounted for at
//! the first write it answers.

use std::time::Duration;

use kvgate_store::WritePolicy;

mod common;
use common::redis_server::{free_port, RedisServer, Server};
use common::redis_store::*;
use common::*;

on_redis_and_valkey!(
    a_restart_accounts_for_what_is_there_and_evicts_it_first,
    a_server_not_up_at_start_is_accounted_for_at_its_first_write,
);

/// What the server holds: chunk values (not a contract's index or salts).
fn chunk_bytes(server: &RedisServer) -> Vec<u64> {
    let chunks = server
        .contents()
        .into_iter()
        .filter(|(name, _)| !name.ends_with(":index") && !name.ends_with(":salts"));
    chunks.map(|(_, v)| v.len() as u64).collect()
}

async fn a_restart_accounts_for_what_is_there_and_evicts_it_first(srv: Server) {
    let server = RedisServer::start(&srv);
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    // Another store on the server, with a contract this one does not hold.
    let other_dir = tempfile::tempdir().unwrap();
    let other = contracts(other_dir.path(), &[("kz", "zeta")]);
    let other_salt = gateway_salt(&other, "kz");
    let redis = single(&server, WritePolicy::Through, 4 * FRAME + 10);
    {
        let (mut z, _) = start(&other, &redis).await;
        for h in 0..2 {
            put(&mut z, key(500 + h, &other_salt), &payload(h)).await;
        }
        sync(&mut z).await;
    }
    // The first run: chunks 0 and 1, then (two seconds later on Redis's
    // clock, which counts idle time in seconds) 2 and 3.
    {
        let (mut s, store) = start(&cfg, &redis).await;
        assert!(redis_of(&store).rebuilt());
        assert_eq!(redis_of(&store).len(), 0, "zeta's chunks are not ours");
        for h in 0..2 {
            put(&mut s, key(h, &salt), &payload(h)).await;
        }
        sync(&mut s).await;
        tokio::time::sleep(Duration::from_millis(2200)).await;
        for h in 2..4 {
            put(&mut s, key(h, &salt), &payload(h)).await;
        }
        sync(&mut s).await;
        assert_eq!(redis_of(&store).len(), 4);
    }

    // The restart: the gauge is what acme has there, zeta's not counted.
    // (Nothing reads the values before: a GET would make them all look
    // just used.)
    let (mut s, store) = start(&cfg, &redis).await;
    let tier = redis_of(&store);
    assert!(tier.rebuilt());
    assert_eq!((tier.len(), tier.bytes()), (4, 4 * FRAME));
    let there = chunk_bytes(&server);
    assert_eq!(there.len(), 6, "four of acme, two of zeta");
    assert_eq!(there.iter().sum::<u64>(), 6 * FRAME);
    let metrics = admin_metrics(store.clone()).await;
    for line in [
        format!("kvgate_store_bytes{{tier=\"redis\"}} {}\n", 4 * FRAME),
        "kvgate_store_chunks{tier=\"redis\"} 4\n".to_string(),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    // A chunk of the previous run is served (sealed under the salt kept in
    // Redis, opened with the same key material).
    assert_eq!(get(&mut s, key(2, &salt)).await, Some((META, payload(2))));
    assert_eq!(tier.stats.hits.get(), 1);
    // Writing more makes room from what was there, least recently used
    // first: 0 and 1 (idle longest), not 2 (just read) or 3.
    for h in 4..6 {
        put(&mut s, key(h, &salt), &payload(h)).await;
    }
    sync(&mut s).await;
    assert_eq!((tier.len(), tier.bytes()), (4, 4 * FRAME));
    assert_eq!(tier.stats.evictions.get(), 2);
    let (mut fresh, _) = start(&cfg, &redis).await;
    let mut found = Vec::new();
    for h in 0..6 {
        found.push(get(&mut fresh, key(h, &salt)).await.is_some());
    }
    assert_eq!(found, [false, false, true, true, true, true]);
    // Zeta's chunks were never this store's to evict.
    let (mut z, _) = start(&other, &redis).await;
    for h in 0..2 {
        assert_eq!(
            get(&mut z, key(500 + h, &other_salt)).await,
            Some((META, payload(h)))
        );
    }
    assert_eq!(chunk_bytes(&server).iter().sum::<u64>(), 6 * FRAME);
}

async fn a_server_not_up_at_start_is_accounted_for_at_its_first_write(srv: Server) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    let port = free_port(&[]);
    let mut redis = single_url(&format!("redis://127.0.0.1:{port}"));
    redis.max_bytes = 3 * FRAME;
    // Nothing listens yet: the store starts all the same.
    let (mut late, store) = start(&cfg, &redis).await;
    assert!(!redis_of(&store).rebuilt());
    let server = RedisServer::start_on(&srv, port);
    {
        let (mut s, _) = start(&cfg, &redis).await;
        for h in 0..3 {
            put(&mut s, key(h, &salt), &payload(h)).await;
        }
        sync(&mut s).await;
    }
    // Its first write finds the three there first, and makes room for
    // itself from them.
    put(&mut late, key(3, &salt), &payload(3)).await;
    sync(&mut late).await;
    let tier = redis_of(&store);
    assert!(tier.rebuilt());
    assert_eq!((tier.len(), tier.bytes()), (3, 3 * FRAME));
    assert_eq!(tier.stats.evictions.get(), 1);
    assert_eq!(chunk_bytes(&server).iter().sum::<u64>(), 3 * FRAME);
}

fn single_url(url: &str) -> kvgate_store::RedisConfig {
    kvgate_store::RedisConfig {
        url: Some(url.to_string()),
        cluster: Vec::new(),
        tls: None,
        max_bytes: 1 << 20,
        write: WritePolicy::Through,
    }
}
