//! The gateway's Prometheus metrics.

use std::collections::HashMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub model: String,
    pub status: u16,
    /// How the response ended: [`OUTCOME_COMPLETED`], [`OUTCOME_ABORTED`]
    /// (the client went away), [`OUTCOME_FAILED`] (upstream broke off) or
    /// [`OUTCOME_REVOKED`] (cut: its contract was suspended).
    pub outcome: &'static str,
}

pub const OUTCOME_COMPLETED: &str = "completed";
pub const OUTCOME_ABORTED: &str = "aborted";
pub const OUTCOME_FAILED: &str = "failed";
pub const OUTCOME_REVOKED: &str = "revoked";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub endpoint: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub policy: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenizerLabels {
    pub model: String,
    /// The transformers tokenizer class vLLM builds for the model.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenderFailureLabels {
    /// Only models the fleet serves get this far, so the label stays bounded.
    pub model: String,
    pub reason: &'static str,
}

/// The deployment's service name (config `service`), as our users' KEDA
/// triggers select it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// One endpoint of the fleet: its name and the model it serves first.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
    pub model: String,
}

/// An engine's KV use as KEDA triggers query it (`service`, as on `sentinel_*`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineServiceLabels {
    pub service: String,
    pub endpoint: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Only configured contracts get here, so the label stays bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContractLabels {
    pub contract: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContractTokenLabels {
    pub contract: String,
    /// `prompt` or `output`.
    pub kind: &'static str,
}

/// A refusal's code (`kvgate_auth::Denied::code`): a fixed set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenyLabels {
    pub code: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub ttft: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub decisions: Family<ReasonLabels, Counter>,
    pub predicted_hit_tokens: Counter,
    pub prompt_tokens: Counter,
    pub connect_retries: Counter,
    pub routing_duration: Histogram,
    pub render_failures: Family<RenderFailureLabels, Counter>,
    /// 1 per model whose tokenizer class kvgate cannot reproduce.
    pub unsupported_tokenizers: Family<TokenizerLabels, Gauge>,
    /// Requests received and not yet answered to the end.
    pub pending_requests: Family<ServiceLabels, Gauge>,
    /// Routed prompt tokens expected cached, over all routed (set at scrape).
    pub kv_cache_hit_rate: Family<ServiceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub contract_requests: Family<ContractLabels, Counter>,
    pub contract_tokens: Family<ContractTokenLabels, Counter>,
    /// Each contract's handles into the two families above.
    contract_counters: parking_lot::RwLock<HashMap<String, ContractCounters>>,
    pub denied: Family<DenyLabels, Counter>,
    pub control_plane_errors: Counter,
    /// Contract status pushes to the KV store that failed after retries.
    pub store_sync_errors: Counter,
    /// Per endpoint, set at scrape: requests kvgate has in flight there, the
    /// engine's queue (its waiting requests) and KV use (0-1), as last scraped.
    pub endpoint_in_flight: Family<EndpointLabels, Gauge>,
    pub endpoint_queue_depth: Family<EndpointLabels, Gauge>,
    pub endpoint_kv_usage: Family<EndpointLabels, FloatGauge>,
    /// The engine's KV use again, as `vllm_gpu_cache_usage_perc{service}`:
    /// the series our users' KEDA ScaledObjects scale on.
    pub engine_kv_usage_by_service: Family<EngineServiceLabels, FloatGauge>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            ttft: Family::new_with_constructor(latency_histogram),
            decisions: Family::default(),
            predicted_hit_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            connect_retries: Counter::default(),
            // 1 µs .. ~33 ms
            routing_duration: Histogram::new(exponential_buckets(1e-6, 2.0, 16)),
            render_failures: Family::default(),
            unsupported_tokenizers: Family::default(),
            pending_requests: Family::default(),
            kv_cache_hit_rate: Family::default(),
            contract_requests: Family::default(),
            contract_tokens: Family::default(),
            contract_counters: parking_lot::RwLock::default(),
            denied: Family::default(),
            control_plane_errors: Counter::default(),
            store_sync_errors: Counter::default(),
            endpoint_in_flight: Family::default(),
            endpoint_queue_depth: Family::default(),
            endpoint_kv_usage: Family::default(),
            engine_kv_usage_by_service: Family::default(),
        }
    }
}

/// One contract's request and token counters, looked up once per contract:
/// `Family::get_or_create` allocates and hashes its labels on every call,
/// three times per request.
#[derive(Clone, Debug)]
pub struct ContractCounters {
    pub requests: Counter,
    pub prompt_tokens: Counter,
    pub output_tokens: Counter,
}

impl GatewayMetrics {
    pub fn contract(&self, id: &str) -> ContractCounters {
        if let Some(c) = self.contract_counters.read().get(id) {
            return c.clone();
        }
        let tokens = |kind| {
            self.contract_tokens
                .get_or_create(&ContractTokenLabels {
                    contract: id.to_string(),
                    kind,
                })
                .clone()
        };
        let c = ContractCounters {
            requests: self
                .contract_requests
                .get_or_create(&ContractLabels {
                    contract: id.to_string(),
                })
                .clone(),
            prompt_tokens: tokens("prompt"),
            output_tokens: tokens("output"),
        };
        self.contract_counters
            .write()
            .entry(id.to_string())
            .or_insert(c)
            .clone()
    }

