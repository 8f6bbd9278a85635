//! What goes into and comes out of the engine: requests, token events,
//! errors, step outputs and vLLM-style counters.

use kvgate_wire::vllm::KvEvent;

#[derive(Debug, Clone, Default)]
pub struct SimRequest {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: u32,
    pub cache_salt: Option<String>,
    pub lora_name: Option<String>,
}

/// What the HTTP layer hears about one request.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// Prefill done; `ttft_secs` is simulated time since arrival.
    FirstToken {
        cached_tokens: usize,
        ttft_secs: f64,
    },
    Token(u32),
    Done {
        completion_tokens: usize,
        cached_tokens: usize,
        e2e_secs: f64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is not running")]
    Stopped,
    #[error("the engine refuses requests (fault injection)")]
    Refusing,
    #[error("prompt of {tokens} tokens needs {blocks} KV blocks; the engine has {usable}")]
    TooLong {
        tokens: usize,
        blocks: usize,
        usable: usize,
    },
}

pub type RequestId = u64;

/// Tokens produced by one step, for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub id: RequestId,
    pub events: Vec<TokenEvent>,
    pub finished: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// Simulated duration of the step.
    pub duration_secs: f64,
    pub prefill_tokens: usize,
    pub decode_seqs: usize,
    pub kv_events: Vec<KvEvent>,
    pub outputs: Vec<RequestOutput>,
}

/// Counters with vLLM's metric meanings.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    /// Prompt tokens of requests looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached.
    pub prefix_cache_hits: u64,
    /// Prompt tokens computed (vLLM counts all prompt tokens of a request).
    pub prompt_tokens: u64,
    pub prompt_tokens_cached: u64,
    pub generation_tokens: u64,
    pub requests_finished: u64,
    pub preemptions: u64,
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    pub ttft: Histogram,
    pub e2e: Histogram,
}

/// A Prometheus histogram with vLLM's TTFT buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

/// vLLM's `time_to_first_token_seconds` buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self {
            bounds: TTFT_BUCKETS,
            counts: vec![0; TTFT_BUCKETS.len()],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}
