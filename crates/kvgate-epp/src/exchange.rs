//! One ext_proc stream is one HTTP request through Envoy. Its steps, in the
//! order Envoy sends them (the EPP protocol; `../README.md`):
//!
//! 1. **Request headers**: kept. Answered at once only when they end the
//!    request (a bodyless `GET /v1/models`): Envoy waits for that answer
//!    before it sends anything else, so holding it would hang the request.
//! 2. **Request body**: chunks collected to `end_of_stream` (at most
//!    `max_body_bytes`, else 413). Then the routing transaction runs once
//!    (`kvgate_gateway::pick`: contract, validation, tokens, route) and the
//!    answer is the headers response (the destination, route cache cleared)
//!    followed by the body as forwarded (the contract's salt and LMCache tag
//!    in it), in chunks; or an `ImmediateResponse` (400, 401, 403, 404, 413,
//!    429, 503), after which the stream carries nothing of ours.
//! 3. **Request trailers**: answered unchanged.
//! 4. **Response headers**: the upstream's status kept for the metrics.
//! 5. **Response body**: each chunk passed back as it comes (SSE streams
//!    event by event), its usage read; at `end_of_stream` the request is
//!    counted, its tokens charged and its endpoint's load released.
//! 6. **Response trailers**: answered; end the request if the body did not.
//!
//! If Envoy closes the stream first (the client went away, the upstream
//! failed), dropping the exchange counts the request aborted and releases
//! the load, as the proxy does when its response body is dropped.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use kvgate_fleet::Endpoint;
use kvgate_gateway::metrics::{OUTCOME_COMPLETED, OUTCOME_REVOKED};
use kvgate_gateway::pick::{pick, pick_any};
use kvgate_gateway::pipeline::Kind;
use kvgate_gateway::request_end::RequestEnd;
use kvgate_gateway::Gateway;
use kvgate_openai::OpenAiError;

use crate::wire::{self, Headers};

/// Fallbacks named after the primary in the destination header.
pub const MAX_FALLBACKS: usize = 2;

pub struct Exchange {
    gw: Arc<Gateway>,
    received: Instant,
    headers: Option<Headers>,
    body: Vec<u8>,
    /// The subset hint: only these `ip:port`s may be picked.
    subset: Option<Vec<String>>,
    /// The picked endpoint's `ip:port`.
    destination: Option<String>,
    end: Option<RequestEnd>,
    /// Answered with an ImmediateResponse: nothing more is ours to answer.
    done: bool,
}

