#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The fake API server's objects are the ones `scripts/check-deploy`
//! validates against the real Pod schema and InferencePool CRD: if the fake
//! drifts from tests/fixtures/objects.yaml, this fails.

use kvgate_k8s::testing::{inference_pool, pod};
use serde::Deserialize;

#[test]
fn the_fake_servers_objects_are_the_validated_fixtures() {
    let text = include_str!("fixtures/objects.yaml");
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0], pod("vllm-0", "10.0.0.1", true));
    assert_eq!(docs[1], inference_pool("vllm-pool", "vllm", 8000));
}
