//! The Kubernetes discovery's config (the watching itself is `kvgate-k8s`,
//! kept out of this crate with its kube-rs dependencies).

use serde::{Deserialize, Serialize};

use crate::engine_models::{default_models_from_engine, default_models_refresh_ms};

/// `kubernetes:` in the gateway's config: the engines are the Ready pods a
/// label selector (or an InferencePool) names (`kvgate-k8s` watches them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sDiscoveryConfig {
    pub namespace: String,
    /// A label selector (`app=vllm,tier=gpu`); or
    #[serde(default)]
    pub selector: Option<String>,
    /// the name of an InferencePool in `namespace` (its selector and port,
    /// followed as the pool changes).
    #[serde(default)]
    pub inference_pool: Option<String>,
    /// The engines' HTTP port (with `selector`; a pool names its own).
    #[serde(default)]
    pub port: Option<u16>,
    /// What every pod serves; with `models_from_engine`, only for pods whose
    /// `/v1/models` has not answered yet (empty: such a pod is left out
    /// until it answers).
    #[serde(default)]
    pub models: Vec<String>,
    /// Ask each Ready pod's `GET /v1/models` for its models and LoRA
    /// adapters (on by default: a pool's pods say what they serve, as an
    /// endpoint picker's user expects).
    #[serde(default = "default_models_from_engine")]
    pub models_from_engine: bool,
    /// How often `/v1/models` is asked again (adapters load at runtime).
    #[serde(default = "default_models_refresh_ms")]
    pub models_refresh_ms: u64,
    pub block_size: u32,
    #[serde(default)]
    pub events_port: Option<u16>,
    #[serde(default)]
    pub replay_port: Option<u16>,
    #[serde(default)]
    pub topic: String,
}
