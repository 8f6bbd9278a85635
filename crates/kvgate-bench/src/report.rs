//! A bench run's report: JSON for machines, Markdown for people.

use serde::Serialize;

use crate::runner::StageSummary;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    pub target: String,
    pub workload: String,
    pub command: String,
    pub runs: Vec<RunReport>,
}

/// One router (or policy) through the whole ladder.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub router: String,
    pub stages: Vec<StageReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Offered load (requests/s), or None for closed-loop stages.
    pub offered_rate: Option<f64>,
    #[serde(flatten)]
    pub summary: StageSummary,
    /// Fleet prefix-cache hit rate during the stage, from the engines' metrics.
    pub fleet_hit_rate: Option<f64>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# {}\n\nTarget: `{}`. Workload: `{}`.\n\nCommand: `{}`\n\n",
            self.title, self.target, self.workload, self.command
        );
        s.push_str(&self.table());
        s
    }

    /// One row per router and stage.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str("| router | offered QPS | requests | errors | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ITL p50 ms | output tok/s | fleet hit rate |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for run in &self.runs {
            for st in &run.stages {
                let m = &st.summary;
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {} |\n",
                    run.router,
                    st.offered_rate
                        .map_or("closed loop".to_string(), |r| format!("{r:.1}")),
                    m.requests,
                    m.errors,
                    m.ttft_p50_ms,
                    m.ttft_p90_ms,
                    m.ttft_p99_ms,
                    m.itl_p50_ms,
                    m.output_tok_s,
                    st.fleet_hit_rate
                        .map_or("-".to_string(), |h| format!("{:.1}%", h * 100.0)),
                ));
            }
        }
        s
    }
}

/// Fleet-wide prefix cache counters from engines' `/metrics` (vLLM names).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheCounters {
    pub queries: f64,
    pub hits: f64,
}

impl CacheCounters {
    pub fn parse(text: &str) -> Self {
        let mut c = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = || {
                line.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if line.starts_with("vllm:prefix_cache_queries_total") {
                c.queries += value();
            } else if line.starts_with("vllm:prefix_cache_hits_total") {
                c.hits += value();
            }
        }
        c
    }

    pub fn plus(self, o: Self) -> Self {
        Self {
            queries: self.queries + o.queries,
            hits: self.hits + o.hits,
        }
    }

    /// Hit rate between two readings.
    pub fn rate_since(self, before: Self) -> Option<f64> {
        let q = self.queries - before.queries;
        (q > 0.0).then(|| (self.hits - before.hits) / q)
    }
}

/// Sums the counters of several engines.
pub async fn scrape_fleet(client: &reqwest::Client, engines: &[String]) -> CacheCounters {
    let mut total = CacheCounters::default();
    for e in engines {
        if let Ok(r) = client.get(format!("{e}/metrics")).send().await {
            if let Ok(t) = r.text().await {
                total = total.plus(CacheCounters::parse(&t));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_and_diff() {
        let a = CacheCounters::parse("# x\nvllm:prefix_cache_queries_total{engine=\"0\"} 100.0\nvllm:prefix_cache_hits_total{engine=\"0\"} 25.0\n");
        let b = CacheCounters::parse("vllm:prefix_cache_queries_total{engine=\"0\"} 300.0\nvllm:prefix_cache_hits_total{engine=\"0\"} 175.0\n");
        assert_eq!(
            a,
            CacheCounters {
                queries: 100.0,
                hits: 25.0
            }
        );
        assert_eq!(b.rate_since(a), Some(0.75));
        assert_eq!(a.rate_since(a), None);
    }
}
