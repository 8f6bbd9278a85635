//! Kubernetes discovery: the engines are the Ready pods with a podIP that a
//! label selector names in one namespace, or the pods an `InferencePool`
//! (`inference.networking.k8s.io/v1`) selects on its first target port.
//! Pods are watched with kube-rs's watcher, which lists, then watches from the
//! list's resourceVersion with bookmarks, and lists again on `410 Gone` (the
//! set is rebuilt from that list, so pods deleted while the watch was away
//! go too). A pod that turns unready, loses its IP or is deleted leaves the
//! set at once, which closes its event subscription and drops its index
//! entries (`Fleet::follow`); one that turns Ready joins.
//!
//! The InferencePool is watched the same way (`watch_object`). When its
//! `spec.selector.matchLabels` or `spec.targetPorts` change, the pods are
//! watched afresh under the new selector and the set is replaced once that
//! list is in (the old set serves until then); when the pool is deleted its
//! endpoints leave, and they come back if it is created again.
//!
//! Each pod's KV-event and replay endpoints are its IP with the configured
//! ports, or the ports its annotations name (`kvgate.io/events-port`,
//! `kvgate.io/replay-port`). With `models_from_engine` (the default) each
//! pod's `/v1/models` says which models and LoRA adapters it serves
//! (`kvgate_fleet::engine_models`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kvgate_fleet::engine_models::{follow_engine_models, validate_template, NameOf};
pub use kvgate_fleet::K8sDiscoveryConfig;
use kvgate_fleet::{Discovery, EndpointConfig};
use parking_lot::Mutex;
use tokio::sync::watch;

#[cfg(feature = "testing")]
pub mod testing;

pub const EVENTS_PORT_ANNOTATION: &str = "kvgate.io/events-port";
pub const REPLAY_PORT_ANNOTATION: &str = "kvgate.io/replay-port";
/// A failed watch is retried after this long (the set stays meanwhile).
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("kubernetes discovery: set exactly one of selector and inference_pool")]
    Source,
    #[error("kubernetes discovery: selector needs port")]
    NoPort,
    #[error("kubernetes discovery: InferencePool {0}: {1}")]
    Pool(String, String),
    #[error("kubernetes discovery: {0}")]
    Api(#[from] kube::Error),
    #[error("kubernetes discovery: {0}")]
    Endpoint(#[from] kvgate_fleet::EndpointConfigError),
    #[error("kubernetes discovery: {0}")]
    Discovery(#[from] kvgate_fleet::DiscoveryError),
}

/// Where pods are found: the config's selector and port, or an InferencePool's.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    selector: String,
    port: u16,
}

pub struct K8sDiscovery {
    tx: watch::Sender<Vec<EndpointConfig>>,
    _alive: Arc<()>,
}

impl K8sDiscovery {
    /// Reads the InferencePool (if named: a missing pool fails the start, so
    /// a misspelt name is found at once), then watches it and its pods in
    /// the background for as long as this value lives or the set is watched.
    pub async fn start(cfg: K8sDiscoveryConfig, client: kube::Client) -> Result<Self, K8sError> {
        let (target, pool) = match (&cfg.selector, &cfg.inference_pool) {
            (Some(selector), None) => (
                Target {
                    selector: selector.clone(),
                    port: cfg.port.ok_or(K8sError::NoPort)?,
                },
                None,
            ),
            (None, Some(name)) => {
                let gvk =
                    GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool");
                let api: Api<DynamicObject> = Api::namespaced_with(
                    client.clone(),
                    &cfg.namespace,
                    &ApiResource::from_gvk(&gvk),
                );
                let obj = api.get(name).await?;
                (pool_target(name, &obj)?, Some((api, name.clone())))
            }
            _ => return Err(K8sError::Source),
        };
        validate_template(
            &endpoint(&cfg, target.port, "127.0.0.1", &BTreeMap::new()),
            cfg.models_from_engine,
        )?;
        let raw = watch::Sender::new(Vec::new());
        let names: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let alive = Arc::new(());
        let owner = Arc::downgrade(&alive);
        let tx = if cfg.models_from_engine {
            let pods = names.clone();
            let name_of: NameOf =
                Arc::new(move |e: &EndpointConfig| match pods.lock().get(&e.url) {
                    Some(pod) => format!("pod/{pod} ({})", e.url),
                    None => e.url.clone(),
                });
            follow_engine_models(
                raw.subscribe(),
                cfg.models_refresh_ms,
                name_of,
                owner.clone(),
            )
            .await?
        } else {
            raw.clone()
        };
        let watch = Watch {
            pods: Api::namespaced(client, &cfg.namespace),
            cfg,
            sender: raw,
            names,
            owner,
        };
        tokio::spawn(watch.run(target, pool));
        Ok(Self { tx, _alive: alive })
    }
}

impl Discovery for K8sDiscovery {
    fn watch(&self) -> watch::Receiver<Vec<EndpointConfig>> {
        self.tx.subscribe()
    }
}

type Stream<T> = BoxStream<'static, watcher::Result<T>>;

/// The background watch of the pool (if any) and its pods.
struct Watch {
    cfg: K8sDiscoveryConfig,
    pods: Api<Pod>,
    /// The set before each engine's `/v1/models` is asked.
    sender: watch::Sender<Vec<EndpointConfig>>,
    /// url -> pod name, for the engine models' logs.
    names: Arc<Mutex<HashMap<String, String>>>,
    owner: Weak<()>,
}

// One value a loop turn, moved once: boxing the pod would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Step {
    Pool(Option<watcher::Result<Option<DynamicObject>>>),
    Pod(Option<watcher::Result<Event<Pod>>>),
}

