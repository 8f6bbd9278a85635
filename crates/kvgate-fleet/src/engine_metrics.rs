//! Reads the engine-side load numbers vLLM exports on `/metrics` (the fleet's scrape).

/// Load-relevant values from a Prometheus text exposition (summed over label sets).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct EngineLoad {
    pub waiting: f64,
    pub running: f64,
    pub kv_usage: f64,
}

pub fn parse_engine_load(text: &str) -> EngineLoad {
    let mut out = EngineLoad::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let slot = match name {
            "vllm:num_requests_waiting" => &mut out.waiting,
            "vllm:num_requests_running" => &mut out.running,
            // Renamed across vLLM releases.
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => &mut out.kv_usage,
            _ => continue,
        };
        // The value follows the (optional) label set.
        let rest = match line.rfind('}') {
            Some(i) => &line[i + 1..],
            None => &line[name_end..],
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            if v.is_finite() {
                *slot += v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_metrics() {
        let text = "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2.0\n\
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 1.0\n\
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n\
vllm:num_requests_waiting_by_reason{reason=\"x\"} 9\n\
garbage line\nvllm:kv_cache_usage_perc NaN\n";
        assert_eq!(
            parse_engine_load(text),
            EngineLoad {
                waiting: 3.0,
                running: 3.0,
                kv_usage: 0.25
            }
        );
        assert_eq!(parse_engine_load(""), EngineLoad::default());
    }
}