impl Exchange {
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self {
            gw,
            received: Instant::now(),
            headers: None,
            body: Vec::new(),
            subset: None,
            destination: None,
            end: None,
            done: false,
        }
    }

    /// What to send back for one message from Envoy (often nothing yet).
    pub fn on(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        if self.done {
            return Vec::new();
        }
        let Some(request) = msg.request else {
            return Vec::new();
        };
        match request {
            Request::RequestHeaders(h) => {
                self.received = Instant::now();
                self.subset = wire::metadata_endpoints(
                    msg.metadata_context.as_ref(),
                    wire::SUBSET_NAMESPACE,
                    wire::SUBSET_KEY,
                );
                self.headers = Some(Headers::from_envoy(h.headers.as_ref()));
                if h.end_of_stream {
                    return self.decide();
                }
                Vec::new()
            }
            Request::RequestBody(b) => {
                if self.body.len() + b.body.len() > self.gw.config().max_body_bytes {
                    return self.refuse(OpenAiError::payload_too_large(format!(
                        "request body over {} bytes",
                        self.gw.config().max_body_bytes
                    )));
                }
                self.body.extend_from_slice(&b.body);
                if b.end_of_stream {
                    return self.decide();
                }
                Vec::new()
            }
            Request::RequestTrailers(_) => vec![wire::trailers(true)],
            Request::ResponseHeaders(h) => {
                let headers = Headers::from_envoy(h.headers.as_ref());
                let status = headers.pseudo("status").parse().unwrap_or(200);
                let mut set = Vec::new();
                if let Some(end) = &mut self.end {
                    end.set_status(status);
                    if self.gw.config().debug_headers {
                        set.extend(self.debug_headers());
                    }
                }
                if h.end_of_stream {
                    self.finish(OUTCOME_COMPLETED);
                }
                vec![wire::response_headers(set)]
            }
            Request::ResponseBody(b) => {
                let mut outcome = None;
                if let Some(end) = &mut self.end {
                    if end.revoked() {
                        outcome = Some(OUTCOME_REVOKED);
                    } else {
                        end.body_chunk(&b.body);
                    }
                }
                if let Some(o) = outcome {
                    // The contract was suspended with its streams cut.
                    self.finish(o);
                    self.done = true;
                    return vec![wire::immediate(
                        403,
                        error_body(&OpenAiError::new(
                            http::StatusCode::FORBIDDEN,
                            "contract suspended",
                        )),
                        &[],
                    )];
                }
                if b.end_of_stream {
                    self.finish(OUTCOME_COMPLETED);
                }
                vec![wire::streamed_body(b.body, b.end_of_stream, false)]
            }
            Request::ResponseTrailers(_) => {
                self.finish(OUTCOME_COMPLETED);
                vec![wire::trailers(false)]
            }
        }
    }

    fn debug_headers(&self) -> Vec<HeaderValueOption> {
        let dest = self.destination.as_deref().unwrap_or_default();
        vec![wire::set_header("x-kvgate-endpoint", dest)]
    }

    fn finish(&mut self, outcome: &'static str) {
        if let Some(mut end) = self.end.take() {
            end.count(outcome);
        }
    }

    fn eligible(&self) -> impl Fn(&Endpoint) -> bool + '_ {
        move |e: &Endpoint| match (&self.subset, host_port(&e.cfg.url)) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(subset), Some(addr)) => subset.iter().any(|s| s == addr),
        }
    }

    /// The request is whole: pick its endpoint and answer headers then body.
    fn decide(&mut self) -> Vec<ProcessingResponse> {
        let Some(headers) = self.headers.take() else {
            return self.refuse(OpenAiError::bad_request("no request headers", None));
        };
        let path = headers.pseudo("path").to_string();
        let kind = match kvgate_auth::paths::allowed_path(&path) {
            Ok("/v1/chat/completions") => Kind::Chat,
            Ok("/v1/completions") => Kind::Completion,
            Ok(_) => return self.any_endpoint(),
            Err(e) => {
                let reason = match e {
                    kvgate_auth::paths::PathRefused::NotCanonical => "not_canonical",
                    kvgate_auth::paths::PathRefused::NotAllowed => "not_allowed",
                };
                self.gw.sentinel().audit().record(
                    kvgate_auth::audit::AuditRecord::new(kvgate_auth::audit::kind::PATH_REFUSED)
                        .status(404)
                        .reason(reason)
                        .detail(
                            serde_json::json!({"path": path.chars().take(256).collect::<String>()}),
                        ),
                );
                return self.refuse(OpenAiError::not_found(
                    format!("no such endpoint ({reason})"),
                    None,
                ));
            }
        };
        let body = Bytes::from(std::mem::take(&mut self.body));
        let picked = {
            let eligible = self.eligible();
            pick(&self.gw, kind, &headers.map, body, self.received, &eligible)
        };
        let picked = match picked {
            Ok(p) => p,
            Err(e) => return self.refuse(e),
        };
        let Some(primary) = host_port(&picked.endpoint.cfg.url).map(String::from) else {
            return self.refuse(OpenAiError::service_unavailable(
                "the picked endpoint has no host:port",
                None,
            ));
        };
        // `primary[,fallback...]`: the next best by the decision's own cost,
        // for Envoy to try if the primary cannot be reached.
        let mut dest = primary.clone();
        for f in self.fallbacks(&picked) {
            dest.push(',');
            dest.push_str(&f);
        }
        let mut remove = vec!["content-length".to_string()];
        for name in headers.map.keys() {
            // The client's credential is the contract layer's, never the
            // engine's; engine identity and placement headers are kvgate's.
            if (*name == http::header::AUTHORIZATION && self.gw.sentinel().enabled())
                || kvgate_auth::fields::PRIVILEGED_HEADERS.contains(&name.as_str())
            {
                remove.push(name.as_str().to_string());
            }
        }
        let mut out = vec![wire::destination(&primary, &dest, Vec::new(), remove)];
        out.extend(wire::body_chunks(&picked.body, true));
        self.destination = Some(primary);
        self.end = Some(picked.end);
        out
    }

    /// Up to [`MAX_FALLBACKS`] other eligible, available endpoints the
    /// decision scored, cheapest first (none for policies that do not score).
    fn fallbacks(&self, picked: &kvgate_gateway::pick::Picked) -> Vec<String> {
        let eligible = self.eligible();
        let fleet = self.gw.fleet().snapshot();
        let mut scored: Vec<&kvgate_router::Score> = picked
            .decision
            .scores
            .iter()
            .filter(|s| s.endpoint != picked.endpoint.name())
            .collect();
        scored.sort_by(|a, b| a.cost.total_cmp(&b.cost));
        scored
            .into_iter()
            .filter_map(|s| fleet.iter().find(|e| e.name() == s.endpoint))
            .filter(|e| e.is_available() && eligible(e))
            .filter_map(|e| host_port(&e.cfg.url).map(String::from))
            .take(MAX_FALLBACKS)
            .collect()
    }

    /// A request that names no model: any available endpoint, by load.
    fn any_endpoint(&mut self) -> Vec<ProcessingResponse> {
        let picked = {
            let eligible = self.eligible();
            pick_any(&self.gw, &eligible)
        };
        let Some(dest) = picked.as_ref().and_then(|e| host_port(&e.cfg.url)) else {
            return self.refuse(OpenAiError::service_unavailable(
                "no available endpoint",
                Some(kvgate_gateway::config::DEFAULT_RETRY_AFTER_SECS),
            ));
        };
        let dest = dest.to_string();
        let mut out = vec![wire::destination(&dest, &dest, Vec::new(), Vec::new())];
        if !self.body.is_empty() {
            out.extend(wire::body_chunks(&std::mem::take(&mut self.body), true));
        }
        self.destination = Some(dest);
        out
    }

    fn refuse(&mut self, e: OpenAiError) -> Vec<ProcessingResponse> {
        self.done = true;
        let mut headers = Vec::new();
        if let Some(secs) = e.retry_after() {
            headers.push(("retry-after", secs.to_string()));
        }
        vec![wire::immediate(
            e.status().as_u16(),
            error_body(&e),
            &headers,
        )]
    }
}

/// OpenAI's error shape, `{"error": {...}}`.
fn error_body(e: &OpenAiError) -> Vec<u8> {
    serde_json::to_vec(e).unwrap_or_default()
}

/// `host:port` of an endpoint URL (`http://10.0.0.5:8000` -> `10.0.0.5:8000`).
fn host_port(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    authority.contains(':').then_some(authority)
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_of_urls() {
        assert_eq!(host_port("http://10.0.0.5:8000"), Some("10.0.0.5:8000"));
        assert_eq!(host_port("http://10.0.0.5:8000/x"), Some("10.0.0.5:8000"));
        assert_eq!(host_port("http://[::1]:8000"), Some("[::1]:8000"));
        assert_eq!(host_port("http://pod"), None);
    }
}