impl Watch {
    async fn run(self, target: Target, pool: Option<(Api<DynamicObject>, String)>) {
        let (mut pool_events, pool_name): (Option<Stream<Option<DynamicObject>>>, String) =
            match pool {
                Some((api, name)) => (Some(watcher::watch_object(api, &name).boxed()), name),
                None => (None, String::new()),
            };
        let mut target = Some(target);
        let mut pod_events = target.as_ref().map(|t| self.watch_pods(t));
        // Pod name -> endpoint; a relist is buffered until it is complete.
        let mut live: BTreeMap<String, EndpointConfig> = BTreeMap::new();
        let mut relisting: Option<BTreeMap<String, EndpointConfig>> = None;
        loop {
            let step = tokio::select! {
                ev = next(&mut pool_events) => Step::Pool(ev),
                ev = next(&mut pod_events) => Step::Pod(ev),
            };
            if self.owner.strong_count() == 0 && self.sender.is_closed() {
                return;
            }
            match step {
                // Watchers do not end; if one did, it is not polled again.
                Step::Pool(None) => pool_events = None,
                Step::Pod(None) => pod_events = None,
                // The watcher retries (relisting on 410 Gone); the set stays.
                Step::Pool(Some(Err(e))) | Step::Pod(Some(Err(e))) => {
                    tracing::warn!(error = %e, "kubernetes discovery: watch failed; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                Step::Pool(Some(Ok(obj))) => {
                    let next = match obj {
                        None => None,
                        Some(obj) => match pool_target(&pool_name, &obj) {
                            Ok(t) => Some(t),
                            Err(e) => {
                                tracing::warn!(error = %e, "kubernetes discovery: kept the pool's last selector and port");
                                continue;
                            }
                        },
                    };
                    if next == target {
                        continue;
                    }
                    tracing::info!(pool = %pool_name, target = ?next, "kubernetes discovery: InferencePool changed");
                    pod_events = next.as_ref().map(|t| self.watch_pods(t));
                    relisting = None;
                    if next.is_none() {
                        live.clear();
                    }
                    target = next;
                }
                Step::Pod(Some(Ok(ev))) => {
                    if let Some(t) = &target {
                        self.apply(t, ev, &mut live, &mut relisting);
                    }
                }
            }
            if relisting.is_none() {
                self.publish(&live);
            }
        }
    }

    fn watch_pods(&self, t: &Target) -> Stream<Event<Pod>> {
        let wc = watcher::Config::default().labels(&t.selector);
        watcher::watcher(self.pods.clone(), wc).boxed()
    }

    fn apply(
        &self,
        t: &Target,
        ev: Event<Pod>,
        live: &mut BTreeMap<String, EndpointConfig>,
        relisting: &mut Option<BTreeMap<String, EndpointConfig>>,
    ) {
        match ev {
            Event::Init => *relisting = Some(BTreeMap::new()),
            Event::InitApply(pod) => {
                if let (Some(buf), Some((name, e))) =
                    (relisting.as_mut(), ready(&self.cfg, t, &pod))
                {
                    buf.insert(name, e);
                }
            }
            Event::InitDone => {
                if let Some(buf) = relisting.take() {
                    *live = buf;
                }
            }
            Event::Apply(pod) => {
                let name = pod.metadata.name.clone().unwrap_or_default();
                match ready(&self.cfg, t, &pod) {
                    Some((name, e)) => live.insert(name, e),
                    None => live.remove(&name),
                };
            }
            Event::Delete(pod) => {
                live.remove(&pod.metadata.name.clone().unwrap_or_default());
            }
        }
    }

    fn publish(&self, live: &BTreeMap<String, EndpointConfig>) {
        *self.names.lock() = live
            .iter()
            .map(|(pod, e)| (e.url.clone(), pod.clone()))
            .collect();
        let next: Vec<EndpointConfig> = live.values().cloned().collect();
        self.sender.send_if_modified(|current| {
            let changed = *current != next;
            if changed {
                tracing::info!(
                    endpoints = next.len(),
                    "kubernetes discovery: endpoints changed"
                );
                *current = next;
            }
            changed
        });
    }
}

/// The stream's next item; never, when there is no stream.
async fn next<T>(s: &mut Option<BoxStream<'static, T>>) -> Option<T> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// An InferencePool's label selector and first target port (field names as
/// the CRD's `openAPIV3Schema` has them).
fn pool_target(pool: &str, obj: &DynamicObject) -> Result<Target, K8sError> {
    let bad = |why: &str| K8sError::Pool(pool.to_string(), why.to_string());
    let spec = obj.data.get("spec").ok_or_else(|| bad("no spec"))?;
    let labels = spec
        .pointer("/selector/matchLabels")
        .and_then(|m| m.as_object())
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("no spec.selector.matchLabels"))?;
    let selector = labels
        .iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|v| format!("{k}={v}"))
                .ok_or_else(|| bad("a matchLabels value is not a string"))
        })
        .collect::<Result<Vec<_>, _>>()?
        .join(",");
    let port = spec
        .pointer("/targetPorts/0/number")
        .and_then(|p| p.as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| bad("no spec.targetPorts[0].number"))?;
    Ok(Target { selector, port })
}

