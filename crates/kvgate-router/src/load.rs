//! Load the gateway itself puts on each endpoint, released when a response
//! body ends (including when the client goes away: the guard drops with it).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::Speculated;

/// Per-endpoint counters, shared by the proxy and the scheduler.
#[derive(Debug, Default)]
pub struct LoadCounters {
    in_flight: AtomicI64,
    /// Uncached prompt tokens of routed requests whose first token has not arrived.
    pending_prefill_tokens: AtomicI64,
    /// Routed requests whose first token has not arrived.
    pending_requests: AtomicI64,
    /// Scraped from the engine's /metrics (f64 bits for usage).
    engine_waiting: AtomicU64,
    engine_running: AtomicU64,
    engine_kv_usage_bits: AtomicU64,
    /// [`ROUTED`] when a request was last started here.
    last_routed: AtomicU64,
}

/// Orders routing decisions process-wide, so endpoints can be compared by how
/// long ago they were last given a request.
static ROUTED: AtomicU64 = AtomicU64::new(0);

/// A consistent-enough copy of the counters for one scheduling decision.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadSnapshot {
    pub in_flight: u64,
    pub pending_prefill_tokens: u64,
    /// Requests routed here whose first token has not arrived.
    pub pending_requests: u64,
    pub engine_waiting: u64,
    pub engine_running: u64,
    pub engine_kv_usage: f64,
    /// When it was last given a request, on a process-wide sequence (larger
    /// is more recent; 0: never).
    pub last_routed: u64,
}

impl LoadCounters {
    pub fn snapshot(&self) -> LoadSnapshot {
        LoadSnapshot {
            in_flight: self.in_flight.load(Ordering::Relaxed).max(0) as u64,
            pending_prefill_tokens: self.pending_prefill_tokens.load(Ordering::Relaxed).max(0)
                as u64,
            pending_requests: self.pending_requests.load(Ordering::Relaxed).max(0) as u64,
            engine_waiting: self.engine_waiting.load(Ordering::Relaxed),
            engine_running: self.engine_running.load(Ordering::Relaxed),
            engine_kv_usage: f64::from_bits(self.engine_kv_usage_bits.load(Ordering::Relaxed)),
            last_routed: self.last_routed.load(Ordering::Relaxed),
        }
    }

    /// Counts a routed request until the returned guard drops.
    pub fn start(self: &Arc<Self>, uncached_prompt_tokens: u64) -> RequestGuard {
        let pending = i64::try_from(uncached_prompt_tokens).unwrap_or(i64::MAX);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_routed.store(
            ROUTED.fetch_add(1, Ordering::Relaxed) + 1,
            Ordering::Relaxed,
        );
        self.pending_prefill_tokens
            .fetch_add(pending, Ordering::Relaxed);
        self.pending_requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard {
            counters: self.clone(),
            pending_prefill: pending,
            started: false,
            speculation: None,
        }
    }

    /// Engine-side numbers from its metrics endpoint.
    pub fn set_engine(&self, waiting: u64, running: u64, kv_usage: f64) {
        self.engine_waiting.store(waiting, Ordering::Relaxed);
        self.engine_running.store(running, Ordering::Relaxed);
        self.engine_kv_usage_bits
            .store(kv_usage.to_bits(), Ordering::Relaxed);
    }
}

/// Held for the life of a proxied request (move it into the response body).
#[derive(Debug)]
pub struct RequestGuard {
    counters: Arc<LoadCounters>,
    pending_prefill: i64,
    /// The first token arrived (or the request ended).
    started: bool,
    /// What the scheduler expects this request to be computing: released
    /// with the first token.
    speculation: Option<Speculated>,
}

impl RequestGuard {
    /// Holds the scheduler's speculation until the first token.
    pub fn speculating(mut self, speculation: Option<Speculated>) -> Self {
        self.speculation = speculation;
        self
    }

    /// The first token arrived: the request's prefill is no longer queued
    /// work, and its prefix is the engine's events' to report.
    pub fn first_token(&mut self) {
        self.speculation = None;
        if !self.started {
            self.started = true;
            self.counters
                .pending_requests
                .fetch_sub(1, Ordering::Relaxed);
        }
        if self.pending_prefill != 0 {
            self.counters
                .pending_prefill_tokens
                .fetch_sub(self.pending_prefill, Ordering::Relaxed);
            self.pending_prefill = 0;
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.first_token();
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_releases_on_first_token_and_drop() {
        let c = Arc::new(LoadCounters::default());
        let mut g = c.start(1000);
        let h = c.start(10);
        assert_eq!(c.snapshot().in_flight, 2);
        assert_eq!(c.snapshot().pending_prefill_tokens, 1010);
        assert_eq!(c.snapshot().pending_requests, 2);
        g.first_token();
        g.first_token();
        assert_eq!(c.snapshot().pending_prefill_tokens, 10);
        assert_eq!(c.snapshot().pending_requests, 1);
        drop(h);
        assert_eq!(c.snapshot().pending_prefill_tokens, 0);
        assert_eq!(c.snapshot().in_flight, 1);
        drop(g);
        let routed = c.snapshot().last_routed;
        assert!(routed > 0);
        assert_eq!(
            c.snapshot(),
            LoadSnapshot {
                last_routed: routed,
                ..LoadSnapshot::default()
            }
        );
        // Stamps order endpoints by when they were last given a request.
        let other = Arc::new(LoadCounters::default());
        drop(other.start(1));
        assert!(other.snapshot().last_routed > routed);
        c.set_engine(3, 4, 0.5);
        assert_eq!(c.snapshot().engine_kv_usage, 0.5);
    }
}
