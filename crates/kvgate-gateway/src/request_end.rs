//! The end of a routed request, whichever front served it (the proxy's
//! response stream, or the endpoint picker's ext_proc exchange): its load
//! guard, its metrics, the output tokens charged to its contract and its
//! audit record, counted once, when the response ends or is dropped.

use std::sync::Arc;
use std::time::Instant;

use kvgate_fleet::{Endpoint, RoutingInput};
use kvgate_router::{Decision, RequestGuard};

use crate::metrics::{LatencyLabels, ReasonLabels, RequestLabels, OUTCOME_ABORTED};
use crate::proxy::RequestFacts;
use crate::usage::UsageScan;
use crate::Gateway;

/// Counts a routing decision (on a request's first attempt also its routing
/// time and predicted hits).
pub fn record_routed(
    gw: &Gateway,
    input: &RoutingInput<'_>,
    decision: &Decision,
    received: Instant,
    first_attempt: bool,
) {
    if first_attempt {
        gw.metrics
            .routing_duration
            .observe(received.elapsed().as_secs_f64());
        gw.metrics.prompt_tokens.inc_by(input.prompt_tokens as u64);
        gw.metrics
            .predicted_hit_tokens
            .inc_by(decision.expected_cached_tokens);
    }
    gw.metrics
        .decisions
        .get_or_create(&ReasonLabels {
            policy: gw.fleet.scheduler().config().policy.name().into(),
            reason: decision.reason.into(),
        })
        .inc();
}

/// A routed request until its response ends: holds the endpoint's load
/// guard (released on drop) and counts the request exactly once.
pub struct RequestEnd {
    guard: RequestGuard,
    first: bool,
    gw: Arc<Gateway>,
    labels: LatencyLabels,
    status: u16,
    facts: RequestFacts,
    prompt_tokens: u64,
    cached_tokens: u64,
    usage: UsageScan,
    /// Set once the request has been counted (ended or broke off).
    counted: bool,
}

impl RequestEnd {
    pub fn new(
        gw: &Arc<Gateway>,
        endpoint: &Endpoint,
        model: &str,
        prompt_tokens: u64,
        decision: &Decision,
        guard: RequestGuard,
        facts: RequestFacts,
    ) -> Self {
        Self {
            guard,
            first: true,
            gw: gw.clone(),
            labels: LatencyLabels {
                endpoint: endpoint.name().to_string(),
                model: model.to_string(),
            },
            status: 200,
            facts,
            prompt_tokens,
            cached_tokens: decision.expected_cached_tokens,
            usage: UsageScan::default(),
            counted: false,
        }
    }

    /// The upstream's response status.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// Whether the request's contract was suspended with its streams cut.
    pub fn revoked(&self) -> bool {
        self.facts.admission.as_ref().is_some_and(|a| a.cut())
    }

    /// A chunk of the response body went by (the first one is the TTFT).
    pub fn body_chunk(&mut self, chunk: &[u8]) {
        self.usage.feed(chunk);
        if self.first {
            self.first = false;
            self.guard.first_token();
            self.gw
                .metrics
                .ttft
                .get_or_create(&self.labels)
                .observe(self.facts.received.elapsed().as_secs_f64());
        }
    }

    /// Counts the request as ended with `outcome` (once; later calls do nothing).
    pub fn count(&mut self, outcome: &'static str) {
        if std::mem::replace(&mut self.counted, true) {
            return;
        }
        self.gw
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint: self.labels.endpoint.clone(),
                model: self.labels.model.clone(),
                status: self.status,
                outcome,
            })
            .inc();
        self.gw
            .metrics
            .request_duration
            .get_or_create(&self.labels)
            .observe(self.facts.received.elapsed().as_secs_f64());
        let output_tokens = self.usage.output_tokens();
        if let Some(a) = &self.facts.admission {
            a.charge_output(output_tokens);
        }
        if let Some(c) = &self.facts.counters {
            c.output_tokens.inc_by(output_tokens);
        }
        audit_request(
            &self.gw,
            &self.facts,
            kvgate_auth::audit::AuditRecord::new(kvgate_auth::audit::kind::REQUEST)
                .model(&self.labels.model)
                .endpoint(&self.labels.endpoint)
                .status(self.status)
                .prompt_tokens(self.prompt_tokens)
                .cached_tokens(self.cached_tokens)
                .output_tokens(output_tokens)
                .reason(outcome),
        );
    }
}

impl Drop for RequestEnd {
    fn drop(&mut self) {
        // Dropped before its end: the client went away mid-response.
        self.count(OUTCOME_ABORTED);
    }
}

/// The audit record of a request, with its contract and subject.
pub(crate) fn audit_request(
    gw: &Gateway,
    facts: &RequestFacts,
    rec: kvgate_auth::audit::AuditRecord,
) {
    let rec = match &facts.admission {
        Some(a) => rec.contract(a.contract.id()).subject(&a.principal.subject),
        None => rec,
    };
    gw.sentinel
        .audit()
        .record(rec.latency_ms(facts.received.elapsed().as_secs_f64() * 1e3));
}