/// The pod's name and endpoint if it is Ready with an IP.
fn ready(cfg: &K8sDiscoveryConfig, target: &Target, pod: &Pod) -> Option<(String, EndpointConfig)> {
    let status = pod.status.as_ref()?;
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let is_ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !is_ready || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    Some((
        pod.metadata.name.clone()?,
        endpoint(cfg, target.port, &host, &annotations),
    ))
}

fn endpoint(
    cfg: &K8sDiscoveryConfig,
    port: u16,
    host: &str,
    annotations: &BTreeMap<String, String>,
) -> EndpointConfig {
    let port_of = |annotation: &str, configured: Option<u16>| {
        annotations
            .get(annotation)
            .and_then(|p| p.parse::<u16>().ok())
            .or(configured)
    };
    EndpointConfig {
        url: format!("http://{host}:{port}"),
        models: cfg.models.clone(),
        adapters: Vec::new(),
        block_size: cfg.block_size,
        events: port_of(EVENTS_PORT_ANNOTATION, cfg.events_port)
            .map(|p| format!("tcp://{host}:{p}")),
        replay: port_of(REPLAY_PORT_ANNOTATION, cfg.replay_port)
            .map(|p| format!("tcp://{host}:{p}")),
        topic: cfg.topic.clone(),
        bind: false,
    }
}
