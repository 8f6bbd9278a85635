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

use crate::metrics::{RequestLabels, OUTCOME_COMPLETED, OUTCOME_FAILED, OUTCOME_REVOKED};
use crate::pipeline::Kind;
use crate::request_end::{audit_request, record_routed, RequestEnd};
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
        record_routed(gw, &input, &decision, received, attempt == 0);
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

/// The response body's state: its end (load guard, count, charge, audit)
/// lives here, so it is released when the body ends or the client goes away.
struct Tracked {
    inner: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    end: RequestEnd,
}

/// Where a request went.
struct RoutedTo<'a> {
    endpoint: &'a Endpoint,
    model: &'a str,
    prompt_tokens: u64,
    decision: &'a Decision,
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
    let mut end = RequestEnd::new(gw, endpoint, model, prompt_tokens, decision, guard, facts);
    end.set_status(status.as_u16());
    let tracked = Tracked {
        inner: resp.bytes_stream().boxed(),
        end,
    };
    let stream = futures_util::stream::unfold(tracked, |mut t| async move {
        match t.inner.next().await {
            Some(Ok(_)) if t.end.revoked() => {
                t.end.count(OUTCOME_REVOKED);
                Some((Err(std::io::Error::other("contract suspended")), t))
            }
            Some(Ok(chunk)) => {
                t.end.body_chunk(&chunk);
                Some((Ok::<Bytes, std::io::Error>(chunk), t))
            }
            Some(Err(e)) => {
                t.end.count(OUTCOME_FAILED);
                Some((Err(std::io::Error::other(e)), t))
            }
            None => {
                t.end.count(OUTCOME_COMPLETED);
                None
            }
        }
    });
    Ok(builder.body(Body::from_stream(stream))?)
}
