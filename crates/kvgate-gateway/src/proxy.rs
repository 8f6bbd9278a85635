//! Sending a routed request upstream, retrying connection failures on the
//! next-best endpoint, and streaming the response back chunk by chunk.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName};
use axum::response::Response;
use futures_util::StreamExt;
use kvgate_fleet::{Endpoint, Routed, RoutingInput};
use kvgate_router::{Decision, RequestGuard};

use crate::metrics::{
    LatencyLabels, ReasonLabels, RequestLabels, OUTCOME_ABORTED, OUTCOME_COMPLETED, OUTCOME_FAILED,
    OUTCOME_REVOKED,
};
use crate::pipeline::Kind;
use crate::usage::UsageScan;
use crate::Gateway;

/// What the response's end needs to know of its request: when it came, its
/// contract (released, charged and audited at the end).
pub struct RequestFacts {
    pub received: Instant,
    pub admission: Option<kvgate_auth::Admission>,
    /// The admitted contract's counters (with `admission`).
    pub counters: Option<crate::metrics::ContractCounters>,
    pub pending: PendingRequest,
}

/// Counts a request in `sentinel_pending_requests` until it is dropped
/// (with the response body, or with the error answered instead).
pub struct PendingRequest(prometheus_client::metrics::gauge::Gauge);

impl PendingRequest {
    pub fn new(gw: &Gateway) -> Self {
        gw.pending_gauge.inc();
        Self(gw.pending_gauge.clone())
    }
}

impl Drop for PendingRequest {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    NoEndpoint(#[from] kvgate_router::RouteError),
    #[error("upstream {endpoint}: {source}")]
    Upstream {
        endpoint: String,
        source: reqwest::Error,
    },
    #[error("building the response: {0}")]
    Response(#[from] axum::http::Error),
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Routes and forwards `body`; on a connection failure the request goes to
/// the next-best endpoint (up to `connect_retries` times).
pub async fn forward(
    gw: &Arc<Gateway>,
    kind: Kind,
    headers: &HeaderMap,
    body: Bytes,
    mut input: RoutingInput<'_>,
    facts: RequestFacts,
) -> Result<Response, ProxyError> {
    let received = facts.received;
    let mut attempt = 0;
    loop {
        let Routed {
            endpoint,
            decision,
            guard,
        } = gw.fleet.route(&input)?;
        if attempt == 0 {
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
        let mut upstream = gw
            .http
            .post(format!("{}{}", endpoint.cfg.url, kind.path()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        for (name, value) in headers {
            // The client's credential is the contract layer's, never the
            // engine's; engine identity and placement headers are kvgate's.
            let skip = is_hop_by_hop(name)
                || *name == header::CONTENT_TYPE
                || (*name == header::AUTHORIZATION && gw.sentinel.enabled())
                || kvgate_auth::fields::PRIVILEGED_HEADERS.contains(&name.as_str());
            if !skip {
                upstream = upstream.header(name, value);
            }
        }
        match upstream.send().await {
            Ok(resp) => {
                if resp.status().is_server_error() {
                    endpoint.record_failure();
                } else {
                    endpoint.record_success();
                }
                let routed = RoutedTo {
                    endpoint: &endpoint,
                    model: input.model,
                    prompt_tokens: input.prompt_tokens as u64,
                    decision: &decision,
                };
                return stream_back(gw, routed, resp, guard, facts);
            }
            Err(e) if e.is_connect() && attempt < gw.cfg.connect_retries => {
                tracing::warn!(endpoint = %endpoint.name(), error = %e, "connect failed; trying the next endpoint");
                endpoint.record_failure();
                gw.metrics.connect_retries.inc();
                input.exclude(&endpoint);
                attempt += 1;
            }
            Err(source) => {
                endpoint.record_failure();
                audit_request(
                    gw,
                    &facts,
                    kvgate_auth::audit::AuditRecord::new(kvgate_auth::audit::kind::REQUEST)
                        .model(input.model)
                        .endpoint(endpoint.name())
                        .status(502)
                        .prompt_tokens(input.prompt_tokens as u64),
                );
                gw.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        endpoint: endpoint.name().into(),
                        model: input.model.to_string(),
                        status: 502,
                        outcome: OUTCOME_FAILED,
                    })
                    .inc();
                return Err(ProxyError::Upstream {
                    endpoint: endpoint.name().to_string(),
                    source,
                });
            }
        }
    }
}

/// The response body's state: the load guard lives here, so it is released
/// when the body ends or the client goes away; so is the request's count.
struct Tracked {
    inner: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
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

/// Where a request went.
struct RoutedTo<'a> {
    endpoint: &'a Endpoint,
    model: &'a str,
    prompt_tokens: u64,
    decision: &'a Decision,
}

/// The audit record of a request, with its contract and subject.
fn audit_request(gw: &Gateway, facts: &RequestFacts, rec: kvgate_auth::audit::AuditRecord) {
    let rec = match &facts.admission {
        Some(a) => rec.contract(a.contract.id()).subject(&a.principal.subject),
        None => rec,
    };
    gw.sentinel
        .audit()
        .record(rec.latency_ms(facts.received.elapsed().as_secs_f64() * 1e3));
}

impl Tracked {
    fn count(&mut self, outcome: &'static str) {
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

impl Drop for Tracked {
    fn drop(&mut self) {
        // Dropped before its end: the client went away mid-response.
        self.count(OUTCOME_ABORTED);
    }
}

fn stream_back(
    gw: &Arc<Gateway>,
    routed: RoutedTo<'_>,
    resp: reqwest::Response,
    guard: RequestGuard,
    facts: RequestFacts,
) -> Result<Response, ProxyError> {
    let RoutedTo {
        endpoint,
        model,
        prompt_tokens,
        decision,
    } = routed;
    let status = resp.status();
    let mut builder = Response::builder().status(status.as_u16());
    for (name, value) in resp.headers() {
        if !is_hop_by_hop(name) {
            builder = builder.header(name, value);
        }
    }
    if gw.cfg.debug_headers {
        builder = builder.header("x-kvgate-endpoint", endpoint.name());
        builder = builder.header(
            "x-kvgate-decision",
            format!("{} {}", decision.reason, decision.explain()),
        );
    }
    let tracked = Tracked {
        inner: resp.bytes_stream().boxed(),
        guard,
        first: true,
        gw: gw.clone(),
        labels: LatencyLabels {
            endpoint: endpoint.name().to_string(),
            model: model.to_string(),
        },
        status: status.as_u16(),
        facts,
        prompt_tokens,
        cached_tokens: decision.expected_cached_tokens,
        usage: UsageScan::default(),
        counted: false,
    };
    let stream = futures_util::stream::unfold(tracked, |mut t| async move {
        match t.inner.next().await {
            Some(Ok(_)) if t.facts.admission.as_ref().is_some_and(|a| a.cut()) => {
                t.count(OUTCOME_REVOKED);
                Some((Err(std::io::Error::other("contract suspended")), t))
            }
            Some(Ok(chunk)) => {
                t.usage.feed(&chunk);
                if t.first {
                    t.first = false;
                    t.guard.first_token();
                    t.gw.metrics
                        .ttft
                        .get_or_create(&t.labels)
                        .observe(t.facts.received.elapsed().as_secs_f64());
                }
                Some((Ok::<Bytes, std::io::Error>(chunk), t))
            }
            Some(Err(e)) => {
                t.count(OUTCOME_FAILED);
                Some((Err(std::io::Error::other(e)), t))
            }
            None => {
                t.count(OUTCOME_COMPLETED);
                None
            }
        }
    });
    Ok(builder.body(Body::from_stream(stream))?)
}
