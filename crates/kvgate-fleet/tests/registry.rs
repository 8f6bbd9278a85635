#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The registry against discovery: reconcile, follow, and the routing
//! transaction's admission and exclusion.

use std::sync::Arc;
use std::time::Duration;

use kvgate_fleet::{Ejection, EndpointConfig, Fleet, IndexOnly, RouteQuery, StaticDiscovery};
use kvgate_index::{IndexConfig, KvIndex};
use kvgate_keys::BlockHasher;
use kvgate_router::{Policy, RouteError, RouterConfig};

fn fleet(policy: Policy) -> Arc<Fleet> {
    let index = Arc::new(KvIndex::new(
        IndexConfig::default(),
        BlockHasher::from_secret(b"registry-test"),
    ));
    Arc::new(Fleet::new(
        RouterConfig {
            policy,
            ..RouterConfig::default()
        },
        Ejection {
            after_failures: 1,
            cooldown: Duration::from_secs(60),
        },
        index.clone(),
        Box::new(IndexOnly(index)),
    ))
}

fn names(f: &Fleet) -> Vec<String> {
    f.snapshot().iter().map(|e| e.name().to_string()).collect()
}

#[tokio::test]
async fn reconcile_follows_discovery_and_rejoins_changed_endpoints() {
    let f = fleet(Policy::RoundRobin);
    let a = EndpointConfig::new("http://a:1", "m", 16);
    let b = EndpointConfig::new("http://b:1", "m", 16);
    let discovery = StaticDiscovery::new(vec![a.clone(), b.clone()]).unwrap();
    f.follow(&discovery).await;
    assert_eq!(names(&f), ["http://a:1", "http://b:1"]);
    let kept = f.snapshot()[1].clone();
    assert_eq!(f.index().endpoints().len(), 2);

    // b changes its block size (leaves and joins again), a goes, c comes.
    let b32 = EndpointConfig::new("http://b:1", "m", 32);
    let c = EndpointConfig::new("http://c:1", "m", 16);
    discovery.set(vec![b32.clone(), c.clone()]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while names(&f) != ["http://b:1", "http://c:1"] && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(names(&f), ["http://b:1", "http://c:1"]);
    let snap = f.snapshot();
    assert_eq!(snap[0].cfg.block_size, 32);
    assert!(
        !Arc::ptr_eq(&snap[0], &kept),
        "a changed endpoint is a new one"
    );
    assert!(snap[0].index_id.is_some(), "it rejoined the index");
    let mut indexed: Vec<(String, u32)> = f
        .index()
        .endpoints()
        .into_iter()
        .map(|e| (e.name, e.block_size))
        .collect();
    indexed.sort();
    assert_eq!(
        indexed,
        [
            ("http://b:1".to_string(), 32),
            ("http://c:1".to_string(), 16)
        ]
    );
    assert_eq!(f.models(), ["m"]);

    // An unchanged set keeps the same endpoints (and their load counters).
    f.reconcile(vec![b32, c]).await;
    assert!(Arc::ptr_eq(&f.snapshot()[0], &snap[0]));
}

#[tokio::test]
async fn an_engine_that_loads_an_adapter_stays_the_same_endpoint() {
    let f = fleet(Policy::RoundRobin);
    let a = EndpointConfig::new("http://a:1", "base", 16);
    f.reconcile(vec![a.clone()]).await;
    let before = f.snapshot()[0].clone();
    let load = before.load.clone();
    let id = before.index_id;
    assert!(id.is_some());

    let mut with_lora = a.clone();
    with_lora.adapters = vec!["lora".into()];
    f.reconcile(vec![with_lora.clone()]).await;
    let after = f.snapshot()[0].clone();
    assert!(after.serves("lora"));
    assert_eq!(after.index_id, id, "the same index registration");
    assert!(Arc::ptr_eq(&after.load, &load), "the same load counters");
    assert_eq!(f.index().endpoints().len(), 1);
    assert_eq!(f.models(), ["base", "lora"]);
    // The breaker is shared too: a failure recorded on the old one counts.
    before.record_failure();
    assert!(!after.is_available(), "one breaker for the engine");

    // A new root model changes its block keys: it leaves and joins again.
    let other = EndpointConfig::new("http://a:1", "other", 16);
    f.reconcile(vec![other]).await;
    let rejoined = f.snapshot()[0].clone();
    assert!(!Arc::ptr_eq(&rejoined.load, &load));
    assert_eq!(f.models(), ["other"]);
}

#[tokio::test]
async fn route_counts_load_excludes_and_knows_unknown_models() {
    let f = fleet(Policy::RoundRobin);
    f.join(EndpointConfig::new("http://a:1", "m", 16));
    f.join(EndpointConfig::new("http://b:1", "m", 16));
    let tokens: Vec<u32> = (0..40).collect();
    let q = RouteQuery {
        model: "m",
        tokens: &tokens,
        ..RouteQuery::default()
    };
    let mut input = f.routing_input(&q).unwrap();
    assert_eq!(input.keys().len(), 1, "one block size, keyed once");
    assert_eq!(input.keys()[0].1.len(), 2, "two full blocks of 40 tokens");
    let first = f.route(&input).unwrap();
    assert_eq!(first.endpoint.load.snapshot().in_flight, 1);
    // The endpoint that failed is passed over on the retry.
    input.exclude(&first.endpoint);
    for _ in 0..4 {
        let r = f.route(&input).unwrap();
        assert_ne!(r.endpoint.name(), first.endpoint.name());
    }
    let load = first.endpoint.load.clone();
    drop(first);
    assert_eq!(load.snapshot().in_flight, 0, "the guard releases the load");
    // An ejected endpoint is not admitted; with both out there is no endpoint.
    for e in f.snapshot().iter() {
        e.record_failure();
    }
    let fresh = f.routing_input(&q).unwrap();
    assert!(matches!(
        f.route(&fresh),
        Err(RouteError::NoHealthyEndpoint(_))
    ));
    assert!(matches!(
        f.routing_input(&RouteQuery {
            model: "other",
            ..q
        }),
        Err(RouteError::UnknownModel(_))
    ));
}
