//! Test support (feature `testing`), shared by this crate's tests and the
//! gateway's: a loopback fake API server that speaks the real wire format
//! (no real apiserver can run here) and a fake engine's `/v1/models`.
//!
//! The fake holds Pods and InferencePools. Lists carry
//! `metadata.resourceVersion`; `?watch=true` streams newline-delimited ADDED /
//! MODIFIED / DELETED events, each followed by a BOOKMARK, filtered by
//! `labelSelector` (pods: `k=v,...`) or `fieldSelector` (`metadata.name=`);
//! an object that stops matching a watch's selector is DELETED for it, as
//! apiservers do. Once history is compacted ([`FakeApiServer::compact`]) a
//! watch from an older resourceVersion gets an ERROR event with a 410 Status.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::Mutex;
use serde_json::{json, Value};

pub type TestError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    InferencePool,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::Pod => "v1",
            Kind::InferencePool => "inference.networking.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::InferencePool => "InferencePool",
        }
    }
}

struct Change {
    rv: u64,
    kind: Kind,
    deleted: bool,
    old: Option<Value>,
    new: Value,
}

#[derive(Default)]
struct Cluster {
    rv: u64,
    /// Resource versions below this are compacted: watching from them is 410 Gone.
    compacted: u64,
    objects: BTreeMap<(Kind, String), Value>,
    log: Vec<Change>,
    pod_selectors: Vec<String>,
    pod_lists: usize,
}

/// The fake API server's state; [`FakeApiServer::client`] serves it.
#[derive(Clone, Default)]
pub struct FakeApiServer {
    cluster: Arc<Mutex<Cluster>>,
    changed: Arc<tokio::sync::Notify>,
}

impl FakeApiServer {
    /// Creates or replaces an object (its kind from `kind`), as a new resourceVersion.
    pub fn put(&self, kind: Kind, object: Value) {
        let mut c = self.cluster.lock();
        c.rv += 1;
        let rv = c.rv;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let old = c.objects.insert((kind, name), object.clone());
        c.log.push(Change {
            rv,
            kind,
            deleted: false,
            old,
            new: object,
        });
        drop(c);
        self.changed.notify_waiters();
    }

    pub fn delete(&self, kind: Kind, name: &str) {
        let mut c = self.cluster.lock();
        c.rv += 1;
        let rv = c.rv;
        if let Some(mut object) = c.objects.remove(&(kind, name.to_string())) {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.log.push(Change {
                rv,
                kind,
                deleted: true,
                old: None,
                new: object,
            });
        }
        drop(c);
        self.changed.notify_waiters();
    }

    pub fn put_pod(&self, pod: Value) {
        self.put(Kind::Pod, pod);
    }

    /// History is compacted: open watches get 410 and must list again.
    pub fn compact(&self) {
        let mut c = self.cluster.lock();
        c.rv += 1;
        c.compacted = c.rv;
        drop(c);
        self.changed.notify_waiters();
    }

    /// A pod deleted while nobody watches (only a relist can see it gone).
    pub fn vanish(&self, name: &str) {
        self.cluster
            .lock()
            .objects
            .remove(&(Kind::Pod, name.to_string()));
    }

    /// A pod created while nobody watches (only a relist can see it).
    pub fn appear(&self, pod: Value) {
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = json!("1");
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.cluster.lock().objects.insert((Kind::Pod, name), pod);
    }

    /// The label selectors pod lists and watches asked with, in order.
    pub fn pod_selectors(&self) -> Vec<String> {
        self.cluster.lock().pod_selectors.clone()
    }

    /// How many times pods were listed.
    pub fn pod_lists(&self) -> usize {
        self.cluster.lock().pod_lists
    }

    /// Serves the fake on a loopback port; a client for it (namespace `inference`).
    pub async fn client(&self) -> Result<kube::Client, TestError> {
        let app = axum::Router::new()
            .route("/api/v1/namespaces/{ns}/pods", get(pods))
            .route(
                "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools",
                get(pools),
            )
            .route(
                "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools/{name}",
                get(one_pool),
            )
            .with_state(self.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move { axum::serve(l, app).await });
        let mut cfg = kube::Config::new(format!("http://{addr}").parse()?);
        cfg.default_namespace = "inference".into();
        Ok(kube::Client::try_from(cfg)?)
    }
}

/// A Pod labelled `app: vllm`, naming events port 5557 in its annotation.
pub fn pod(name: &str, ip: &str, ready: bool) -> Value {
    labelled_pod(name, ip, ready, "vllm")
}

/// A Pod labelled `app: <app>`.
pub fn labelled_pod(name: &str, ip: &str, ready: bool, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "inference", "labels": {"app": app},
                     "annotations": {"kvgate.io/events-port": "5557"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.32.0"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

/// An InferencePool selecting `app: <app>` on `port`: the fields of
/// `inference.networking.k8s.io_inferencepools.yaml` (v1, the
/// gateway-api-inference-extension CRD): `spec.selector.matchLabels`,
/// `spec.targetPorts[].number`, `spec.endpointPickerRef`.
pub fn inference_pool(name: &str, app: &str, port: u16) -> Value {
    json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "inference"},
        "spec": {"selector": {"matchLabels": {"app": app}}, "targetPorts": [{"number": port}],
                 "appProtocol": "http",
                 "endpointPickerRef": {"name": "kvgate-epp", "port": {"number": 9002},
                                       "failureMode": "FailClose"}},
    })
}

