//! `/metrics` in vLLM's Prometheus names and labels.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::SimState;
use crate::engine::Histogram;

pub(super) async fn metrics(State(state): State<SimState>) -> Response {
    let m = state.engine.metrics_snapshot();
    let labels = format!("engine=\"0\",model_name=\"{}\"", state.model);
    let mut out = String::new();
    // The standard process metric: restart detection compares it between scrapes.
    out.push_str(&format!(
        "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {:.3}\n",
        state.engine.start_time_seconds()
    ));
    let mut gauge = |name: &str, help: &str, v: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {v}\n"
        ));
    };
    gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        m.running as f64,
    );
    gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        m.waiting as f64,
    );
    gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        m.kv_usage,
    );
    let mut counter = |name: &str, help: &str, v: u64| {
        out.push_str(&format!("# HELP {name}_total {help}\n# TYPE {name}_total counter\n{name}_total{{{labels}}} {v}.0\n"));
    };
    counter(
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        m.prefix_cache_queries,
    );
    counter(
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        m.prefix_cache_hits,
    );
    counter(
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        m.prompt_tokens,
    );
    counter(
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        m.generation_tokens,
    );
    counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        m.requests_finished,
    );
    counter(
        "vllm:prompt_tokens_cached",
        "Number of cached prompt tokens.",
        m.prompt_tokens_cached,
    );
    counter(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        m.preemptions,
    );
    out.push_str(&format!(
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"{}\",prefix_caching_hash_algo=\"sha256\"}} 1.0\n",
        state.block_size, state.num_blocks
    ));
    histogram(
        &mut out,
        &labels,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &m.ttft,
    );
    histogram(
        &mut out,
        &labels,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &m.e2e,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn histogram(out: &mut String, labels: &str, name: &str, help: &str, h: &Histogram) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
    let mut cumulative = 0u64;
    for (le, n) in h.bounds.iter().zip(&h.counts) {
        cumulative += n;
        out.push_str(&format!(
            "{name}_bucket{{{labels},le=\"{le:?}\"}} {cumulative}.0\n"
        ));
    }
    out.push_str(&format!(
        "{name}_bucket{{{labels},le=\"+Inf\"}} {}.0\n",
        h.count
    ));
    out.push_str(&format!(
        "{name}_count{{{labels}}} {}.0\n{name}_sum{{{labels}}} {}\n",
        h.count, h.sum
    ));
}
