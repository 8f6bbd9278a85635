//! Prometheus metrics of event ingestion and index queries.

use std::sync::Arc;

use kvgate_index::{ApplyStats, KvIndex};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub endpoint: String,
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub endpoint: String,
    pub outcome: String,
}

/// A Prometheus scrape response for `registry` (OpenMetrics text).
pub fn render(registry: &Registry) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Every metric the indexer exports; cheap to share behind an `Arc`.
pub struct IndexerMetrics {
    pub events_received: Family<EventLabels, Counter>,
    pub blocks_applied: Family<OutcomeLabels, Counter>,
    pub decode_errors: Family<EndpointLabels, Counter>,
    pub seq_gaps: Family<EndpointLabels, Counter>,
    pub replays: Family<OutcomeLabels, Counter>,
    pub reconnects: Family<EndpointLabels, Counter>,
    pub query_duration: Histogram,
    pub query_blocks: Counter,
    pub query_hit_blocks: Counter,
    pub hit_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub blocks_total: Gauge,
    pub pods_tracked: Gauge,
    pub memory_bytes: Gauge,
}

impl Default for IndexerMetrics {
    fn default() -> Self {
        Self {
            events_received: Family::default(),
            blocks_applied: Family::default(),
            decode_errors: Family::default(),
            seq_gaps: Family::default(),
            replays: Family::default(),
            reconnects: Family::default(),
            // 1 µs .. ~16 ms: lookups are microseconds, tokenizing callers more.
            query_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-6, 2.0, 15),
            ),
            query_blocks: Counter::default(),
            query_hit_blocks: Counter::default(),
            hit_ratio: Gauge::default(),
            blocks_total: Gauge::default(),
            pods_tracked: Gauge::default(),
            memory_bytes: Gauge::default(),
        }
    }
}

impl IndexerMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let m = self.as_ref();
        registry.register(
            "kv_cache_events_received",
            "KV events received, by endpoint and type",
            m.events_received.clone(),
        );
        registry.register(
            "kv_cache_blocks_applied",
            "Blocks applied to the index, by outcome (stored, removed, evicted, orphan, unknown_removal)",
            m.blocks_applied.clone(),
        );
        registry.register(
            "kv_cache_event_decode_errors",
            "Event payloads or frames that failed to decode",
            m.decode_errors.clone(),
        );
        registry.register(
            "kv_cache_event_seq_gaps",
            "Sequence gaps detected in an endpoint's event stream",
            m.seq_gaps.clone(),
        );
        registry.register(
            "kv_cache_replays",
            "Replay requests, by outcome (ok, unavailable, stale)",
            m.replays.clone(),
        );
        registry.register(
            "kv_cache_reconnects",
            "Event stream (re)connections",
            m.reconnects.clone(),
        );
        registry.register(
            "kv_cache_query_duration_seconds",
            "Index lookup latency (keys to per-endpoint matches)",
            m.query_duration.clone(),
        );
        registry.register(
            "kv_cache_hit_ratio",
            "Matched blocks over queried blocks, best endpoint, since start",
            m.hit_ratio.clone(),
        );
        registry.register(
            "kv_cache_blocks_total",
            "Tracked (block, endpoint, tier) entries",
            m.blocks_total.clone(),
        );
        registry.register(
            "kv_cache_pods_tracked",
            "Endpoints known to the index",
            m.pods_tracked.clone(),
        );
        registry.register(
            "kv_cache_index_memory_bytes",
            "Approximate heap bytes held by the index",
            m.memory_bytes.clone(),
        );
    }

    pub fn record_event(&self, endpoint: &str, kind: &str) {
        self.events_received
            .get_or_create(&EventLabels {
                endpoint: endpoint.to_string(),
                r#type: kind.to_string(),
            })
            .inc();
    }

    pub fn record_apply(&self, endpoint: &str, s: &ApplyStats) {
        for (outcome, n) in [
            ("stored", s.stored_blocks),
            ("removed", s.removed_blocks),
            ("evicted", s.evicted_blocks),
            ("orphan", s.orphan_blocks),
            ("unknown_removal", s.unknown_removals),
            ("rejected_event", s.rejected_events),
        ] {
            if n > 0 {
                self.blocks_applied
                    .get_or_create(&OutcomeLabels {
                        endpoint: endpoint.to_string(),
                        outcome: outcome.to_string(),
                    })
                    .inc_by(n as u64);
            }
        }
    }

    pub fn record_outcome(family: &Family<OutcomeLabels, Counter>, endpoint: &str, outcome: &str) {
        family
            .get_or_create(&OutcomeLabels {
                endpoint: endpoint.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn inc(family: &Family<EndpointLabels, Counter>, endpoint: &str) {
        family
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .inc();
    }

    pub fn record_query(&self, seconds: f64, queried_blocks: u64, best_matched: u64) {
        self.query_duration.observe(seconds);
        let q = self.query_blocks.inc_by(queried_blocks) + queried_blocks;
        let h = self.query_hit_blocks.inc_by(best_matched) + best_matched;
        if q > 0 {
            self.hit_ratio.set(h as f64 / q as f64);
        }
    }

    /// Refreshes gauges from the index (called at scrape time).
    pub fn refresh_gauges(&self, index: &KvIndex) {
        let s = index.stats();
        self.blocks_total.set(s.tracked_entries as i64);
        self.pods_tracked.set(s.endpoints as i64);
        self.memory_bytes.set(s.approx_heap_bytes as i64);
    }
}