fn line(kind: &str, object: &Value) -> Vec<u8> {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Whether `object` matches a `k=v,...` label selector or a
/// `metadata.name=` field selector (absent: everything).
fn matches(object: &Value, labels: Option<&str>, fields: Option<&str>) -> bool {
    let labels_ok = labels.is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|term| {
            let (k, v) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .unwrap_or((term, ""));
            object["metadata"]["labels"][k].as_str() == Some(v)
        })
    });
    let fields_ok = fields.is_none_or(|sel| {
        sel.strip_prefix("metadata.name=")
            .is_some_and(|n| object["metadata"]["name"].as_str() == Some(n))
    });
    labels_ok && fields_ok
}

async fn pods(
    State(fake): State<FakeApiServer>,
    Path(_ns): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    {
        let mut c = fake.cluster.lock();
        if let Some(s) = q.get("labelSelector") {
            c.pod_selectors.push(s.clone());
        }
        if q.get("watch").map(String::as_str) != Some("true") {
            c.pod_lists += 1;
        }
    }
    list_or_watch(fake, Kind::Pod, q)
}

async fn pools(
    State(fake): State<FakeApiServer>,
    Path(_ns): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    list_or_watch(fake, Kind::InferencePool, q)
}

async fn one_pool(
    State(fake): State<FakeApiServer>,
    Path((_ns, name)): Path<(String, String)>,
) -> Response {
    match fake
        .cluster
        .lock()
        .objects
        .get(&(Kind::InferencePool, name.clone()))
    {
        Some(pool) => axum::Json(pool.clone()).into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("inferencepools.inference.networking.k8s.io \"{name}\" not found")})),
        )
            .into_response(),
    }
}

fn list_or_watch(fake: FakeApiServer, kind: Kind, q: BTreeMap<String, String>) -> Response {
    let labels = q.get("labelSelector").cloned();
    let fields = q.get("fieldSelector").cloned();
    if q.get("watch").map(String::as_str) != Some("true") {
        let c = fake.cluster.lock();
        let items: Vec<Value> = c
            .objects
            .iter()
            .filter(|((k, _), o)| *k == kind && matches(o, labels.as_deref(), fields.as_deref()))
            .map(|(_, o)| o.clone())
            .collect();
        return axum::Json(json!({
            "apiVersion": kind.api_version(), "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": c.rv.to_string()},
            "items": items,
        }))
        .into_response();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stream = futures_util::stream::unfold((fake, from, false), move |(fake, at, done)| {
        let (labels, fields) = (labels.clone(), fields.clone());
        async move {
            if done {
                return None;
            }
            let mut at = at;
            loop {
                let notified = fake.changed.notified();
                {
                    let c = fake.cluster.lock();
                    if at < c.compacted {
                        let gone = line(
                            "ERROR",
                            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "message": "too old resource version",
                                "reason": "Expired", "code": 410}),
                        );
                        return Some((
                            Ok::<_, std::io::Error>(Bytes::from(gone)),
                            (fake.clone(), at, true),
                        ));
                    }
                    if let Some(ch) = c.log.iter().find(|ch| ch.rv > at && ch.kind == kind) {
                        at = ch.rv;
                        let is = |o: &Value| matches(o, labels.as_deref(), fields.as_deref());
                        let was = ch.old.as_ref().is_some_and(is);
                        let now = is(&ch.new);
                        let event = match (ch.deleted, was, now) {
                            (true, _, true) => Some("DELETED"),
                            (false, false, true) => Some("ADDED"),
                            (false, true, true) => Some("MODIFIED"),
                            (false, true, false) => Some("DELETED"),
                            _ => None,
                        };
                        let mut out = event.map(|e| line(e, &ch.new)).unwrap_or_default();
                        // A bookmark after each change, as apiservers send them.
                        out.extend(line(
                            "BOOKMARK",
                            &json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                                    "metadata": {"resourceVersion": at.to_string()}}),
                        ));
                        return Some((Ok(Bytes::from(out)), (fake.clone(), at, false)));
                    }
                }
                notified.await;
            }
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A fake engine's `/v1/models` (vLLM's shape), changeable while served.
#[derive(Clone, Default)]
pub struct FakeEngine {
    models: Arc<Mutex<Value>>,
}

impl FakeEngine {
    /// Serving `base` models and `(adapter, parent)` LoRA adapters.
    pub fn new(base: &[&str], adapters: &[(&str, &str)]) -> Self {
        let e = Self::default();
        e.set(base, adapters);
        e
    }

    pub fn set(&self, base: &[&str], adapters: &[(&str, &str)]) {
        let cards = base
            .iter()
            .map(|m| json!({"id": m, "object": "model", "owned_by": "vllm", "root": format!("/models/{m}"), "parent": null, "max_model_len": 4096}))
            .chain(adapters.iter().map(|(a, parent)| json!({"id": a, "object": "model", "owned_by": "vllm", "root": format!("/adapters/{a}"), "parent": parent})));
        *self.models.lock() = json!({"object": "list", "data": cards.collect::<Vec<_>>()});
    }

    /// `GET /v1/models` (merge it into an engine's other routes).
    pub fn router(&self) -> axum::Router {
        let models = self.models.clone();
        axum::Router::new().route(
            "/v1/models",
            get(move || {
                let body = models.lock().clone();
                async move { axum::Json(body) }
            }),
        )
    }

    /// Serves [`Self::router`] on `ip:port` (a pod's address on loopback).
    pub async fn serve(&self, ip: &str, port: u16) -> Result<(), TestError> {
        let l = tokio::net::TcpListener::bind((ip, port)).await?;
        let app = self.router();
        tokio::spawn(async move { axum::serve(l, app).await });
        Ok(())
    }
}
