#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! DNS discovery: the endpoint set follows the name's records (added,
//! removed), keeps the last set when a lookup fails, and the system
//! resolver answers for a real name; each address's `/v1/models` says what
//! it serves.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use kvgate_fleet::dns::{system_resolver, Resolve};
use kvgate_fleet::{Discovery, DnsDiscovery, DnsDiscoveryConfig};
use parking_lot::Mutex;

fn cfg(name: &str) -> DnsDiscoveryConfig {
    DnsDiscoveryConfig {
        name: name.into(),
        port: 8000,
        models: vec!["m".into()],
        models_from_engine: false,
        models_refresh_ms: 5_000,
        block_size: 16,
        events_port: Some(5557),
        replay_port: Some(5558),
        topic: "kv".into(),
        refresh_ms: 100,
    }
}

type Answer = Arc<Mutex<std::io::Result<Vec<IpAddr>>>>;

fn fake(answer: &Answer) -> Resolve {
    let answer = answer.clone();
    Arc::new(move |_name: String| {
        let a = match &*answer.lock() {
            Ok(ips) => Ok(ips.clone()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        Box::pin(async move { a })
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn urls_after_change(
    rx: &mut tokio::sync::watch::Receiver<Vec<kvgate_fleet::EndpointConfig>>,
) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .expect("a change within 2 s")
        .unwrap();
    rx.borrow().iter().map(|e| e.url.clone()).collect()
}

#[tokio::test]
async fn the_set_follows_the_records_and_survives_a_failed_lookup() {
    let answer: Answer = Arc::new(Mutex::new(Ok(vec![ip("10.0.0.5")])));
    let d = DnsDiscovery::start(cfg("vllm.inference.svc"), fake(&answer))
        .await
        .unwrap();
    let mut rx = d.watch();
    {
        let first = rx.borrow_and_update();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].url, "http://10.0.0.5:8000");
        assert_eq!(first[0].events.as_deref(), Some("tcp://10.0.0.5:5557"));
        assert_eq!(first[0].replay.as_deref(), Some("tcp://10.0.0.5:5558"));
    }
    *answer.lock() = Ok(vec![ip("10.0.0.6"), ip("10.0.0.5"), ip("10.0.0.5")]);
    assert_eq!(
        urls_after_change(&mut rx).await,
        ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
    );
    *answer.lock() = Err(std::io::Error::other("SERVFAIL"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "a failed lookup keeps the last set"
    );
    *answer.lock() = Ok(vec![ip("fd00::7")]);
    assert_eq!(urls_after_change(&mut rx).await, ["http://[fd00::7]:8000"]);
}

#[tokio::test]
async fn the_system_resolver_answers_for_localhost() {
    let d = DnsDiscovery::start(cfg("localhost"), system_resolver())
        .await
        .unwrap();
    let urls: Vec<String> = d.watch().borrow().iter().map(|e| e.url.clone()).collect();
    assert!(
        urls.iter()
            .any(|u| u == "http://127.0.0.1:8000" || u == "http://[::1]:8000"),
        "{urls:?}"
    );
}

#[tokio::test]
async fn a_config_that_makes_bad_endpoints_is_refused() {
    let mut c = cfg("x");
    c.models.clear();
    let answer: Answer = Arc::new(Mutex::new(Ok(vec![])));
    assert!(DnsDiscovery::start(c, fake(&answer)).await.is_err());
}

#[tokio::test]
async fn models_from_engine_ask_each_address_and_fall_back_to_the_config() {
    // An engine on 127.0.0.1 listing a base model and an adapter; none on
    // 127.0.0.2 (refused at once).
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let models = Arc::new(Mutex::new(serde_json::json!({"object": "list", "data": [
        {"id": "base", "object": "model", "parent": null},
        {"id": "lora", "object": "model", "parent": "base"}]})));
    let served = models.clone();
    let app = axum::Router::new().route(
        "/v1/models",
        axum::routing::get(move || {
            let body = served.lock().clone();
            async move { axum::Json(body) }
        }),
    );
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let answer: Answer = Arc::new(Mutex::new(Ok(vec![ip("127.0.0.1"), ip("127.0.0.2")])));
    let c = DnsDiscoveryConfig {
        port,
        models_from_engine: true,
        models_refresh_ms: 100,
        ..cfg("vllm.inference.svc")
    };
    let d = DnsDiscovery::start(c.clone(), fake(&answer)).await.unwrap();
    {
        let set = d.watch().borrow().clone();
        assert_eq!(set.len(), 2, "{set:?}");
        assert_eq!(
            (set[0].models.clone(), set[0].adapters.clone()),
            (vec!["base".to_string()], vec!["lora".to_string()])
        );
        assert_eq!(set[1].models, ["m"], "no answer: the configured models");
    }
    // The adapter is unloaded: the refresh drops it.
    *models.lock() = serde_json::json!({"data": [{"id": "base", "parent": null}]});
    let mut rx = d.watch();
    tokio::time::timeout(Duration::from_secs(2), async {
        while rx.borrow_and_update()[0].serves("lora") {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the unloaded adapter is dropped within 2 s");

    // Without configured models, an address that cannot answer is left out.
    let c = DnsDiscoveryConfig {
        models: vec![],
        ..c
    };
    let d = DnsDiscovery::start(c, fake(&answer)).await.unwrap();
    let urls: Vec<String> = d.watch().borrow().iter().map(|e| e.url.clone()).collect();
    assert_eq!(urls, [format!("http://127.0.0.1:{port}")]);
}
