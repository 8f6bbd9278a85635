#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Kubernetes discovery against a loopback fake API server that speaks the
//! real wire format (no real apiserver can run here): a PodList with its
//! resourceVersion, then `?watch=true` as newline-delimited ADDED /
//! MODIFIED / DELETED / BOOKMARK events, and `410 Gone` (an ERROR event with
//! a Status) once the watch's resourceVersion is compacted away, after which
//! the client lists again. Pods turn Ready and unready and are deleted; an
//! InferencePool names the selector and port.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::routing::get;
use kvgate_fleet::Discovery;
use kvgate_k8s::{K8sDiscovery, K8sDiscoveryConfig};
use parking_lot::Mutex;
use serde_json::{json, Value};

#[derive(Default)]
struct Cluster {
    rv: u64,
    /// Resource versions at or below this are compacted: watching from
    /// them is 410 Gone.
    compacted: u64,
    pods: BTreeMap<String, Value>,
    /// (resourceVersion, type, object) of every change.
    log: Vec<(u64, &'static str, Value)>,
    selectors: Vec<String>,
    lists: usize,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Cluster>>, Arc<tokio::sync::Notify>);

impl Fake {
    fn put(&self, pod: Value) {
        let mut c = self.0.lock();
        c.rv += 1;
        let rv = c.rv;
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let kind = if c.pods.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.pods.insert(name, pod.clone());
        c.log.push((rv, kind, pod));
        drop(c);
        self.1.notify_waiters();
    }

    fn delete(&self, name: &str) {
        let mut c = self.0.lock();
        c.rv += 1;
        let rv = c.rv;
        if let Some(mut pod) = c.pods.remove(name) {
            pod["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.log.push((rv, "DELETED", pod));
        }
        drop(c);
        self.1.notify_waiters();
    }

    /// History is compacted: open watches get 410 and must list again.
    fn compact(&self) {
        let mut c = self.0.lock();
        c.rv += 1;
        c.compacted = c.rv;
        drop(c);
        self.1.notify_waiters();
    }

    /// A pod deleted while nobody watches (only a relist can see it gone).
    fn vanish(&self, name: &str) {
        self.0.lock().pods.remove(name);
    }
}

fn pod(name: &str, ip: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "inference", "labels": {"app": "vllm"},
                     "annotations": {"kvgate.io/events-port": "5557"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.32.0"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

fn gone() -> Bytes {
    line(
        "ERROR",
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}),
    )
}

async fn pods(
    State(fake): State<Fake>,
    Path(_ns): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> axum::response::Response {
    if let Some(s) = q.get("labelSelector") {
        fake.0.lock().selectors.push(s.clone());
    }
    if q.get("watch").map(String::as_str) != Some("true") {
        let mut c = fake.0.lock();
        c.lists += 1;
        let list = json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": c.rv.to_string()},
            "items": c.pods.values().cloned().collect::<Vec<_>>(),
        });
        return axum::Json(list).into_response();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stream = futures_util::stream::unfold(
        (fake, from, false),
        |(fake, mut at, done)| async move {
            if done {
                return None;
            }
            loop {
                let notified = fake.1.notified();
                {
                    let c = fake.0.lock();
                    if at < c.compacted {
                        return Some((Ok::<_, std::io::Error>(gone()), (fake.clone(), at, true)));
                    }
                    if let Some((rv, kind, obj)) = c.log.iter().find(|(rv, _, _)| *rv > at).cloned()
                    {
                        at = rv;
                        let mut out = line(kind, &obj).to_vec();
                        // A bookmark after each event, as apiservers send them.
                        out.extend_from_slice(&line(
                        "BOOKMARK",
                        &json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}),
                    ));
                        return Some((Ok(Bytes::from(out)), (fake.clone(), at, false)));
                    }
                }
                notified.await;
            }
        },
    );
    axum::response::Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

use axum::response::IntoResponse;

async fn pool(Path((_ns, name)): Path<(String, String)>) -> axum::response::Response {
    if name != "vllm-pool" {
        return (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(json!({"kind": "Status", "code": 404})),
        )
            .into_response();
    }
    axum::Json(json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "inference", "resourceVersion": "1"},
        "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}],
                 "endpointPickerRef": {"name": "kvgate-epp", "port": {"number": 9002}}},
    }))
    .into_response()
}