    /// Sets the per-endpoint gauges from the fleet as it is now (endpoints
    /// that left disappear).
    pub fn refresh_endpoints(
        &self,
        endpoints: &[std::sync::Arc<kvgate_fleet::Endpoint>],
        service: &str,
    ) {
        for f in [&self.endpoint_in_flight, &self.endpoint_queue_depth] {
            f.clear();
        }
        self.endpoint_kv_usage.clear();
        self.engine_kv_usage_by_service.clear();
        for e in endpoints {
            let load = e.load.snapshot();
            let labels = EndpointLabels {
                endpoint: e.name().to_string(),
                model: e.cfg.models.first().cloned().unwrap_or_default(),
            };
            let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.endpoint_in_flight
                .get_or_create(&labels)
                .set(as_i64(load.in_flight));
            self.endpoint_queue_depth
                .get_or_create(&labels)
                .set(as_i64(load.engine_waiting));
            self.endpoint_kv_usage
                .get_or_create(&labels)
                .set(load.engine_kv_usage);
            self.engine_kv_usage_by_service
                .get_or_create(&EngineServiceLabels {
                    service: service.to_string(),
                    endpoint: labels.endpoint,
                })
                .set(load.engine_kv_usage);
        }
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "kvgate_requests",
            "Proxied requests by endpoint, model, status and how the response ended",
            self.requests.clone(),
        );
        r.register(
            "kvgate_request_duration_seconds",
            "Time from receiving a request to the end of its response",
            self.request_duration.clone(),
        );
        r.register(
            "kvgate_time_to_first_token_seconds",
            "Time from receiving a request to the first response chunk, at the gateway",
            self.ttft.clone(),
        );
        r.register(
            "kvgate_routing_decisions",
            "Routing decisions by policy and reason",
            self.decisions.clone(),
        );
        r.register(
            "kvgate_predicted_prefix_hit_tokens",
            "Prompt tokens the router expected to hit the chosen endpoint's cache",
            self.predicted_hit_tokens.clone(),
        );
        r.register(
            "kvgate_prompt_tokens",
            "Prompt tokens routed",
            self.prompt_tokens.clone(),
        );
        r.register(
            "kvgate_connect_retries",
            "Requests retried on another endpoint after a connection failure",
            self.connect_retries.clone(),
        );
        r.register(
            "kvgate_render_failures",
            "Prompts the gateway could not render or tokenize (routed by load alone), by model and reason",
            self.render_failures.clone(),
        );
        r.register(
            "kvgate_tokenizer_unsupported",
            "1 for each model whose tokenizer class (as vLLM builds it) kvgate cannot reproduce: its requests route by load alone",
            self.unsupported_tokenizers.clone(),
        );
        // Our users' KEDA triggers query these names as they are.
        r.register(
            "sentinel_pending_requests",
            "Requests received and not yet answered to the end",
            self.pending_requests.clone(),
        );
        r.register(
            "sentinel_kv_cache_hit_rate",
            "Share of routed prompt tokens the router expected cached on the chosen endpoint",
            self.kv_cache_hit_rate.clone(),
        );
        r.register(
            "kvgate_contract_requests",
            "Requests admitted per contract",
            self.contract_requests.clone(),
        );
        r.register(
            "kvgate_contract_tokens",
            "Tokens per contract: prompt (at admission) and output (from usage)",
            self.contract_tokens.clone(),
        );
        r.register(
            "kvgate_contract_denied",
            "Requests refused by the contract layer, by code",
            self.denied.clone(),
        );
        r.register(
            "kvgate_control_plane_errors",
            "Control plane polls that failed (the last known statuses stand)",
            self.control_plane_errors.clone(),
        );
        r.register(
            "kvgate_store_sync_errors",
            "Contract status pushes to the KV store that failed after retries",
            self.store_sync_errors.clone(),
        );
        r.register(
            "kvgate_routing_duration_seconds",
            "Template + tokenize + keys + score time per request",
            self.routing_duration.clone(),
        );
        r.register(
            "kvgate_endpoint_in_flight",
            "Requests kvgate has in flight at each endpoint",
            self.endpoint_in_flight.clone(),
        );
        r.register(
            "kvgate_endpoint_queue_depth",
            "Each engine's waiting requests, as last scraped",
            self.endpoint_queue_depth.clone(),
        );
        r.register(
            "kvgate_endpoint_kv_usage",
            "Each engine's KV cache use (0-1), as last scraped",
            self.endpoint_kv_usage.clone(),
        );
        r.register(
            "vllm_gpu_cache_usage_perc",
            "Each engine's KV cache use (0-1) by service, re-exported for autoscalers (KEDA)",
            self.engine_kv_usage_by_service.clone(),
        );
    }
}
