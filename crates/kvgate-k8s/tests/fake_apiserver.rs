#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Kubernetes discovery against a loopback fake API server that speaks the
//! real wire format (`kvgate_k8s::testing`; no real apiserver can run here):
//! pods turn Ready and unready and are deleted, `410 Gone` makes the client
//! list again, an InferencePool names the selector and port and is followed
//! as it changes, is deleted and comes back; each pod's `/v1/models` says
//! which models and LoRA adapters it serves.

use std::time::Duration;

use kvgate_fleet::{Discovery, EndpointConfig};
use kvgate_k8s::testing::{inference_pool, labelled_pod, pod, FakeApiServer, FakeEngine, Kind};
use kvgate_k8s::{K8sDiscovery, K8sDiscoveryConfig};

fn config() -> K8sDiscoveryConfig {
    K8sDiscoveryConfig {
        namespace: "inference".into(),
        selector: Some("app=vllm".into()),
        inference_pool: None,
        port: Some(8000),
        models: vec!["m".into()],
        models_from_engine: false,
        models_refresh_ms: 5_000,
        block_size: 16,
        events_port: Some(5550),
        replay_port: Some(5558),
        topic: "kv".into(),
    }
}

fn pool_config() -> K8sDiscoveryConfig {
    K8sDiscoveryConfig {
        selector: None,
        inference_pool: Some("vllm-pool".into()),
        port: None,
        ..config()
    }
}

