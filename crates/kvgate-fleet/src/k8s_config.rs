//! The Kubernetes discovery's config (the watching itself is `kvgate-k8s`,
//! kept out of this crate with its kube-rs dependencies).

use serde::{Deserialize, Serialize};

/// `kubernetes:` in the gateway's config: the engines are the Ready pods a
/// label selector (or an InferencePool) names (`kvgate-k8s` watches them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sDiscoveryConfig {
    pub namespace: String,
    /// A label selector (`app=vllm,tier=gpu`); or
    #[serde(default)]
    pub selector: Option<String>,
    /// the name of an InferencePool in `namespace` (its selector and port).
    #[serde(default)]
    pub inference_pool: Option<String>,
    /// The engines' HTTP port (with `selector`; a pool names its own).
    #[serde(default)]
    pub port: Option<u16>,
    pub models: Vec<String>,
    pub block_size: u32,
    #[serde(default)]
    pub events_port: Option<u16>,
    #[serde(default)]
    pub replay_port: Option<u16>,
    #[serde(default)]
    pub topic: String,
}
