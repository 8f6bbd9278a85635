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
//! Each pod's KV-event and replay endpoints are its IP with the configured
//! ports, or the ports its annotations name (`kvgate.io/events-port`,
//! `kvgate.io/replay-port`).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
pub use kvgate_fleet::K8sDiscoveryConfig;
use kvgate_fleet::{Discovery, EndpointConfig};
use tokio::sync::watch;

pub const EVENTS_PORT_ANNOTATION: &str = "kvgate.io/events-port";
pub const REPLAY_PORT_ANNOTATION: &str = "kvgate.io/replay-port";

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
}

/// Where pods are found, once an InferencePool (if any) is read.
#[derive(Debug, Clone)]
struct Target {
    selector: String,
    port: u16,
}

pub struct K8sDiscovery {
    tx: watch::Sender<Vec<EndpointConfig>>,
    _alive: Arc<()>,
}

impl K8sDiscovery {
    /// Resolves the target (reads the InferencePool), then watches its pods
    /// in the background for as long as this value lives or the set is
    /// watched.
    pub async fn start(cfg: K8sDiscoveryConfig, client: kube::Client) -> Result<Self, K8sError> {
        let target = target(&cfg, &client).await?;
        kvgate_fleet::validate_all(&[endpoint(&cfg, target.port, "127.0.0.1", &BTreeMap::new())])?;
        let tx = watch::Sender::new(Vec::new());
        let sender = tx.clone();
        let alive = Arc::new(());
        let owner = Arc::downgrade(&alive);
        let pods: Api<Pod> = Api::namespaced(client, &cfg.namespace);
        tokio::spawn(async move {
            let wc = watcher::Config::default().labels(&target.selector);
            let mut events = watcher::watcher(pods, wc).boxed();
            let mut live: BTreeMap<String, EndpointConfig> = BTreeMap::new();
            let mut relisting: Option<BTreeMap<String, EndpointConfig>> = None;
            while let Some(ev) = events.next().await {
                if owner.strong_count() == 0 && sender.is_closed() {
                    return;
                }
                match ev {
                    Ok(Event::Init) => relisting = Some(BTreeMap::new()),
                    Ok(Event::InitApply(pod)) => {
                        if let (Some(buf), Some((name, e))) =
                            (&mut relisting, ready(&cfg, &target, &pod))
                        {
                            buf.insert(name, e);
                        }
                    }
                    Ok(Event::InitDone) => {
                        if let Some(buf) = relisting.take() {
                            live = buf;
                        }
                    }
                    Ok(Event::Apply(pod)) => {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        match ready(&cfg, &target, &pod) {
                            Some((name, e)) => live.insert(name, e),
                            None => live.remove(&name),
                        };
                    }
                    Ok(Event::Delete(pod)) => {
                        live.remove(&pod.metadata.name.clone().unwrap_or_default());
                    }
                    // The watcher retries (relisting on 410 Gone); the set stays.
                    Err(e) => {
                        tracing::warn!(error = %e, "kubernetes discovery: watch failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        continue;
                    }
                }
                if relisting.is_none() {
                    let next: Vec<EndpointConfig> = live.values().cloned().collect();
                    sender.send_if_modified(|current| {
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
        });
        Ok(Self { tx, _alive: alive })
    }
}

impl Discovery for K8sDiscovery {
    fn watch(&self) -> watch::Receiver<Vec<EndpointConfig>> {
        self.tx.subscribe()
    }
}

/// The label selector and port: the config's, or the InferencePool's.
async fn target(cfg: &K8sDiscoveryConfig, client: &kube::Client) -> Result<Target, K8sError> {
    match (&cfg.selector, &cfg.inference_pool) {
        (Some(selector), None) => Ok(Target {
            selector: selector.clone(),
            port: cfg.port.ok_or(K8sError::NoPort)?,
        }),
        (None, Some(pool)) => {
            let gvk = GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool");
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &cfg.namespace, &ApiResource::from_gvk(&gvk));
            let obj = api.get(pool).await?;
            let bad = |why: &str| K8sError::Pool(pool.clone(), why.to_string());
            let spec = obj.data.get("spec").ok_or_else(|| bad("no spec"))?;
            let labels = spec
                .pointer("/selector/matchLabels")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no spec.selector.matchLabels"))?;
            let selector = labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",");
            let port = spec
                .pointer("/targetPorts/0/number")
                .and_then(|p| p.as_u64())
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| bad("no spec.targetPorts[0].number"))?;
            Ok(Target { selector, port })
        }
        _ => Err(K8sError::Source),
    }
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