async fn apiserver(fake: Fake) -> kube::Client {
    let app = axum::Router::new()
        .route("/api/v1/namespaces/{ns}/pods", get(pods))
        .route(
            "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools/{name}",
            get(pool),
        )
        .with_state(fake);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let mut cfg = kube::Config::new(format!("http://{addr}").parse().unwrap());
    cfg.default_namespace = "inference".into();
    kube::Client::try_from(cfg).unwrap()
}

fn config() -> K8sDiscoveryConfig {
    K8sDiscoveryConfig {
        namespace: "inference".into(),
        selector: Some("app=vllm".into()),
        inference_pool: None,
        port: Some(8000),
        models: vec!["m".into()],
        block_size: 16,
        events_port: Some(5550),
        replay_port: Some(5558),
        topic: "kv".into(),
    }
}

/// Waits (2 s at most) until the set's URLs are `want`.
async fn expect(d: &K8sDiscovery, want: &[&str]) {
    let mut rx = d.watch();
    let got = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let urls: Vec<String> = rx
                .borrow_and_update()
                .iter()
                .map(|e| e.url.clone())
                .collect();
            if urls == want {
                return urls;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "the set never became {want:?} (now {:?})",
        d.watch()
            .borrow()
            .iter()
            .map(|e| e.url.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_pods_join_unready_and_deleted_ones_leave_and_410_relists() {
    let fake = Fake::default();
    fake.put(pod("vllm-a", "10.0.0.1", true));
    fake.put(pod("vllm-b", "10.0.0.2", false));
    let d = K8sDiscovery::start(config(), apiserver(fake.clone()).await)
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
    }
    assert_eq!(
        fake.0.lock().selectors.first().map(String::as_str),
        Some("app=vllm")
    );

    fake.put(pod("vllm-b", "10.0.0.2", true));
    expect(&d, &["http://10.0.0.1:8000", "http://10.0.0.2:8000"]).await;
    fake.put(pod("vllm-a", "10.0.0.1", false));
    expect(&d, &["http://10.0.0.2:8000"]).await;
    fake.put(pod("vllm-c", "", true));
    fake.put(pod("vllm-a", "10.0.0.1", true));
    expect(&d, &["http://10.0.0.1:8000", "http://10.0.0.2:8000"]).await;
    fake.delete("vllm-a");
    expect(&d, &["http://10.0.0.2:8000"]).await;

    // History compacted: b vanishes unseen and d appears; only the relist
    // after 410 Gone can tell.
    let lists = fake.0.lock().lists;
    fake.vanish("vllm-b");
    fake.0.lock().pods.insert("vllm-d".into(), {
        let mut p = pod("vllm-d", "10.0.0.4", true);
        p["metadata"]["resourceVersion"] = json!("1");
        p
    });
    fake.compact();
    expect(&d, &["http://10.0.0.4:8000"]).await;
    assert!(
        fake.0.lock().lists > lists,
        "410 made the client list again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inference_pool_names_the_selector_and_the_port() {
    let fake = Fake::default();
    fake.put(pod("vllm-a", "10.0.0.1", true));
    let client = apiserver(fake.clone()).await;
    let cfg = K8sDiscoveryConfig {
        selector: None,
        inference_pool: Some("vllm-pool".into()),
        port: None,
        ..config()
    };
    let d = K8sDiscovery::start(cfg.clone(), client.clone())
        .await
        .unwrap();
    expect(&d, &["http://10.0.0.1:8000"]).await;
    assert_eq!(
        fake.0.lock().selectors.first().map(String::as_str),
        Some("app=vllm")
    );

    let missing = K8sDiscoveryConfig {
        inference_pool: Some("no-such-pool".into()),
        ..cfg
    };
    assert!(
        K8sDiscovery::start(missing, client).await.is_err(),
        "a missing pool is an error"
    );
}
