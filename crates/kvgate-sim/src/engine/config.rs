//! The engine's shape (vLLM's flags) and its step latency model.

/// How long each step takes, in simulated time.
///
/// Defaults are calibrated on an 8B-class model on one H100 (see
/// `../shared/workloads.md`): ~35 us per uncached prompt token, plus a fixed
/// cost for every forward pass that carries prefill work. A ~10k-token prompt
/// then takes ~0.46 s cold (two chunks of the default 8192-token budget) and
/// ~0.056 s when all but its last block is cached: ~8x, the shape of llm-d's
/// single-pod anchor (~7x).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatencyModel {
    /// Every step (scheduling, sampling, kernel launches).
    pub step_overhead_ms: f64,
    /// Added to a step that computes any prefill tokens.
    pub prefill_overhead_ms: f64,
    /// Per prompt token computed (not cached).
    pub prefill_us_per_token: f64,
    /// Per sequence decoding in the step.
    pub decode_us_per_seq: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            step_overhead_ms: 5.0,
            prefill_overhead_ms: 50.0,
            prefill_us_per_token: 35.0,
            decode_us_per_seq: 60.0,
        }
    }
}

impl LatencyModel {
    /// Seconds for a step with `prefill_tokens` computed prompt tokens and
    /// `decode_seqs` sequences decoding.
    pub fn step_secs(&self, prefill_tokens: usize, decode_seqs: usize) -> f64 {
        let mut ms = self.step_overhead_ms;
        if prefill_tokens > 0 {
            ms +=
                self.prefill_overhead_ms + prefill_tokens as f64 * self.prefill_us_per_token / 1e3;
        }
        ms += decode_seqs as f64 * self.decode_us_per_seq / 1e3;
        ms / 1e3
    }
}

/// The engine's shape, as vLLM's flags set it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// `--block-size`.
    pub block_size: usize,
    /// `--num-gpu-blocks-override` (block 0 is reserved, as in vLLM).
    pub num_blocks: usize,
    /// `--max-num-seqs`.
    pub max_num_seqs: usize,
    /// `--max-num-batched-tokens`: the per-step token budget.
    pub max_num_batched_tokens: usize,
    /// Token ids sampled for output are drawn below this (the tokenizer's
    /// regular vocabulary).
    pub output_vocab: u32,
    pub latency: LatencyModel,
    /// Simulated seconds per wall-clock second (1 = real time).
    pub time_scale: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 4096,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            output_vocab: 32_000,
            latency: LatencyModel::default(),
            time_scale: 1.0,
        }
    }
}