/// Waits (2 s at most) until `done` holds for the set.
async fn wait_for(d: &K8sDiscovery, what: &str, done: impl Fn(&[EndpointConfig]) -> bool) {
    let mut rx = d.watch();
    let got = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if done(&rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(got.is_ok(), "{what} (now {:?})", *d.watch().borrow());
}

/// Waits (2 s at most) until the set's URLs are `want`.
async fn expect(d: &K8sDiscovery, want: &[&str]) {
    wait_for(d, &format!("the set never became {want:?}"), |set| {
        set.iter().map(|e| e.url.as_str()).eq(want.iter().copied())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_pods_join_unready_and_deleted_ones_leave_and_410_relists() {
    let fake = FakeApiServer::default();
    fake.put_pod(pod("vllm-a", "10.0.0.1", true));
    fake.put_pod(pod("vllm-b", "10.0.0.2", false));
    let d = K8sDiscovery::start(config(), fake.client().await.unwrap())
        .await
        .unwrap();
    expect(&d, &["http://10.0.0.1:8000"]).await;
    {
        let set = d.watch().borrow().clone();
        assert_eq!(
            set[0].events.as_deref(),
            Some("tcp://10.0.0.1:5557"),
            "the annotation's events port"
        );
        assert_eq!(set[0].replay.as_deref(), Some("tcp://10.0.0.1:5558"));
        assert_eq!(set[0].models, ["m"], "the configured models");
    }
    assert_eq!(
        fake.pod_selectors().first().map(String::as_str),
        Some("app=vllm")
    );

    fake.put_pod(pod("vllm-b", "10.0.0.2", true));
    expect(&d, &["http://10.0.0.1:8000", "http://10.0.0.2:8000"]).await;
    fake.put_pod(pod("vllm-a", "10.0.0.1", false));
    expect(&d, &["http://10.0.0.2:8000"]).await;
    fake.put_pod(pod("vllm-c", "", true));
    fake.put_pod(pod("vllm-a", "10.0.0.1", true));
    expect(&d, &["http://10.0.0.1:8000", "http://10.0.0.2:8000"]).await;
    fake.delete(Kind::Pod, "vllm-a");
    expect(&d, &["http://10.0.0.2:8000"]).await;

    // History compacted: b vanishes unseen and d appears; only the relist
    // after 410 Gone can tell.
    let lists = fake.pod_lists();
    fake.vanish("vllm-b");
    fake.appear(pod("vllm-d", "10.0.0.4", true));
    fake.compact();
    expect(&d, &["http://10.0.0.4:8000"]).await;
    assert!(fake.pod_lists() > lists, "410 made the client list again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inference_pool_names_the_selector_and_the_port() {
    let fake = FakeApiServer::default();
    fake.put_pod(pod("vllm-a", "10.0.0.1", true));
    fake.put(
        Kind::InferencePool,
        inference_pool("vllm-pool", "vllm", 8000),
    );
    let client = fake.client().await.unwrap();
    let d = K8sDiscovery::start(pool_config(), client.clone())
        .await
        .unwrap();
    expect(&d, &["http://10.0.0.1:8000"]).await;
    assert_eq!(
        fake.pod_selectors().first().map(String::as_str),
        Some("app=vllm")
    );

    let missing = K8sDiscoveryConfig {
        inference_pool: Some("no-such-pool".into()),
        ..pool_config()
    };
    assert!(
        K8sDiscovery::start(missing, client).await.is_err(),
        "a missing pool is an error at start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_is_followed_as_its_selector_and_port_change_and_as_it_goes_and_comes_back() {
    let fake = FakeApiServer::default();
    fake.put_pod(pod("vllm-a", "10.0.0.1", true));
    fake.put_pod(labelled_pod("vllm2-a", "10.0.1.1", true, "vllm2"));
    fake.put_pod(labelled_pod("vllm2-b", "10.0.1.2", true, "vllm2"));
    fake.put(
        Kind::InferencePool,
        inference_pool("vllm-pool", "vllm", 8000),
    );
    let d = K8sDiscovery::start(pool_config(), fake.client().await.unwrap())
        .await
        .unwrap();
    expect(&d, &["http://10.0.0.1:8000"]).await;

    // A new selector and port: the old pod leaves, the new ones join on the new port.
    fake.put(
        Kind::InferencePool,
        inference_pool("vllm-pool", "vllm2", 8001),
    );
    expect(&d, &["http://10.0.1.1:8001", "http://10.0.1.2:8001"]).await;
    assert_eq!(
        fake.pod_selectors().last().map(String::as_str),
        Some("app=vllm2")
    );
    // The pods under the new selector are still watched.
    fake.put_pod(labelled_pod("vllm2-b", "10.0.1.2", false, "vllm2"));
    expect(&d, &["http://10.0.1.1:8001"]).await;
    // Only the port changes.
    fake.put(
        Kind::InferencePool,
        inference_pool("vllm-pool", "vllm2", 8002),
    );
    expect(&d, &["http://10.0.1.1:8002"]).await;

    // Deleted: its endpoints leave; created again: they come back.
    fake.delete(Kind::InferencePool, "vllm-pool");
    expect(&d, &[]).await;
    fake.put(
        Kind::InferencePool,
        inference_pool("vllm-pool", "vllm", 8000),
    );
    expect(&d, &["http://10.0.0.1:8000"]).await;

    // A compaction relists the pool too; a change made meanwhile is seen.
    fake.compact();
    fake.put(
        Kind::InferencePool,
        inference_pool("vllm-pool", "vllm2", 8003),
    );
    expect(&d, &["http://10.0.1.1:8003"]).await;
}

/// A free port on loopback, for engines on several 127.0.0.x addresses.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_serves_the_models_and_adapters_its_engine_lists() {
    let port = free_port();
    let a = FakeEngine::new(&["base"], &[("sql-lora", "base"), ("chat-lora", "base")]);
    a.serve("127.0.0.1", port).await.unwrap();
    // b's engine is not up: with no models configured it is left out; c has
    // no engine either and keeps the configured models.
    let fake = FakeApiServer::default();
    fake.put_pod(pod("vllm-a", "127.0.0.1", true));
    fake.put_pod(pod("vllm-b", "127.0.0.2", true));
    let cfg = K8sDiscoveryConfig {
        port: Some(port),
        models: vec![],
        models_from_engine: true,
        models_refresh_ms: 200,
        ..config()
    };
    let client = fake.client().await.unwrap();
    let d = K8sDiscovery::start(cfg.clone(), client.clone())
        .await
        .unwrap();
    let url_a = format!("http://127.0.0.1:{port}");
    wait_for(&d, "a serves the base model and both adapters", |set| {
        set.len() == 1
            && set[0].url == url_a
            && ["base", "sql-lora", "chat-lora"]
                .iter()
                .all(|m| set[0].serves(m))
    })
    .await;
    {
        let set = d.watch().borrow().clone();
        assert_eq!(set[0].models, ["base"], "adapters are not base models");
        assert_eq!(set[0].adapters, ["sql-lora", "chat-lora"]);
        assert!(
            !set[0].serves("m"),
            "the engine's list replaces the config's"
        );
    }

    // The engine unloads an adapter: the refresh drops it.
    a.set(&["base"], &[("sql-lora", "base")]);
    wait_for(&d, "the unloaded adapter is dropped", |set| {
        set.len() == 1 && set[0].serves("sql-lora") && !set[0].serves("chat-lora")
    })
    .await;

    // b's engine comes up: the refresh finds it.
    let b = FakeEngine::new(&["base"], &[]);
    b.serve("127.0.0.2", port).await.unwrap();
    wait_for(&d, "b joins once its engine answers", |set| set.len() == 2).await;

    // With models configured, a pod whose engine cannot answer keeps them.
    fake.put_pod(pod("vllm-c", "127.0.0.3", true));
    let d2 = K8sDiscovery::start(
        K8sDiscoveryConfig {
            models: vec!["m".into()],
            ..cfg
        },
        client,
    )
    .await
    .unwrap();
    let url_c = format!("http://127.0.0.3:{port}");
    wait_for(&d2, "c is kept with the configured model", |set| {
        set.iter().any(|e| e.url == url_c && e.models == ["m"])
            && set.iter().any(|e| e.url == url_a && e.serves("sql-lora"))
    })
    .await;
}
